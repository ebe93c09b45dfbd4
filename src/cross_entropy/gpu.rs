//! Launch wrappers for `kernels/cross_entropy.cu`.
//!
//! One call is at most: a memset and the count kernel (mean only: the count of valid rows the
//! gradient scale needs), the fused kernel (one block of [`SLOTS`] threads per row, blocks
//! looping over rows), and the sum kernel over the per-row losses (sum and mean: once per
//! [`REDUCE_CHUNK`]-fold level, one launch up to 4096 rows). The vector path (16-byte accesses)
//! runs when the logits (and a separate gradient) start 16-byte aligned and a row is a whole
//! number of 16-byte vectors; otherwise the scalar path, with the same bits.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{check_lens, Config, Consts, Reduction, TargetIndex, OP, REDUCE_CHUNK, SLOTS};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::{Kernel, KernelFamily};
use crate::runtime::Handle;
use crate::runtime::WorkspaceView;

crate::kernel_list! {
    "cross_entropy" => {
        [f32 CrossEntropyFusedF32Ti32, f16 CrossEntropyFusedF16Ti32, bf16 CrossEntropyFusedBf16Ti32] = "cross_entropy_fused_", "_ti32" => FUSED_I32,
        [f32 CrossEntropyFusedF32Ti64, f16 CrossEntropyFusedF16Ti64, bf16 CrossEntropyFusedBf16Ti64] = "cross_entropy_fused_", "_ti64" => FUSED_I64,
        [f32 CrossEntropyFusedFastF32Ti32, f16 CrossEntropyFusedFastF16Ti32, bf16 CrossEntropyFusedFastBf16Ti32] = "cross_entropy_fused_fast_", "_ti32" => FAST_I32,
        [f32 CrossEntropyFusedFastF32Ti64, f16 CrossEntropyFusedFastF16Ti64, bf16 CrossEntropyFusedFastBf16Ti64] = "cross_entropy_fused_fast_", "_ti64" => FAST_I64,
        [f32 CrossEntropyUnfusedNllF32Ti32, f16 CrossEntropyUnfusedNllF16Ti32, bf16 CrossEntropyUnfusedNllBf16Ti32] = "cross_entropy_unfused_nll_", "_ti32" => NLL_I32,
        [f32 CrossEntropyUnfusedNllF32Ti64, f16 CrossEntropyUnfusedNllF16Ti64, bf16 CrossEntropyUnfusedNllBf16Ti64] = "cross_entropy_unfused_nll_", "_ti64" => NLL_I64,
        [f32 CrossEntropyUnfusedBackwardF32Ti32, f16 CrossEntropyUnfusedBackwardF16Ti32, bf16 CrossEntropyUnfusedBackwardBf16Ti32] = "cross_entropy_unfused_backward_", "_ti32" => BWD_I32,
        [f32 CrossEntropyUnfusedBackwardF32Ti64, f16 CrossEntropyUnfusedBackwardF16Ti64, bf16 CrossEntropyUnfusedBackwardBf16Ti64] = "cross_entropy_unfused_backward_", "_ti64" => BWD_I64,
        [f32 CrossEntropyUnfusedLogSoftmaxF32, f16 CrossEntropyUnfusedLogSoftmaxF16, bf16 CrossEntropyUnfusedLogSoftmaxBf16] = "cross_entropy_unfused_log_softmax_" => LOG_SOFTMAX,
        [_ CrossEntropyCountTi32] = "cross_entropy_count_ti32",
        [_ CrossEntropyCountTi64] = "cross_entropy_count_ti64",
        [_ CrossEntropySum] = "cross_entropy_sum",
    }
}

pub(super) const FLAG_GRAD: u32 = 1;
pub(super) const FLAG_VEC: u32 = 2;
pub(super) const FLAG_MEAN: u32 = 4;
pub(super) const FLAG_UPSTREAM: u32 = 8;

/// The most blocks of a row-looping launch: each block loops over rows, results never depend on
/// it.
pub(super) const MAX_GRID: u64 = 1 << 20;

