//! The arithmetic of the [`Math::Fast`](crate::Math::Fast) kernel on the CPU, over a model of
//! the special-function unit: the same operations in the same order as `absorb_fast`,
//! `combine_fast` and the fast epilogue and gradient of `kernels/cross_entropy.cu`.
//!
//! Not part of the API (hidden from the docs): the tests use it. With [`EmuSfu`] (the model the
//! host emulation of the kernels uses, `scripts/emu/shim.h`) it reproduces the emulated kernel
//! bit for bit, which checks the kernel's logic without a GPU; with a model that perturbs every
//! special-function result by its documented worst error it checks the error bound stated in the
//! [module docs](super) ("Math::Fast"). The hardware's own results differ from [`EmuSfu`] by at
//! most that error, so the GPU is held to the bound, not to these bits.

use super::cpu::{self, z_factor, Loss, Mode, RowGrad, State};
use super::{Config, Consts, TargetIndex, GROUP};
use crate::dtype::Dtype;
use crate::error::Result;

/// `log2(e)` rounded to f32 (the kernel's `L2E`).
pub const L2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// `ln(2)` rounded to f32 (the kernel's `LN2`).
pub const LN2: f32 = f32::from_bits(0x3f31_7218);

/// The two special-function-unit instructions the fast kernel uses.
pub trait Sfu {
    /// `ex2.approx.ftz.f32`: 2^x.
    fn ex2(&self, x: f32) -> f32;
    /// `lg2.approx.ftz.f32`: log2(x).
    fn lg2(&self, x: f32) -> f32;
}

/// The emulation's model of the instructions (`emu_ex2_approx`, `emu_lg2_approx` in
/// `scripts/emu/shim.h`): the f32 nearest to the f64 result, subnormal inputs and results flushed
/// to zero. Not the hardware's bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuSfu;

/// Flushes an f32 subnormal to a zero of the same sign.
pub fn ftz(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(x)
    } else {
        x
    }
}

impl Sfu for EmuSfu {
    fn ex2(&self, x: f32) -> f32 {
        ftz(f64::from(ftz(x)).exp2() as f32)
    }
    fn lg2(&self, x: f32) -> f32 {
        f64::from(ftz(x)).log2() as f32
    }
}

/// The fast mode over an [`Sfu`]. Its slot state's `m` is the running maximum times `log2(e)`
/// (the product rounded to f32), floored at `-f32::MAX`; `s` is the sum of `2^(x·log2(e) - m)`.
pub struct Fast<S: Sfu>(pub S);

/// [`Fast`]'s row: `nl = -lse·log2(e)`, `a = zf·scale`, `nb = -(α/V·scale)`, `(1-α)·scale`.
pub struct FastRow<'a, S: Sfu> {
    sfu: &'a S,
    nl: f32,
    a: f32,
    nb: f32,
    conf_scale: f32,
}

impl<S: Sfu> Mode for Fast<S> {
    type Row<'a>
        = FastRow<'a, S>
    where
        S: 'a;

    fn init(&self) -> State {
        State {
            m: -f32::MAX,
            s: 0.0,
            sx: 0.0,
        }
    }

    /// A partial group is padded with -inf (no maximum, a term of 0); `sx` sums the real ones.
    fn absorb(&self, st: &mut State, x: &[f32]) {
        let mut v = [f32::NEG_INFINITY; GROUP];
        v[..x.len()].copy_from_slice(x);
        let mut gm = v[0];
        for &y in &v[1..] {
            gm = gm.max(y);
        }
        let mn = st.m.max((gm * L2E).max(-f32::MAX));
        let e: [f32; GROUP] = std::array::from_fn(|k| self.0.ex2(v[k].mul_add(L2E, -mn)));
        let t = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
        st.s = st.s * self.0.ex2(st.m - mn) + t;
        for &y in x {
            st.sx += y;
        }
        st.m = mn;
    }

    fn combine(&self, a: State, b: State) -> State {
        let m = a.m.max(b.m);
        State {
            m,
            s: a.s * self.0.ex2(a.m - m) + b.s * self.0.ex2(b.m - m),
            sx: a.sx + b.sx,
        }
    }

