//! Launch wrappers for `kernels/dropout.cu`. The launch geometry and the backward are the shared
//! ones of [`crate::dropping`]; this file fills in the forward's params.

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

use super::{BackwardOptions, Config, ForwardOptions, OP};
use crate::dropping::gpu::{
    aligned16, backward as backward_op, geometry, resolution_flag, row_scale_fields, segments,
    zero_mask, BackwardKernels, Geometry, Segment, Slabs, BWD_SLAB_ROWS, FLAG_UNROLL,
};
use crate::dropping::{check_forward, ForwardLens};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::Handle;

/// Mirrors `dropout::FwdParams<T>` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FwdParams {
    x: u64,
    bias: u64,
    y: u64,
    rowscale: u64,
    rowscale_out: u64,
    mask: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
    seed: u64,
    call: u64,
    threshold: u64,
    path_call: u64,
    path_threshold: u64,
    base: u64,
    scale: f32,
    path_scale: f32,
    flags: u32,
    rows_per_sample: u32,
}
const _: () = assert!(std::mem::size_of::<FwdParams>() == 136);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for FwdParams {}

const FWD_VEC: KernelFamily = per_dtype!(DropoutFwdVecF32, DropoutFwdVecF16, DropoutFwdVecBf16);
const FWD_SCALAR: KernelFamily = per_dtype!(
    DropoutFwdScalarF32,
    DropoutFwdScalarF16,
    DropoutFwdScalarBf16
);
const BWD: BackwardKernels = BackwardKernels {
    vec: per_dtype!(DropoutBwdVecF32, DropoutBwdVecF16, DropoutBwdVecBf16),
    scalar: per_dtype!(
        DropoutBwdScalarF32,
        DropoutBwdScalarF16,
        DropoutBwdScalarBf16
    ),
    dbias: per_dtype!(DropoutDbiasF32, DropoutDbiasF16, DropoutDbiasBf16),
};

/// Rows per slab of forward launches. The forward moves two streams like the backward without
/// dbias, so it takes the backward's slab (two unrolled visits per thread): a prediction to
/// measure against 4, not a measurement.
const FWD_SLAB_ROWS: u64 = BWD_SLAB_ROWS;