device_params! {
    /// Mirrors `FusedParams` in the kernel.
    #[derive(Debug, Default)]
    struct FusedParams(112) {
        logits: u64,
        grad: u64,
        targets: u64,
        loss_rows: u64,
        upstream: u64,
        n_valid: u64,
        flag: u64,
        row: RowParams,
    }
}
const _: () = assert!(std::mem::offset_of!(FusedParams, row) == 56); // `rows` in the kernel

/// The fields the fused and the unfused kernels' parameters end with, `rows` to `pad`: the
/// shape, the ignore index, the constants of the pinned arithmetic and the flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RowParams {
    rows: u64,
    vocab: u64,
    ignore_index: i64,
    consts: Consts,
    flags: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<RowParams>() == 56);
const _: () = assert!(std::mem::offset_of!(RowParams, consts) == 24); // `conf` in the kernel

impl RowParams {
    pub(super) fn new(cfg: &Config, flags: u32) -> Self {
        RowParams {
            rows: cfg.rows() as u64,
            vocab: cfg.vocab() as u64,
            ignore_index: cfg.get_ignore_index(),
            consts: cfg.consts(),
            flags,
            pad: 0,
        }
    }
}

device_params! {
    /// Mirrors `CountParams` in the kernel.
    #[derive(Debug, Default)]
    pub(super) struct CountParams(40) {
        pub targets: u64,
        pub n_valid: u64,
        pub rows: u64,
        pub vocab: u64,
        pub ignore_index: i64,
    }
}

device_params! {
    /// Mirrors `SumParams` in the kernel.
    #[derive(Debug, Default)]
    struct SumParams(40) {
        input: u64,
        out: u64,
        n_valid: u64,
        n: u64,
        flags: u32,
        pad: u32,
    }
}

/// Picks the i32 or i64 member of a pair of kernel families.
pub(super) fn by_target<T: Dtype, I: TargetIndex>(
    i32s: KernelFamily,
    i64s: KernelFamily,
) -> Kernel {
    if std::mem::size_of::<I>() == 8 {
        i64s.get::<T>()
    } else {
        i32s.get::<T>()
    }
}

/// Device scratch of the reductions: the per-row losses and the chunk sums (f32), and the count
/// of valid rows (u64). Pass one to reuse it across calls; otherwise each call allocates its
/// own, stream-ordered.
///
/// # Examples
///
/// ```
/// use fusedreg::cross_entropy::Workspace;
/// let ws = Workspace::new(); // allocates nothing: no GPU needed
/// assert_eq!(ws.capacity(), 0);
/// ```
#[derive(Debug, Default)]
pub struct Workspace {
    f32s: Option<CudaSlice<f32>>,
    count: Option<CudaSlice<u64>>,
}

impl Workspace {
    /// An empty workspace; the first call that needs it sizes it.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Workspace;
    /// assert_eq!(Workspace::new().capacity(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Current size of the f32 scratch in elements.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cross_entropy::Workspace;
    /// assert_eq!(Workspace::default().capacity(), 0);
    /// ```
    pub fn capacity(&self) -> usize {
        self.f32s.as_ref().map_or(0, |b| b.len())
    }
}

/// Bytes of scratch a call needs (the body of [`crate::workspace::cross_entropy_size`]): the
/// reduction's f32s, then its u64 count at the next multiple of 8.
pub(crate) fn workspace_size(rows: usize, vocab: usize, reduction: Reduction) -> Result<usize> {
    if rows == 0 || vocab == 0 {
        return Ok(0);
    }
    let f32_bytes = scratch_f32_len(rows, reduction)
        .checked_mul(4)
        .ok_or_else(|| Error::shape(OP, "the workspace size overflows usize"))?;
    Ok(count_offset(f32_bytes) + 8)
}

/// f32 elements of the reduction scratch (0 with [`Reduction::None`]).
fn scratch_f32_len(rows: usize, reduction: Reduction) -> usize {
    if reduction == Reduction::None {
        0
    } else {
        scratch_len(rows)
    }
}

/// Byte offset of the u64 count: after `f32_bytes`, rounded up to 8.
fn count_offset(f32_bytes: usize) -> usize {
    f32_bytes.div_ceil(8) * 8
}

/// f32 scratch for `rows` per-row losses and every level of chunk sums below the final one.
pub(crate) fn scratch_len(rows: usize) -> usize {
    let mut total = rows;
    let mut n = rows;
    while n > REDUCE_CHUNK {
        n = n.div_ceil(REDUCE_CHUNK);
        total += n;
    }
    total
}

