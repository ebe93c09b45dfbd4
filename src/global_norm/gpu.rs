//! Launch wrappers of the global norm: [`GlobalNorm`] holds the device buffers of one set.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PinnedHostSlice};

use super::{check_loss_scale, check_max_norm, NormValues, OP};
use crate::dtype::{DtypeKind, PerDtype};
use crate::error::{Error, Result};
use crate::multi_tensor::TensorSet;
use crate::runtime::kernels::{per_dtype, Kernel};
use crate::runtime::Handle;

const NORM_THREADS: u32 = super::cpu::NORM_THREADS as u32;
const REDUCE_THREADS: u32 = super::cpu::REDUCE_THREADS as u32;
const PER_TENSOR_THREADS: u32 = 256;
const SCALE_THREADS: u32 = 512;

const REDUCE_FINALIZE: u32 = 1;
const REDUCE_CLIP: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct PartialsParams {
    tensors: u64,
    blocks: u64,
    partials: u64,
    skip: u64,
    block_offset: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<PartialsParams>() == 40);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for PartialsParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct ReduceParams {
    partials: u64,
    count: u64,
    result: u64,
    loss_scale: u64,
    max_norm: f32,
    flags: u32,
}
const _: () = assert!(std::mem::size_of::<ReduceParams>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for ReduceParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct FinalizeParams {
    result: u64,
    loss_scale: u64,
    max_norm: f32,
    clip: u32,
}
const _: () = assert!(std::mem::size_of::<FinalizeParams>() == 24);
// SAFETY: as above.
unsafe impl DeviceRepr for FinalizeParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct PerTensorParams {
    tensors: u64,
    partials: u64,
    sumsq: u64,
    norms: u64,
    count: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<PerTensorParams>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for PerTensorParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct ScaleParams {
    tensors: u64,
    blocks: u64,
    coef_ptr: u64,
    nonfinite: u64,
    coef: f32,
    block_offset: u32,
}
const _: () = assert!(std::mem::size_of::<ScaleParams>() == 40);
// SAFETY: as above.
unsafe impl DeviceRepr for ScaleParams {}

const PARTIALS: PerDtype<Kernel> = per_dtype!(
    GlobalNormPartialsF32,
    GlobalNormPartialsF16,
    GlobalNormPartialsBf16
);
const SCALE: PerDtype<Kernel> =
    per_dtype!(GlobalNormScaleF32, GlobalNormScaleF16, GlobalNormScaleBf16);

pub(crate) fn pick(f: &PerDtype<Kernel>, kind: DtypeKind) -> Kernel {
    match kind {
        DtypeKind::F32 => f.f32,
        DtypeKind::F16 => f.f16,
        DtypeKind::Bf16 => f.bf16,
    }
}

/// Stage A over chunks `block_offset .. block_offset + grid` of the set.
pub(crate) fn launch_partials(
    set: &TensorSet,
    partials: u64,
    block_offset: u32,
    grid: u32,
) -> Result<()> {
    if grid == 0 {
        return Ok(());
    }
    let p = PartialsParams {
        tensors: set.tensors_ptr(),
        blocks: set.blocks_ptr(),
        partials,
        skip: set.skip_ptr_or_null(),
        block_offset,
        pad: 0,
    };
    set.handle().launch(
        pick(&PARTIALS, set.grad_dtype()),
        (grid, 1, 1),
        (NORM_THREADS, 1, 1),
        0,
        &p,
    )
}

/// The scale pass over chunks `block_offset .. block_offset + grid`: by `*coef_ptr` when it is
/// non-zero, else by `coef`; nothing when `*nonfinite` (if non-zero) is set.
pub(crate) fn launch_scale(
    set: &TensorSet,
    coef_ptr: u64,
    coef: f32,
    nonfinite: u64,
    block_offset: u32,
    grid: u32,
) -> Result<()> {
    if grid == 0 {
        return Ok(());
    }
    let p = ScaleParams {
        tensors: set.tensors_ptr(),
        blocks: set.blocks_ptr(),
        coef_ptr,
        nonfinite,
        coef,
        block_offset,
    };
    set.handle().launch(
        pick(&SCALE, set.grad_dtype()),
        (grid, 1, 1),
        (SCALE_THREADS, 1, 1),
        0,
        &p,
    )
}

fn raw<T>(h: &Handle, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(h.stream());
    p
}

/// The global norm of one [`TensorSet`]'s gradients: device buffers for the per-chunk partials,
/// the results ([`NormValues`]) and the loss scale. See the [module docs](super).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// let mut b = TensorSet::builder(&h);
/// b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
/// let mut set = b.build()?;
/// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
/// norm.compute(&set)?;            // 2 launches, no host sync
/// norm.scale_grads(&mut set)?;    // grads *= coef, coef read on the device
/// let v = norm.read()?;           // blocking read, when you want the numbers
/// println!("norm {} coef {}", v.norm, v.coef);
/// # Ok(()) }
/// ```
pub struct GlobalNorm {
    handle: Handle,
    set_id: u64,
    num_chunks: u32,
    num_tensors: usize,
    max_norm: Option<f32>,
    partials: CudaSlice<f32>,
    result: CudaSlice<NormValues>,
    loss_scale: CudaSlice<f32>,
    per_tensor: Option<(CudaSlice<f64>, CudaSlice<f32>)>,
    partials_ptr: u64,
    result_ptr: u64,
    loss_scale_ptr: u64,
}

impl std::fmt::Debug for GlobalNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalNorm")
            .field("chunks", &self.num_chunks)
            .field("tensors", &self.num_tensors)
            .field("max_norm", &self.max_norm)
            .finish()
    }
}

