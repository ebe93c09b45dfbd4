//! Launch wrappers for `kernels/dropout_residual.cu`.
//!
//! Launch shape: grid.x over column tiles (`block` threads, `vec` consecutive columns each),
//! grid.y over row slabs of [`slab_rows`] rows; each thread loops over its slab's rows. A tensor
//! with no bias, no row scale (and, in the backward, no dbias) is launched as `[1, n]`, which
//! needs only base-pointer alignment for the vector path.
//!
//! The vector path (16-byte accesses, `vec = 16 / size_of::<T>()`) is taken when every element
//! pointer is 16-byte aligned and every row starts on a vector (`cols % vec == 0`, or a single
//! row whose partial last group the kernel handles element by element). For f32 with a mask
//! output it also needs `cols % 8 == 0` (two lanes combine their nibbles into one mask byte; see
//! the kernel). Otherwise the scalar path runs, with the same results; it ORs mask bits with
//! integer atomics into a mask zeroed first (a stream-ordered memset).

use cudarc::driver::{result, DevicePtr, DevicePtrMut, DeviceRepr};

use super::{
    check_backward, check_forward, slab_rows, BackwardOptions, Config, ForwardLens, ForwardOptions,
    LaunchTuning, DBIAS_LANES, OP,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::Handle;

const FLAG_DROP_PATH: u32 = 1;
const FLAG_UNROLL: u32 = 2;
const FLAG_IN_PLACE: u32 = 4;

/// Mirrors `FwdParams<T>` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FwdParams {
    x: u64,
    bias: u64,
    residual: u64,
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
const _: () = assert!(std::mem::size_of::<FwdParams>() == 144);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for FwdParams {}

/// Mirrors `BwdParams<T>` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BwdParams {
    dy: u64,
    dx: u64,
    rowscale: u64,
    mask: u64,
    partials: u64,
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
const _: () = assert!(std::mem::size_of::<BwdParams>() == 128);
// SAFETY: as above.
unsafe impl DeviceRepr for BwdParams {}

/// Mirrors `DbiasParams<T>` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct DbiasParams {
    pub partials: u64,
    pub dbias: u64,
    pub cols: u64,
    pub slabs: u64,
}
const _: () = assert!(std::mem::size_of::<DbiasParams>() == 32);
// SAFETY: as above.
unsafe impl DeviceRepr for DbiasParams {}

const FWD_VEC: KernelFamily = per_dtype!(
    DropoutResidualFwdVecF32,
    DropoutResidualFwdVecF16,
    DropoutResidualFwdVecBf16
);
const FWD_SCALAR: KernelFamily = per_dtype!(
    DropoutResidualFwdScalarF32,
    DropoutResidualFwdScalarF16,
    DropoutResidualFwdScalarBf16
);
const BWD_VEC: KernelFamily = per_dtype!(
    DropoutResidualBwdVecF32,
    DropoutResidualBwdVecF16,
    DropoutResidualBwdVecBf16
);
const BWD_SCALAR: KernelFamily = per_dtype!(
    DropoutResidualBwdScalarF32,
    DropoutResidualBwdScalarF16,
    DropoutResidualBwdScalarBf16
);
pub(super) const DBIAS: KernelFamily = per_dtype!(
    DropoutResidualDbiasF32,
    DropoutResidualDbiasF16,
    DropoutResidualDbiasBf16
);

/// Threads per block of the dbias finishing kernel: 8 warps sharing 32 columns (the kernel's
/// DBIAS_WARPS and DBIAS_COLS), so its few columns spread over many SMs.
pub(super) const DBIAS_BLOCK: u32 = 256;
/// Columns per block of the dbias finishing kernel.
const DBIAS_COLS: u64 = 32;

/// Where a launch goes: the (possibly flattened) shape, the path and the grid.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub rows: u64,
    pub cols: u64,
    pub slab_rows: u64,
    pub vector: bool,
    pub grid: (u32, u32, u32),
    /// (threads per column tile, row lanes): lanes = [`DBIAS_LANES`] for dbias launches.
    pub block: (u32, u32, u32),
}

