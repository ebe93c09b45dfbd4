//! How an op evaluates its transcendental functions: [`Math::Fast`] or [`Math::Exact`].
//!
//! An op with `exp`, `tanh`, `erf`, `sigmoid` or `log` in its formula (the activations of
//! [`crate::bias_act_dropout`], [`crate::cross_entropy`]) takes a `Math` in its config:
//!
//! * [`Math::Exact`] runs [`crate::fmath`] in the kernel: the same IEEE operations as the CPU
//!   reference, so GPU and CPU agree bit for bit. It costs 25–64 instructions per function call,
//!   more than a memory-bound kernel can afford (see the instruction budget in the README).
//! * [`Math::Fast`] runs the GPU's special-function unit (`ex2.approx.ftz.f32`,
//!   `tanh.approx.f32`, `lg2.approx.ftz.f32`, `rcp.approx.ftz.f32`: one instruction each,
//!   `kernels/common/fastmath.cuh`). The results are not the CPU reference's bits: each op states
//!   its error bound against the exact function (its module docs), and the GPU tests hold the
//!   kernel to that bound against the CPU reference on random data and edge values.
//!
//! Each op chooses its own default: `Fast` where the exact path cannot meet the op's
//! instruction budget, `Exact` elsewhere. The CPU references always compute the exact function
//! (the same bits as `Exact` on the GPU), whatever the mode: `Fast` changes only how close the
//! GPU is to them.
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
    pub fn is_exact(self) -> bool {
        self == Math::Exact
    }
}
