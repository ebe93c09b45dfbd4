//! Launch geometry and the shared GPU backward of the dropping ops (see the
//! [module docs](super)).
//!
//! Launch shape: grid.x over column tiles (`block` threads, `vec` consecutive columns each),
//! grid.y over row slabs of [`slab_rows`] rows; each thread loops over its slab's rows. A tensor
//! whose row structure does not matter (no bias, no row scale, no dbias) is launched as rows of a
//! fixed width ([`segments`]), which needs only base-pointer alignment for the vector path.
//!
//! The vector path (16-byte accesses, `vec = 16 / size_of::<T>()`) is taken when every element
//! pointer is 16-byte aligned and every row starts on a vector (`cols % vec == 0`, or a single
//! row whose partial last group the kernel handles element by element). For f32 with a mask
//! output it also needs `cols % 8 == 0` (two lanes combine their nibbles into one mask byte; see
//! `write_bits`): pass that as `vector_ok`. Otherwise the scalar path runs, with the same
//! results; it ORs mask bits with integer atomics into a mask zeroed first.

use cudarc::driver::{result, CudaSlice, DevicePtr, DevicePtrMut};

use super::{
    check_backward, slab_rows, BackwardOptions, Config, DropPath, Keying, LaunchTuning,
    MaskResolution, Workspace, DBIAS_LANES,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::runtime::device_params;
use crate::runtime::kernels::KernelFamily;
use crate::runtime::WorkspaceView;
use crate::runtime::{Handle, OptPtr};

/// `FLAG_DROP_PATH` in the kernels: generate the row scale under the drop path's call id.
pub(crate) const FLAG_DROP_PATH: u32 = 1;
/// `FLAG_UNROLL` in the kernels: unroll the row loop by `UNROLL` (launch tuning).
pub(crate) const FLAG_UNROLL: u32 = 2;
/// `FLAG_KEY16` in the kernels: 16-bit keying (the threshold is in `0 ..= 2^16`).
pub(crate) const FLAG_KEY16: u32 = 8;
/// `FLAG_KEY8` in the kernels: 8-bit keying (the threshold is in `0 ..= 2^8`).
pub(crate) const FLAG_KEY8: u32 = 16;

/// The kernel flag of a keying's resolution, or an error naming `op` when its kernels do not
/// implement that resolution (`supported` lists the ones they do), so that a resolution a
/// kernel would not read never runs as another one.
pub(crate) fn resolution_flag(
    op: &'static str,
    keying: &Keying,
    supported: &[MaskResolution],
) -> Result<u32> {
    let resolution = keying.resolution();
    if !supported.contains(&resolution) {
        return Err(Error::invalid(
            op,
            format!(
                "{resolution:?} keying is not implemented by this op's kernels (they offer {supported:?}); use one of those"
            ),
        ));
    }
    Ok(match resolution {
        MaskResolution::Bits32 => 0,
        MaskResolution::Bits16 => FLAG_KEY16,
        MaskResolution::Bits8 => FLAG_KEY8,
    })
}

device_params! {
    /// Mirrors `DropoutBwdParams<T>` in the kernels.
    #[derive(Debug, Default)]
    pub(crate) struct BwdParams(128) {
        dy: u64,
        dx: u64,
        rowscale: u64,
        mask: u64,
        partials: u64,
        rows: KeyedRows,
    }
}

device_params! {
    /// The launch shape and the element mask's keys, `rows` to `threshold`, that every dropping
    /// kernel's parameters hold after their pointers (flat in the kernels' structs; nested here,
    /// 8-byte aligned like them, so every offset is the same).
    #[derive(Debug, Default)]
    pub(crate) struct KeyedShape(48) {
        rows: u64,
        cols: u64,
        slab_rows: u64,
        seed: u64,
        call: u64,
        threshold: u64,
    }
}

impl KeyedShape {
    /// `(rows, cols, slab_rows)` of the launch and the element mask's `keying`.
    pub(crate) fn new((rows, cols, slab_rows): (u64, u64, u64), keying: &Keying) -> Self {
        Self {
            rows,
            cols,
            slab_rows,
            seed: keying.seed(),
            call: keying.call(),
            threshold: keying.threshold(),
        }
    }
}

device_params! {
    /// The fields the dropout kernels' parameters end with, `rows` to `rows_per_sample` (flat in
    /// the kernels' `FwdParams` / `DropoutBwdParams`, same offsets): the shape and keys, the row
    /// scale, the first flat index and the flags.
    #[derive(Debug, Default)]
    pub(crate) struct KeyedRows(88) {
        shape: KeyedShape,
        path_call: u64,
        path_threshold: u64,
        base: u64,
        scale: f32,
        path_scale: f32,
        flags: u32,
        rows_per_sample: u32,
    }
}

impl KeyedRows {
    /// `(rows, cols, slab_rows)` of the launch, the element mask's `keying`, the row scale
    /// `rsf`, the first flat index `base` and the kernel's `flags` (the row scale's included).
    pub(crate) fn new(
        shape: (u64, u64, u64),
        keying: &Keying,
        rsf: &RowScaleFields,
        base: u64,
        flags: u32,
    ) -> Self {
        Self {
            shape: KeyedShape::new(shape, keying),
            path_call: rsf.path_call,
            path_threshold: rsf.path_threshold,
            base,
            scale: keying.scale(),
            path_scale: rsf.path_scale,
            flags,
            rows_per_sample: rsf.rows_per_sample,
        }
    }
}

device_params! {
    /// Mirrors `DbiasParams<T>` in the kernel.
    #[derive(Debug, Default)]
    pub(crate) struct DbiasParams(32) {
        pub partials: u64,
        pub dbias: u64,
        pub cols: u64,
        pub slabs: u64,
    }
}

/// Threads per block of the dbias finishing kernel: 8 warps sharing 32 columns (the kernel's
/// DBIAS_WARPS and DBIAS_COLS), so its few columns spread over many SMs.
pub(crate) const DBIAS_BLOCK: u32 = 256;
/// Columns per block of the dbias finishing kernel.
const DBIAS_COLS: u64 = 32;

/// Where a launch goes: the (possibly flattened) shape, the path and the grid.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
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
pub(crate) enum Slabs {
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
pub(crate) const FWD_SLAB_ROWS: u64 = 4;
/// Rows per slab of backward launches without dbias: two visits (8 beat 4 for bf16, tied 16).
pub(crate) const BWD_SLAB_ROWS: u64 = 8;

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
pub(crate) struct Segment {
    pub base: usize,
    pub rows: usize,
    pub cols: usize,
}

/// The launches of an op: the config's own shape when rows matter (bias, row scale, dbias);
/// otherwise, for the vector path, rows of [`flat_width`] elements plus the remainder as a
/// second one-row launch. The element index keying the mask is `base + row * cols + col`
/// either way, so the result is the same bits. At most two, so no allocation per call.
pub(crate) fn segments<T: Dtype>(
    rows: usize,
    cols: usize,
    rows_matter: bool,
    vector_possible: bool,
    tuning: &LaunchTuning,
) -> impl Iterator<Item = Segment> {
    let n = rows * cols;
    let one = |rows, cols| Segment {
        base: 0,
        rows,
        cols,
    };
    let w = flat_width::<T>(tuning);
    let (first, second) = if rows_matter {
        (one(rows, cols), None)
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
pub(crate) fn geometry<T: Dtype>(
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
            "dropout",
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

/// Whether every pointer is 16-byte aligned (an absent buffer, 0, counts as aligned).
pub(crate) fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|&p| p % 16 == 0)
}

/// The row-scale fields of a kernel's params (both directions): the caller's buffer (`rowscale`,
/// 0 when none) or the drop path's keys with `FLAG_DROP_PATH`.
pub(crate) struct RowScaleFields {
    pub rowscale: u64,
    pub flags: u32,
    pub path_call: u64,
    pub path_threshold: u64,
    pub path_scale: f32,
    pub rows_per_sample: u32,
}

pub(crate) fn row_scale_fields(drop_path: Option<DropPath>, rowscale: u64) -> RowScaleFields {
    match drop_path {
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

/// The kernel families of an op's instantiation of the shared backward
/// (`dropout_bwd<T, V>` for `vec` and `V = 1` for `scalar`, `dbias_finish<T>` for `dbias`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardKernels {
    pub vec: KernelFamily,
    pub scalar: KernelFamily,
    pub dbias: KernelFamily,
    /// The keying resolutions these kernels implement.
    pub resolutions: &'static [MaskResolution],
}

/// One shared backward: `dx = m != 0 ? T(dy * m) : 0`, optionally with dbias. The caller has
/// validated every length, holds the guards of the raw pointers for the call, and handled the
/// empty problem (rows * cols == 0).
pub(crate) struct BackwardLaunch<'a> {
    pub op: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub keying: Keying,
    pub drop_path: Option<DropPath>,
    /// Caller-supplied row scale (0: none).
    pub rowscale: u64,
    /// 1-bit mask to read (0: regenerate).
    pub mask: u64,
    pub dy: u64,
    pub dx: u64,
    /// dbias output (0: none).
    pub dbias: u64,
    pub workspace: Option<&'a mut Workspace>,
    /// The caller's memory for the partials (see [`crate::workspace`]); not with `workspace`.
    pub view: Option<WorkspaceView<'a>>,
    pub tuning: LaunchTuning,
}

/// Launches the shared backward (see [`BackwardLaunch`]): per-slab f32 dbias partials (stage 1,
/// `dropout_bwd`) summed over slabs in order (stage 2, `dbias_finish`), the same partition and
/// order as `super::backward_cpu`, so dbias matches the CPU bit for bit. The partials live in
/// the workspace or are allocated stream-ordered for this call.
pub(crate) fn launch_backward<T: Dtype>(
    handle: &Handle,
    kernels: &BackwardKernels,
    l: BackwardLaunch<'_>,
) -> Result<()> {
    let op = l.op;
    let want_dbias = l.dbias != 0;
    // Without dbias and row scale, rows of a fixed width (the same bits as any layout).
    let rows_matter = want_dbias || l.rowscale != 0 || l.drop_path.is_some();
    let aligned = aligned16(&[l.dy, l.dx]);
    let slabs_kind = if want_dbias {
        Slabs::DbiasLanes
    } else {
        Slabs::Free(BWD_SLAB_ROWS)
    };
    let mut launches: [Option<(Segment, Geometry)>; 2] = [None, None];
    for (slot, seg) in launches.iter_mut().zip(segments::<T>(
        l.rows,
        l.cols,
        rows_matter,
        aligned,
        &l.tuning,
    )) {
        let g = geometry::<T>(seg.rows, seg.cols, aligned, true, slabs_kind, &l.tuning)?;
        *slot = Some((seg, g));
    }

    // Stage-1 partials: [slabs][cols] f32, every entry written by the kernel (one segment when
    // dbias is wanted: rows matter).
    let slabs = launches[0].map_or(0, |(_, g)| g.grid.1 as usize);
    let mut own = None;
    let mut view = l.view;
    // A non-null partials pointer is what asks the kernel for dbias: none without it.
    let want = want_dbias.then_some(slabs * l.cols);
    // SAFETY: stage 1 writes every (slab, column) partial before stage 2 reads it.
    let (partials_ptr, part_g) = unsafe {
        bind_partials(
            handle,
            op,
            SIZE_QUERY,
            view.as_mut(),
            l.workspace,
            &mut own,
            want,
        )
    }?;

    let rsf = row_scale_fields(l.drop_path, l.rowscale);
    let mut flags = rsf.flags | resolution_flag(l.op, &l.keying, kernels.resolutions)?;
    if l.tuning.unroll {
        flags |= FLAG_UNROLL;
    }
    let size = T::KIND.size() as u64;
    for &(seg, g) in launches.iter().flatten() {
        let (base, off) = (seg.base as u64, seg.base as u64 * size);
        let p = BwdParams {
            dy: l.dy + off,
            dx: l.dx + off,
            rowscale: rsf.rowscale,
            mask: if l.mask == 0 {
                0
            } else {
                l.mask + base / 32 * 4
            },
            partials: partials_ptr,
            rows: KeyedRows::new((g.rows, g.cols, g.slab_rows), &l.keying, &rsf, base, flags),
        };
        let family = if g.vector {
            kernels.vec
        } else {
            kernels.scalar
        };
        handle.launch(family.get::<T>(), g.grid, g.block, 0, &p)?;
    }

    if want_dbias {
        finish_dbias::<T>(handle, kernels.dbias, partials_ptr, l.dbias, l.cols, slabs)?;
    }
    drop(part_g);
    drop(own); // stream-ordered free after the kernels that use it
    Ok(())
}

/// The whole GPU backward of an op whose gradient is `m * dy` (see [`launch_backward`]): checks
/// the buffers against `cfg` (errors name `op`), zeroes dbias for an empty problem, launches.
pub(crate) fn backward<T: Dtype>(
    handle: &Handle,
    op: &'static str,
    kernels: &BackwardKernels,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    mut opts: BackwardOptions<'_, T>,
) -> Result<()> {
    check_backward(
        op,
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
                    .map_err(Error::driver(op))?;
            }
        }
        return Ok(());
    }
    let (dy_ptr, _g1) = handle.read_ptr(op, "dy", dy)?;
    let (dx_ptr, _g2) = handle.write_ptr(op, "dx", dx)?;
    let (rowscale, _grs) = handle.read_opt(op, "rowscale", opts.rowscale.as_ref())?;
    let (mask, _gm) = handle.read_opt(op, "mask", opts.mask.as_ref())?;
    let (dbias, _gdb) = handle.write_opt(op, "dbias", opts.dbias.as_mut())?;
    let l = BackwardLaunch {
        op,
        rows: cfg.rows(),
        cols: cfg.cols(),
        keying: cfg.keying(T::KIND),
        drop_path: cfg.drop_path(),
        rowscale,
        mask,
        dy: dy_ptr,
        dx: dx_ptr,
        dbias,
        workspace: opts.workspace,
        view: opts.workspace_view,
        tuning: opts.tuning,
    };
    launch_backward::<T>(handle, kernels, l)?;
    Ok(())
}

/// The size query a dropping op's workspace view is checked against (named in its error).
const SIZE_QUERY: &str = "fusedreg::workspace::dropout_backward_size";

/// The error of a call given both an owned workspace and a borrowed view.
pub(crate) fn both_workspaces(op: &'static str) -> Error {
    Error::invalid(
        op,
        "both `workspace` and `workspace_view` are set; pass one (the owned workspace or the \
         caller's memory)",
    )
}

/// Where a backward's `len` f32 column partials live (`len == None`: none wanted, address 0):
/// the caller's `view` (checked against the size query `query` names), else the owned
/// `workspace` (grown when too small), else `own`, this call's buffer, which the caller drops
/// after its launches (a stream-ordered free). A view and a workspace both given: an error.
///
/// # Safety
///
/// The memory is uninitialised: the backward must write every partial before its finishing
/// kernel reads it.
pub(crate) unsafe fn bind_partials<'a>(
    handle: &'a Handle,
    op: &'static str,
    query: &str,
    view: Option<&'a mut WorkspaceView<'_>>,
    workspace: Option<&'a mut Workspace>,
    own: &'a mut Option<CudaSlice<f32>>,
    len: Option<usize>,
) -> Result<OptPtr<'a>> {
    if view.is_some() && workspace.is_some() {
        return Err(both_workspaces(op));
    }
    let Some(len) = len else {
        return Ok((0, None));
    };
    match view {
        Some(v) => {
            let (p, g) = v.bind(handle, op, query, 4 * len)?;
            Ok((p, Some(g)))
        }
        None => {
            // SAFETY: the caller's contract (see above).
            let b = unsafe { Workspace::partials(handle, op, workspace, own, len) }?;
            handle.write_opt(op, "workspace", Some(b))
        }
    }
}

/// Zeroes a 1-bit mask of `words` u32 before a scalar-path forward ORs bits into it.
pub(crate) fn zero_mask(handle: &Handle, op: &'static str, mask: u64, words: usize) -> Result<()> {
    // SAFETY: the caller passes a live buffer of `words` u32 (checked) on this context.
    unsafe { result::memset_d8_async(mask, 0, 4 * words, handle.stream().cu_stream()) }
        .map_err(Error::driver(op))
}

/// Stage 2: `dbias[col] = T(sum over slabs in order of partials[slab][col])`.
pub(crate) fn finish_dbias<T: Dtype>(
    handle: &Handle,
    family: KernelFamily,
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
        family.get::<T>(),
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