/// How a launch splits its rows into slabs (grid.y).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slabs {
    /// The dbias partition ([`slab_rows`]): a function of the shape only, because per-slab
    /// partial sums are summed in slab order. Used by every launch that produces dbias partials.
    Dbias,
    /// [`Slabs::Dbias`] with each slab's rows split over [`DBIAS_LANES`] row lanes of the block
    /// (the fused backward).
    DbiasLanes,
    /// Any size: elementwise launches (no partials), where short slabs give many small blocks
    /// and so no tail wave ([`LaunchTuning::slab_rows`], else the given default).
    Free(u64),
}

/// Rows per slab of forward launches: one unrolled visit of 4 rows per thread. Measured on an
/// H100 against 8, 16, 32 and 64: the shortest slab is fastest (benches/NOTES.md).
pub(super) const FWD_SLAB_ROWS: u64 = 4;
/// Rows per slab of backward launches without dbias: two visits (8 beat 4 for bf16, tied 16).
pub(super) const BWD_SLAB_ROWS: u64 = 8;

/// Elements per row when a flat tensor (no bias, no row scale) is laid out as rows for the
/// kernels: 4 column tiles of 256 threads x one 16-byte vector. A flat tensor of one long row
/// would leave each thread a single vector and no loads to overlap (benches/NOTES.md).
fn flat_width<T: Dtype>(tuning: &LaunchTuning) -> usize {
    if tuning.flat_width > 0 {
        tuning.flat_width as usize
    } else {
        4 * tuning.block as usize * (16 / T::KIND.size())
    }
}

/// One launch over elements `base .. base + rows * cols` of the flat tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    pub base: usize,
    pub rows: usize,
    pub cols: usize,
}

/// The launches of an op: the config's own shape when rows matter (bias, row scale, dbias);
/// otherwise, for the vector path, rows of [`flat_width`] elements plus the remainder as a
/// second one-row launch. The element index keying the mask is `base + row * cols + col`
/// either way, so the result is the same bits. At most two, so no allocation per call.
pub(super) fn segments<T: Dtype>(
    cfg: &Config,
    rows_matter: bool,
    vector_possible: bool,
    tuning: &LaunchTuning,
) -> impl Iterator<Item = Segment> {
    let n = cfg.len();
    let one = |rows, cols| Segment {
        base: 0,
        rows,
        cols,
    };
    let w = flat_width::<T>(tuning);
    let (first, second) = if rows_matter {
        (one(cfg.rows(), cfg.cols()), None)
    } else if !vector_possible || tuning.force_scalar || n < 2 * w || w % 32 != 0 {
        (one(1, n), None)
    } else {
        let main = n / w * w;
        let rest = (main < n).then_some(Segment {
            base: main,
            rows: 1,
            cols: n - main,
        });
        (one(n / w, w), rest)
    };
    std::iter::once(first).chain(second)
}

/// The launch geometry of `[rows, cols]` elements of `T`. `aligned`: every element pointer is
/// 16-byte aligned; `vector_ok`: any further condition of the vector path holds.
pub(super) fn geometry<T: Dtype>(
    rows: usize,
    cols: usize,
    aligned: bool,
    vector_ok: bool,
    kind: Slabs,
    tuning: &LaunchTuning,
) -> Result<Geometry> {
    tuning.check()?;
    let vec = 16 / T::KIND.size();
    let vector = !tuning.force_scalar && aligned && vector_ok && (cols % vec == 0 || rows == 1);
    let per_thread = if vector { vec } else { 1 } as u64;
    let slab = match kind {
        Slabs::Dbias | Slabs::DbiasLanes => slab_rows(rows, cols, T::KIND) as u64,
        Slabs::Free(default) => {
            let want = if tuning.slab_rows > 0 {
                u64::from(tuning.slab_rows)
            } else {
                default
            };
            want.min(rows.max(1) as u64)
                .max((rows as u64).div_ceil(65_535))
        }
    };
    let slabs = (rows as u64).div_ceil(slab);
    if slabs > 65_535 {
        // slab_rows guarantees this; a violation would be a bug, not bad input.
        return Err(Error::invalid(
            OP,
            format!("internal: {slabs} row slabs exceed the grid limit"),
        ));
    }
    // A dbias launch splits each slab's rows over DBIAS_LANES row lanes of the block.
    let (bx, by) = match kind {
        Slabs::DbiasLanes => (tuning.block / DBIAS_LANES as u32, DBIAS_LANES as u32),
        Slabs::Dbias | Slabs::Free(_) => (tuning.block, 1),
    };
    let tiles = (cols as u64).div_ceil(per_thread).div_ceil(u64::from(bx));
    let grid_x = tiles.clamp(1, u64::from(tuning.max_grid_x).min(i32::MAX as u64)) as u32;
    Ok(Geometry {
        rows: rows as u64,
        cols: cols as u64,
        slab_rows: slab,
        vector,
        grid: (grid_x, slabs.max(1) as u32, 1),
        block: (bx, by, 1),
    })
}

