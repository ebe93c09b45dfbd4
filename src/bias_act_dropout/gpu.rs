//! Launch wrappers for `kernels/bias_act_dropout.cu`.
//!
//! Launch shape: blocks of (64, [`LANES`]) threads; grid.x over column groups (64 threads, `vec`
//! consecutive columns each), grid.y over row slabs of [`slab_rows`] rows (the dbias partition,
//! used by both directions). The vector path (16-byte accesses, `vec = 16 / size_of::<T>()`) is
//! taken when `cols % vec == 0` and every element pointer is 16-byte aligned; otherwise the
//! scalar path runs, with the same results.
//!
//! Kernels: the vector path has one kernel per body (ReLU, each `Math::Fast` activation, and one
//! with the four `Math::Exact` bodies), so each stays within 64 registers; the backward's ReLU
//! and `Math::Fast` bodies have one kernel per keying besides (the keying a template argument,
//! no spills); the scalar path one kernel per math mode. dbias is finished by the shared staged `dbias_finish` (`kernels/common/
//! dropping.cuh`), the same ordered sum over slabs.

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};

use super::{check_backward, check_forward, Activation, Config, Preact, LANES, OP};
use crate::dropping::gpu::{aligned16, finish_dbias, resolution_flag};
use crate::dropping::{slab_rows, MaskResolution};
use crate::dtype::{Dtype, DtypeKind};
use crate::error::{Error, Result};
use crate::math::Math;
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::Handle;
use crate::workspace::WorkspaceView;

/// The keying resolutions kernels/bias_act_dropout.cu implements.
const RESOLUTIONS: &[MaskResolution] = &[
    MaskResolution::Bits32,
    MaskResolution::Bits16,
    MaskResolution::Bits8,
];

/// Mirrors `BiasActDropoutFwdParams` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct FwdParams {
    x: u64,
    bias: u64,
    y: u64,
    h_out: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
    seed: u64,
    call: u64,
    threshold: u64,
    scale: f32,
    keep_frac: f32,
    log2_scale: f32,
    act: u32,
    math: u32,
    flags: u32,
}
const _: () = assert!(std::mem::size_of::<FwdParams>() == 104);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for FwdParams {}

/// Mirrors `BiasActDropoutBwdParams` in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BwdParams {
    dy: u64,
    x: u64,
    bias: u64,
    h: u64,
    dx: u64,
    partials: u64,
    rows: u64,
    cols: u64,
    slab_rows: u64,
    seed: u64,
    call: u64,
    threshold: u64,
    scale: f32,
    act: u32,
    math: u32,
    flags: u32,
    keep_frac: f32,
    log2_keep: f32,
}
const _: () = assert!(std::mem::size_of::<BwdParams>() == 120);
// SAFETY: as above.
unsafe impl DeviceRepr for BwdParams {}

