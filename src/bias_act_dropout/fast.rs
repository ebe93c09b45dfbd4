//! The CPU model of the `Math::Fast` activations of `kernels/bias_act_dropout.cu` (`fast_fwd`,
//! `fast_grad`): the same f32 operations in the same order, with the special-function-unit
//! instructions supplied by an [`Sfu`] model. With [`sfu::Model`] it gives the emulator's bits;
//! with [`sfu::Pessimistic`] every instruction is off by its full documented error, which is how
//! the bounds in [`super::Activation::fast_bound`] are checked without a GPU (tests below).
//!
//! The f64 references the bounds are stated against are [`act_f64`] and [`grad_f64`].
//!
//! Outside the tests only the references are used (the model is the tests' instrument).
#![cfg_attr(not(test), allow(dead_code))]

use super::Activation;
use crate::math::sfu::{self, Sfu};

// The kernel's constants, bit for bit (see its comments for what each is).
const NEG_A0: f32 = f32::from_bits(0xc013_5761);
const NEG_A1: f32 = f32::from_bits(0xbdd2_d3e8);
const B0: f32 = f32::from_bits(0x3fcc_422a);
const B1: f32 = f32::from_bits(0x3e5b_33b6);
const NEG_LOG2E: f32 = f32::from_bits(0xbfb8_aa3b);
const ERF_K: f32 = f32::from_bits(0x3eb5_04f3);
const ERF_F3: f32 = f32::from_bits(0xbefc_568d);
const ERF_F2: f32 = f32::from_bits(0x3f7b_e3bb);
const ERF_F1: f32 = f32::from_bits(0x3fa9_9978);
const ERF_F0: f32 = f32::from_bits(0xc034_3303);
const NEG_HALF_LOG2E: f32 = f32::from_bits(0xbf38_aa3b);
const LOG2_PDF0: f32 = f32::from_bits(0xbfa9_b21d);
const ERFB_K: f32 = f32::from_bits(0x3e99_999a);
const ERFB_P3: f32 = f32::from_bits(0x3f06_03df);
const ERFB_P2: f32 = f32::from_bits(0x3db6_b0c7);
const ERFB_P1: f32 = f32::from_bits(0x3eb0_705b);
const ERFB_P0: f32 = f32::from_bits(0x3e97_b3e6);

/// The launch constants of a fast forward or backward: `keep_frac = 1 - p`, `scale = 1 / (1 -
/// p)`, `log2(scale)` (the forward's GELU-erf) and `log2(1 - p)` (the backward's GELU-tanh and
/// SiLU), each as f32 (as the host passes them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FwdConsts {
    pub(crate) keep_frac: f32,
    pub(crate) scale: f32,
    pub(crate) log2_scale: f32,
    pub(crate) log2_keep: f32,
}

impl FwdConsts {
    /// The constants the host computes for a drop rate with this `scale` (0 for p = 1).
    pub(crate) fn new(p: f64, scale: f32) -> Self {
        FwdConsts {
            keep_frac: (1.0 - p) as f32,
            scale,
            log2_scale: f64::from(scale).log2() as f32,
            log2_keep: (1.0 - p).log2() as f32,
        }
    }
}

/// NaN-keeping clamp (`max.NaN` then `min.NaN` in the kernel).
fn clamp_nan(x: f32, lo: f32, hi: f32) -> f32 {
    if x.is_nan() {
        x
    } else {
        x.max(lo).min(hi)
    }
}

/// `fmaxf(h, lo)`: a NaN `h` gives `lo` (the NaN reaches the result through the other factor).
fn fmax(h: f32, lo: f32) -> f32 {
    h.max(lo)
}

