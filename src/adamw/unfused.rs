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
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::{unfused, AdamW, AdamWConfig};
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// # let s = h.stream();
/// # let mut b = TensorSet::builder(&h);
/// # for _ in 0..4 {
/// #     let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
/// #     b.push(p, s.clone_htod(&vec![0.01f32; 4096]).unwrap())?;
/// # }
/// # let mut set = b.build()?;
/// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01; 4])?;
/// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
/// let out = unfused::clip_and_step(&opt, &mut set, &mut norm)?;
/// // 3 launches per tensor (norm, scale, AdamW) where the fused path needs 3 in all.
/// println!("norm {} coef {}: {} launches", out.norm.norm, out.norm.coef, out.launches);
/// if out.skipped {
///     println!("non-finite gradients: step skipped");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnfusedOutcome {
    /// The norm values the host computed (loss scale 1).
    pub norm: NormValues,
    /// Kernel launches this step made.
    pub launches: u64,
    /// True when the norm was non-finite and the step was skipped on the host.
    pub skipped: bool,
}

/// The unfused global norm: one partial-sums launch per tensor, then the host reads the
/// partials (a sync) and reduces them. Returns the norm values and the launches made.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::unfused;
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// # let s = h.stream();
/// # let mut b = TensorSet::builder(&h);
/// # for _ in 0..4 {
/// #     let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
/// #     b.push(p, s.clone_htod(&vec![0.01f32; 4096]).unwrap())?;
/// # }
/// # let set = b.build()?;
/// let norm = GlobalNorm::new(&set, Some(1.0))?;
/// let (values, launches) = unfused::global_norm(&set, &norm)?; // blocks: a host sync
/// println!("norm {} from {launches} launches", values.norm); // one launch per tensor
/// # Ok(()) }
/// ```
pub fn global_norm(set: &TensorSet, norm: &GlobalNorm) -> Result<(NormValues, u64)> {
    global_norm_skipping(set, norm, 0)
}

/// [`global_norm`] honouring an optimizer's skip flags (device address, 0: none).
fn global_norm_skipping(
    set: &TensorSet,
    norm: &GlobalNorm,
    skip: u64,
) -> Result<(NormValues, u64)> {
    norm.check_for(set)?;
    let handle = set.handle();
    let before = handle.launch_count();
    for_each_tensor(set, |first, n| {
        launch_partials(set, norm.partials_ptr(), skip, first, n)
    })?;
    // The host waits for the GPU here: the sync every step of this path pays.
    let partials = norm.read_partials()?;
    let values = norm_cpu::finalize(norm_cpu::reduce(&partials), norm.max_norm(), 1.0);
    Ok((values, handle.launch_count() - before))
}

/// The unfused AdamW step: one launch per tensor (PyTorch's per-parameter path). Returns the
/// launches made.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::{unfused, AdamW, AdamWConfig};
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// # let s = h.stream();
/// # let mut b = TensorSet::builder(&h);
/// # for _ in 0..4 {
/// #     let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
/// #     b.push(p, s.clone_htod(&vec![0.01f32; 4096]).unwrap())?;
/// # }
/// # let mut set = b.build()?;
/// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01; 4])?;
/// let launches = unfused::step(&opt, &mut set)?; // one per tensor: 4 here
/// println!("{launches} launches");
/// # Ok(()) }
/// ```
pub fn step(adamw: &AdamW, set: &mut TensorSet) -> Result<u64> {
    adamw.check_set(set)?;
    let before = set.handle().launch_count();
    for_each_tensor(set, |first, n| adamw.launch(set, 0, 0, first, n))?;
    Ok(set.handle().launch_count() - before)
}

/// Calls `f(first_chunk, chunks)` for every tensor of the set (empty tensors have no chunks; the
/// launch helpers skip them).
fn for_each_tensor(set: &TensorSet, mut f: impl FnMut(u32, u32) -> Result<()>) -> Result<()> {
    let layout = set.layout();
    for t in 0..layout.num_tensors() {
        let r = layout.chunks(t);
        f(r.start as u32, r.len() as u32)?;
    }
    Ok(())
}

/// One unfused clip-and-step (see the [module docs](self)): per-tensor launches and a blocking
/// read of the norm. Uses `norm`'s partials buffer and clipping threshold.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::{unfused, AdamW, AdamWConfig};
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// # let s = h.stream();
/// # let mut b = TensorSet::builder(&h);
/// # for _ in 0..4 {
/// #     let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
/// #     b.push(p, s.clone_htod(&vec![0.01f32; 4096]).unwrap())?;
/// # }
/// # let mut set = b.build()?;
/// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01; 4])?;
/// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
/// for _ in 0..10 {
///     let out = unfused::clip_and_step(&opt, &mut set, &mut norm)?;
///     println!("norm {} skipped {}", out.norm.norm, out.skipped);
/// }
/// # Ok(()) }
/// ```
pub fn clip_and_step(
    adamw: &AdamW,
    set: &mut TensorSet,
    norm: &mut GlobalNorm,
) -> Result<UnfusedOutcome> {
    adamw.check_set(set)?;
    let before = set.handle().launch_count();
    let (values, _) = global_norm_skipping(set, norm, adamw.skip_ptr())?;
    if !values.is_finite() {
        return Ok(UnfusedOutcome {
            norm: values,
            launches: set.handle().launch_count() - before,
            skipped: true,
        });
    }
    for_each_tensor(set, |first, n| {
        launch_scale(set, 0, values.coef, 0, first, n)
    })?;
    step(adamw, set)?;
    Ok(UnfusedOutcome {
        norm: values,
        launches: set.handle().launch_count() - before,
        skipped: false,
    })
}