    /// `lse = (m + lg2(s))·ln 2`.
    fn finish(&self, c: &Consts, st: State, scale: f32) -> (f32, FastRow<'_, S>) {
        let lse2 = st.m + self.0.lg2(st.s);
        let lse = lse2 * LN2;
        let zf = z_factor(c, lse);
        let row = FastRow {
            sfu: &self.0,
            nl: -lse2,
            a: zf * scale,
            nb: -(c.eps * scale),
            conf_scale: c.conf * scale,
        };
        (lse, row)
    }
}

impl<S: Sfu> RowGrad for FastRow<'_, S> {
    /// `fma(2^(fma(x, log2 e, nl)), a, nb)`, minus `(1-α)·scale` at the target.
    #[inline]
    fn elem(&self, x: f32, is_target: bool) -> f32 {
        let g = self
            .sfu
            .ex2(x.mul_add(L2E, self.nl))
            .mul_add(self.a, self.nb);
        if is_target {
            g - self.conf_scale
        } else {
            g
        }
    }
}

/// [`cpu::forward_backward`] in the fast kernel's arithmetic over `sfu`: the per-row losses, the
/// reduced loss (the same fixed-order sum) and the gradient into `grad`.
///
/// Errors: as [`cpu::forward_backward`].
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, fast_model, Config, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 4)?.reduction(Reduction::Sum);
/// let x = [0.5f32, -1.0, 2.0, 0.0];
/// let (mut g, mut g_ref) = ([0.0f32; 4], [0.0f32; 4]);
/// let fast = fast_model::forward_backward(&cfg, &x, &[2i32], None, &mut g, &fast_model::EmuSfu)?;
/// let exact = cpu::forward_backward(&cfg, &x, &[2i32], None, &mut g_ref)?;
/// assert!((fast.rows[0] - exact.rows[0]).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn forward_backward<T: Dtype, I: TargetIndex, S: Sfu>(
    cfg: &Config,
    logits: &[T],
    targets: &[I],
    upstream: Option<&[f32]>,
    grad: &mut [T],
    sfu: &S,
) -> Result<Loss> {
    cpu::run_separate(&Fast(sfu), cfg, logits, targets, upstream, grad)
}

/// [`forward_backward`] with the gradient written over the logits.
///
/// Errors: as [`cpu::forward_backward_inplace`].
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{fast_model, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 2)?;
/// let mut x = [0.0f32, 0.0];
/// fast_model::forward_backward_inplace(&cfg, &mut x, &[0i64], None, &fast_model::EmuSfu)?;
/// assert_eq!(x, [-0.5, 0.5]);
/// # Ok(()) }
/// ```
pub fn forward_backward_inplace<T: Dtype, I: TargetIndex, S: Sfu>(
    cfg: &Config,
    logits: &mut [T],
    targets: &[I],
    upstream: Option<&[f32]>,
    sfu: &S,
) -> Result<Loss> {
    cpu::run_inplace(&Fast(sfu), cfg, logits, targets, upstream)
}

impl<S: Sfu> Sfu for &S {
    fn ex2(&self, x: f32) -> f32 {
        (**self).ex2(x)
    }
    fn lg2(&self, x: f32) -> f32 {
        (**self).lg2(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_the_f32_roundings() {
        assert_eq!(L2E, std::f32::consts::LOG2_E);
        assert_eq!(LN2, std::f32::consts::LN_2);
    }

    #[test]
    fn the_model_keeps_the_special_cases_the_kernel_relies_on() {
        let s = EmuSfu;
        assert_eq!(s.ex2(0.0), 1.0); // an unmoved maximum rescales by exactly 1
        assert_eq!(s.ex2(-0.0), 1.0);
        assert_eq!(s.ex2(f32::NEG_INFINITY), 0.0);
        assert_eq!(s.ex2(-f32::MAX), 0.0);
        assert_eq!(s.ex2(-130.0), 0.0); // a subnormal result is flushed
        assert!(s.ex2(f32::NAN).is_nan());
        assert_eq!(s.lg2(0.0), f32::NEG_INFINITY);
        assert_eq!(s.lg2(1.0), 0.0);
    }

    #[test]
    fn an_empty_slot_is_the_identity_of_combine() {
        let mode = Fast(EmuSfu);
        let mut a = mode.init();
        mode.absorb(&mut a, &[1.5, -2.0, 0.25]);
        let id = mode.init();
        for c in [mode.combine(a, id), mode.combine(id, a)] {
            assert_eq!((c.m, c.s), (a.m, a.s));
        }
    }
}