/// The outputs and optional inputs of a GPU call besides logits, targets and gradient.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::cross_entropy::{self as xe, Config, Outputs, Reduction};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(4, 50_257)?.reduction(Reduction::None);
/// let mut logits = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// let targets = s.clone_htod(&[1i64, 2, -100, 3]).unwrap();
/// let upstream = s.clone_htod(&[1.0f32, 0.5, 1.0, 2.0]).unwrap();
/// let mut loss = s.alloc_zeros::<f32>(cfg.rows()).unwrap();
/// let mut flag = s.alloc_zeros::<u32>(1).unwrap();
/// let out = Outputs {
///     upstream: Some(upstream.as_view()),
///     invalid_target: Some(flag.as_view_mut()),
///     ..Outputs::new(loss.as_view_mut())
/// };
/// xe::forward_backward_inplace(&h, &cfg, &mut logits, &targets, out)?;
/// assert_eq!(s.clone_dtoh(&flag).unwrap(), [0]); // every target was in range
/// # Ok(()) }
/// ```
pub struct Outputs<'a> {
    /// The loss: `rows` f32 for [`Reduction::None`] (0 for ignored rows), one f32 otherwise.
    pub loss: CudaViewMut<'a, f32>,
    /// Per-row upstream gradient (`rows` f32), only with [`Reduction::None`]; `None` means 1.
    pub upstream: Option<CudaView<'a, f32>>,
    /// A flag (at least one u32) OR'ed with 1 when a target is outside `[0, V)` and not the
    /// ignore index. Never cleared by the op: zero it before the calls you want to check.
    pub invalid_target: Option<CudaViewMut<'a, u32>>,
    /// Reusable scratch for the reductions.
    pub workspace: Option<&'a mut Workspace>,
    /// The caller's memory for that scratch instead (at least
    /// [`crate::workspace::cross_entropy_size`] bytes; not with `workspace`).
    pub workspace_view: Option<WorkspaceView<'a>>,
}

impl<'a> Outputs<'a> {
    /// Just the loss.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::cross_entropy::Outputs;
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let mut loss = h.stream().alloc_zeros::<f32>(1).unwrap();
    /// let out = Outputs::new(loss.as_view_mut());
    /// assert!(out.upstream.is_none());
    /// # Ok(()) }
    /// ```
    pub fn new(loss: CudaViewMut<'a, f32>) -> Self {
        Outputs {
            loss,
            upstream: None,
            invalid_target: None,
            workspace: None,
            workspace_view: None,
        }
    }

    /// [`check_lens`] for a device call: the buffers' lengths against `cfg`.
    pub(super) fn check_lens(
        &self,
        cfg: &Config,
        logits: usize,
        targets: usize,
        grad: Option<usize>,
    ) -> Result<()> {
        let upstream = self.upstream.as_ref().map(|u| u.len());
        check_lens(cfg, logits, targets, grad, self.loss.len(), upstream)
    }
}

/// An empty config launches nothing: the sum or mean of no rows is 0, so a reduced loss is
/// zeroed (a per-row loss has no elements). True when `cfg` is empty and the call is done.
pub(super) fn finish_empty(handle: &Handle, cfg: &Config, loss: u64) -> Result<bool> {
    if !cfg.is_empty() {
        return Ok(false);
    }
    if cfg.get_reduction() != Reduction::None {
        // SAFETY: the loss view holds one f32 (checked).
        unsafe { cudarc::driver::result::memset_d8_async(loss, 0, 4, handle.stream().cu_stream()) }
            .map_err(Error::driver(OP))?;
    }
    Ok(true)
}

/// The kernels' reduction flags: the mean's division, or a per-row upstream gradient.
pub(super) fn reduction_flags(reduction: Reduction, upstream: bool) -> u32 {
    match reduction {
        Reduction::Mean => FLAG_MEAN,
        Reduction::None if upstream => FLAG_UPSTREAM,
        _ => 0,
    }
}

