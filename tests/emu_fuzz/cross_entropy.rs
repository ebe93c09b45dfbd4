//! `kernels/cross_entropy.cu`: the fused loss-and-gradient kernel (gradient none, separate or in
//! place), the valid-row count, the multi-level loss sum and the unfused baseline's kernels, for
//! every logits dtype and target type, over vocabularies around the vector width, the group (8),
//! the slot round (2048) and the row, views at any element, label smoothing, z-loss, any ignore
//! index, out-of-range targets (the device flag; the CPU reference is given them as ignored),
//! every reduction (none with and without a per-row upstream), and logits with `±inf`, NaNs and
//! `±1e4` at every position class, in both math modes. `Math::Exact`: `cross_entropy::cpu` must
//! give the same bits; `Math::Fast`: `fast_model` over the emulation's model of the
//! special-function unit (`EmuSfu`) must (the bound against the exact reference is the module's
//! own test; the GPU is held to the bound, not to these bits). The unfused baseline is exact in
//! both: `unfused::forward_backward_cpu`.

use fusedreg::cross_entropy::{cpu, fast_model, unfused, Config, Reduction, TargetIndex};
use fusedreg::{Dtype, DtypeKind, Math};

use crate::by_dtype;
use crate::harness::*;

#[derive(Debug)]
pub struct Case {
    dtype: DtypeKind,
    target_bytes: u64,
    rows: usize,
    vocab: usize,
    grid: u64,
    /// 0 none, 1 separate, 2 in place.
    grad: u64,
    reduction: Reduction,
    alpha: f64,
    lambda: f64,
    ignore_index: i64,
    math: Math,
    logits_off: u64,
    grad_off: u64,
    logits: Data<u32>,
    targets: Vec<i64>,
    upstream: Option<Data<f32>>,
}

impl Case {
    fn config(&self) -> Config {
        Config::new(self.rows, self.vocab)
            .and_then(|c| c.label_smoothing(self.alpha))
            .and_then(|c| c.z_loss(self.lambda))
            .map(|c| {
                c.ignore_index(self.ignore_index)
                    .reduction(self.reduction)
                    .with_math(self.math)
            })
            .expect("a valid config")
    }
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let dtype = g.pick(&DTYPES);
        let vw = 16 / dtype.size();
        let vocab = size(g, &[vw, 8, 2048, 4 * 8], 5003).max(1);
        let rows = size(g, &[4], (40_000 / vocab).clamp(1, 9));
        let n = rows * vocab;
        // Sums of uniforms, some large: realistic logits.
        let mut logits = Data(by_dtype!(dtype, T => (0..n)
            .map(|_| {
                let mut f: f32 = (0..4).map(|_| g.f32_in(-1.7, 1.7)).sum();
                if g.chance(1, 50) {
                    f += 6.0;
                }
                if g.chance(1, 200) {
                    f = g.pick(&[1e4, -1e4, f32::NEG_INFINITY]);
                }
                to_bits(T::from_f32_rn(f))
            })
            .collect()));
        if g.chance(1, 2) {
            plant(g, dtype, &mut logits.0, vocab, &[vw, 8, 2048]);
        }
        let ignore_index = g.pick(&[-100, -100, -1, 0, vocab as i64 - 1]);
        let targets = (0..rows)
            .map(|_| match g.below(12) {
                0 => ignore_index,
                1 => g.pick(&[vocab as i64, -7, i64::from(i32::MAX)]),
                _ => g.below(vocab as u64) as i64,
            })
            .collect();
        let reduction = g.pick(&[Reduction::None, Reduction::Sum, Reduction::Mean]);
        Case {
            dtype,
            target_bytes: g.pick(&[4, 8]),
            rows,
            vocab,
            grid: g.range(1, rows.clamp(1, 3) as u64),
            grad: g.below(3),
            reduction,
            alpha: g.pick(&[0.0, 0.1, 1.0, 0.37]),
            lambda: g.pick(&[0.0, 1e-4, 0.01]),
            ignore_index,
            math: g.pick(&[Math::Exact, Math::Fast]),
            logits_off: offset(g, 9),
            grad_off: offset(g, 9),
            logits,
            targets,
            upstream: (reduction == Reduction::None && g.bool()).then(|| {
                Data(
                    (0..rows)
                        .map(|_| value::<f32>(g, 3.0, Specials(4)))
                        .collect(),
                )
            }),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        let cfg = c.config();
        w.u64("dtype", dtype_code(c.dtype));
        w.u64("target_bytes", c.target_bytes);
        w.u64("rows", c.rows as u64);
        w.u64("vocab", c.vocab as u64);
        w.u64("grid", c.grid);
        w.u64("grad", c.grad);
        w.u64("reduction", c.reduction as u64);
        w.f32("alpha", cfg.alpha());
        w.f32("lambda", cfg.lambda());
        w.u64("ignore_index", c.ignore_index as u64);
        w.flag("fast", c.math == Math::Fast);
        w.view_bits("logits", c.dtype, &c.logits, c.logits_off);
        w.view("targets", &c.targets, 0);
        w.view(
            "upstream",
            c.upstream.as_ref().map_or(&[][..], |u| &u[..]),
            0,
        );
        w.u64("grad_off", c.grad_off);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.dtype, T => if c.target_bytes == 4 {
            let t: Vec<i32> = c.targets.iter().map(|&v| v as i32).collect();
            check::<T, i32>(c, r, &t)
        } else {
            check::<T, i64>(c, r, &c.targets)
        })
    }
}

