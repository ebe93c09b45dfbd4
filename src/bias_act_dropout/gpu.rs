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

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::{check_backward, check_forward, Activation, Config, Preact, LANES, OP};
use crate::dropping::gpu::{aligned16, bind_partials, finish_dbias, resolution_flag, KeyedShape};
use crate::dropping::{slab_rows, MaskResolution};
use crate::dtype::{Dtype, DtypeKind};
use crate::error::Result;
use crate::math::Math;
use crate::runtime::device_params;
use crate::runtime::kernels::{per_dtype, KernelFamily};
use crate::runtime::Handle;
use crate::runtime::WorkspaceView;

crate::kernel_list! {
    "bias_act_dropout" => {
        [f32 BiasActDropoutFwdVecF32, f16 BiasActDropoutFwdVecF16, bf16 BiasActDropoutFwdVecBf16] = "bias_act_dropout_fwd_vec_" => FWD_VEC,
        [f32 BiasActDropoutFwdVecReluF32, f16 BiasActDropoutFwdVecReluF16, bf16 BiasActDropoutFwdVecReluBf16] = "bias_act_dropout_fwd_vec_relu_" => FWD_VEC_RELU,
        [f32 BiasActDropoutFwdVecGeluErfFastF32, f16 BiasActDropoutFwdVecGeluErfFastF16, bf16 BiasActDropoutFwdVecGeluErfFastBf16] = "bias_act_dropout_fwd_vec_gelu_erf_fast_" => FWD_VEC_GELU_ERF_FAST,
        [f32 BiasActDropoutFwdVecGeluTanhFastF32, f16 BiasActDropoutFwdVecGeluTanhFastF16, bf16 BiasActDropoutFwdVecGeluTanhFastBf16] = "bias_act_dropout_fwd_vec_gelu_tanh_fast_" => FWD_VEC_GELU_TANH_FAST,
        [f32 BiasActDropoutFwdVecSiluFastF32, f16 BiasActDropoutFwdVecSiluFastF16, bf16 BiasActDropoutFwdVecSiluFastBf16] = "bias_act_dropout_fwd_vec_silu_fast_" => FWD_VEC_SILU_FAST,
        [f32 BiasActDropoutFwdScalarF32, f16 BiasActDropoutFwdScalarF16, bf16 BiasActDropoutFwdScalarBf16] = "bias_act_dropout_fwd_scalar_" => FWD_SCALAR,
        [f32 BiasActDropoutFwdScalarFastF32, f16 BiasActDropoutFwdScalarFastF16, bf16 BiasActDropoutFwdScalarFastBf16] = "bias_act_dropout_fwd_scalar_fast_" => FWD_SCALAR_FAST,
        [f32 BiasActDropoutBwdVecF32, f16 BiasActDropoutBwdVecF16, bf16 BiasActDropoutBwdVecBf16] = "bias_act_dropout_bwd_vec_" => BWD_VEC,
        [f32 BiasActDropoutBwdVecReluF32, f16 BiasActDropoutBwdVecReluF16, bf16 BiasActDropoutBwdVecReluBf16] = "bias_act_dropout_bwd_vec_relu_",
        [f32 BiasActDropoutBwdVecReluK16F32, f16 BiasActDropoutBwdVecReluK16F16, bf16 BiasActDropoutBwdVecReluK16Bf16] = "bias_act_dropout_bwd_vec_relu_k16_",
        [f32 BiasActDropoutBwdVecReluK8F32, f16 BiasActDropoutBwdVecReluK8F16, bf16 BiasActDropoutBwdVecReluK8Bf16] = "bias_act_dropout_bwd_vec_relu_k8_",
        [f32 BiasActDropoutBwdVecGeluErfFastF32, f16 BiasActDropoutBwdVecGeluErfFastF16, bf16 BiasActDropoutBwdVecGeluErfFastBf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_",
        [f32 BiasActDropoutBwdVecGeluErfFastK16F32, f16 BiasActDropoutBwdVecGeluErfFastK16F16, bf16 BiasActDropoutBwdVecGeluErfFastK16Bf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_k16_",
        [f32 BiasActDropoutBwdVecGeluErfFastK8F32, f16 BiasActDropoutBwdVecGeluErfFastK8F16, bf16 BiasActDropoutBwdVecGeluErfFastK8Bf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_k8_",
        [f32 BiasActDropoutBwdVecGeluTanhFastF32, f16 BiasActDropoutBwdVecGeluTanhFastF16, bf16 BiasActDropoutBwdVecGeluTanhFastBf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_",
        [f32 BiasActDropoutBwdVecGeluTanhFastK16F32, f16 BiasActDropoutBwdVecGeluTanhFastK16F16, bf16 BiasActDropoutBwdVecGeluTanhFastK16Bf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_k16_",
        [f32 BiasActDropoutBwdVecGeluTanhFastK8F32, f16 BiasActDropoutBwdVecGeluTanhFastK8F16, bf16 BiasActDropoutBwdVecGeluTanhFastK8Bf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_k8_",
        [f32 BiasActDropoutBwdVecSiluFastF32, f16 BiasActDropoutBwdVecSiluFastF16, bf16 BiasActDropoutBwdVecSiluFastBf16] = "bias_act_dropout_bwd_vec_silu_fast_",
        [f32 BiasActDropoutBwdVecSiluFastK16F32, f16 BiasActDropoutBwdVecSiluFastK16F16, bf16 BiasActDropoutBwdVecSiluFastK16Bf16] = "bias_act_dropout_bwd_vec_silu_fast_k16_",
        [f32 BiasActDropoutBwdVecSiluFastK8F32, f16 BiasActDropoutBwdVecSiluFastK8F16, bf16 BiasActDropoutBwdVecSiluFastK8Bf16] = "bias_act_dropout_bwd_vec_silu_fast_k8_",
        [f32 BiasActDropoutBwdScalarF32, f16 BiasActDropoutBwdScalarF16, bf16 BiasActDropoutBwdScalarBf16] = "bias_act_dropout_bwd_scalar_" => BWD_SCALAR,
        [f32 BiasActDropoutBwdScalarFastF32, f16 BiasActDropoutBwdScalarFastF16, bf16 BiasActDropoutBwdScalarFastBf16] = "bias_act_dropout_bwd_scalar_fast_" => BWD_SCALAR_FAST,
        [f32 BiasActDropoutDbiasF32, f16 BiasActDropoutDbiasF16, bf16 BiasActDropoutDbiasBf16] = "bias_act_dropout_dbias_" => DBIAS,
        [f32 BiasActDropoutUnfusedBiasAddF32, f16 BiasActDropoutUnfusedBiasAddF16, bf16 BiasActDropoutUnfusedBiasAddBf16] = "bias_act_dropout_unfused_bias_add_" => BIAS_ADD,
        [f32 BiasActDropoutUnfusedActF32, f16 BiasActDropoutUnfusedActF16, bf16 BiasActDropoutUnfusedActBf16] = "bias_act_dropout_unfused_act_" => ACT,
        [f32 BiasActDropoutUnfusedDropoutF32, f16 BiasActDropoutUnfusedDropoutF16, bf16 BiasActDropoutUnfusedDropoutBf16] = "bias_act_dropout_unfused_dropout_" => DROPOUT,
        [f32 BiasActDropoutUnfusedMaskedScaleF32, f16 BiasActDropoutUnfusedMaskedScaleF16, bf16 BiasActDropoutUnfusedMaskedScaleBf16] = "bias_act_dropout_unfused_masked_scale_" => MASKED_SCALE,
        [f32 BiasActDropoutUnfusedActGradF32, f16 BiasActDropoutUnfusedActGradF16, bf16 BiasActDropoutUnfusedActGradBf16] = "bias_act_dropout_unfused_act_grad_" => ACT_GRAD,
        [f32 BiasActDropoutUnfusedColSumF32, f16 BiasActDropoutUnfusedColSumF16, bf16 BiasActDropoutUnfusedColSumBf16] = "bias_act_dropout_unfused_col_sum_" => COL_SUM,
    }
}

/// The keying resolutions kernels/bias_act_dropout.cu implements.
const RESOLUTIONS: &[MaskResolution] = &[
    MaskResolution::Bits32,
    MaskResolution::Bits16,
    MaskResolution::Bits8,
];

device_params! {
    /// Mirrors `BiasActDropoutFwdParams` in the kernel.
    #[derive(Debug, Default)]
    struct FwdParams(104) {
        x: u64,
        bias: u64,
        y: u64,
        h_out: u64,
        rows: KeyedShape,
        scale: f32,
        keep_frac: f32,
        log2_scale: f32,
        act: u32,
        math: u32,
        flags: u32,
    }
}

device_params! {
    /// Mirrors `BiasActDropoutBwdParams` in the kernel.
    #[derive(Debug, Default)]
    struct BwdParams(120) {
        dy: u64,
        x: u64,
        bias: u64,
        h: u64,
        dx: u64,
        partials: u64,
        rows: KeyedShape,
        scale: f32,
        act: u32,
        math: u32,
        flags: u32,
        keep_frac: f32,
        log2_keep: f32,
    }
}

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
/// [`Error::ShapeMismatch`]: crate::Error::ShapeMismatch
/// [`Error::InvalidArgument`]: crate::Error::InvalidArgument
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
    let (bias_ptr, _gb) = handle.read_opt(OP, "bias", bias.as_ref())?;
    let (h_ptr, _gh) = handle.write_opt(OP, "h_out", h_out.as_mut())?;
    // The bias is read element by element: its alignment does not matter.
    let (vector, grid, slab) = geometry::<T>(cfg, aligned16(&[x_ptr, y_ptr, h_ptr]));
    // The keying's scale, 1 / (1 - effective p): unbiased at every resolution.
    let keying = cfg.keying(T::KIND);
    let p = FwdParams {
        x: x_ptr,
        bias: bias_ptr,
        y: y_ptr,
        h_out: h_ptr,
        rows: KeyedShape::new((cfg.rows() as u64, cfg.cols() as u64, slab), &keying),
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
/// [`Error::ShapeMismatch`]: crate::Error::ShapeMismatch
/// [`Error::InvalidArgument`]: crate::Error::InvalidArgument
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
    let db = dbias.as_ref().map(|d| d.len());
    check_backward(cfg, dy.len(), &pre.lens(|b| b.len()), dx.len(), db)?;
    // The slab partition (grid.y) depends on the shape only.
    let (_, grid0, slab) = geometry::<T>(cfg, false);
    let slabs = grid0.1 as usize;
    let (db_ptr, _gdb) = handle.write_opt(OP, "dbias", dbias.as_mut())?;
    if cfg.is_empty() {
        if db_ptr != 0 && cfg.cols() > 0 {
            // No rows: the column sums are zero (no partials to read).
            finish_dbias::<T>(handle, DBIAS, 0, db_ptr, cfg.cols(), 0)?;
        }
        return Ok(());
    }
    let (dy_ptr, _gdy) = handle.read_ptr(OP, "dy", dy)?;
    let (dx_ptr, _gdx) = handle.write_ptr(OP, "dx", dx)?;
    let ((x_ptr, _gx), (b_ptr, _gb), (h_ptr, _gh)) = match &pre {
        Preact::X { x, bias } => (
            handle.read_opt(OP, "x", Some(x))?,
            handle.read_opt(OP, "bias", bias.as_ref())?,
            (0, None),
        ),
        Preact::H(h) => ((0, None), (0, None), handle.read_opt(OP, "h", Some(h))?),
    };
    let (vector, grid, _) = geometry::<T>(cfg, aligned16(&[dy_ptr, dx_ptr, x_ptr, h_ptr]));

    // A non-null partials pointer is what asks the kernel for dbias: none without it.
    let mut own = None;
    let want = (db_ptr != 0).then_some(slabs * cfg.cols());
    let query = "fusedreg::workspace::bias_act_dropout_backward_size";
    // SAFETY: the backward kernel writes every (slab, column) partial before the finishing
    // kernel reads it (every slab has at least one row; inactive columns are not read).
    let (part_ptr, part_g) =
        unsafe { bind_partials(handle, OP, query, workspace.as_mut(), None, &mut own, want) }?;
    let keying = cfg.keying(T::KIND);
    let p = BwdParams {
        dy: dy_ptr,
        x: x_ptr,
        bias: b_ptr,
        h: h_ptr,
        dx: dx_ptr,
        partials: part_ptr,
        rows: KeyedShape::new((cfg.rows() as u64, cfg.cols() as u64, slab), &keying),
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
    drop(own); // stream-ordered free after the kernels that use it
    Ok(())
}
