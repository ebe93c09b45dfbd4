//! The unfused baseline, the way PyTorch eager runs `F.cross_entropy` with label smoothing
//! forward and backward, and its CPU mirror. The benchmarks compare the fused op with this.
//!
//! Four steps, each through device memory: a log-softmax kernel writes the log-probabilities
//! `lp = T(x - lse)` (a `[rows, vocab]` temporary in the logits dtype, passed in by the caller)
//! and `lse` per row; a gather + smoothing kernel reads `lp` and writes per-row losses
//! `conf·(-lp[t]) + α·(-(Σ lp)/V) + λ·lse²`; the loss sum (the fused op's kernel); a separate
//! backward kernel reads `lp` and writes `grad = T((exp(lp)·zf - α/V - conf·[j = t])·scale)`.
//! Because `lp` is rounded to `T`, results differ from the fused op in 16-bit types (by the
//! rounding of `lp`): [`forward_backward_cpu`] mirrors this path exactly, and the GPU tests
//! compare the kernels with it bit for bit. Bytes: [`unfused_bytes`](super::unfused_bytes).
//!
//! ```no_run
//! use fusedreg::cross_entropy::{unfused, Config, Outputs};
//! # fn main() -> fusedreg::Result<()> {
//! let h = fusedreg::Handle::new(0)?;
//! let s = h.stream();
//! let cfg = Config::new(16, 32_000)?.label_smoothing(0.1)?;
//! let x = s.clone_htod(&vec![0.25f32; cfg.len()]).unwrap();
//! let t = s.clone_htod(&[3i64; 16]).unwrap();
//! let mut lp = s.alloc_zeros::<f32>(cfg.len()).unwrap();
//! let mut grad = s.alloc_zeros::<f32>(cfg.len()).unwrap();
//! let mut loss = s.alloc_zeros::<f32>(1).unwrap();
//! unfused::forward_backward(&h, &cfg, &x, &t, &mut lp, &mut grad, Outputs::new(loss.as_view_mut()))?;
//! # Ok(()) }
//! ```

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::cpu::{self, row_state, z_factor, Loss};
use super::gpu::{
    by_target, count_valid, finish_empty, reduce_losses, reduction_flags, scratch, scratch_len,
    Outputs, RowParams, Workspace, MAX_GRID,
};
use super::gpu::{BWD_I32, BWD_I64, LOG_SOFTMAX, NLL_I32, NLL_I64};
use super::math::{exp, ln};
use super::{Config, Reduction, TargetClass, TargetIndex, OP, SLOTS};
use crate::dtype::Dtype;
use crate::error::{check_len, Result};
use crate::runtime::device_params;
use crate::runtime::Handle;

device_params! {
    /// Mirrors `UnfusedParams` in the kernel.
    #[derive(Debug, Default)]
    struct UnfusedParams(112) {
        x: u64,
        y: u64,
        targets: u64,
        lse: u64,
        loss_rows: u64,
        upstream: u64,
        n_valid: u64,
        row: RowParams,
    }
}
const _: () = assert!(std::mem::offset_of!(UnfusedParams, row) == 56); // `rows` in the kernel

