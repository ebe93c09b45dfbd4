//! Launch wrappers of the global norm: [`GlobalNorm`] holds the device buffers of one set.

use cudarc::driver::{CudaSlice, PinnedHostSlice};

use super::{check_loss_scale, check_max_norm, NormValues, OP};
use crate::dtype::{DtypeKind, PerDtype};
use crate::error::{Error, Result};
use crate::multi_tensor::{resident_addr, TensorSet};
use crate::runtime::device_params;
use crate::runtime::kernels::{per_dtype, Kernel};
use crate::runtime::{DeviceScalar, Handle};

crate::kernel_list! {
    "global_norm" => {
        [f32 GlobalNormPartialsF32, f16 GlobalNormPartialsF16, bf16 GlobalNormPartialsBf16] = "global_norm_partials_",
        [_ GlobalNormReduce] = "global_norm_reduce",
        [_ GlobalNormFinalize] = "global_norm_finalize",
        [_ GlobalNormPerTensor] = "global_norm_per_tensor",
        [f32 GlobalNormScaleF32, f16 GlobalNormScaleF16, bf16 GlobalNormScaleBf16] = "global_norm_scale_",
    }
}

const NORM_THREADS: u32 = super::cpu::NORM_THREADS as u32;
const REDUCE_THREADS: u32 = super::cpu::REDUCE_THREADS as u32;
const PER_TENSOR_THREADS: u32 = 256;
const SCALE_THREADS: u32 = 512;

const REDUCE_FINALIZE: u32 = 1;
const REDUCE_CLIP: u32 = 2;

device_params! {
    struct PartialsParams(40) {
        tensors: u64,
        blocks: u64,
        partials: u64,
        skip: u64,
        block_offset: u32,
        pad: u32,
    }
}

device_params! {
    struct ReduceParams(40) {
        partials: u64,
        count: u64,
        result: u64,
        loss_scale: u64,
        max_norm: f32,
        flags: u32,
    }
}

device_params! {
    struct FinalizeParams(24) {
        result: u64,
        loss_scale: u64,
        max_norm: f32,
        clip: u32,
    }
}

device_params! {
    struct PerTensorParams(40) {
        tensors: u64,
        partials: u64,
        sumsq: u64,
        norms: u64,
        count: u32,
        pad: u32,
    }
}

device_params! {
    struct ScaleParams(40) {
        tensors: u64,
        blocks: u64,
        coef_ptr: u64,
        nonfinite: u64,
        coef: f32,
        block_offset: u32,
    }
}

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

