//! fusedreg's ops on [candle](https://github.com/huggingface/candle) tensors, with autograd
//! (feature `candle`; `candle-cuda` adds candle's CUDA device).
//!
//! Each op is a candle custom op (`CustomOp2` / `CustomOp3` with `bwd`), so it takes part in
//! `Tensor::backward` like any candle op:
//!
//! * on the CPU device it runs fusedreg's CPU reference (the code the kernels are tested against
//!   bit for bit), so a model using the adapter trains and is tested without a GPU;
//! * on candle's CUDA device (feature `candle-cuda`) it launches fusedreg's kernels on candle's
//!   own stream (`CudaDevice::cuda_stream()`), never on
//!   another stream and with no host synchronisation, so it is ordered with candle's work.
//!   (One exception: [`CrossEntropy`]'s forward reads a 4-byte flag back to report an
//!   out-of-range target as an error, which waits for the op, unless
//!   [`CrossEntropy::without_target_check`] is set.)
//!
//! Ops: [`DropoutResidual`] (bias + dropout + residual add, with drop path); [`Dropout`] (plain
//! dropout with optional bias and drop path); [`BiasActDropout`] (the FFN site: bias +
//! activation + dropout); [`DropoutAddNorm`] (bias + dropout + residual add + LayerNorm /
//! RMSNorm, with drop path and LayerNorm Scaling; gradients from both outputs); [`CrossEntropy`]
//! (mean cross-entropy with label smoothing and an ignore index).
//!
//! Training-loop pieces: [`AdamW`] (fusedreg's multi-tensor AdamW with clipping as a
//! `candle_nn::optim::Optimizer`, updating the Vars in place on CUDA) and [`StochasticDepth`] /
//! [`DepthPlan`] (which residual blocks run at a step; dropped blocks are never called and their
//! Vars skip the optimizer step).
//!
//! # Random keys: nothing is stored for the backward
//!
//! Every mask is a pure function of `(seed, call id, element index)` (see [`crate::philox`]). The
//! adapter derives the call id from [`StepKeys`] (the seed and the training step) and the site:
//! a number, fixed when the model is built, that tells apart the dropout sites of one step
//! (block 3's attention output, block 3's MLP output, ...). The backward regenerates the mask from
//! the same keys, so no mask is kept between forward and backward; the op object in candle's
//! graph holds a few scalars. Call ids:
//!
//! ```text
//! call = step * 2^32 + site * 2^8 + stream
//! ```
//!
//! `stream` numbers the random streams of one op at one site (0: the element mask, 1: the drop
//! path's row draws), `site < 2^24`, `step < 2^32`. Two consequences worth knowing: running a
//! forward twice with the same keys (activation recomputation) gives the same mask, and a step
//! that is not advanced repeats its masks — call [`StepKeys::next_step`] (or build new keys) once per
//! optimizer step.
//!
//! # Inputs
//!
//! * dtypes `f32`, `f16`, `bf16`; all tensor arguments of one call share the dtype and device.
//!   Anything else is an [`Error`](candle_core::Error), never a panic.
//! * Non-contiguous inputs are **copied** (`Tensor::contiguous`, one extra pass, gradients flow
//!   through the copy); contiguous views with a start offset are used in place. The custom ops
//!   underneath refuse non-contiguous layouts with an error (they are not reachable with one
//!   through this module's functions).
//! * fusedreg's own errors (bad probability, shape, ...) arrive wrapped in a candle error whose
//!   message is fusedreg's.
//!
//! # Link mode
//!
//! candle-core's `cuda` feature makes cudarc link libcuda (`dynamic-linking`); fusedreg then
//! follows (with none of its link features set, cudarc loads libcuda at run time unless some
//! crate in the build asks for linking). So a candle user writes only:
//!
//! ```toml
//! [dependencies]
//! candle-core = { version = "0.11", features = ["cuda"] }
//! fusedreg = { version = "0.1", features = ["candle-cuda"] }
//! ```
//!
//! # Example (CPU device)
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use fusedreg::candle::{DropoutResidual, StepKeys};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let x = Var::randn(0f32, 1.0, (4, 16), &dev)?; // the sublayer's output
//! let bias = Var::zeros(16, candle_core::DType::F32, &dev)?;
//! let residual = Tensor::randn(0f32, 1.0, (4, 16), &dev)?; // the residual stream
//! let site = DropoutResidual::new(0.1, /* site */ 3)?;
//! let mut keys = StepKeys::new(/* seed */ 42, /* step */ 0);
//! let y = site.forward(&x, &residual, Some(&bias), Some(&keys))?;
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(&x).unwrap().dims(), &[4, 16]);
//! keys = keys.next_step()?; // once per training step: new masks
//! # let _ = keys;
//! # Ok(()) }
//! ```
//!
//! # Adding an op
//!
//! One file, `src/candle/<stem>.rs` (the step "a candle op" of the README's recipe): a public
//! site type (a dropping op holds a `Site`: rate, site number, drop path, the keys of a step;
//! `site_methods!` gives it its accessors) whose `forward` checks its arguments with the shell's
//! checks (`check_tensor`, `rows_cols`, `check_per_column`, `check_same_shape`) and applies
//! `Op(Fwd { .. })` to its tensors. `Fwd` and `Bwd` implement the shell's `Pass`: `cpu` (the op's
//! CPU reference), `cuda` (its kernels on candle's stream) and, for `Fwd`, `bwd`, which applies
//! `Bwd` with `Op::apply_no_bwd`; several gradients travel in one buffer (`split_parts!` in the
//! pass, `unpack` after: views, no copy). Copies of strided inputs, the dtype dispatch and the
//! storage checks are the shell's.