/// Loss and gradient into a separate buffer `grad` (`rows * vocab` of the logits' dtype), on the
/// handle's stream (see the [module docs](super)). Views starting at any element are accepted
/// (misaligned ones take the scalar path, with the same bits).
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config,
/// [`Error::InvalidArgument`] for an upstream gradient with a reduction other than `None` or a
/// buffer from another CUDA context; driver errors. Targets are not checked on the host: an
/// out-of-range one raises `out.invalid_target` and its row counts as ignored.
///
/// ```no_run
/// use fusedreg::cross_entropy::{self as xe, Config, Outputs};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(2, 1000)?.label_smoothing(0.1)?;
/// let logits = s.clone_htod(&vec![0.5f32; cfg.len()]).unwrap();
/// let targets = s.clone_htod(&[7i32, 999]).unwrap();
/// let mut grad = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut loss = s.alloc_zeros::<f32>(1).unwrap();
/// xe::forward_backward(&h, &cfg, &logits, &targets, &mut grad, Outputs::new(loss.as_view_mut()))?;
/// # Ok(()) }
/// ```
pub fn forward_backward<T: Dtype, I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    logits: &impl DevicePtr<T>,
    targets: &impl DevicePtr<I>,
    grad: &mut impl DevicePtrMut<T>,
    out: Outputs<'_>,
) -> Result<()> {
    out.check_lens(cfg, logits.len(), targets.len(), Some(grad.len()))?;
    let (l, _gl) = handle.read_ptr(OP, "logits", logits)?;
    let (t, _gt) = handle.read_ptr(OP, "targets", targets)?;
    let (g, _gg) = handle.write_ptr(OP, "grad", grad)?;
    launch::<T, I>(handle, cfg, l, t, Some(g), out)
}

/// Loss, with the gradient written over the logits (Liger-Kernel's way: no second
/// `[rows, vocab]` buffer at all).
///
/// Errors: as [`forward_backward`].
///
/// ```no_run
/// use fusedreg::cross_entropy::{self as xe, Config, Outputs};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(8, 128_256)?.label_smoothing(0.1)?;
/// let mut logits = s.alloc_zeros::<bf16>(cfg.len()).unwrap();
/// let targets = s.clone_htod(&[5i64; 8]).unwrap();
/// let mut loss = s.alloc_zeros::<f32>(1).unwrap();
/// xe::forward_backward_inplace(&h, &cfg, &mut logits, &targets, Outputs::new(loss.as_view_mut()))?;
/// // `logits` now holds d(mean loss)/d(logits).
/// # Ok(()) }
/// ```
pub fn forward_backward_inplace<T: Dtype, I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    logits: &mut impl DevicePtrMut<T>,
    targets: &impl DevicePtr<I>,
    out: Outputs<'_>,
) -> Result<()> {
    out.check_lens(cfg, logits.len(), targets.len(), None)?;
    let (t, _gt) = handle.read_ptr(OP, "targets", targets)?;
    let (l, _gl) = handle.write_ptr(OP, "logits", logits)?;
    launch::<T, I>(handle, cfg, l, t, Some(l), out)
}

/// Loss only: each row is read once.
///
/// Errors: as [`forward_backward`] (an upstream gradient is accepted and unused).
///
/// ```no_run
/// use fusedreg::cross_entropy::{self as xe, Config, Outputs, Reduction};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(2, 10)?.reduction(Reduction::Sum);
/// let logits = s.clone_htod(&[0.0f32; 20]).unwrap();
/// let targets = s.clone_htod(&[1i32, 2]).unwrap();
/// let mut loss = s.alloc_zeros::<f32>(1).unwrap();
/// xe::forward(&h, &cfg, &logits, &targets, Outputs::new(loss.as_view_mut()))?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype, I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    logits: &impl DevicePtr<T>,
    targets: &impl DevicePtr<I>,
    out: Outputs<'_>,
) -> Result<()> {
    out.check_lens(cfg, logits.len(), targets.len(), None)?;
    let (l, _gl) = handle.read_ptr(OP, "logits", logits)?;
    let (t, _gt) = handle.read_ptr(OP, "targets", targets)?;
    launch::<T, I>(handle, cfg, l, t, None, out)
}

/// The f32 scratch and the count to use: the caller's workspace (grown when too small) or
/// per-call buffers, which `own` keeps alive until after the launches (stream-ordered free).
pub(super) struct Scratch {
    pub f32s: u64,
    pub count: u64,
}