/// `scale * act(h)`, the kept value of the fast forward (`fast_fwd` in the kernel).
pub(crate) fn fwd<S: Sfu>(s: &S, act: Activation, h: f32, c: FwdConsts) -> f32 {
    match act {
        Activation::GeluTanh => {
            let z = h * NEG_A1.mul_add(h * h, NEG_A0);
            let r = s.rcp(s.ex2(z).mul_add(c.keep_frac, c.keep_frac));
            fmax(h, -16.0) * r
        }
        Activation::Silu => {
            let r = s.rcp(s.ex2(h * NEG_LOG2E).mul_add(c.keep_frac, c.keep_frac));
            fmax(h, -128.0) * r
        }
        Activation::GeluErf => {
            let erf_c0 = ERF_F0 + c.log2_scale;
            let t = s.rcp(h.abs().mul_add(ERF_K, 1.0));
            let f = ERF_F3
                .mul_add(t, ERF_F2)
                .mul_add(t, ERF_F1)
                .mul_add(t, erf_c0);
            let qs = t * s.ex2((h * h).mul_add(NEG_HALF_LOG2E, f));
            let cdf = if h < 0.0 { qs } else { c.scale - qs };
            fmax(h, -16.0) * cdf
        }
        Activation::Relu => super::cpu::act_fwd(act, h) * c.scale,
    }
}

/// `scale * act'(h)` of the fast backward as the kernel's two factors `(a, b)` (`fast_grad`):
/// the kept `dx` is `(dy * a) * b`. GELU-tanh and SiLU fold the scale into `a`
/// (`a = 1 / ((1 - p) e + (1 - p))`, the exponent taking `log2(1 - p)`); GELU-erf gives
/// `(1, scale act'(h))` (the kernel forms `dy * b`, the same bits as `(dy * 1) * b`), its scale
/// in the exponent of the one `ex2` that `Phi` and `phi` share.
pub(crate) fn grad<S: Sfu>(s: &S, act: Activation, h: f32, c: FwdConsts) -> (f32, f32) {
    match act {
        Activation::GeluTanh => {
            let hc = clamp_nan(h, -9.0, 9.0);
            let h2 = hc * hc;
            let ek = s.ex2(hc.mul_add(NEG_A1.mul_add(h2, NEG_A0), c.log2_keep));
            let a = s.rcp(ek + c.keep_frac);
            let w = hc * B1.mul_add(h2, B0);
            (a, w.mul_add(ek * a, 1.0))
        }
        Activation::Silu => {
            let hc = clamp_nan(h, -80.0, 80.0);
            let ek = s.ex2(hc.mul_add(NEG_LOG2E, c.log2_keep));
            let a = s.rcp(ek + c.keep_frac);
            (a, hc.mul_add(ek * a, 1.0))
        }
        Activation::GeluErf => {
            // One exponential for Phi and phi: a = min(|h|, 16), r = scale act'(-a) =
            // scale phi(a) (t P(t) - a), act'(a) = 1 - act'(-a); the scale in the exponent.
            let ac = if h.is_nan() { h } else { h.abs().min(16.0) };
            let t = s.rcp(ac.mul_add(ERFB_K, 1.0));
            let pt = ERFB_P3
                .mul_add(t, ERFB_P2)
                .mul_add(t, ERFB_P1)
                .mul_add(t, ERFB_P0);
            let v = t.mul_add(pt, -ac);
            let erf_c = LOG2_PDF0 - c.log2_keep;
            let phis = s.ex2((ac * ac).mul_add(NEG_HALF_LOG2E, erf_c));
            let r = phis * v;
            (1.0, if h < 0.0 { r } else { c.scale - r })
        }
        Activation::Relu => (c.scale, super::cpu::act_grad(act, h)),
    }
}

/// The deterministic model's forward value (the emulator's bits).
pub(crate) fn fwd_model(act: Activation, h: f32, c: FwdConsts) -> f32 {
    fwd(&sfu::Model, act, h, c)
}

/// The deterministic model's factors of `scale * act'(h)` (see [`grad`]).
pub(crate) fn grad_model(act: Activation, h: f32, c: FwdConsts) -> (f32, f32) {
    grad(&sfu::Model, act, h, c)
}

/// `Phi(h)`, the standard normal CDF, in f64 (through `erfc`, accurate in both tails).
fn cdf_f64(h: f64) -> f64 {
    0.5 * libm::erfc(-h / std::f64::consts::SQRT_2)
}

/// `1 / (1 + e^-v)` and `e^-v / (1 + e^-v)` (= 1 - the first) in f64, both accurate.
fn sigmoid_pair(v: f64) -> (f64, f64) {
    if v >= 0.0 {
        let e = (-v).exp();
        (1.0 / (1.0 + e), e / (1.0 + e))
    } else {
        let e = v.exp();
        (e / (1.0 + e), 1.0 / (1.0 + e))
    }
}