fn check<T: Dtype, I: TargetIndex + Copy + TryFrom<i64>>(
    c: &Case,
    r: &mut Reader,
    targets: &[I],
) -> Result<(), String>
where
    i64: From<I>,
{
    let cfg = c.config();
    let n = c.rows * c.vocab;
    let loss_rows = r.vec::<f32>("loss_rows", c.rows)?;
    let reduced = r.f32("reduced")?;
    let n_valid = r.u64("n_valid")?;
    let flag = r.u64("flag")?;
    let grad = r.vec::<T>("grad", if c.grad == 0 { 0 } else { n })?;
    let u_rows = r.vec::<f32>("unfused_loss_rows", c.rows)?;
    let u_grad = r.vec::<T>("unfused_grad", n)?;

    // The kernel treats a target outside [0, V) that is not ignored as ignored (and raises the
    // flag); the CPU reference refuses it, so it gets those rows as ignored.
    let bad = |t: i64| t != c.ignore_index && !(0..c.vocab as i64).contains(&t);
    let t: Vec<I> = targets
        .iter()
        .map(|&t| {
            if bad(i64::from(t)) {
                I::try_from(c.ignore_index).ok().unwrap_or(t)
            } else {
                t
            }
        })
        .collect();
    let any_bad = targets.iter().any(|&t| bad(i64::from(t)));
    let logits: Vec<T> = typed(&c.logits);
    let up = c.upstream.as_ref().map(|u| &u[..]);
    let mut want_grad = vec![T::from_f32_rn(0.0); n];
    let l = match c.math {
        Math::Exact => cpu::forward_backward(&cfg, &logits, &t, up, &mut want_grad),
        Math::Fast => {
            fast_model::forward_backward(&cfg, &logits, &t, up, &mut want_grad, &fast_model::EmuSfu)
        }
    }
    .map_err(|e| format!("CPU: {e}"))?;
    let mut d = Diffs::default();
    d.eq("flag", &[flag != 0], &[any_bad]);
    d.bits("loss rows", &loss_rows, &l.rows);
    if c.reduction != Reduction::None && c.rows > 0 {
        d.bits("reduced loss", &[reduced], &[l.reduced.unwrap_or(f32::NAN)]);
    }
    if c.reduction == Reduction::Mean {
        d.eq("n_valid", &[n_valid], &[l.n_valid]);
    }
    if c.grad != 0 {
        d.bits("grad", &grad, &want_grad);
    }
    let mut ug = vec![T::from_f32_rn(0.0); n];
    let ul = unfused::forward_backward_cpu(&cfg, &logits, &t, up, &mut ug)
        .map_err(|e| format!("CPU unfused: {e}"))?;
    d.bits("unfused loss rows", &u_rows, &ul.rows);
    d.bits("unfused grad", &u_grad, &ug);
    d.into_result()
}
