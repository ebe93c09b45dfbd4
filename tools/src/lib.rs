//! # fusedreg-tools
//!
//! The tools around the [`fusedreg`] library, kept out of the library's public API: a framework
//! that links `fusedreg` gets the ops, the engine, the runtime and the CPU references; this crate
//! holds what serves the benchmark binary, the criterion benches and the examples.
//!
//! * [`report`]: the fused-vs-unfused benchmark report written by `fusedreg-bench` (table, JSON,
//!   SVG), with the byte-count formulas of every row and the model parameter lists.
//! * [`timing`]: GPU timing with CUDA events, the copy-bandwidth reference and benchmark buffers.
//! * [`mlp`]: a deep residual MLP trained end to end with fusedreg's ops (the `train_mlp`
//!   example and the stochastic-depth row of the report), with its own kernels
//!   (`tools/kernels/mlp.cu`) and their CPU references.
//!
//! It uses only fusedreg's public API; its own kernels (`tools/kernels/*.cu`) are compiled by the
//! library's kernel build (`build/cuda.rs`, shared by both build scripts) and launched through
//! [`fusedreg::Handle::launch_function`], so [`fusedreg::Handle::launch_count`] still counts
//! every kernel of a training step.
//!
//! ```
//! // The CPU trainer runs everywhere.
//! use fusedreg_tools::mlp::{MlpConfig, Trainer};
//! let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() })?;
//! assert!(t.step(true)?.is_finite());
//! # Ok::<(), fusedreg::Error>(())
//! ```
#![warn(missing_docs)]

mod kernels;
pub mod mlp;
pub mod report;
pub mod timing;

/// Loads every kernel of the tools (`tools/kernels/*.cu`) into the handle's context now rather
/// than at first use, so a module the driver cannot load is reported at start-up. Returns how
/// many were loaded. (The library's own kernels: [`fusedreg::Handle::load_all_kernels`].)
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// assert!(fusedreg_tools::load_all_kernels(&h)? > 0);
/// # Ok(()) }
/// ```
pub fn load_all_kernels(handle: &fusedreg::Handle) -> fusedreg::Result<usize> {
    kernels::load_all(handle)
}
