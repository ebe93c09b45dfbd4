//! The `Math::Fast` bounds of `bias_act_dropout` (its module docs, "Math::Fast") applied to
//! whole outputs, for the emulator test (`tests/bias_act_dropout_emu.rs`) and the GPU suite
//! (`tests/gpu/bias_act_dropout.rs`): the mask and the dropped `+0` bit for bit, `y`, `dx` and
//! `dbias` within the stated bounds of the f64 reference.
#![allow(dead_code)]

use fusedreg::bias_act_dropout::Config;
use fusedreg::{Dtype, DtypeKind};

/// Half an ulp of `T`, relative.
pub fn half_ulp(kind: DtypeKind) -> f64 {
    match kind {
        DtypeKind::F32 => 2f64.powi(-24),
        DtypeKind::F16 => 2f64.powi(-11),
        DtypeKind::Bf16 => 2f64.powi(-8),
    }
}

/// Half the smallest subnormal of `T`.
pub fn half_min_sub(kind: DtypeKind) -> f64 {
    match kind {
        DtypeKind::F32 => 2f64.powi(-150),
        DtypeKind::F16 => 2f64.powi(-25),
        DtypeKind::Bf16 => 2f64.powi(-134),
    }
}

/// The largest finite `T`.
pub fn max_finite(kind: DtypeKind) -> f64 {
    match kind {
        DtypeKind::F32 => f64::from(f32::MAX),
        DtypeKind::F16 => 65504.0,
        DtypeKind::Bf16 => f64::from(f32::from_bits(0x7f7f_0000)),
    }
}

/// Collects failures with the first few messages.
#[derive(Default)]
pub struct Failures {
    pub count: usize,
    pub first: Vec<String>,
}

impl Failures {
    fn add(&mut self, msg: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.len() < 6 {
            self.first.push(msg());
        }
    }
    pub fn result(self, what: &str) -> Result<(), String> {
        if self.count == 0 {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} outside the bound: {}",
                self.count,
                self.first.join("; ")
            ))
        }
    }
}

fn is_pos_zero<T: Dtype>(v: T) -> bool {
    v.to_f32().to_bits() == 0
}

/// Checks a `Math::Fast` forward: `y[i]` is `+0` exactly where `cfg` drops `i`, and within
/// `(A.rel + 2^-22 + u_T) |s act(h)| + s A.abs + m_T` of the f64 reference elsewhere. `h` is
/// the f32 pre-activation (`x + b` in f32, or the saved `h`).
pub fn check_forward<T: Dtype>(cfg: &Config, h: &[f32], y: &[T], fails: &mut Failures) {
    let act = cfg.act();
    let b = act.fast_bound().act;
    // The keying's scale: 1 / (1 - the effective p), at every resolution.
    let s = 1.0 / (1.0 - cfg.effective_p(T::KIND));
    let (u, m) = (half_ulp(T::KIND), half_min_sub(T::KIND));
    for i in 0..y.len() {
        if !cfg.keeps(T::KIND, i as u64) {
            if !is_pos_zero(y[i]) {
                fails.add(|| format!("y[{i}] dropped but {:e}", y[i].to_f32()));
            }
            continue;
        }
        let got = f64::from(y[i].to_f32());
        let exact = act.forward_f64(f64::from(h[i])) * s;
        let ok = if exact.is_nan() || got.is_nan() || exact.is_infinite() || got.is_infinite() {
            // Specials: NaN for NaN; an infinite h gives the saturated values; a finite value
            // may overflow T (f16) on both sides alike.
            (exact.is_nan() && got.is_nan())
                || got == exact
                || (exact.is_finite()
                    && got == exact.signum() * f64::INFINITY
                    && exact.abs() * (1.0 + b.rel + 2f64.powi(-22) + u) + s * b.abs
                        >= max_finite(T::KIND))
        } else {
            (got - exact).abs() <= (b.rel + 2f64.powi(-22) + u) * exact.abs() + s * b.abs + m
        };
        if !ok {
            fails.add(|| format!("y[{i}] h={:e}: {got:e} vs {exact:e}", h[i]));
        }
    }
}