impl GlobalNorm {
    /// Device buffers for `set`'s norm; `max_norm` = `None` computes the norm and the flag
    /// without clipping (coef 1). The loss scale starts at 1.
    pub fn new(set: &TensorSet, max_norm: Option<f32>) -> Result<Self> {
        check_max_norm(max_norm)?;
        let handle = set.handle().clone();
        let s = handle.stream();
        let chunks = set.layout().num_chunks();
        // Zeroed, so reading before the first computation is defined (and initcheck-clean).
        let partials = s
            .alloc_zeros::<f32>(chunks.max(1))
            .map_err(Error::driver(OP))?;
        // Neutral until the first computation: a step reading it scales by 1 and proceeds.
        let neutral = NormValues {
            sumsq: 0.0,
            norm: 0.0,
            coef: 1.0,
            grad_scale: 1.0,
            nonfinite: 0,
        };
        let result = s.clone_htod(&[neutral]).map_err(Error::driver(OP))?;
        let loss_scale = s.clone_htod(&[1.0f32]).map_err(Error::driver(OP))?;
        let partials_ptr = raw(&handle, &partials);
        let result_ptr = raw(&handle, &result);
        let loss_scale_ptr = raw(&handle, &loss_scale);
        Ok(GlobalNorm {
            set_id: set.id(),
            num_chunks: set.num_chunks_u32(),
            num_tensors: set.len(),
            max_norm,
            partials,
            result,
            loss_scale,
            per_tensor: None,
            partials_ptr,
            result_ptr,
            loss_scale_ptr,
            handle,
        })
    }

    fn check_set(&self, set: &TensorSet) -> Result<()> {
        if set.id() == self.set_id {
            Ok(())
        } else {
            Err(Error::invalid(
                OP,
                "this GlobalNorm was created for another TensorSet: create one per set",
            ))
        }
    }

    /// The clipping threshold (`None`: no clipping).
    pub fn max_norm(&self) -> Option<f32> {
        self.max_norm
    }