/// The unfused forward and backward on the device: four kernels (five with the mean's count),
/// the log-probabilities materialised in `logprobs` (`rows * vocab` of `T`), the gradient in
/// `grad`. `out` as for the fused op (the invalid-target flag is not supported here: a bad
/// target's row is treated as ignored).
///
/// Errors: as [`forward_backward`](super::forward_backward), plus a `logprobs` of the wrong
/// length.
///
/// ```no_run
/// # use fusedreg::cross_entropy::{unfused, Config, Outputs};
/// # fn main() -> fusedreg::Result<()> {
/// # let h = fusedreg::Handle::new(0)?;
/// # let s = h.stream();
/// let cfg = Config::new(2, 8)?;
/// # let x = s.clone_htod(&[0.0f32; 16]).unwrap();
/// # let t = s.clone_htod(&[1i32, 2]).unwrap();
/// # let mut lp = s.alloc_zeros::<f32>(16).unwrap();
/// # let mut g = s.alloc_zeros::<f32>(16).unwrap();
/// # let mut loss = s.alloc_zeros::<f32>(1).unwrap();
/// unfused::forward_backward(&h, &cfg, &x, &t, &mut lp, &mut g, Outputs::new(loss.as_view_mut()))?;
/// # Ok(()) }
/// ```
pub fn forward_backward<T: Dtype, I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    logits: &impl DevicePtr<T>,
    targets: &impl DevicePtr<I>,
    logprobs: &mut impl DevicePtrMut<T>,
    grad: &mut impl DevicePtrMut<T>,
    mut out: Outputs<'_>,
) -> Result<()> {
    out.check_lens(cfg, logits.len(), targets.len(), Some(grad.len()))?;
    check_len(OP, "logprobs", logprobs.len(), cfg.len())?;
    let reduction = cfg.get_reduction();
    let (loss_ptr, _gloss) = handle.write_ptr(OP, "loss", &mut out.loss)?;
    if finish_empty(handle, cfg, loss_ptr)? {
        return Ok(());
    }
    let (x, _g1) = handle.read_ptr(OP, "logits", logits)?;
    let (t, _g2) = handle.read_ptr(OP, "targets", targets)?;
    let (lp, _g3) = handle.write_ptr(OP, "logprobs", logprobs)?;
    let (g, _g4) = handle.write_ptr(OP, "grad", grad)?;
    let (upstream, _gu) = handle.read_opt(OP, "upstream", out.upstream.as_ref())?;

    // Scratch: lse per row, then the losses and their chunk levels.
    let rows = cfg.rows();
    let mut own = Workspace::new();
    let s = scratch(
        handle,
        out.workspace.take(),
        rows + scratch_len(rows),
        &mut own,
    )?;
    if reduction == Reduction::Mean {
        count_valid::<I>(handle, cfg, t, s.count)?;
    }
    let lse = s.f32s;
    let loss_rows = if reduction == Reduction::None {
        loss_ptr
    } else {
        lse + 4 * rows as u64
    };
    let base = UnfusedParams {
        x,
        y: lp,
        targets: t,
        lse,
        loss_rows,
        upstream,
        n_valid: s.count,
        row: RowParams::new(cfg, reduction_flags(reduction, upstream != 0)),
    };
    let grid = ((rows as u64).min(MAX_GRID) as u32, 1, 1);
    let block = (SLOTS as u32, 1, 1);
    handle.launch(LOG_SOFTMAX.get::<T>(), grid, block, 0, &base)?;
    let nll = UnfusedParams {
        x: lp,
        y: 0,
        ..base
    };
    handle.launch(by_target::<T, I>(NLL_I32, NLL_I64), grid, block, 0, &nll)?;
    if reduction != Reduction::None {
        reduce_losses(
            handle,
            loss_rows,
            rows,
            loss_ptr,
            s.count,
            reduction == Reduction::Mean,
        )?;
    }
    let bwd = UnfusedParams {
        x: lp,
        y: g,
        ..base
    };
    handle.launch(by_target::<T, I>(BWD_I32, BWD_I64), grid, block, 0, &bwd)?;
    drop(own);
    Ok(())
}

/// The CPU mirror of [`forward_backward`]: the same roundings (log-probabilities in `T`) and
/// operation order. Targets are checked as in [`cpu`].
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::{cpu, unfused, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 5)?.label_smoothing(0.1)?;
/// let x: Vec<f32> = (0..10).map(|i| (i as f32 * 0.7).sin()).collect();
/// let (mut g1, mut g2) = (vec![0.0f32; 10], vec![0.0f32; 10]);
/// let a = unfused::forward_backward_cpu(&cfg, &x, &[1i32, 4], None, &mut g1)?;
/// let b = cpu::forward_backward(&cfg, &x, &[1i32, 4], None, &mut g2)?;
/// assert!((a.reduced.unwrap() - b.reduced.unwrap()).abs() < 1e-5);
/// assert!(g1.iter().zip(&g2).all(|(p, q)| (p - q).abs() < 1e-6));
/// # Ok(()) }
/// ```
pub fn forward_backward_cpu<T: Dtype, I: TargetIndex>(
    cfg: &Config,
    logits: &[T],
    targets: &[I],
    upstream: Option<&[f32]>,
    grad: &mut [T],
) -> Result<Loss> {
    cpu::check_host_lens(cfg, logits.len(), targets.len(), Some(grad.len()), upstream)?;
    let v = cfg.vocab();
    let c = cfg.consts();
    let (classes, n_valid) = cpu::target_classes(cfg, targets)?;
    let mut rows = vec![0.0f32; cfg.rows()];
    let mut xs = vec![0.0f32; v];
    let mut lp = vec![0.0f32; v];
    for (row, class) in classes.iter().enumerate() {
        let out = &mut grad[row * v..(row + 1) * v];
        let TargetClass::Valid(t) = *class else {
            out.fill(T::from_f32_rn(0.0));
            continue;
        };
        for (d, s) in xs.iter_mut().zip(&logits[row * v..(row + 1) * v]) {
            *d = s.to_f32();
        }
        let st = row_state(&xs);
        let lse = st.m + ln(st.s);
        for (l, &x) in lp.iter_mut().zip(&xs) {
            *l = T::from_f32_rn(x - lse).to_f32();
        }
        let sum_lp = row_state(&lp).sx;
        let mut loss = 0.0f32;
        if c.conf != 0.0 {
            loss = c.conf * (0.0 - lp[t]);
        }
        if c.alpha != 0.0 {
            loss += c.alpha * (0.0 - sum_lp / c.vocab_f);
        }
        if c.lambda != 0.0 {
            loss += c.lambda * (lse * lse);
        }
        rows[row] = loss;
        let zf = z_factor(&c, lse);
        let scale = cpu::grad_scale(cfg, n_valid, upstream, row);
        for (j, (o, &l)) in out.iter_mut().zip(&lp).enumerate() {
            let mut d = exp(l) * zf - c.eps;
            if j == t {
                d -= c.conf;
            }
            *o = T::from_f32_rn(d * scale);
        }
    }
    Ok(Loss::reduce(cfg, rows, n_valid))
}
