//! The pre-norm state of the GPU model: its activations in device buffers, and the scratch of
//! its fused entry backward (its steps are `GpuMlp`'s `Steps` in `gpu_model.rs`).

use cudarc::driver::CudaSlice;

use crate::mlp::prenorm;
use crate::mlp::PreNorm;
use fusedreg::dropout_add_norm as dan;
use fusedreg::{Error, Handle, Result};

const OP: &str = "mlp";

/// The GPU model's pre-norm activations (device buffers) and its entry backward's scratch.
pub(crate) type State = prenorm::State<CudaSlice<f32>, EntryScratch>;

/// The entry backward's column gradients, copied into the tensor set afterwards (the set lends
/// one gradient at a time, and gamma is read from it in the same call), and its workspace.
pub(crate) struct EntryScratch {
    pub(super) dgamma: CudaSlice<f32>,
    pub(super) dbeta: CudaSlice<f32>,
    pub(super) dbias: CudaSlice<f32>,
    pub(super) ws: dan::Workspace,
}

/// [`State`] on the handle's stream.
pub(super) fn new_state(
    h: &Handle,
    cfg: PreNorm,
    blocks: usize,
    tokens: usize,
    hidden: usize,
) -> Result<State> {
    let zeros = |n: usize| h.stream().alloc_zeros::<f32>(n).map_err(Error::driver(OP));
    let scratch = EntryScratch {
        dgamma: zeros(hidden)?,
        dbeta: zeros(hidden)?,
        dbias: zeros(hidden)?,
        ws: dan::Workspace::new(),
    };
    State::new(cfg, (blocks, tokens, hidden), zeros, scratch)
}