mod adamw;
mod bias_act_dropout;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;
mod redundancy;
mod shell;
mod site;
mod stochastic_depth;
mod vars;

pub use adamw::{AdamW, AdamWParams};
pub use bias_act_dropout::BiasActDropout;
pub use cross_entropy::CrossEntropy;
pub use dropout::{Dropout, DropoutResidual, MeasuredResidual};
pub use dropout_add_norm::{DropoutAddNorm, Measured};
pub use redundancy::BlockInfluence;
#[cfg(feature = "candle-cuda")]
pub use shell::cuda_handle;
pub use stochastic_depth::{DepthPlan, StochasticDepth};
pub use vars::vars_by_name;

/// The random keys of one training step: the run's seed and the step number. Copy it into every
/// op call of the step; advance it with [`StepKeys::next_step`] once per step (see the
/// [module docs](self) for how call ids are derived).
///
/// # Examples
///
/// ```
/// use fusedreg::candle::StepKeys;
/// # fn main() -> candle_core::Result<()> {
/// let keys = StepKeys::new(42, 0);
/// assert_eq!((keys.seed(), keys.step()), (42, 0));
/// assert_eq!(keys.next_step()?.step(), 1);
/// // Site 3's element mask and drop path use different call ids, and so does the next step.
/// assert_ne!(keys.call(3, 0)?, keys.call(3, 1)?);
/// assert_ne!(keys.call(3, 0)?, keys.next_step()?.call(3, 0)?);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepKeys {
    seed: u64,
    step: u64,
}

/// Sites are numbered below this bound (24 bits of the call id).
pub const MAX_SITES: u32 = 1 << 24;
/// Steps are numbered below this bound (the high 32 bits of the call id).
pub const MAX_STEPS: u64 = 1 << 32;

impl StepKeys {
    /// Keys of step `step` of a run seeded with `seed`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::StepKeys;
    /// let resumed = StepKeys::new(42, 1000); // resuming at step 1000 gives step 1000's masks
    /// assert_eq!(resumed.step(), 1000);
    /// ```
    pub fn new(seed: u64, step: u64) -> Self {
        StepKeys { seed, step }
    }

    /// The seed.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(fusedreg::candle::StepKeys::new(7, 0).seed(), 7);
    /// ```
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The step number.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(fusedreg::candle::StepKeys::new(7, 12).step(), 12);
    /// ```
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The keys of the next step. Errors when the next step would reach [`MAX_STEPS`] (keys
    /// built with a step at or past it included, up to `u64::MAX`).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::{StepKeys, MAX_STEPS};
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(StepKeys::new(1, 5).next_step()?, StepKeys::new(1, 6));
    /// assert!(StepKeys::new(1, MAX_STEPS - 1).next_step().is_err());
    /// assert!(StepKeys::new(1, u64::MAX).next_step().is_err());
    /// # Ok(()) }
    /// ```
    pub fn next_step(&self) -> candle_core::Result<Self> {
        // `new` takes any step (`call` refuses the out-of-range ones), so saturate: u64::MAX
        // stays past MAX_STEPS and is refused below instead of overflowing.
        let step = self.step.saturating_add(1);
        check_step(step)?;
        Ok(StepKeys { step, ..*self })
    }

    /// The call id of random stream `stream` (0: element mask, 1: drop path) at `site`:
    /// `step * 2^32 + site * 2^8 + stream`. Errors when `site >= MAX_SITES`, `stream >= 256` or
    /// `step >= MAX_STEPS`, so two different triples never share a call id.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::{StepKeys, MAX_SITES};
    /// # fn main() -> candle_core::Result<()> {
    /// let keys = StepKeys::new(42, 2);
    /// assert_eq!(keys.call(3, 1)?, (2 << 32) | (3 << 8) | 1);
    /// assert!(keys.call(MAX_SITES, 0).is_err());
    /// assert!(keys.call(0, 256).is_err());
    /// # Ok(()) }
    /// ```
    pub fn call(&self, site: u32, stream: u32) -> candle_core::Result<u64> {
        check_step(self.step)?;
        check_site(site)?;
        if stream >= 256 {
            return Err(wrap(crate::Error::invalid(
                "candle",
                format!("random stream {stream} must be below 256"),
            )));
        }
        Ok(self.step << 32 | u64::from(site) << 8 | u64::from(stream))
    }
}

fn check_step(step: u64) -> candle_core::Result<()> {
    check_call_field("step", step, MAX_STEPS)
}

pub(crate) fn check_site(site: u32) -> candle_core::Result<()> {
    check_call_field("site", u64::from(site), u64::from(MAX_SITES))
}

/// Checks that `value` fits the bits the call id keeps for `what` (`limit` is a power of two).
fn check_call_field(what: &str, value: u64, limit: u64) -> candle_core::Result<()> {
    if value < limit {
        return Ok(());
    }
    let bits = limit.trailing_zeros();
    Err(wrap(crate::Error::invalid(
        "candle",
        format!("{what} {value} must be below 2^{bits} (the call id keeps {bits} bits for it)"),
    )))
}

/// A fusedreg error as a candle error (the message is kept), so `?` on a fusedreg result works
/// in code that returns `candle_core::Result`.
///
/// ```
/// fn p(p: f64) -> candle_core::Result<f64> {
///     Ok(fusedreg::dropping::DropRate::new(p)?.p())
/// }
/// assert_eq!(p(0.25).unwrap(), 0.25);
/// assert!(p(1.5).is_err()); // fusedreg's error, as a candle error
/// ```
impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A fusedreg error as a candle error, where `?` cannot convert it (an `Err(...)` built in
/// place, a `map_err` whose result is returned as is).
pub(crate) fn wrap(e: crate::Error) -> candle_core::Error {
    e.into()
}