const FWD_VEC: KernelFamily = per_dtype!(
    BiasActDropoutFwdVecF32,
    BiasActDropoutFwdVecF16,
    BiasActDropoutFwdVecBf16
);
const FWD_VEC_RELU: KernelFamily = per_dtype!(
    BiasActDropoutFwdVecReluF32,
    BiasActDropoutFwdVecReluF16,
    BiasActDropoutFwdVecReluBf16
);
const FWD_VEC_GELU_ERF_FAST: KernelFamily = per_dtype!(
    BiasActDropoutFwdVecGeluErfFastF32,
    BiasActDropoutFwdVecGeluErfFastF16,
    BiasActDropoutFwdVecGeluErfFastBf16
);
const FWD_VEC_GELU_TANH_FAST: KernelFamily = per_dtype!(
    BiasActDropoutFwdVecGeluTanhFastF32,
    BiasActDropoutFwdVecGeluTanhFastF16,
    BiasActDropoutFwdVecGeluTanhFastBf16
);
const FWD_VEC_SILU_FAST: KernelFamily = per_dtype!(
    BiasActDropoutFwdVecSiluFastF32,
    BiasActDropoutFwdVecSiluFastF16,
    BiasActDropoutFwdVecSiluFastBf16
);
const FWD_SCALAR: KernelFamily = per_dtype!(
    BiasActDropoutFwdScalarF32,
    BiasActDropoutFwdScalarF16,
    BiasActDropoutFwdScalarBf16
);
const FWD_SCALAR_FAST: KernelFamily = per_dtype!(
    BiasActDropoutFwdScalarFastF32,
    BiasActDropoutFwdScalarFastF16,
    BiasActDropoutFwdScalarFastBf16
);
const BWD_VEC: KernelFamily = per_dtype!(
    BiasActDropoutBwdVecF32,
    BiasActDropoutBwdVecF16,
    BiasActDropoutBwdVecBf16
);
/// One kernel per keying: [Bits32, Bits16, Bits8] (see [`by_keying`]).
const BWD_VEC_RELU: [KernelFamily; 3] = [
    per_dtype!(
        BiasActDropoutBwdVecReluF32,
        BiasActDropoutBwdVecReluF16,
        BiasActDropoutBwdVecReluBf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecReluK16F32,
        BiasActDropoutBwdVecReluK16F16,
        BiasActDropoutBwdVecReluK16Bf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecReluK8F32,
        BiasActDropoutBwdVecReluK8F16,
        BiasActDropoutBwdVecReluK8Bf16
    ),
];
/// One kernel per keying: [Bits32, Bits16, Bits8] (see [`by_keying`]).
const BWD_VEC_GELU_ERF_FAST: [KernelFamily; 3] = [
    per_dtype!(
        BiasActDropoutBwdVecGeluErfFastF32,
        BiasActDropoutBwdVecGeluErfFastF16,
        BiasActDropoutBwdVecGeluErfFastBf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecGeluErfFastK16F32,
        BiasActDropoutBwdVecGeluErfFastK16F16,
        BiasActDropoutBwdVecGeluErfFastK16Bf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecGeluErfFastK8F32,
        BiasActDropoutBwdVecGeluErfFastK8F16,
        BiasActDropoutBwdVecGeluErfFastK8Bf16
    ),
];
/// One kernel per keying: [Bits32, Bits16, Bits8] (see [`by_keying`]).
const BWD_VEC_GELU_TANH_FAST: [KernelFamily; 3] = [
    per_dtype!(
        BiasActDropoutBwdVecGeluTanhFastF32,
        BiasActDropoutBwdVecGeluTanhFastF16,
        BiasActDropoutBwdVecGeluTanhFastBf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecGeluTanhFastK16F32,
        BiasActDropoutBwdVecGeluTanhFastK16F16,
        BiasActDropoutBwdVecGeluTanhFastK16Bf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecGeluTanhFastK8F32,
        BiasActDropoutBwdVecGeluTanhFastK8F16,
        BiasActDropoutBwdVecGeluTanhFastK8Bf16
    ),
];
/// One kernel per keying: [Bits32, Bits16, Bits8] (see [`by_keying`]).
const BWD_VEC_SILU_FAST: [KernelFamily; 3] = [
    per_dtype!(
        BiasActDropoutBwdVecSiluFastF32,
        BiasActDropoutBwdVecSiluFastF16,
        BiasActDropoutBwdVecSiluFastBf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecSiluFastK16F32,
        BiasActDropoutBwdVecSiluFastK16F16,
        BiasActDropoutBwdVecSiluFastK16Bf16
    ),
    per_dtype!(
        BiasActDropoutBwdVecSiluFastK8F32,
        BiasActDropoutBwdVecSiluFastK8F16,
        BiasActDropoutBwdVecSiluFastK8Bf16
    ),
];
const BWD_SCALAR: KernelFamily = per_dtype!(
    BiasActDropoutBwdScalarF32,
    BiasActDropoutBwdScalarF16,
    BiasActDropoutBwdScalarBf16
);
const BWD_SCALAR_FAST: KernelFamily = per_dtype!(
    BiasActDropoutBwdScalarFastF32,
    BiasActDropoutBwdScalarFastF16,
    BiasActDropoutBwdScalarFastBf16
);
const DBIAS: KernelFamily = per_dtype!(
    BiasActDropoutDbiasF32,
    BiasActDropoutDbiasF16,
    BiasActDropoutDbiasBf16
);

/// `MATH_*` in the kernel: 0 = Exact (a zeroed params struct is the bit-exact mode), 1 = Fast.
/// ReLU has no transcendental and always runs its one body.
fn math_code(cfg: &Config) -> u32 {
    match (cfg.act(), cfg.math()) {
        (Activation::Relu, _) | (_, Math::Exact) => 0,
        (_, Math::Fast) => 1,
    }
}