/// Checks a `Math::Fast` backward: `dx[i]` is `+0` exactly where `cfg` drops `i`, within
/// `(G.rel + 2^-22 + u_T) |dy s act'(h)| + |dy s| G.abs + m_T` elsewhere (finite `dy`; a
/// non-finite `dy` has no bound), and, when given, each `dbias[col]` within the documented
/// bound of the sum of the exact `dy s act'(h)` over the kept rows (columns whose sum is not
/// finite are skipped).
pub fn check_backward<T: Dtype>(
    cfg: &Config,
    h: &[f32],
    dy: &[T],
    dx: &[T],
    dbias: Option<&[T]>,
    fails: &mut Failures,
) {
    let act = cfg.act();
    let g = act.fast_bound().grad;
    // The keying's scale: 1 / (1 - the effective p), at every resolution.
    let s = 1.0 / (1.0 - cfg.effective_p(T::KIND));
    let (u, m) = (half_ulp(T::KIND), half_min_sub(T::KIND));
    let (rows, cols) = (cfg.rows(), cfg.cols());
    // Per column: sum of exact d, sum of |d|, sum of the per-term bound.
    let mut col = vec![(0.0f64, 0.0f64, 0.0f64); cols];
    for i in 0..dx.len() {
        if !cfg.keeps(T::KIND, i as u64) {
            if !is_pos_zero(dx[i]) {
                fails.add(|| format!("dx[{i}] dropped but {:e}", dx[i].to_f32()));
            }
            continue;
        }
        let dys = f64::from(dy[i].to_f32()) * s;
        let exact = dys * act.grad_f64(f64::from(h[i]));
        let term = (g.rel + 2f64.powi(-22)) * exact.abs() + dys.abs() * g.abs;
        let c = &mut col[i % cols];
        c.0 += exact;
        c.1 += exact.abs();
        c.2 += term;
        if !dys.is_finite() {
            continue;
        }
        if !(dy[i].to_f32() * cfg.keying(T::KIND).scale()).is_finite() {
            // `dy * scale` overflows f32, where both math modes form it first (the exact mode
            // gives the same non-finite value, bit for bit): no bound for the element or its
            // column's sum.
            c.0 = f64::NAN;
            continue;
        }
        let got = f64::from(dx[i].to_f32());
        // The kernel forms dx = (dy a) b (module docs): where dy a falls into f32's subnormal
        // range its rounding (up to 2^-150) is carried into dx magnified by |b|.
        let sub = (1.0 + fast_factor_b(act, f64::from(h[i]))) * 2f64.powi(-150);
        let ok = if exact.is_nan() || got.is_nan() {
            exact.is_nan() && got.is_nan()
        } else if exact.is_infinite() || got.is_infinite() {
            got == exact
                || (exact.is_finite()
                    && got == exact.signum() * f64::INFINITY
                    && exact.abs() + term + u * exact.abs() >= max_finite(T::KIND))
        } else {
            (got - exact).abs() <= term + u * exact.abs() + m + sub
        };
        if !ok {
            fails.add(|| {
                format!(
                    "dx[{i}] h={:e} dy={:e}: {got:e} vs {exact:e}",
                    h[i],
                    dy[i].to_f32()
                )
            });
        }
    }
    if let Some(db) = dbias {
        for (c, &(sum, abs_sum, terms)) in col.iter().enumerate() {
            if !sum.is_finite() || !abs_sum.is_finite() {
                continue;
            }
            let got = f64::from(db[c].to_f32());
            let bound = terms + rows as f64 * 2f64.powi(-24) * abs_sum + u * sum.abs() + m;
            // NaN fails too; an infinity only where rounding to T may overflow.
            let overflow =
                got == sum.signum() * f64::INFINITY && sum.abs() + bound >= max_finite(T::KIND);
            if ((got - sum).abs() > bound || got.is_nan()) && !overflow {
                fails.add(|| format!("dbias[{c}]: {got:e} vs {sum:e} (bound {bound:e})"));
            }
        }
    }
}

/// `|b|` of the Fast backward's `dx = (dy a) b` at `h` (module docs): `h act'(h) / act(h)` for
/// GELU (tanh) and SiLU (`a = s act(h) / h`), `act'(h)` for GELU (erf) (`a = s`); 1 where the
/// ratio is not finite (`h = 0`, saturation).
pub fn fast_factor_b(act: fusedreg::bias_act_dropout::Activation, h: f64) -> f64 {
    use fusedreg::bias_act_dropout::Activation;
    let grad = act.grad_f64(h);
    let b = match act {
        Activation::GeluErf => grad,
        _ => h * grad / act.forward_f64(h),
    };
    if b.is_finite() {
        b.abs()
    } else {
        1.0
    }
}