pub(super) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|&p| p % 16 == 0)
}

/// Row-scale fields shared by both directions.
struct RowScaleFields {
    rowscale: u64,
    flags: u32,
    path_call: u64,
    path_threshold: u64,
    path_scale: f32,
    rows_per_sample: u32,
}

fn row_scale_fields(cfg: &Config, rowscale: u64) -> RowScaleFields {
    match cfg.drop_path() {
        Some(path) => RowScaleFields {
            rowscale: 0,
            flags: FLAG_DROP_PATH,
            path_call: path.call(),
            path_threshold: path.rate().threshold(),
            path_scale: path.rate().scale(),
            rows_per_sample: path.rows_per_sample() as u32,
        },
        None => RowScaleFields {
            rowscale,
            flags: 0,
            path_call: 0,
            path_threshold: 0,
            path_scale: 0.0,
            rows_per_sample: 1,
        },
    }
}

/// `y = residual + dropout(x + bias)` on the handle's stream (see the [module docs](super)).
///
/// `x`, `residual` and `y` have `cfg.len()` elements; the optional buffers are in `opts`.
/// Views starting at any element are accepted (misaligned ones take the scalar path).
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config,
/// [`Error::InvalidArgument`] for a rowscale together with a drop path, rowscale_out without a
/// drop path, or a buffer from another CUDA context; driver errors.
///
/// ```no_run
/// use fusedreg::dropout_residual::{self as dr, Config, ForwardOptions};
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
///     mask_out: Some(mask.as_view_mut()),
///     ..Default::default()
/// };
/// dr::forward(&h, &cfg, &x, &r, &mut y, opts)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    residual: &impl DevicePtr<T>,
    y: &mut impl DevicePtrMut<T>,
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    let lens = forward_lens(x.len(), residual.len(), Some(y.len()), &opts);
    check_forward(cfg, &lens)?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x_ptr, _gx) = handle.read_ptr(OP, "x", x)?;
    let (r_ptr, _gr) = handle.read_ptr(OP, "residual", residual)?;
    let (y_ptr, _gy) = handle.write_ptr(OP, "y", y)?;
    forward_launch::<T>(handle, cfg, x_ptr, r_ptr, y_ptr, false, opts)
}

/// [`forward`] updating the residual stream in place: `residual += dropout(x + bias)`. Rows whose
/// row scale is 0 are not touched at all.
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_residual::{self as dr, Config, ForwardOptions};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(512, 1024, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![bf16::ONE; cfg.len()]).unwrap();
/// let mut stream = s.clone_htod(&vec![bf16::ZERO; cfg.len()]).unwrap(); // the residual stream
/// dr::forward_inplace(&h, &cfg, &x, &mut stream, ForwardOptions::default())?;
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    residual: &mut impl DevicePtrMut<T>,
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    let lens = forward_lens(x.len(), residual.len(), None, &opts);
    check_forward(cfg, &lens)?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x_ptr, _gx) = handle.read_ptr(OP, "x", x)?;
    let (r_ptr, _gr) = handle.write_ptr(OP, "residual", residual)?;
    forward_launch::<T>(handle, cfg, x_ptr, r_ptr, r_ptr, true, opts)
}