    /// Changes the clipping threshold for later finalizes (a kernel argument, no copy).
    pub fn set_max_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        check_max_norm(max_norm)?;
        self.max_norm = max_norm;
        Ok(())
    }

    /// Sets the loss scale the gradients carry (a 4-byte host-to-device copy from pageable
    /// memory; for CUDA graphs write it at [`GlobalNorm::loss_scale_device_ptr`]): the norm is
    /// reported unscaled and `grad_scale = coef / loss_scale`.
    pub fn set_loss_scale(&mut self, loss_scale: f32) -> Result<()> {
        check_loss_scale(loss_scale)?;
        self.handle
            .stream()
            .memcpy_htod(&[loss_scale], &mut self.loss_scale)
            .map_err(Error::driver(OP))
    }

    /// Device address of the f32 loss scale, for callers (a dynamic loss scaler) that update it
    /// on the device. It must stay finite and > 0.
    pub fn loss_scale_device_ptr(&self) -> u64 {
        self.loss_scale_ptr
    }

    /// Stage A: one launch writes every chunk's f32 sum of squares.
    pub fn partials(&mut self, set: &TensorSet) -> Result<()> {
        self.check_set(set)?;
        launch_partials(set, self.partials_ptr, 0, self.num_chunks)
    }

    fn launch_reduce(&self, flags: u32) -> Result<()> {
        let p = ReduceParams {
            partials: self.partials_ptr,
            count: u64::from(self.num_chunks),
            result: self.result_ptr,
            loss_scale: self.loss_scale_ptr,
            max_norm: self.max_norm.unwrap_or(0.0),
            flags: flags
                | if self.max_norm.is_some() {
                    REDUCE_CLIP
                } else {
                    0
                },
        };
        self.handle.launch(
            Kernel::GlobalNormReduce,
            (1, 1, 1),
            (REDUCE_THREADS, 1, 1),
            0,
            &p,
        )
    }

    /// Stage B: one block sums the partials (in f64) into `sumsq` at
    /// [`GlobalNorm::sumsq_device_ptr`]; norm, coef and flag are left for [`GlobalNorm::finalize`].
    pub fn reduce(&mut self) -> Result<()> {
        self.launch_reduce(0)
    }

    /// Stage C: norm, coef, grad scale and flag from the f64 at
    /// [`GlobalNorm::sumsq_device_ptr`] (after an all-reduce, for data-parallel training).
    pub fn finalize(&mut self) -> Result<()> {
        let p = FinalizeParams {
            result: self.result_ptr,
            loss_scale: self.loss_scale_ptr,
            max_norm: self.max_norm.unwrap_or(0.0),
            clip: u32::from(self.max_norm.is_some()),
        };
        self.handle
            .launch(Kernel::GlobalNormFinalize, (1, 1, 1), (32, 1, 1), 0, &p)
    }

    /// Stages A, B and C: 2 launches (A, then B and C in one block), no host sync.
    pub fn compute(&mut self, set: &TensorSet) -> Result<()> {
        self.partials(set)?;
        self.launch_reduce(REDUCE_FINALIZE)
    }

    /// Per-tensor sums of squares (f64) and norms (f32) from the partials of the last
    /// [`GlobalNorm::partials`] / [`GlobalNorm::compute`]: one launch; read them with
    /// [`GlobalNorm::read_per_tensor`].
    pub fn per_tensor(&mut self, set: &TensorSet) -> Result<()> {
        self.check_set(set)?;
        if self.per_tensor.is_none() {
            let s = self.handle.stream();
            let sums = s
                .alloc_zeros::<f64>(self.num_tensors)
                .map_err(Error::driver(OP))?;
            let norms = s
                .alloc_zeros::<f32>(self.num_tensors)
                .map_err(Error::driver(OP))?;
            self.per_tensor = Some((sums, norms));
        }
        let (sums, norms) = self.per_tensor.as_ref().expect("allocated above");
        let p = PerTensorParams {
            tensors: set.tensors_ptr(),
            partials: self.partials_ptr,
            sumsq: raw(&self.handle, sums),
            norms: raw(&self.handle, norms),
            count: self.num_tensors as u32,
            pad: 0,
        };
        let warps_per_block = (PER_TENSOR_THREADS / 32) as usize;
        let grid = self.num_tensors.div_ceil(warps_per_block) as u32;
        self.handle.launch(
            Kernel::GlobalNormPerTensor,
            (grid, 1, 1),
            (PER_TENSOR_THREADS, 1, 1),
            0,
            &p,
        )
    }

    /// `grads *= grad_scale` over the whole set, `grad_scale` (the clip coefficient divided by
    /// the loss scale) read from device memory; nothing is written when the non-finite flag is
    /// set or `grad_scale` is exactly 1. One launch.
    pub fn scale_grads(&self, set: &mut TensorSet) -> Result<()> {
        self.check_set(set)?;
        launch_scale(
            set,
            self.grad_scale_device_ptr(),
            1.0,
            self.nonfinite_device_ptr(),
            0,
            self.num_chunks,
        )
    }

    /// Reads the results (blocks until the stream reaches this point).
    pub fn read(&self) -> Result<NormValues> {
        let v = self
            .handle
            .stream()
            .clone_dtoh(&self.result)
            .map_err(Error::driver(OP))?;
        Ok(v[0])
    }

    /// Enqueues a copy of the results into pinned host memory the caller owns, without waiting:
    /// the values are there once the stream has passed this point (synchronize an event or the
    /// stream before reading them).
    pub fn copy_to_host_async(&self, dst: &mut PinnedHostSlice<NormValues>) -> Result<()> {
        if dst.is_empty() {
            return Err(Error::shape(
                OP,
                "the pinned buffer must hold at least 1 NormValues",
            ));
        }
        self.handle
            .stream()
            .memcpy_dtoh(&self.result, dst)
            .map_err(Error::driver(OP))
    }

    /// Reads the per-tensor sums of squares and norms (blocking). Errors before
    /// [`GlobalNorm::per_tensor`] has run.
    pub fn read_per_tensor(&self) -> Result<(Vec<f64>, Vec<f32>)> {
        let (sums, norms) = self
            .per_tensor
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "call per_tensor() before read_per_tensor()"))?;
        let s = self.handle.stream();
        Ok((
            s.clone_dtoh(sums).map_err(Error::driver(OP))?,
            s.clone_dtoh(norms).map_err(Error::driver(OP))?,
        ))
    }

    /// Reads the per-chunk partials (blocking): for diagnostics and tests.
    pub fn read_partials(&self) -> Result<Vec<f32>> {
        let mut v = self
            .handle
            .stream()
            .clone_dtoh(&self.partials)
            .map_err(Error::driver(OP))?;
        v.truncate(self.num_chunks as usize);
        Ok(v)
    }

    /// Device address of the whole [`NormValues`] struct (24 bytes).
    pub fn result_device_ptr(&self) -> u64 {
        self.result_ptr
    }

    /// Device address of the f64 sum of squares: the value to all-reduce between
    /// [`GlobalNorm::reduce`] and [`GlobalNorm::finalize`].
    pub fn sumsq_device_ptr(&self) -> u64 {
        self.result_ptr
    }

    /// Device address of the f32 clip coefficient.
    pub fn coef_device_ptr(&self) -> u64 {
        self.result_ptr + 12
    }

    /// Device address of the f32 gradient scale (`coef / loss_scale`).
    pub fn grad_scale_device_ptr(&self) -> u64 {
        self.result_ptr + 16
    }

    /// Device address of the u32 non-finite flag.
    pub fn nonfinite_device_ptr(&self) -> u64 {
        self.result_ptr + 20
    }

    pub(crate) fn partials_ptr(&self) -> u64 {
        self.partials_ptr
    }

    pub(crate) fn check_for(&self, set: &TensorSet) -> Result<()> {
        self.check_set(set)
    }
}
