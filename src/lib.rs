//! # fusedreg
//!
//! Hand-written CUDA kernels for the regularization and optimizer work of a training step, fused
//! so that every byte of device memory moves as few times as possible, with a CPU reference for
//! every op that the kernels are tested against bit for bit wherever the op allows.
//!
//! Ops (each with a `cpu` reference, the GPU `forward` / `backward`, and an `unfused` baseline):
//!
//! * [`dropout`]: dropout with an optional bias before it and an optional residual after it (in
//!   place or not), drop path, 1-bit mask, 32- or 16-bit keying: the embedding, attention and
//!   residual-exit sites.
//! * [`bias_act_dropout`]: fused bias + activation (GELU, GELU-tanh, SiLU, ReLU) + dropout, the
//!   feed-forward site, with the bias gradient fused into the backward.
//! * [`dropout_add_norm`]: fused dropout + residual add + LayerNorm / RMSNorm with LayerNorm
//!   Scaling and drop path (the entry of a pre-norm block), forward and backward.
//! * [`cross_entropy`]: fused cross-entropy with label smoothing and z-loss, loss and gradient
//!   in one kernel (gradient in place).
//!
//! Optimizer, engine and stochastic depth:
//!
//! * [`stochastic_depth`]: schedules and per-step plans of which blocks run (whole blocks
//!   skipped on the host; per-sample drop path through the dropping ops' row scale).
//! * [`adamw`]: fused multi-tensor AdamW with device-side scalars, master weights and a
//!   bit-exact CPU reference.
//! * [`global_norm`]: deterministic global gradient norm, clip coefficient and scale pass.
//! * [`multi_tensor`]: tensor sets registered once, launched over as one (the engine behind
//!   [`adamw`] and [`global_norm`]).
//! * [`redundancy`]: Block Influence (`1 - mean cos(r, s)` of the residual stream before and
//!   after each add) measured inside the fused residual add of [`dropout_add_norm`], per call
//!   site, on the device.
//!
//! Shared pieces:
//!
//! * [`dropping`]: what every dropping op shares — the drop rate and its keying, the drop path,
//!   the 1-bit mask, the dbias partition, launch geometry, workspaces, the shared backward and
//!   the eager baseline kernels (device side: `kernels/common/dropping.cuh`).
//! * [`philox`]: the counter-based generator (Philox4x32-10) and the mask keying
//!   `(seed, call id, 64-bit element index) -> 32-bit word` every random op shares.
//! * [`fmath`]: bit-exact f32 `exp`, `ln`, `erf`, `tanh`, `sigmoid`, the same operations on the
//!   CPU and in the kernels (`kernels/common/fmath.cuh`).
//! * [`math`]: [`Math::Fast`] (hardware approximations within a stated bound) or [`Math::Exact`]
//!   (bit for bit with the CPU reference) for ops with transcendental functions.
//! * [`dtype`]: the element types (f32, f16, bf16) and their rounding, as the kernels round.
//! * [`Handle`]: a CUDA context and stream (yours or ours) with the embedded kernels loaded once
//!   per context; [`Error`] for everything that can go wrong.
//! * `candle` (feature `candle`): the ops on candle tensors, with autograd, on candle's CPU
//!   device and (feature `candle-cuda`) on its CUDA device and stream.
//!
//! The benchmark report (`fusedreg-bench`), its GPU timing harness, the residual-MLP trainer, the
//! criterion benches and the examples are tools, not library: they live in the workspace member
//! `tools/` (package `fusedreg-tools`) and build on this crate's public API only.
//!
//! Building needs no CUDA: without nvcc the kernels are left out, the CPU references work and
//! every GPU entry point returns [`Error::KernelsNotBuilt`]. Running needs no files beside the
//! binary: the kernels are embedded as a fatbin (SASS for sm_80 and sm_90, PTX for newer GPUs).
//!
//! ```
//! // Works everywhere: a GPU is used when there is one.
//! match fusedreg::Handle::new(0) {
//!     Ok(h) => println!("running on {}", h.device_info().unwrap().name),
//!     Err(e) => println!("CPU only: {e}"),
//! }
//! ```
#![warn(missing_docs)]

pub mod adamw;
pub mod bias_act_dropout;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cross_entropy;
pub mod dropout;
pub mod dropout_add_norm;
pub mod dropping;
pub mod dtype;
pub mod error;
pub mod fmath;
pub mod global_norm;
pub mod math;
pub mod multi_tensor;
pub mod philox;
pub mod redundancy;
mod runtime;
pub mod stochastic_depth;
pub mod workspace;

pub use dtype::{Dtype, DtypeKind};
pub use error::{Error, Result};
pub use math::Math;
#[doc(hidden)]
pub use runtime::grid_for;
/// The kernel loader, for crates that embed kernels of their own with `build/cuda.rs` (the
/// tools): not part of the API a user relies on.
#[doc(hidden)]
pub mod kernel_table {
    pub use crate::runtime::modules::{EmbeddedModule, KernelTable, Loaded};
}
pub use runtime::{
    compiled_archs, device_count, driver_present, kernels_built, nvcc_version, DeviceInfo,
    DeviceScalar, Handle,
};

/// Re-exported so callers can name buffer types without depending on cudarc directly.
pub use cudarc;
/// Re-exported for the 16-bit element types.
pub use half;
