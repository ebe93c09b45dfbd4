//! The unfused baseline: clip-and-step the way PyTorch's foreach path and DeepSpeed do it.
//!
//! 1. the norm: one launch per (non-empty) tensor, each writing its chunks' partial sums;
//! 2. the host reads the partials (a sync: the host waits for the GPU), reduces them and
//!    computes the clip coefficient; a non-finite norm skips the step on the host;
//! 3. the gradients are scaled in place by that coefficient, one launch per tensor;
//! 4. AdamW, one launch per tensor, on the scaled gradients.
//!
//! That is about `3 x tensors` launches, one host sync and four passes over the gradients (read
//! for the norm, read + write to scale, read by AdamW) where [`super::AdamW::clip_and_step`]
//! needs 3 launches, no sync and two passes.
//!
//! It computes the same math: the partials, the f64 reduction and the coefficient are the
//! fused path's own (the reduction runs on the host, [`crate::global_norm::cpu::reduce`]), so the
//! norm and coefficient are bit-identical to [`crate::global_norm::GlobalNorm::compute`]'s. With
//! f32 gradients the step is then bit-identical too (`round(g * coef)` is what the fused kernel
//! computes in registers). With 16-bit gradients the scaled gradient is rounded to 16 bits before
//! AdamW reads it: each gradient differs by at most half a 16-bit ulp, and parameters agree with
//! the CPU reference within a few f32 ulps per step of the update size (`lr`). The baseline
//! ignores the [`GlobalNorm`]'s loss scale (it has none).

use super::gpu::AdamW;
use crate::error::Result;
use crate::global_norm::gpu::{launch_partials, launch_scale};
use crate::global_norm::{cpu as norm_cpu, GlobalNorm, NormValues};
use crate::multi_tensor::TensorSet;

/// What one unfused step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnfusedOutcome {
    /// The norm values the host computed (loss scale 1).
    pub norm: NormValues,
    /// Kernel launches this step made.
    pub launches: u64,
    /// True when the norm was non-finite and the step was skipped on the host.
    pub skipped: bool,
}

/// One unfused clip-and-step (see the [module docs](self)): per-tensor launches and a blocking
/// read of the norm. Uses `norm`'s partials buffer and clipping threshold.
pub fn clip_and_step(
    adamw: &AdamW,
    set: &mut TensorSet,
    norm: &mut GlobalNorm,
) -> Result<UnfusedOutcome> {
    adamw.check_set(set)?;
    norm.check_for(set)?;
    let handle = set.handle().clone();
    let before = handle.launch_count();
    let layout = set.layout().clone();
    let per_tensor = |t: usize| {
        let r = layout.chunks(t);
        (r.start as u32, r.len() as u32)
    };
    for t in 0..layout.num_tensors() {
        let (first, n) = per_tensor(t);
        launch_partials(set, norm.partials_ptr(), first, n)?;
    }
    // The host waits for the GPU here: the sync every step of this path pays.
    let partials = norm.read_partials()?;
    let values = norm_cpu::finalize(norm_cpu::reduce(&partials), norm.max_norm(), 1.0);
    if !values.is_finite() {
        return Ok(UnfusedOutcome {
            norm: values,
            launches: handle.launch_count() - before,
            skipped: true,
        });
    }
    for t in 0..layout.num_tensors() {
        let (first, n) = per_tensor(t);
        launch_scale(set, 0, values.coef, 0, first, n)?;
    }
    for t in 0..layout.num_tensors() {
        let (first, n) = per_tensor(t);
        adamw.launch(set, 0, 0, first, n)?;
    }
    Ok(UnfusedOutcome {
        norm: values,
        launches: handle.launch_count() - before,
        skipped: false,
    })
}