/// The per-keying backward kernel of `kernels` ([Bits32, Bits16, Bits8]): the keying is a
/// template argument of those kernels (one keying's row loop per kernel keeps ptxas from
/// spilling), so the symbol must match `cfg`'s resolution for `dtype`.
fn by_keying(cfg: &Config, dtype: DtypeKind, kernels: &[KernelFamily; 3]) -> KernelFamily {
    match cfg.resolution_for(dtype) {
        MaskResolution::Bits32 => kernels[0],
        MaskResolution::Bits16 => kernels[1],
        MaskResolution::Bits8 => kernels[2],
    }
}

/// The (forward, backward) kernel families of a launch (see the module docs).
fn families(cfg: &Config, dtype: DtypeKind, vector: bool) -> (KernelFamily, KernelFamily) {
    let fast = math_code(cfg) == 1;
    let bwd = |kernels: &[KernelFamily; 3]| by_keying(cfg, dtype, kernels);
    match (vector, cfg.act(), fast) {
        (true, Activation::Relu, _) => (FWD_VEC_RELU, bwd(&BWD_VEC_RELU)),
        (true, Activation::GeluErf, true) => (FWD_VEC_GELU_ERF_FAST, bwd(&BWD_VEC_GELU_ERF_FAST)),
        (true, Activation::GeluTanh, true) => {
            (FWD_VEC_GELU_TANH_FAST, bwd(&BWD_VEC_GELU_TANH_FAST))
        }
        (true, Activation::Silu, true) => (FWD_VEC_SILU_FAST, bwd(&BWD_VEC_SILU_FAST)),
        (true, _, false) => (FWD_VEC, BWD_VEC),
        (false, _, true) => (FWD_SCALAR_FAST, BWD_SCALAR_FAST),
        (false, _, false) => (FWD_SCALAR, BWD_SCALAR),
    }
}

/// Threads per column group block (blockDim.x); MAX_BLOCK_X in the kernel.
const BLOCK_X: u32 = 64;

/// (vector path, grid, slab rows) of a `[rows, cols]` launch of `T`.
fn geometry<T: Dtype>(cfg: &Config, aligned: bool) -> (bool, (u32, u32, u32), u64) {
    let vec = 16 / T::KIND.size();
    let vector = aligned && cfg.cols() % vec == 0;
    let per_thread = if vector { vec } else { 1 } as u64;
    let slab = slab_rows(cfg.rows(), cfg.cols(), T::KIND).max(1) as u64;
    let slabs = (cfg.rows() as u64).div_ceil(slab).max(1);
    let tiles = (cfg.cols() as u64)
        .div_ceil(per_thread)
        .div_ceil(u64::from(BLOCK_X))
        .clamp(1, i32::MAX as u64);
    (vector, (tiles as u32, slabs as u32, 1), slab)
}

/// `y = dropout(act(x + bias))` on the handle's stream (see the [module docs](super)); `h_out`,
/// when given, receives `T(x + bias)` for a backward with [`Preact::H`].
///
/// Views starting at any element are accepted (misaligned ones take the scalar path).
///
/// Errors: [`Error::ShapeMismatch`] for a length that disagrees with the config,
/// [`Error::InvalidArgument`] for a buffer from another CUDA context; driver errors.
///
/// ```no_run
/// use fusedreg::bias_act_dropout::{self as bad, Activation, Config};
/// use half::bf16;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let (rows, cols) = (8, 4096);
/// let cfg = Config::new(rows, cols, Activation::GeluTanh, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![bf16::ONE; rows * cols]).unwrap();
/// let bias = s.clone_htod(&vec![bf16::ZERO; cols]).unwrap();
/// let mut y = s.alloc_zeros::<bf16>(rows * cols).unwrap();
/// bad::forward(&h, &cfg, &x, Some(bias.as_view()), &mut y, None)?;
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    bias: Option<CudaView<'_, T>>,
    y: &mut impl DevicePtrMut<T>,
    mut h_out: Option<CudaViewMut<'_, T>>,
) -> Result<()> {
    check_forward(
        cfg,
        x.len(),
        bias.as_ref().map(|b| b.len()),
        y.len(),
        h_out.as_ref().map(|h| h.len()),
    )?;
    if cfg.is_empty() {
        return Ok(());
    }
    let (x_ptr, _gx) = handle.read_ptr(OP, "x", x)?;
    let (y_ptr, _gy) = handle.write_ptr(OP, "y", y)?;
    let bias_g = bias
        .as_ref()
        .map(|b| handle.read_ptr(OP, "bias", b))
        .transpose()?;
    let h_g = h_out
        .as_mut()
        .map(|h| handle.write_ptr(OP, "h_out", h))
        .transpose()?;
    let ptr = |g: &Option<(u64, _)>| g.as_ref().map_or(0, |(p, _)| *p);
    let (bias_ptr, h_ptr) = (ptr(&bias_g), ptr(&h_g));
    // The bias is read element by element: its alignment does not matter.
    let (vector, grid, slab) = geometry::<T>(cfg, aligned16(&[x_ptr, y_ptr, h_ptr]));
    // The keying's scale, 1 / (1 - effective p): unbiased at every resolution.
    let keying = cfg.keying(T::KIND);
    let p = FwdParams {
        x: x_ptr,
        bias: bias_ptr,
        y: y_ptr,
        h_out: h_ptr,
        rows: cfg.rows() as u64,
        cols: cfg.cols() as u64,
        slab_rows: slab,
        seed: cfg.seed(),
        call: cfg.call(),
        threshold: keying.threshold(),
        scale: keying.scale(),
        keep_frac: (1.0 - keying.effective_p()) as f32,
        log2_scale: f64::from(keying.scale()).log2() as f32,
        act: cfg.act().code(),
        math: math_code(cfg),
        flags: resolution_flag(OP, &keying, RESOLUTIONS)?,
    };
    let family = families(cfg, T::KIND, vector).0;
    handle.launch(family.get::<T>(), grid, (BLOCK_X, LANES as u32, 1), 0, &p)
}

