//! Launch wrappers for `kernels/dropout.cu`. The launch geometry (slabs, segments, the vector
//! path's conditions) and the backward are the shared ones of [`crate::dropping`]; this file
//! fills in the forward's params.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::cpu::IN_PLACE_RESIDUAL;
use super::{BackwardOptions, Config, ForwardOptions, OP};
use crate::dropping::gpu::{
    aligned16, backward as backward_op, geometry, resolution_flag, row_scale_fields, segments,
    zero_mask, BackwardKernels, Geometry, KeyedRows, Segment, Slabs, BWD_SLAB_ROWS, FLAG_UNROLL,
    FWD_SLAB_ROWS,
};
use crate::dropping::rows::row_partials;
use crate::dropping::{check_forward, ForwardLens, MaskResolution};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::Handle;

crate::kernel_list! {
    "dropout" => {
        [f32 DropoutFwdVecF32, f16 DropoutFwdVecF16, bf16 DropoutFwdVecBf16] = "dropout_fwd_vec_",
        [f32 DropoutFwdScalarF32, f16 DropoutFwdScalarF16, bf16 DropoutFwdScalarBf16] = "dropout_fwd_scalar_",
        [f32 DropoutFwdResVecF32, f16 DropoutFwdResVecF16, bf16 DropoutFwdResVecBf16] = "dropout_fwd_res_vec_",
        [f32 DropoutFwdResScalarF32, f16 DropoutFwdResScalarF16, bf16 DropoutFwdResScalarBf16] = "dropout_fwd_res_scalar_",
        /// The residual forward with the redundancy statistics (one row per block): the scalar entry
        /// (any width and alignment) and the vector one (`cols % 8 == 0`, 16-byte aligned views).
        [f32 DropoutFwdResStatsF32, f16 DropoutFwdResStatsF16, bf16 DropoutFwdResStatsBf16] = "dropout_fwd_res_stats_" => FWD_STATS,
        [f32 DropoutFwdResStatsVecF32, f16 DropoutFwdResStatsVecF16, bf16 DropoutFwdResStatsVecBf16] = "dropout_fwd_res_stats_vec_" => FWD_STATS_VEC,
        [f32 DropoutBwdVecF32, f16 DropoutBwdVecF16, bf16 DropoutBwdVecBf16] = "dropout_bwd_vec_",
        [f32 DropoutBwdScalarF32, f16 DropoutBwdScalarF16, bf16 DropoutBwdScalarBf16] = "dropout_bwd_scalar_",
        [f32 DropoutDbiasF32, f16 DropoutDbiasF16, bf16 DropoutDbiasBf16] = "dropout_dbias_",
        [f32 DropoutUnfusedBiasAddF32, f16 DropoutUnfusedBiasAddF16, bf16 DropoutUnfusedBiasAddBf16] = "dropout_unfused_bias_add_",
        [f32 DropoutUnfusedDropoutF32, f16 DropoutUnfusedDropoutF16, bf16 DropoutUnfusedDropoutBf16] = "dropout_unfused_dropout_",
        [f32 DropoutUnfusedMaskedScaleF32, f16 DropoutUnfusedMaskedScaleF16, bf16 DropoutUnfusedMaskedScaleBf16] = "dropout_unfused_masked_scale_",
        [f32 DropoutUnfusedColSumF32, f16 DropoutUnfusedColSumF16, bf16 DropoutUnfusedColSumBf16] = "dropout_unfused_col_sum_",
        [f32 DropoutUnfusedAddF32, f16 DropoutUnfusedAddF16, bf16 DropoutUnfusedAddBf16] = "dropout_unfused_add_" => ADD,
    }
}

/// `FLAG_IN_PLACE` in the kernel: y == residual, dropped rows are not touched at all.
const FLAG_IN_PLACE: u32 = 4;

device_params! {
    /// Mirrors `dropout::FwdParams<T>` in the kernel.
    #[derive(Debug, Default)]
    struct FwdParams(144) {
        x: u64,
        bias: u64,
        residual: u64,
        y: u64,
        rowscale: u64,
        rowscale_out: u64,
        mask: u64,
        rows: KeyedRows,
    }
}

device_params! {
    /// Mirrors `dropout::FwdStatsParams<T>`: the statistics entries' params.
    #[derive(Debug, Default)]
    struct FwdStatsParams(152) {
        f: FwdParams,
        /// The meter site's 3 words.
        stats: u64,
    }
}

/// Most blocks of a statistics launch (each loops over its rows): about two blocks per slot of an
/// H100/H200 (132 SMs x 8 blocks of 256 threads), so a block's setup is spent on several rows.
/// The words do not depend on the grid (integer atomics).
const STATS_MAX_GRID: u64 = 2048;