/// `y = dropout(x + bias)` on the handle's stream (see the [module docs](super)).
///
/// `x` and `y` have `cfg.len()` elements; the optional buffers are in `opts`. Views starting at
/// any element are accepted (misaligned ones take the scalar path, with the same results).
///
/// Errors: [`crate::Error::ShapeMismatch`] for a length that disagrees with the config,
/// [`crate::Error::InvalidArgument`] for a rowscale together with a drop path, rowscale_out
/// without a drop path, bad launch tuning, or a buffer from another CUDA context; driver errors.
///
/// ```no_run
/// use fusedreg::dropout::{self, Config, ForwardOptions};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let (rows, cols) = (8, 4096);
/// let cfg = Config::new(rows, cols, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![bf16::ONE; rows * cols]).unwrap();
/// let bias = s.clone_htod(&vec![bf16::ZERO; cols]).unwrap();
/// let mut y = s.alloc_zeros::<bf16>(rows * cols).unwrap();
/// let mut mask = s.alloc_zeros::<u32>(cfg.mask_words()).unwrap();
/// let opts = ForwardOptions {
///     bias: Some(bias.as_view()),
///     mask_out: Some(mask.as_view_mut()),
///     ..Default::default()
/// };
/// dropout::forward(&h, &cfg, &x, &mut y, opts)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    y: &mut impl DevicePtrMut<T>,
    mut opts: ForwardOptions<'_, T>,
) -> Result<()> {
    let lens = ForwardLens {
        x: x.len(),
        residual: None,
        y: Some(y.len()),
        bias: opts.bias.as_ref().map(|b| b.len()),
        rowscale: opts.rowscale.as_ref().map(|b| b.len()),
        mask_out: opts.mask_out.as_ref().map(|b| b.len()),
        rowscale_out: opts.rowscale_out.as_ref().map(|b| b.len()),
    };
    check_forward(OP, cfg, &lens)?;
    opts.tuning.check()?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x, _gx) = handle.read_ptr(OP, "x", x)?;
    let (y, _gy) = handle.write_ptr(OP, "y", y)?;
    let bias_g = opts
        .bias
        .as_ref()
        .map(|b| handle.read_ptr(OP, "bias", b))
        .transpose()?;
    let rs_g = opts
        .rowscale
        .as_ref()
        .map(|b| handle.read_ptr(OP, "rowscale", b))
        .transpose()?;
    let mask_g = opts
        .mask_out
        .as_mut()
        .map(|b| handle.write_ptr(OP, "mask_out", b))
        .transpose()?;
    let rs_out_g = opts
        .rowscale_out
        .as_mut()
        .map(|b| handle.write_ptr(OP, "rowscale_out", b))
        .transpose()?;
    let ptr = |g: &Option<(u64, _)>| g.as_ref().map_or(0, |(p, _)| *p);
    let (bias, rowscale, mask, rowscale_out) =
        (ptr(&bias_g), ptr(&rs_g), ptr(&mask_g), ptr(&rs_out_g));

    // Without bias and row scale the row structure does not matter: the tensor is launched as
    // rows of a fixed width (plus a one-row remainder), the same bits as any other layout.
    let rows_matter = bias != 0 || cfg.has_row_scale(rowscale != 0);
    let aligned = aligned16(&[x, y, bias]); // an absent bias (0) is aligned

    let mut launches: [Option<(Segment, Geometry)>; 2] = [None, None];
    for (slot, seg) in launches.iter_mut().zip(segments::<T>(
        cfg.rows(),
        cfg.cols(),
        rows_matter,
        aligned,
        &opts.tuning,
    )) {
        // f32 packs 4 mask bits per thread: two lanes share a byte, which needs even lanes to
        // start on a multiple of 8 elements.
        let mask_ok = mask == 0 || T::KIND.size() != 4 || seg.cols % 8 == 0 || seg.rows == 1;
        let g = geometry::<T>(
            seg.rows,
            seg.cols,
            aligned,
            mask_ok,
            Slabs::Free(FWD_SLAB_ROWS),
            &opts.tuning,
        )?;
        *slot = Some((seg, g));
    }
    if mask != 0 && launches.iter().flatten().any(|(_, g)| !g.vector) {
        // The scalar path ORs bits into the words; zero them first.
        zero_mask(handle, OP, mask, cfg.mask_words())?;
    }

    let rsf = row_scale_fields(cfg.drop_path(), rowscale);
    let keying = cfg.keying();
    let mut flags = rsf.flags | resolution_flag(&keying);
    if opts.tuning.unroll {
        flags |= FLAG_UNROLL;
    }
    let rate = cfg.rate();
    let size = T::KIND.size() as u64;
    for &(seg, g) in launches.iter().flatten() {
        // Segments start on multiples of the flat width (a multiple of 32 elements), so the
        // mask of a later segment starts on a word boundary.
        let (base, off) = (seg.base as u64, seg.base as u64 * size);
        let p = FwdParams {
            x: x + off,
            bias,
            y: y + off,
            rowscale: rsf.rowscale,
            rowscale_out,
            mask: if mask == 0 { 0 } else { mask + base / 32 * 4 },
            rows: g.rows,
            cols: g.cols,
            slab_rows: g.slab_rows,
            seed: cfg.seed(),
            call: cfg.call(),
            threshold: keying.threshold(),
            path_call: rsf.path_call,
            path_threshold: rsf.path_threshold,
            base,
            scale: rate.scale(),
            path_scale: rsf.path_scale,
            flags,
            rows_per_sample: rsf.rows_per_sample,
        };
        let family = if g.vector { FWD_VEC } else { FWD_SCALAR };
        handle.launch(family.get::<T>(), g.grid, g.block, 0, &p)?;
    }
    Ok(())
}

/// `dx = dropout'(dy)` and optionally `dbias` on the handle's stream (see the
/// [module docs](super)): the shared backward (the same kernel code as
/// [`crate::dropout_residual::backward`]).
///
/// The keep mask is read from `opts.mask` when given, otherwise regenerated from `cfg` (the same
/// config as the forward). The row scale is `opts.rowscale` or the config's drop path. dbias is
/// deterministic: per-slab f32 partials summed over slabs in order, the partition and order of
/// [`super::cpu::backward`], so it matches the CPU bit for bit. The partials live in
/// `opts.workspace` or are allocated stream-ordered per call. When `rows` is 0 dbias is zeroed.
///
/// Errors as [`forward`].
///
/// ```no_run
/// use fusedreg::dropout::{self, BackwardOptions, Config, Workspace};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(1024, 1024, 0.1, 42, 7)?;
/// let s = h.stream();
/// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dbias = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
/// let mut ws = Workspace::new();
/// let opts = BackwardOptions {
///     dbias: Some(dbias.as_view_mut()),
///     workspace: Some(&mut ws),
///     ..Default::default()
/// };
/// dropout::backward(&h, &cfg, &dy, &mut dx, opts)?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    opts: BackwardOptions<'_, T>,
) -> Result<()> {
    backward_op::<T>(handle, OP, &BWD, cfg, dy, dx, opts)
}