/// `dx = dropout'(dy) * act'(h)` and, when `dbias` is given, its column sums, on the handle's
/// stream (see the [module docs](super)). `pre` says where `h` comes from: recomputed from the
/// forward's `x` and bias ([`Preact::X`]) or read ([`Preact::H`]).
///
/// Errors: as [`forward`].
///
/// ```no_run
/// use fusedreg::bias_act_dropout::{self as bad, Activation, Config, Preact};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(64, 1024, Activation::GeluErf, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![0.5f32; cfg.len()]).unwrap();
/// let bias = s.clone_htod(&vec![0.1f32; cfg.cols()]).unwrap();
/// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dbias = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
/// let pre = Preact::X { x: x.as_view(), bias: Some(bias.as_view()) };
/// bad::backward(&h, &cfg, &dy, pre, &mut dx, Some(dbias.as_view_mut()))?;
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    pre: Preact<CudaView<'_, T>>,
    dx: &mut impl DevicePtrMut<T>,
    dbias: Option<CudaViewMut<'_, T>>,
) -> Result<()> {
    backward_with_workspace(handle, cfg, dy, pre, dx, dbias, None)
}

/// [`backward`] with the dbias partials in the caller's memory (`workspace`, at least
/// [`crate::workspace::bias_act_dropout_backward_size`] bytes) instead of a stream-ordered
/// allocation per call (`None`).
///
/// Errors: as [`backward`], and a workspace too small ([`Error::ShapeMismatch`]) or not
/// 16-byte aligned ([`Error::InvalidArgument`]).
///
/// ```no_run
/// use fusedreg::bias_act_dropout::{self as bad, Activation, Config, Preact};
/// use fusedreg::workspace::{bias_act_dropout_backward_size, WorkspaceView};
/// use fusedreg::DtypeKind;
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let cfg = Config::new(64, 1024, Activation::Relu, 0.1, 42, 7)?;
/// let s = h.stream();
/// let x = s.clone_htod(&vec![0.5f32; cfg.len()]).unwrap();
/// let dy = s.clone_htod(&vec![1.0f32; cfg.len()]).unwrap();
/// let mut dx = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let mut dbias = s.alloc_zeros::<f32>(cfg.cols()).unwrap();
/// let n = bias_act_dropout_backward_size(64, 1024, DtypeKind::F32, true)?;
/// let mut ws = s.alloc_zeros::<u8>(n).unwrap();
/// let pre = Preact::X { x: x.as_view(), bias: None };
/// let ws = Some(WorkspaceView::new(ws.as_view_mut()));
/// bad::backward_with_workspace(&h, &cfg, &dy, pre, &mut dx, Some(dbias.as_view_mut()), ws)?;
/// # Ok(()) }
/// ```
pub fn backward_with_workspace<T: Dtype>(
    handle: &Handle,
    cfg: &Config,
    dy: &impl DevicePtr<T>,
    pre: Preact<CudaView<'_, T>>,
    dx: &mut impl DevicePtrMut<T>,
    mut dbias: Option<CudaViewMut<'_, T>>,
    mut workspace: Option<WorkspaceView<'_>>,
) -> Result<()> {
    let lens = match &pre {
        Preact::X { x, bias } => Preact::X {
            x: x.len(),
            bias: bias.as_ref().map(|b| b.len()),
        },
        Preact::H(h) => Preact::H(h.len()),
    };
    check_backward(
        cfg,
        dy.len(),
        &lens,
        dx.len(),
        dbias.as_ref().map(|d| d.len()),
    )?;
    // The slab partition (grid.y) depends on the shape only.
    let (_, grid0, slab) = geometry::<T>(cfg, false);
    let slabs = grid0.1 as usize;
    let db_g = dbias
        .as_mut()
        .map(|d| handle.write_ptr(OP, "dbias", d))
        .transpose()?;
    let db_ptr = db_g.as_ref().map_or(0, |(p, _)| *p);
    if cfg.is_empty() {
        if db_ptr != 0 && cfg.cols() > 0 {
            // No rows: the column sums are zero (no partials to read).
            finish_dbias::<T>(handle, DBIAS, 0, db_ptr, cfg.cols(), 0)?;
        }
        return Ok(());
    }
    let (dy_ptr, _gdy) = handle.read_ptr(OP, "dy", dy)?;
    let (dx_ptr, _gdx) = handle.write_ptr(OP, "dx", dx)?;
    let (x_g, b_g, h_g) = match &pre {
        Preact::X { x, bias } => (
            Some(handle.read_ptr(OP, "x", x)?),
            bias.as_ref()
                .map(|b| handle.read_ptr(OP, "bias", b))
                .transpose()?,
            None,
        ),
        Preact::H(h) => (None, None, Some(handle.read_ptr(OP, "h", h)?)),
    };
    let ptr = |g: &Option<(u64, _)>| g.as_ref().map_or(0, |(p, _)| *p);
    let (x_ptr, b_ptr, h_ptr) = (ptr(&x_g), ptr(&b_g), ptr(&h_g));
    let (vector, grid, _) = geometry::<T>(cfg, aligned16(&[dy_ptr, dx_ptr, x_ptr, h_ptr]));

    let mut partials = if db_ptr != 0 && workspace.is_none() {
        // SAFETY: the backward kernel writes every (slab, column) partial before the finishing
        // kernel reads it (every slab has at least one row; inactive columns are not read).
        Some(
            unsafe { handle.stream().alloc::<f32>(slabs * cfg.cols()) }
                .map_err(Error::driver(OP))?,
        )
    } else {
        None
    };
    // A non-null partials pointer is what asks the kernel for dbias: none without it.
    let part_g = match (partials.as_mut(), workspace.as_mut()) {
        (Some(b), _) => Some(handle.write_ptr(OP, "partials", b)?),
        (None, Some(v)) if db_ptr != 0 => {
            let query = "fusedreg::workspace::bias_act_dropout_backward_size";
            Some(v.bind(handle, OP, query, 4 * slabs * cfg.cols())?)
        }
        _ => None,
    };
    let part_ptr = part_g.as_ref().map_or(0, |(p, _)| *p);
    let keying = cfg.keying(T::KIND);
    let p = BwdParams {
        dy: dy_ptr,
        x: x_ptr,
        bias: b_ptr,
        h: h_ptr,
        dx: dx_ptr,
        partials: part_ptr,
        rows: cfg.rows() as u64,
        cols: cfg.cols() as u64,
        slab_rows: slab,
        seed: cfg.seed(),
        call: cfg.call(),
        threshold: keying.threshold(),
        scale: keying.scale(),
        act: cfg.act().code(),
        math: math_code(cfg),
        flags: resolution_flag(OP, &keying, RESOLUTIONS)?,
        // Math::Fast's GELU-tanh / SiLU fold the scale into the derivative (fast::BwdConsts).
        keep_frac: (1.0 - keying.effective_p()) as f32,
        log2_keep: (1.0 - keying.effective_p()).log2() as f32,
    };
    let family = families(cfg, T::KIND, vector).1;
    handle.launch(family.get::<T>(), grid, (BLOCK_X, LANES as u32, 1), 0, &p)?;
    if db_ptr != 0 {
        finish_dbias::<T>(handle, DBIAS, part_ptr, db_ptr, cfg.cols(), slabs)?;
    }
    drop(part_g);
    drop(partials); // stream-ordered free after the kernels that use it
    Ok(())
}