/// The forward's (vector, scalar) kernels without and with a residual.
const FWD: [(KernelFamily, KernelFamily); 2] = [
    (
        per_dtype!(DropoutFwdVecF32, DropoutFwdVecF16, DropoutFwdVecBf16),
        per_dtype!(
            DropoutFwdScalarF32,
            DropoutFwdScalarF16,
            DropoutFwdScalarBf16
        ),
    ),
    (
        per_dtype!(
            DropoutFwdResVecF32,
            DropoutFwdResVecF16,
            DropoutFwdResVecBf16
        ),
        per_dtype!(
            DropoutFwdResScalarF32,
            DropoutFwdResScalarF16,
            DropoutFwdResScalarBf16
        ),
    ),
];
const BWD: BackwardKernels = BackwardKernels {
    vec: per_dtype!(DropoutBwdVecF32, DropoutBwdVecF16, DropoutBwdVecBf16),
    scalar: per_dtype!(
        DropoutBwdScalarF32,
        DropoutBwdScalarF16,
        DropoutBwdScalarBf16
    ),
    dbias: per_dtype!(DropoutDbiasF32, DropoutDbiasF16, DropoutDbiasBf16),
    resolutions: RESOLUTIONS,
};

/// The keying resolutions kernels/dropout.cu implements.
const RESOLUTIONS: &[MaskResolution] = &[
    MaskResolution::Bits32,
    MaskResolution::Bits16,
    MaskResolution::Bits8,
];

/// Rows per slab of forward launches: one unrolled visit of 4 rows per thread with a residual
/// (measured on an H100, [`FWD_SLAB_ROWS`]); two visits without one, which moves two streams
/// like the backward without dbias and so takes its slab (a prediction to measure against 4,
/// not a measurement).
fn fwd_slab_rows(residual: bool) -> u64 {
    if residual {
        FWD_SLAB_ROWS
    } else {
        BWD_SLAB_ROWS
    }
}

/// `y = dropout(x + bias)`, or `y = residual + dropout(x + bias)` with `opts.residual`, on the
/// handle's stream (see the [module docs](super)).
///
/// `x`, `y` (and the residual) have `cfg.len()` elements; the optional buffers are in `opts`.
/// Views starting at any element are accepted (misaligned ones take the scalar path, with the
/// same results).
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config,
/// [`Error::InvalidArgument`] for a rowscale together with a drop path, rowscale_out without a
/// drop path, bad launch tuning, or a buffer from another CUDA context; driver errors.
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
/// let r = s.clone_htod(&vec![bf16::ONE; rows * cols]).unwrap();
/// let bias = s.clone_htod(&vec![bf16::ZERO; cols]).unwrap();
/// let mut y = s.alloc_zeros::<bf16>(rows * cols).unwrap();
/// let mut mask = s.alloc_zeros::<u32>(cfg.mask_words()).unwrap();
/// let opts = ForwardOptions {
///     bias: Some(bias.as_view()),
///     residual: Some(r.as_view()), // y = r + dropout(x + bias); None: y = dropout(x + bias)
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
    let residual_len = opts.residual.as_ref().map(|r| r.len());
    check_forward(
        OP,
        cfg,
        &forward_lens(x.len(), residual_len, Some(y.len()), &opts),
    )?;
    opts.tuning.check()?;
    super::check_redundancy(
        opts.redundancy.is_some(),
        residual_len.is_some(),
        opts.mask_out.is_some(),
    )?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x_ptr, _gx) = handle.read_ptr(OP, "x", x)?;
    let (y_ptr, _gy) = handle.write_ptr(OP, "y", y)?;
    let residual_view = opts.residual.take();
    let (r_ptr, _gr) = handle.read_opt(OP, "residual", residual_view.as_ref())?;
    let residual = (r_ptr != 0).then_some(r_ptr);
    forward_launch::<T>(handle, cfg, x_ptr, residual, y_ptr, false, opts)
}

/// [`forward`] updating the residual stream in place: `residual += dropout(x + bias)`, the bits
/// of the out-of-place forward (`opts.residual` must be `None`: the residual is the output).
/// Rows whose row scale is 0 are not touched at all.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout::{self, Config, ForwardOptions};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(512, 1024, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![bf16::ONE; cfg.len()]).unwrap();
/// let mut stream = s.clone_htod(&vec![bf16::ZERO; cfg.len()]).unwrap(); // the residual stream
/// dropout::forward_inplace(&h, &cfg, &x, &mut stream, ForwardOptions::default())?;
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    residual: &mut impl DevicePtrMut<T>,
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    if opts.residual.is_some() {
        return Err(Error::invalid(OP, IN_PLACE_RESIDUAL));
    }
    check_forward(
        OP,
        cfg,
        &forward_lens(x.len(), Some(residual.len()), None, &opts),
    )?;
    opts.tuning.check()?;
    super::check_redundancy(opts.redundancy.is_some(), true, opts.mask_out.is_some())?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x_ptr, _gx) = handle.read_ptr(OP, "x", x)?;
    let (r_ptr, _gr) = handle.write_ptr(OP, "residual", residual)?;
    forward_launch::<T>(handle, cfg, x_ptr, Some(r_ptr), r_ptr, true, opts)
}

