//! How an op evaluates its transcendental functions: [`Math::Fast`] or [`Math::Exact`].
//!
//! An op with `exp`, `tanh`, `erf`, `sigmoid` or `log` in its formula (the activations of
//! [`crate::bias_act_dropout`], [`crate::cross_entropy`]) takes a `Math` in its config:
//!
//! * [`Math::Exact`] runs [`crate::fmath`] in the kernel: the same IEEE operations as the CPU
//!   reference, so GPU and CPU agree bit for bit. It costs 25–64 instructions per function call,
//!   more than a memory-bound kernel can afford (see the instruction budget in the README).
//! * [`Math::Fast`] runs the GPU's special-function unit (one instruction each,
//!   `kernels/common/fastmath.cuh`). The results are not the CPU reference's bits: each op states
//!   its error bound ([`ErrorBound`]) against the exact function evaluated in f64 (its module
//!   docs), a CPU test drives its formulas through a pessimistic model of the instructions, and
//!   the GPU tests hold the kernel to that bound on random data and edge values.
//!
//! Each op chooses its own default: `Fast` where the exact path cannot meet the op's
//! instruction budget, `Exact` elsewhere. The CPU references always compute the exact function
//! (the same bits as `Exact` on the GPU), whatever the mode: `Fast` changes only how close the
//! GPU is to them. Dropout masks do not depend on the mode: which elements are dropped, and the
//! `+0` they become, are bit-exact in both.
//!
//! # The instructions and the errors designed against
//!
//! | instruction (SASS) | function | worst error used | subnormals |
//! | --- | --- | --- | --- |
//! | `ex2.approx.ftz.f32` (`MUFU.EX2`) | `2^x` | 2 ulp ([`EX2_REL`] relative) | inputs read as 0, results flushed to +0 |
//! | `rcp.approx.ftz.f32` (`MUFU.RCP`) | `1/x` | 1 ulp ([`RCP_REL`]) | inputs read as ±0 (→ ±inf), results flushed to ±0 |
//! | `lg2.approx.ftz.f32` (`MUFU.LG2`) | `log2 x` | `2^-22` absolute on `[0.5, 2]`, 2 ulp elsewhere | inputs read as 0 (→ -inf) |
//! | `tanh.approx.f32` (`MUFU.TANH`) | `tanh x` | `2^-10.987` relative ([`TANH_REL`]) | — |
//!
//! The ex2 and lg2 figures are CUDA's documented bounds of `exp2f` / `__log2f` (which are these
//! instructions), rcp's and tanh's the PTX ISA's. NVIDIA staff have measured `MUFU.TANH` at about
//! `2^-16.5`; we design against the documented `2^-10.987`, which is why no activation uses
//! `1 + tanh(u)` near `tanh(u) = -1` (all relative accuracy would be gone there).
//!
//! ```
//! use fusedreg::Math;
//! assert_ne!(Math::Fast, Math::Exact);
//! assert!(Math::Exact.is_exact());
//! ```

/// How an op evaluates its transcendental functions (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Math {
    /// Hardware approximations (one special-function-unit instruction per function), within
    /// the bound the op states.
    Fast,
    /// [`crate::fmath`]: bit for bit with the CPU reference.
    Exact,
}

impl Math {
    /// `true` for [`Math::Exact`]: the GPU results equal the CPU reference's bits.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Math;
    /// assert!(!Math::Fast.is_exact());
    /// ```
    pub fn is_exact(self) -> bool {
        self == Math::Exact
    }
}

/// Relative error designed against for `ex2.approx.ftz.f32`: 2 ulp, `2^-22`.
pub const EX2_REL: f64 = 1.0 / (1u64 << 22) as f64;
/// Relative error designed against for `rcp.approx.ftz.f32`: 1 ulp, `2^-23`.
pub const RCP_REL: f64 = 1.0 / (1u64 << 23) as f64;
/// Relative error designed against for `tanh.approx.f32`: `2^-10.987` (PTX ISA).
pub const TANH_REL: f64 = 4.944_893_552_050_656e-4;