pub(super) fn scratch(
    handle: &Handle,
    ws: Option<&mut Workspace>,
    f32_len: usize,
    own: &mut Workspace,
) -> Result<Scratch> {
    let ws = match ws {
        Some(ws) => ws,
        None => own,
    };
    let stream = handle.stream();
    if f32_len > 0 {
        // SAFETY: every element a kernel reads is written by an earlier kernel of the call.
        unsafe { handle.scratch(OP, &mut ws.f32s, f32_len) }?;
    }
    if ws.count.is_none() {
        ws.count = Some(stream.alloc_zeros::<u64>(1).map_err(Error::driver(OP))?);
    }
    let f32s = match ws.f32s.as_mut() {
        Some(b) if f32_len > 0 => {
            let (p, _g) = handle.write_ptr(OP, "workspace", b)?;
            p
        }
        _ => 0,
    };
    let count = {
        let b = ws.count.as_mut().expect("allocated above");
        let (p, _g) = handle.write_ptr(OP, "workspace", b)?;
        p
    };
    Ok(Scratch { f32s, count })
}

/// Counts the valid rows into `*count` (zeroed first): the mean's divisor.
pub(super) fn count_valid<I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    targets: u64,
    count: u64,
) -> Result<()> {
    // SAFETY: `count` is a live u64 of the workspace on this stream.
    unsafe { cudarc::driver::result::memset_d8_async(count, 0, 8, handle.stream().cu_stream()) }
        .map_err(Error::driver(OP))?;
    let kernel = if std::mem::size_of::<I>() == 8 {
        Kernel::CrossEntropyCountTi64
    } else {
        Kernel::CrossEntropyCountTi32
    };
    let p = CountParams {
        targets,
        n_valid: count,
        rows: cfg.rows() as u64,
        vocab: cfg.vocab() as u64,
        ignore_index: cfg.get_ignore_index(),
    };
    let grid = (cfg.rows() as u64).div_ceil(SLOTS as u64).clamp(1, 1024) as u32;
    handle.launch(kernel, (grid, 1, 1), (SLOTS as u32, 1, 1), 0, &p)
}

/// Sums `n` per-row losses at `rows_ptr` into `out` (one f32), through the chunk levels kept in
/// the scratch after them; divides by `*count` for the mean.
pub(super) fn reduce_losses(
    handle: &Handle,
    rows_ptr: u64,
    n: usize,
    out: u64,
    count: u64,
    mean: bool,
) -> Result<()> {
    let mut input = rows_ptr;
    let mut n = n;
    let mut next = rows_ptr + 4 * n as u64;
    loop {
        let blocks = n.div_ceil(REDUCE_CHUNK);
        let last = blocks == 1;
        let p = SumParams {
            input,
            out: if last { out } else { next },
            n_valid: count,
            n: n as u64,
            flags: if last && mean { FLAG_MEAN } else { 0 },
            pad: 0,
        };
        handle.launch(
            Kernel::CrossEntropySum,
            (blocks as u32, 1, 1),
            (SLOTS as u32, 1, 1),
            0,
            &p,
        )?;
        if last {
            return Ok(());
        }
        input = next;
        next += 4 * blocks as u64;
        n = blocks;
    }
}