fn forward_lens<T>(
    x: usize,
    residual: Option<usize>,
    y: Option<usize>,
    opts: &ForwardOptions<'_, T>,
) -> ForwardLens {
    ForwardLens {
        x,
        residual,
        y,
        bias: opts.bias.as_ref().map(|b| b.len()),
        rowscale: opts.rowscale.as_ref().map(|b| b.len()),
        mask_out: opts.mask_out.as_ref().map(|b| b.len()),
        rowscale_out: opts.rowscale_out.as_ref().map(|b| b.len()),
    }
}

/// The forward's launches on validated, non-empty buffers (`residual`: its address, or `None`).
fn forward_launch<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: u64,
    residual: Option<u64>,
    y: u64,
    in_place: bool,
    mut opts: ForwardOptions<'_, T>,
) -> Result<()> {
    let (bias, _gb) = handle.read_opt(OP, "bias", opts.bias.as_ref())?;
    let (rowscale, _grs) = handle.read_opt(OP, "rowscale", opts.rowscale.as_ref())?;
    let (mask, _gm) = handle.write_opt(OP, "mask_out", opts.mask_out.as_mut())?;
    let (rowscale_out, _grso) = handle.write_opt(OP, "rowscale_out", opts.rowscale_out.as_mut())?;

    if let (Some(site), Some(residual)) = (opts.redundancy.as_mut(), residual) {
        // The statistics forward (mask_out was refused by check_redundancy).
        let (words, _gw) = handle.write_ptr(OP, "redundancy site", &mut site.words)?;
        let rsf = row_scale_fields(cfg.drop_path(), rowscale);
        let keying = cfg.keying(T::KIND);
        let mut flags = rsf.flags | resolution_flag(OP, &keying, RESOLUTIONS)?;
        if in_place {
            flags |= FLAG_IN_PLACE;
        }
        let p = FwdStatsParams {
            f: FwdParams {
                x,
                bias,
                residual,
                y,
                rowscale: rsf.rowscale,
                rowscale_out,
                mask: 0,
                rows: KeyedRows::new(
                    (cfg.rows() as u64, cfg.cols() as u64, 1),
                    &keying,
                    &rsf,
                    0,
                    flags,
                ),
            },
            stats: words,
        };
        let block = row_partials(cfg.cols()) as u32;
        let grid = (cfg.rows() as u64).min(STATS_MAX_GRID) as u32;
        // Whole, aligned groups of 8 (base is 0): the vector entry, the same bits.
        let vector = cfg.cols() % 8 == 0 && aligned16(&[x, residual, y, bias]);
        let family = if vector { FWD_STATS_VEC } else { FWD_STATS };
        return handle.launch(family.get::<T>(), (grid, 1, 1), (block, 1, 1), 0, &p);
    }

    // Without bias and row scale the row structure does not matter: the tensor is launched as
    // rows of a fixed width (plus a one-row remainder), the same bits as any other layout.
    let rows_matter = bias != 0 || cfg.has_row_scale(rowscale != 0);
    // An absent bias or residual (0) is aligned.
    let aligned = aligned16(&[x, residual.unwrap_or(0), y, bias]);

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
            Slabs::Free(fwd_slab_rows(residual.is_some())),
            &opts.tuning,
        )?;
        *slot = Some((seg, g));
    }
    if mask != 0 && launches.iter().flatten().any(|(_, g)| !g.vector) {
        // The scalar path ORs bits into the words; zero them first.
        zero_mask(handle, OP, mask, cfg.mask_words())?;
    }

    let rsf = row_scale_fields(cfg.drop_path(), rowscale);
    let keying = cfg.keying(T::KIND);
    let mut flags = rsf.flags | resolution_flag(OP, &keying, RESOLUTIONS)?;
    if opts.tuning.unroll {
        flags |= FLAG_UNROLL;
    }
    if in_place {
        flags |= FLAG_IN_PLACE;
    }
    let (vec_family, scalar_family) = FWD[usize::from(residual.is_some())];
    let size = T::KIND.size() as u64;
    for &(seg, g) in launches.iter().flatten() {
        // Segments start on multiples of the flat width (a multiple of 32 elements), so the
        // mask of a later segment starts on a word boundary.
        let (base, off) = (seg.base as u64, seg.base as u64 * size);
        let p = FwdParams {
            x: x + off,
            bias,
            residual: residual.map_or(0, |r| r + off),
            y: y + off,
            rowscale: rsf.rowscale,
            rowscale_out,
            mask: if mask == 0 { 0 } else { mask + base / 32 * 4 },
            rows: KeyedRows::new((g.rows, g.cols, g.slab_rows), &keying, &rsf, base, flags),
        };
        let family = if g.vector { vec_family } else { scalar_family };
        handle.launch(family.get::<T>(), g.grid, g.block, 0, &p)?;
    }
    Ok(())
}

/// `dx = dropout'(dy)` and optionally `dbias` on the handle's stream (see the
/// [module docs](super)): the shared backward of [`crate::dropping`]. `dresidual = dy`: nothing
/// is copied, reuse `dy`. The same call serves a forward with or without a residual.
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