fn forward_lens<T>(
    x: usize,
    residual: usize,
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

fn forward_launch<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: u64,
    residual: u64,
    y: u64,
    in_place: bool,
    mut opts: ForwardOptions<'_, T>,
) -> Result<()> {
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
    let aligned = aligned16(&[x, residual, y, bias]); // an absent bias (0) is aligned

    let mut launches: [Option<(Segment, Geometry)>; 2] = [None, None];
    for (slot, seg) in
        launches
            .iter_mut()
            .zip(segments::<T>(cfg, rows_matter, aligned, &opts.tuning))
    {
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
        // SAFETY: `mask` is a live buffer of cfg.mask_words() u32 (checked) on this context.
        unsafe {
            result::memset_d8_async(mask, 0, 4 * cfg.mask_words(), handle.stream().cu_stream())
        }
        .map_err(Error::driver(OP))?;
    }

    let rsf = row_scale_fields(cfg, rowscale);
    let mut flags = rsf.flags;
    if opts.tuning.unroll {
        flags |= FLAG_UNROLL;
    }
    if in_place {
        flags |= FLAG_IN_PLACE;
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
            residual: residual + off,
            y: y + off,
            rowscale: rsf.rowscale,
            rowscale_out,
            mask: if mask == 0 { 0 } else { mask + base / 32 * 4 },
            rows: g.rows,
            cols: g.cols,
            slab_rows: g.slab_rows,
            seed: cfg.seed(),
            call: cfg.call(),
            threshold: rate.threshold(),
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
/// [module docs](super)). `dresidual = dy`: nothing is copied, reuse `dy`.
///
/// The keep mask is read from `opts.mask` when given, otherwise regenerated from `cfg` (the same
/// config as the forward). The row scale is `opts.rowscale` or the config's drop path. dbias is
/// deterministic: per-slab f32 partials (stage 1, this kernel) summed over slabs in order
/// (stage 2), the same partition and order as [`super::cpu::backward`], so it matches the CPU
/// bit for bit. The partials live in `opts.workspace` or are allocated stream-ordered per call.
/// When `rows` is 0 dbias is zeroed (a memset, no kernel).
///
/// ```no_run
/// use fusedreg::dropout_residual::{self as dr, BackwardOptions, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(1024, 1024, 0.1, 42, 7)?;
/// let s = h.stream();
/// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dbias = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
/// let mut ws = dr::Workspace::new();
/// let opts = BackwardOptions {
///     dbias: Some(dbias.as_view_mut()),
///     workspace: Some(&mut ws),
///     ..Default::default()
/// };
/// dr::backward(&h, &cfg, &dy, &mut dx, opts)?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    mut opts: BackwardOptions<'_, T>,
) -> Result<()> {
    check_backward(
        cfg,
        dy.len(),
        dx.len(),
        opts.rowscale.as_ref().map(|b| b.len()),
        opts.mask.as_ref().map(|b| b.len()),
        opts.dbias.as_ref().map(|b| b.len()),
    )?;
    opts.tuning.check()?;
    if cfg.is_empty() {
        if let Some(db) = opts.dbias.as_mut() {
            if !db.is_empty() {
                handle
                    .stream()
                    .memset_zeros(db)
                    .map_err(Error::driver(OP))?;
            }
        }
        return Ok(());
    }
    let (dy_ptr, _g1) = handle.read_ptr(OP, "dy", dy)?;
    let (dx_ptr, _g2) = handle.write_ptr(OP, "dx", dx)?;
    let rs_g = opts
        .rowscale
        .as_ref()
        .map(|b| handle.read_ptr(OP, "rowscale", b))
        .transpose()?;
    let mask_g = opts
        .mask
        .as_ref()
        .map(|b| handle.read_ptr(OP, "mask", b))
        .transpose()?;
    let rowscale = rs_g.as_ref().map_or(0, |(p, _)| *p);
    let mask = mask_g.as_ref().map_or(0, |(p, _)| *p);
    let want_dbias = opts.dbias.is_some();

    // As in the forward: without dbias and row scale, rows of a fixed width.
    let rows_matter = want_dbias || cfg.has_row_scale(rowscale != 0);
    let aligned = aligned16(&[dy_ptr, dx_ptr]);
    let slabs_kind = if want_dbias {
        Slabs::DbiasLanes
    } else {
        Slabs::Free(BWD_SLAB_ROWS)
    };
    let mut launches: [Option<(Segment, Geometry)>; 2] = [None, None];
    for (slot, seg) in
        launches
            .iter_mut()
            .zip(segments::<T>(cfg, rows_matter, aligned, &opts.tuning))
    {
        let g = geometry::<T>(seg.rows, seg.cols, aligned, true, slabs_kind, &opts.tuning)?;
        *slot = Some((seg, g));
    }

    // Stage-1 partials: [slabs][cols] f32, every entry written by the kernel (one segment when
    // dbias is wanted: rows matter).
    let slabs = launches[0].map_or(0, |(_, g)| g.grid.1 as usize);
    let partial_len = if want_dbias { slabs * cfg.cols() } else { 0 };
    let mut own = None;
    let partials = match (want_dbias, opts.workspace.as_deref_mut()) {
        (false, _) => None,
        (true, Some(ws)) => {
            if ws.capacity() < partial_len {
                ws.partials = None; // free the old one first
                                    // SAFETY: every element the kernels read is written by stage 1 first.
                ws.partials = Some(
                    unsafe { handle.stream().alloc::<f32>(partial_len) }
                        .map_err(Error::driver(OP))?,
                );
            }
            ws.partials.as_mut()
        }
        (true, None) => {
            // SAFETY: as above.
            own = Some(
                unsafe { handle.stream().alloc::<f32>(partial_len) }.map_err(Error::driver(OP))?,
            );
            own.as_mut()
        }
    };
    let part_g = partials
        .map(|b| handle.write_ptr(OP, "workspace", b))
        .transpose()?;
    let partials_ptr = part_g.as_ref().map_or(0, |(p, _)| *p);

    let rsf = row_scale_fields(cfg, rowscale);
    let mut flags = rsf.flags;
    if opts.tuning.unroll {
        flags |= FLAG_UNROLL;
    }
    let rate = cfg.rate();
    let size = T::KIND.size() as u64;
    for &(seg, g) in launches.iter().flatten() {
        let (base, off) = (seg.base as u64, seg.base as u64 * size);
        let p = BwdParams {
            dy: dy_ptr + off,
            dx: dx_ptr + off,
            rowscale: rsf.rowscale,
            mask: if mask == 0 { 0 } else { mask + base / 32 * 4 },
            partials: partials_ptr,
            rows: g.rows,
            cols: g.cols,
            slab_rows: g.slab_rows,
            seed: cfg.seed(),
            call: cfg.call(),
            threshold: rate.threshold(),
            path_call: rsf.path_call,
            path_threshold: rsf.path_threshold,
            base,
            scale: rate.scale(),
            path_scale: rsf.path_scale,
            flags,
            rows_per_sample: rsf.rows_per_sample,
        };
        let family = if g.vector { BWD_VEC } else { BWD_SCALAR };
        handle.launch(family.get::<T>(), g.grid, g.block, 0, &p)?;
    }

    if let Some(db) = opts.dbias.as_mut() {
        let (db_ptr, _g) = handle.write_ptr(OP, "dbias", db)?;
        finish_dbias::<T>(handle, partials_ptr, db_ptr, cfg.cols(), slabs)?;
    }
    drop(part_g);
    drop(own); // stream-ordered free after the kernels that use it
    Ok(())
}

/// Stage 2: `dbias[col] = T(sum over slabs in order of partials[slab][col])`.
pub(super) fn finish_dbias<T: Dtype>(
    handle: &Handle,
    partials: u64,
    dbias: u64,
    cols: usize,
    slabs: usize,
) -> Result<()> {
    let p = DbiasParams {
        partials,
        dbias,
        cols: cols as u64,
        slabs: slabs as u64,
    };
    handle.launch(
        DBIAS.get::<T>(),
        (
            (cols as u64).div_ceil(DBIAS_COLS).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        (DBIAS_BLOCK, 1, 1),
        0,
        &p,
    )
}