/// Stage A over chunks `block_offset .. block_offset + grid` of the set. `skip`: device address
/// of one u8 per tensor (an optimizer's skip flags: a skipped tensor has no gradient this step
/// and adds exactly 0), or 0 for none.
pub(crate) fn launch_partials(
    set: &TensorSet,
    partials: u64,
    skip: u64,
    block_offset: u32,
    grid: u32,
) -> Result<()> {
    let p = PartialsParams {
        tensors: set.tensors_ptr(),
        blocks: set.blocks_ptr(),
        partials,
        skip,
        block_offset,
        pad: 0,
    };
    set.launch_chunks(pick(&PARTIALS, set.grad_dtype()), grid, NORM_THREADS, &p)
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
    let p = ScaleParams {
        tensors: set.tensors_ptr(),
        blocks: set.blocks_ptr(),
        coef_ptr,
        nonfinite,
        coef,
        block_offset,
    };
    set.launch_chunks(pick(&SCALE, set.grad_dtype()), grid, SCALE_THREADS, &p)
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
    loss_scale: DeviceScalar<f32>,
    per_tensor: Option<(CudaSlice<f64>, CudaSlice<f32>)>,
    partials_ptr: u64,
    result_ptr: u64,
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut clip = GlobalNorm::new(&set, Some(1.0))?; // clip to norm 1
    /// let mut watch = GlobalNorm::new(&set, None)?;     // norm and flag only, coef 1
    /// clip.compute(&set)?;
    /// watch.compute(&set)?;
    /// # Ok(()) }
    /// ```
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
        let loss_scale = DeviceScalar::new(&handle, OP, 1.0f32)?;
        let partials_ptr = resident_addr(&handle, &partials);
        let result_ptr = resident_addr(&handle, &result);
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let norm = GlobalNorm::new(&set, Some(1.0))?;
    /// if let Some(m) = norm.max_norm() {
    ///     println!("clipping to {m}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn max_norm(&self) -> Option<f32> {
        self.max_norm
    }

    /// Changes the clipping threshold for later finalizes (a kernel argument, no copy).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.set_max_norm(Some(0.5))?; // tighter clipping from now on
    /// norm.compute(&set)?;
    /// norm.set_max_norm(None)?;      // measure only
    /// # Ok(()) }
    /// ```
    pub fn set_max_norm(&mut self, max_norm: Option<f32>) -> Result<()> {
        check_max_norm(max_norm)?;
        self.max_norm = max_norm;
        Ok(())
    }

    /// Sets the loss scale the gradients carry (a 4-byte host-to-device copy from pageable
    /// memory; for CUDA graphs write it at [`GlobalNorm::loss_scale_device_ptr`]): the norm is
    /// reported unscaled and `grad_scale = coef / loss_scale`.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, None)?; // no clipping: loss scaling only
    /// norm.set_loss_scale(1024.0)?; // the backward ran on loss * 1024
    /// norm.compute(&set)?;
    /// let v = norm.read()?; // v.norm is unscaled, v.grad_scale = 1 / 1024
    /// println!("norm {} found inf {}", v.norm, v.nonfinite);
    /// # Ok(()) }
    /// ```
    pub fn set_loss_scale(&mut self, loss_scale: f32) -> Result<()> {
        check_loss_scale(loss_scale)?;
        self.loss_scale.set(loss_scale)
    }

    /// Device address of the f32 loss scale, for callers (a dynamic loss scaler) that update it
    /// on the device. It must stay finite and > 0.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// # use fusedreg::cudarc::driver::{result, DevicePtr};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let norm = GlobalNorm::new(&set, None)?;
    /// // A loss scale computed on the device (here simply copied from a device buffer).
    /// let scale = h.stream().clone_htod(&[512.0f32]).unwrap();
    /// let (src, _guard) = scale.device_ptr(h.stream());
    /// let (dst, stream) = (norm.loss_scale_device_ptr(), h.stream().cu_stream());
    /// // SAFETY: two live f32s of the handle's context, ordered on its stream.
    /// unsafe { result::memcpy_dtod_async(dst, src, 4, stream) }.unwrap();
    /// # Ok(()) }
    /// ```
    pub fn loss_scale_device_ptr(&self) -> u64 {
        self.loss_scale.device_ptr()
    }

    /// Stage A: one launch writes every chunk's f32 sum of squares.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.partials(&set)?; // stage A: one f32 per chunk
    /// norm.reduce()?;       // stage B
    /// norm.finalize()?;     // stage C
    /// println!("{} partials", norm.read_partials()?.len()); // set.layout().num_chunks()
    /// # Ok(()) }
    /// ```
    pub fn partials(&mut self, set: &TensorSet) -> Result<()> {
        self.partials_skipping(set, 0)
    }

    /// Stage A honouring per-tensor skip flags at device address `skip` (0: none). The set
    /// knows no skip flags; an optimizer that owns some passes them (AdamW::clip_and_step).
    pub(crate) fn partials_skipping(&mut self, set: &TensorSet, skip: u64) -> Result<()> {
        self.check_set(set)?;
        launch_partials(set, self.partials_ptr, skip, 0, self.num_chunks)
    }

    fn launch_reduce(&self, flags: u32) -> Result<()> {
        let p = ReduceParams {
            partials: self.partials_ptr,
            count: u64::from(self.num_chunks),
            result: self.result_ptr,
            loss_scale: self.loss_scale.device_ptr(),
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.partials(&set)?;
    /// norm.reduce()?; // sumsq of this rank's gradients, in f64 on the device
    /// // Data-parallel: all-reduce (sum) the f64 at norm.sumsq_device_ptr() here.
    /// norm.finalize()?;
    /// # Ok(()) }
    /// ```
    pub fn reduce(&mut self) -> Result<()> {
        self.launch_reduce(0)
    }

    /// Stage C: norm, coef, grad scale and flag from the f64 at
    /// [`GlobalNorm::sumsq_device_ptr`] (after an all-reduce, for data-parallel training).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.partials(&set)?;
    /// norm.reduce()?;
    /// // ... all-reduce the f64 at norm.sumsq_device_ptr() across ranks ...
    /// norm.finalize()?; // norm, coef, grad_scale and flag of the global sum
    /// # Ok(()) }
    /// ```
    pub fn finalize(&mut self) -> Result<()> {
        let p = FinalizeParams {
            result: self.result_ptr,
            loss_scale: self.loss_scale.device_ptr(),
            max_norm: self.max_norm.unwrap_or(0.0),
            clip: u32::from(self.max_norm.is_some()),
        };
        self.handle
            .launch(Kernel::GlobalNormFinalize, (1, 1, 1), (32, 1, 1), 0, &p)
    }

    /// Stages A, B and C: 2 launches (A, then B and C in one block), no host sync.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// let before = h.launch_count();
    /// norm.compute(&set)?;
    /// println!("{} launches", h.launch_count() - before); // 2
    /// # Ok(()) }
    /// ```
    pub fn compute(&mut self, set: &TensorSet) -> Result<()> {
        self.compute_skipping(set, 0)
    }

    /// [`GlobalNorm::compute`] with an optimizer's per-tensor skip flags (device address, 0:
    /// none): skipped tensors add exactly 0.
    pub(crate) fn compute_skipping(&mut self, set: &TensorSet, skip: u64) -> Result<()> {
        self.partials_skipping(set, skip)?;
        self.launch_reduce(REDUCE_FINALIZE)
    }

    /// Per-tensor sums of squares (f64) and norms (f32) from the partials of the last
    /// [`GlobalNorm::partials`] / [`GlobalNorm::compute`]: one launch; read them with
    /// [`GlobalNorm::read_per_tensor`].
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, None)?;
    /// norm.compute(&set)?;
    /// norm.per_tensor(&set)?; // reuses the partials of compute
    /// let (_sums, norms) = norm.read_per_tensor()?;
    /// for (i, n) in norms.iter().enumerate() {
    ///     println!("tensor {i}: grad norm {n}");
    /// }
    /// # Ok(()) }
    /// ```
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
            sumsq: resident_addr(&self.handle, sums),
            norms: resident_addr(&self.handle, norms),
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let mut set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// norm.scale_grads(&mut set)?; // clipped in place, ready for your own optimizer
    /// let g0 = h.stream().clone_dtoh(&set.grad::<f32>(0)?).unwrap();
    /// # let _ = g0;
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// let v = norm.read()?; // waits for the stream
    /// println!("norm {} coef {} finite {}", v.norm, v.coef, v.is_finite());
    /// # Ok(()) }
    /// ```
    pub fn read(&self) -> Result<NormValues> {
        let v = self.handle.to_host(OP, &self.result)?;
        Ok(v[0])
    }

    /// Enqueues a copy of the results into pinned host memory the caller owns, without waiting:
    /// the values are there once the stream has passed this point (synchronize an event or the
    /// stream before reading them).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// # use fusedreg::global_norm::NormValues;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// // SAFETY: the pinned buffer is read only after the stream has passed the copy.
    /// let mut pinned = unsafe { h.context().alloc_pinned::<NormValues>(1) }.unwrap();
    /// norm.copy_to_host_async(&mut pinned)?; // returns at once
    /// // ... enqueue the rest of the step ...
    /// h.synchronize()?;
    /// println!("norm {}", pinned.as_slice().unwrap()[0].norm);
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, None)?;
    /// norm.partials(&set)?;
    /// norm.per_tensor(&set)?;
    /// let (sums, norms) = norm.read_per_tensor()?; // one f64 and one f32 per tensor
    /// println!("{sums:?} {norms:?}");
    /// # Ok(()) }
    /// ```
    pub fn read_per_tensor(&self) -> Result<(Vec<f64>, Vec<f32>)> {
        let (sums, norms) = self
            .per_tensor
            .as_ref()
            .ok_or_else(|| Error::invalid(OP, "call per_tensor() before read_per_tensor()"))?;
        let h = &self.handle;
        Ok((h.to_host(OP, sums)?, h.to_host(OP, norms)?))
    }

    /// Reads the per-chunk partials (blocking): for diagnostics and tests.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, None)?;
    /// norm.partials(&set)?;
    /// let p = norm.read_partials()?; // one f32 sum of squares per chunk
    /// println!("{} chunks, first {}", p.len(), p[0]);
    /// # Ok(()) }
    /// ```
    pub fn read_partials(&self) -> Result<Vec<f32>> {
        let mut v = self.handle.to_host(OP, &self.partials)?;
        v.truncate(self.num_chunks as usize);
        Ok(v)
    }

    /// Device address of the whole [`NormValues`] struct (24 bytes).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// # use fusedreg::cudarc::driver::{result, DevicePtr};
    /// # use fusedreg::global_norm::NormValues;
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// // Log every step's values on the device; read the log once at the end.
    /// let log = h.stream().alloc_zeros::<NormValues>(100).unwrap();
    /// let (base, guard) = log.device_ptr(h.stream());
    /// for k in 0..100u64 {
    ///     norm.compute(&set)?;
    ///     let (src, stream) = (norm.result_device_ptr(), h.stream().cu_stream());
    ///     // SAFETY: both are live NormValues of the handle's context, ordered on its stream.
    ///     unsafe { result::memcpy_dtod_async(base + 24 * k, src, 24, stream) }.unwrap();
    /// }
    /// drop(guard);
    /// let values = h.stream().clone_dtoh(&log).unwrap();
    /// # let _ = values;
    /// # Ok(()) }
    /// ```
    pub fn result_device_ptr(&self) -> u64 {
        self.result_ptr
    }

    /// Device address of the f64 sum of squares: the value to all-reduce between
    /// [`GlobalNorm::reduce`] and [`GlobalNorm::finalize`].
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.partials(&set)?;
    /// norm.reduce()?;
    /// let sumsq = norm.sumsq_device_ptr(); // one f64
    /// // ncclAllReduce(sumsq, sumsq, 1, ncclFloat64, ncclSum, comm, h.stream().cu_stream())
    /// # let _ = sumsq;
    /// norm.finalize()?;
    /// # Ok(()) }
    /// ```
    pub fn sumsq_device_ptr(&self) -> u64 {
        self.result_ptr
    }

    /// Device address of the f32 clip coefficient.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// # use fusedreg::cudarc::driver::{result, DevicePtrMut};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// // Keep this step's clip coefficient in a buffer of your own, without a host sync.
    /// let mut coef = h.stream().alloc_zeros::<f32>(1).unwrap();
    /// let (dst, _guard) = coef.device_ptr_mut(h.stream());
    /// // SAFETY: two live f32s of the handle's context, ordered on its stream.
    /// unsafe { result::memcpy_dtod_async(dst, norm.coef_device_ptr(), 4, h.stream().cu_stream()) }
    ///     .unwrap();
    /// # Ok(()) }
    /// ```
    pub fn coef_device_ptr(&self) -> u64 {
        self.result_ptr + 12
    }

    /// Device address of the f32 gradient scale (`coef / loss_scale`).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// // Your own optimizer kernel takes the address as a `const float*` and multiplies each
    /// // gradient by it: no host sync between the norm and the update.
    /// let grad_scale: u64 = norm.grad_scale_device_ptr();
    /// # let _ = grad_scale;
    /// # Ok(()) }
    /// ```
    pub fn grad_scale_device_ptr(&self) -> u64 {
        self.result_ptr + 16
    }

    /// Device address of the u32 non-finite flag.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push_grad(h.stream().clone_htod(&vec![0.5f32; 100_000]).unwrap())?;
    /// # b.push_grad(h.stream().clone_htod(&vec![0.25f32; 1000]).unwrap())?;
    /// # let set = b.build()?;
    /// let mut norm = GlobalNorm::new(&set, None)?;
    /// norm.compute(&set)?;
    /// // A dynamic loss scaler's own kernel reads the u32 flag (non-zero: found inf) on the
    /// // device and halves the scale at norm.loss_scale_device_ptr().
    /// let found_inf: u64 = norm.nonfinite_device_ptr();
    /// # let _ = found_inf;
    /// # Ok(()) }
    /// ```
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