/// `act(h)` in f64: the reference the fast bounds are stated against. GELU (tanh) uses
/// `(1 + tanh u) / 2 = sigmoid(2u)`, GELU (erf) `erfc`, so both tails keep their relative
/// accuracy. `±inf` and NaN give the limits (`h`, `-0` below) and NaN.
pub fn act_f64(act: Activation, h: f64) -> f64 {
    if h.is_nan() {
        return h;
    }
    if h.is_infinite() {
        return if h > 0.0 { h } else { -0.0 };
    }
    let k = (2.0 / std::f64::consts::PI).sqrt();
    match act {
        Activation::GeluTanh => h * sigmoid_pair(2.0 * k * (h + 0.044715 * h * h * h)).0,
        Activation::GeluErf => h * cdf_f64(h),
        Activation::Silu => h * sigmoid_pair(h).0,
        Activation::Relu => {
            if h > 0.0 {
                h
            } else {
                0.0
            }
        }
    }
}

/// `act'(h)` in f64 (see [`act_f64`]); `±inf` give 1 and 0.
pub fn grad_f64(act: Activation, h: f64) -> f64 {
    if h.is_nan() {
        return h;
    }
    if h.is_infinite() {
        return if h > 0.0 { 1.0 } else { 0.0 };
    }
    let k = (2.0 / std::f64::consts::PI).sqrt();
    match act {
        Activation::GeluTanh => {
            let (c, omc) = sigmoid_pair(2.0 * k * (h + 0.044715 * h * h * h));
            let dv = 2.0 * k * (1.0 + 3.0 * 0.044715 * h * h);
            c + h * c * omc * dv
        }
        Activation::GeluErf => {
            let pdf = (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf_f64(h) + h * pdf
        }
        Activation::Silu => {
            let (c, omc) = sigmoid_pair(h);
            c + h * c * omc
        }
        Activation::Relu => {
            if h > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::sfu::Pessimistic;
    use rand::{Rng, SeedableRng};

    const FAST: [Activation; 3] = [Activation::GeluErf, Activation::GeluTanh, Activation::Silu];

    /// Every input the bounds must hold for: edge values (0, ±tiny, ±large, ±inf, NaN, where
    /// each activation saturates and where its intermediate values overflow or flush) and
    /// random values over [-20, 20] and over the whole f32 range.
    fn inputs() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-45,
            -1e-45,
            1e-30,
            -1e-30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            1e20,
            -1e20,
        ];
        for x in [
            0.5f32, 0.75, 0.7518, 1.0, 1.278, 2.0, 4.0, 5.0, 7.9, 8.0, 9.0, 10.0, 10.2, 12.0, 13.0,
            15.9, 16.0, 16.1, 20.0, 40.0, 80.0, 87.0, 88.7, 89.0, 100.0, 127.9, 128.0, 129.0,
            1000.0,
        ] {
            v.push(x);
            v.push(-x);
        }
        let mut g = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for _ in 0..40_000 {
            v.push(g.random_range(-20.0f32..20.0));
        }
        for _ in 0..4_000 {
            v.push(f32::from_bits(g.random::<u32>()));
        }
        v
    }

    /// The worst `|got - exact| / (rel |exact| + abs)` over `inputs()` and every sign pattern of
    /// the pessimistic model (calls per formula <= 3: 8 patterns), for the forward value at a
    /// few drop rates and for the gradient. <= 1 means the bound holds.
    fn worst(act: Activation) -> (f64, f64) {
        let b = act.fast_bound();
        let (mut wf, mut wg) = (0.0f64, 0.0f64);
        let ratio = |bound: crate::math::ErrorBound, got: f64, exact: f64| -> f64 {
            if got == exact.signum() * f64::INFINITY
                && exact.abs() * (1.0 + bound.rel) + bound.abs >= f64::from(f32::MAX)
            {
                return 0.0; // the bound reaches past f32::MAX: +-inf is a rounding of it
            }
            if bound.allows(got, exact) {
                if exact.is_finite() && got.is_finite() {
                    (got - exact).abs() / (bound.rel * exact.abs() + bound.abs)
                } else {
                    0.0
                }
            } else {
                f64::INFINITY
            }
        };
        for &h in &inputs() {
            for signs in 0..8u32 {
                for p in [0.0f64, 0.1, 0.5] {
                    let rate = crate::dropping::DropRate::new(p).unwrap();
                    let c = FwdConsts::new(p, rate.scale());
                    // Each bound is on act (act'); the scale adds its own f32 rounding
                    // (documented with the op's output bound; for the gradient also the f32
                    // log2(1 - p) of the folded forms): 2^-23 relative here.
                    let scaled = |e: crate::math::ErrorBound| crate::math::ErrorBound {
                        rel: e.rel + 2f64.powi(-23),
                        abs: e.abs / (1.0 - p),
                    };
                    let got = fwd(&Pessimistic::new(signs), act, h, c) as f64;
                    let exact = act_f64(act, f64::from(h)) / (1.0 - p);
                    let r = ratio(scaled(b.act), got, exact);
                    if r > 1.0 {
                        panic!("{act:?} fwd h={h:e} p={p} signs={signs}: {got:e} vs {exact:e}");
                    }
                    wf = wf.max(r);
                    let (ga, gb) = grad(&Pessimistic::new(signs), act, h, c);
                    // The factors' product, unrounded (the kernel's dx = (dy * a) * b rounds
                    // twice more: the 2^-22 of the dx bound).
                    let got = f64::from(ga) * f64::from(gb);
                    let exact = grad_f64(act, f64::from(h)) / (1.0 - p);
                    let r = ratio(scaled(b.grad), got, exact);
                    if r > 1.0 {
                        panic!("{act:?} grad h={h:e} p={p} signs={signs}: {got:e} vs {exact:e}");
                    }
                    wg = wg.max(r);
                }
            }
        }
        (wf, wg)
    }

    #[test]
    fn bounds_hold_under_the_pessimistic_model() {
        for act in FAST {
            let (wf, wg) = worst(act);
            eprintln!("{act:?}: worst forward {wf:.3} of its bound, gradient {wg:.3}");
            // The bounds are not so loose that they could hide a wrong formula.
            assert!(wf > 0.05 && wg > 0.05, "{act:?}: bound far above the error");
        }
    }

    #[test]
    fn the_model_is_within_the_bounds_too() {
        for act in FAST {
            let b = act.fast_bound();
            for &h in &inputs() {
                let c = FwdConsts::new(0.0, 1.0);
                assert!(
                    b.act
                        .allows(fwd_model(act, h, c) as f64, act_f64(act, f64::from(h))),
                    "{act:?} {h:e}"
                );
                let (ga, gb) = grad_model(act, h, c);
                assert!(
                    b.grad
                        .allows(f64::from(ga) * f64::from(gb), grad_f64(act, f64::from(h))),
                    "{act:?} {h:e}"
                );
            }
        }
    }

    #[test]
    fn specials_saturate_like_the_exact_mode() {
        for act in FAST {
            let c = FwdConsts::new(0.0, 1.0);
            assert_eq!(fwd_model(act, f32::INFINITY, c), f32::INFINITY);
            assert_eq!(
                fwd_model(act, f32::NEG_INFINITY, c).to_bits(),
                (-0.0f32).to_bits()
            );
            assert!(fwd_model(act, f32::NAN, c).is_nan());
            assert_eq!(fwd_model(act, -0.0, c).to_bits(), (-0.0f32).to_bits());
            let g = |h: f32| {
                let (a, b) = grad_model(act, h, c);
                a * b
            };
            assert_eq!(g(f32::INFINITY), 1.0);
            // Beyond the clamp act' is its value at the clamp: 0 to within 2^-88.
            assert!(g(f32::NEG_INFINITY).abs() < 2f32.powi(-88));
            assert!(g(f32::NAN).is_nan());
        }
    }

    #[test]
    fn a_wrong_formula_breaks_the_bound() {
        // The test above can fail: GELU (erf) through GELU (tanh)'s formula is off by up to
        // ~3e-4 absolute, far outside GELU (erf)'s bound.
        let b = Activation::GeluErf.fast_bound();
        let c = FwdConsts::new(0.0, 1.0);
        let bad = inputs().into_iter().filter(|h| h.is_finite()).any(|h| {
            let got = fwd_model(Activation::GeluTanh, h, c) as f64;
            !b.act
                .allows(got, act_f64(Activation::GeluErf, f64::from(h)))
        });
        assert!(bad);
    }
}