fn launch<T: Dtype, I: TargetIndex>(
    handle: &Handle,
    cfg: &Config,
    logits: u64,
    targets: u64,
    grad: Option<u64>,
    mut out: Outputs<'_>,
) -> Result<()> {
    let reduction = cfg.get_reduction();
    let (loss_ptr, _gloss) = handle.write_ptr(OP, "loss", &mut out.loss)?;
    if finish_empty(handle, cfg, loss_ptr)? {
        return Ok(());
    }
    let (upstream, _gu) = handle.read_opt(OP, "upstream", out.upstream.as_ref())?;
    let flag = out
        .invalid_target
        .as_mut()
        .map(|f| {
            if f.is_empty() {
                Err(Error::shape(
                    OP,
                    "invalid_target has 0 elements, expected at least 1",
                ))
            } else {
                handle.write_ptr(OP, "invalid_target", f)
            }
        })
        .transpose()?;

    let mut own = Workspace::new();
    let f32_len = scratch_f32_len(cfg.rows(), reduction);
    if out.workspace.is_some() && out.workspace_view.is_some() {
        return Err(crate::dropping::gpu::both_workspaces(OP));
    }
    let mut view = out.workspace_view.take();
    let mut _view_g = None;
    let s = match view.as_mut() {
        Some(v) => {
            // [f32 scratch][pad to 8][u64 count]; the count is zeroed by count_valid when read.
            let need = workspace_size(cfg.rows(), cfg.vocab(), reduction)?;
            let query = "fusedreg::workspace::cross_entropy_size";
            let (p, g) = v.bind(handle, OP, query, need)?;
            _view_g = Some(g);
            Scratch {
                f32s: if f32_len > 0 { p } else { 0 },
                count: p + count_offset(4 * f32_len) as u64,
            }
        }
        None => scratch(handle, out.workspace.take(), f32_len, &mut own)?,
    };
    if reduction == Reduction::Mean {
        count_valid::<I>(handle, cfg, targets, s.count)?;
    }

    let size = T::KIND.size() as u64;
    let vocab = cfg.vocab() as u64;
    let vec = logits % 16 == 0 && grad.is_none_or(|g| g % 16 == 0) && (vocab * size) % 16 == 0;
    let mut flags = reduction_flags(reduction, upstream != 0);
    if grad.is_some() {
        flags |= FLAG_GRAD;
    }
    if vec {
        flags |= FLAG_VEC;
    }
    let loss_rows = if reduction == Reduction::None {
        loss_ptr
    } else {
        s.f32s
    };
    let p = FusedParams {
        logits,
        grad: grad.unwrap_or(0),
        targets,
        loss_rows,
        upstream,
        n_valid: s.count,
        flag: flag.as_ref().map_or(0, |(p, _)| *p),
        row: RowParams::new(cfg, flags),
    };
    let grid = (cfg.rows() as u64).min(MAX_GRID) as u32;
    let kernel = if cfg.math().is_exact() {
        by_target::<T, I>(FUSED_I32, FUSED_I64)
    } else {
        by_target::<T, I>(FAST_I32, FAST_I64)
    };
    handle.launch(kernel, (grid, 1, 1), (SLOTS as u32, 1, 1), 0, &p)?;
    if reduction != Reduction::None {
        reduce_losses(
            handle,
            s.f32s,
            cfg.rows(),
            loss_ptr,
            s.count,
            reduction == Reduction::Mean,
        )?;
    }
    drop(own); // stream-ordered free after the kernels that use it
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels' structs are flat (`rows, vocab, ignore_index, conf .. lam2, flags, pad`):
    /// the nested Rust struct must give the same bytes.
    #[test]
    fn row_params_are_the_kernels_flat_fields() {
        let cfg = Config::new(3, 7)
            .unwrap()
            .label_smoothing(0.1)
            .unwrap()
            .z_loss(1e-4)
            .unwrap()
            .ignore_index(-5);
        // SAFETY: RowParams is 56 bytes of plain data with no padding (fields asserted above).
        let bytes: [u8; 56] = unsafe { std::mem::transmute(RowParams::new(&cfg, 9)) };
        let c = cfg.consts();
        let mut want = [
            3u64.to_ne_bytes(),
            7u64.to_ne_bytes(),
            (-5i64).to_ne_bytes(),
        ]
        .concat();
        for f in [c.conf, c.alpha, c.eps, c.vocab_f, c.lambda, c.lam2] {
            want.extend(f.to_ne_bytes());
        }
        want.extend([9u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat());
        assert_eq!(bytes.to_vec(), want);
    }

    #[test]
    fn scratch_holds_every_level() {
        assert_eq!(scratch_len(10), 10);
        // The count after the f32s, 8-byte aligned.
        assert_eq!(
            (count_offset(4), count_offset(8), count_offset(12)),
            (8, 8, 16)
        );
        assert_eq!(scratch_len(REDUCE_CHUNK), REDUCE_CHUNK);
        assert_eq!(scratch_len(REDUCE_CHUNK + 1), REDUCE_CHUNK + 1 + 2);
        let big = REDUCE_CHUNK * REDUCE_CHUNK * 3;
        assert_eq!(scratch_len(big), big + REDUCE_CHUNK * 3 + 3);
    }
}