/// An error bound `|got - exact| <= rel * |exact| + abs`, `exact` the function evaluated in f64.
///
/// `abs` covers what a relative bound cannot: a result near a zero crossing of the function,
/// or one flushed to zero near the bottom of the f32 range. How an op composes its functions'
/// bounds into bounds on its outputs is in its module docs.
///
/// # Examples
///
/// ```
/// use fusedreg::math::ErrorBound;
/// let b = ErrorBound { rel: 1e-3, abs: 1e-6 };
/// assert!(b.allows(1.0005, 1.0));
/// assert!(!b.allows(1.01, 1.0));
/// assert!(b.allows(5e-7, 0.0)); // within abs of an exact zero
/// assert!(b.allows(f64::NAN, f64::NAN) && !b.allows(f64::NAN, 0.0));
/// assert!(b.allows(f64::INFINITY, f64::INFINITY));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorBound {
    /// Relative part, a fraction of `|exact|`.
    pub rel: f64,
    /// Absolute part.
    pub abs: f64,
}

impl ErrorBound {
    /// Whether `got` is within the bound of `exact` (NaN only for NaN, infinities only exactly).
    pub fn allows(&self, got: f64, exact: f64) -> bool {
        if exact.is_nan() || got.is_nan() {
            return exact.is_nan() && got.is_nan();
        }
        if exact.is_infinite() || got.is_infinite() {
            return got == exact;
        }
        (got - exact).abs() <= self.rel * exact.abs() + self.abs
    }
}

/// CPU models of the special-function-unit instructions, for the CPU model of an op's
/// `Math::Fast` formulas (crate-internal: the formulas' tests use them).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod sfu {
    use std::cell::Cell;

    /// One way of evaluating the instructions.
    pub(crate) trait Sfu {
        /// `ex2.approx.ftz.f32`.
        fn ex2(&self, x: f32) -> f32;
        /// `rcp.approx.ftz.f32`.
        fn rcp(&self, x: f32) -> f32;
    }

    /// `x` with a subnormal flushed to a zero of its sign (the `.ftz` of the instructions).
    pub(crate) fn ftz(x: f32) -> f32 {
        if x.abs() < f32::MIN_POSITIVE {
            0.0f32.copysign(x)
        } else {
            x
        }
    }

    /// The emulator's deterministic model (`scripts/emu/shim.h`, `emu_ex2_approx` ...): the
    /// function in f64 rounded once to f32, with the instruction's flushing.
    pub(crate) struct Model;

    impl Sfu for Model {
        fn ex2(&self, x: f32) -> f32 {
            ftz((f64::from(ftz(x))).exp2() as f32)
        }
        fn rcp(&self, x: f32) -> f32 {
            ftz((1.0 / f64::from(ftz(x))) as f32)
        }
    }

    /// The pessimistic model: each result off by the full documented error, with the sign of
    /// call `k` (counted from 0 since [`Pessimistic::new`]) taken from bit `k` of `signs`
    /// (1 = too large in magnitude). Enumerating every `signs` over a formula's calls covers
    /// every combination of worst-case errors.
    pub(crate) struct Pessimistic {
        signs: u32,
        call: Cell<u32>,
    }

    impl Pessimistic {
        pub(crate) fn new(signs: u32) -> Self {
            Pessimistic {
                signs,
                call: Cell::new(0),
            }
        }
        fn factor(&self, rel: f64) -> f64 {
            let k = self.call.get();
            self.call.set(k + 1);
            if (self.signs >> (k % 32)) & 1 == 1 {
                1.0 + rel
            } else {
                1.0 - rel
            }
        }
    }

    impl Sfu for Pessimistic {
        fn ex2(&self, x: f32) -> f32 {
            let f = self.factor(super::EX2_REL);
            ftz((f64::from(ftz(x)).exp2() * f) as f32)
        }
        fn rcp(&self, x: f32) -> f32 {
            let f = self.factor(super::RCP_REL);
            ftz((f / f64::from(ftz(x))) as f32)
        }
    }
}
