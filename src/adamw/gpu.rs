//! Launch wrappers of AdamW: [`AdamW`] (hyperparameters and the device learning rate), and the
//! optimizer-state methods of [`TensorSet`] (skip flags, step counts, save and restore).

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

use super::state::{self, StateHeader};
use super::{check_lr, AdamWConfig, Rounding, OP};
use crate::dtype::DtypeKind;
use crate::error::{Error, Result};
use crate::global_norm::GlobalNorm;
use crate::multi_tensor::TensorSet;
use crate::runtime::kernels::Kernel;
use crate::runtime::Handle;

const ADAMW_THREADS: u32 = 512;

#[repr(C)]
#[derive(Clone, Copy)]
struct AdamWParams {
    tensors: u64,
    blocks: u64,
    chunk_steps: u64,
    skip: u64,
    lr: u64,
    grad_scale: u64,
    nonfinite: u64,
    seed: u64,
    beta1: f32,
    beta2: f32,
    eps: f32,
    block_offset: u32,
    stochastic: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<AdamWParams>() == 88);
// SAFETY: plain old data with the layout of the kernel's struct (size asserted on both sides).
unsafe impl DeviceRepr for AdamWParams {}

#[repr(C)]
#[derive(Clone, Copy)]
struct InitMasterParams {
    tensors: u64,
    blocks: u64,
    block_offset: u32,
    pad: u32,
}
const _: () = assert!(std::mem::size_of::<InitMasterParams>() == 24);
// SAFETY: as above.
unsafe impl DeviceRepr for InitMasterParams {}

fn adamw_kernel(p: DtypeKind, g: DtypeKind) -> Kernel {
    use DtypeKind::*;
    match (p, g) {
        (F32, F32) => Kernel::AdamwPf32Gf32,
        (F32, F16) => Kernel::AdamwPf32Gf16,
        (F32, Bf16) => Kernel::AdamwPf32Gbf16,
        (F16, F32) => Kernel::AdamwPf16Gf32,
        (F16, F16) => Kernel::AdamwPf16Gf16,
        (F16, Bf16) => Kernel::AdamwPf16Gbf16,
        (Bf16, F32) => Kernel::AdamwPbf16Gf32,
        (Bf16, F16) => Kernel::AdamwPbf16Gf16,
        (Bf16, Bf16) => Kernel::AdamwPbf16Gbf16,
    }
}

fn raw<T>(h: &Handle, s: &CudaSlice<T>) -> u64 {
    let (p, _g) = s.device_ptr(h.stream());
    p
}

/// Fills the master weights of a freshly built set of 16-bit parameters (one launch).
pub(crate) fn init_master(set: &TensorSet, p: DtypeKind) -> Result<()> {
    let grid = set.num_chunks_u32();
    if grid == 0 {
        return Ok(());
    }
    let k = match p {
        DtypeKind::F16 => Kernel::AdamwInitMasterF16,
        DtypeKind::Bf16 => Kernel::AdamwInitMasterBf16,
        DtypeKind::F32 => return Ok(()),
    };
    let params = InitMasterParams {
        tensors: set.tensors_ptr(),
        blocks: set.blocks_ptr(),
        block_offset: 0,
        pad: 0,
    };
    set.handle()
        .launch(k, (grid, 1, 1), (ADAMW_THREADS, 1, 1), 0, &params)
}

/// Fused AdamW over one [`TensorSet`]: the hyperparameters and the learning rate in device
/// memory. The optimizer state lives in the set. See the [module docs](super).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::{AdamW, AdamWConfig};
/// use fusedreg::global_norm::GlobalNorm;
/// use fusedreg::multi_tensor::TensorSet;
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let mut b = TensorSet::builder(&h);
/// b.push(s.clone_htod(&vec![0.1f32; 4096]).unwrap(), s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
/// let mut set = b.build()?;
/// let opt = AdamW::new(&set, AdamWConfig::default())?;
/// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
/// for _step in 0..10 {
///     // ... backward writes set.grad_mut::<f32>(0) ...
///     opt.clip_and_step(&mut set, &mut norm)?; // 3 launches, no host sync
/// }
/// # Ok(()) }
/// ```
pub struct AdamW {
    handle: Handle,
    set_id: u64,
    config: AdamWConfig,
    lr: CudaSlice<f32>,
    lr_ptr: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .finish()
    }
}

impl AdamW {
    /// An optimizer for `set` (which must hold parameters). Errors on invalid hyperparameters
    /// (see [`AdamWConfig::validate`]).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let cfg = AdamWConfig { lr: 3e-4, beta2: 0.95, ..Default::default() };
    /// let opt = AdamW::new(&set, cfg)?; // validates cfg, copies lr to the device
    /// opt.step(&mut set, None)?;
    /// # Ok(()) }
    /// ```
    pub fn new(set: &TensorSet, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        set.state(OP)?;
        let handle = set.handle().clone();
        let lr = handle
            .stream()
            .clone_htod(&[config.lr])
            .map_err(Error::driver(OP))?;
        let lr_ptr = raw(&handle, &lr);
        Ok(AdamW {
            handle,
            set_id: set.id(),
            config,
            lr,
            lr_ptr,
        })
    }

    /// The hyperparameters (`lr` is the initial learning rate; the current one is on the device).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig { lr: 3e-4, ..Default::default() })?;
    /// opt.set_lr(1e-4)?;
    /// let initial = opt.config().lr; // still 3e-4: set_lr changes the device copy only
    /// println!("initial lr {initial}, betas {} {}", opt.config().beta1, opt.config().beta2);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Sets the learning rate for the following steps: a 4-byte host-to-device copy on the
    /// stream from pageable memory (CUDA may stage it synchronously, and it cannot be captured
    /// into a graph: for graphs, write the value at [`AdamW::lr_device_ptr`] from the device).
    /// Errors on a negative or non-finite value.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig::default())?;
    /// for step in 0..100u32 {
    ///     // Linear warm-up over the first 10 steps, then the base rate.
    ///     opt.set_lr(1e-3 * ((step + 1) as f32 / 10.0).min(1.0))?;
    ///     opt.step(&mut set, None)?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        check_lr(lr)?;
        self.handle
            .stream()
            .memcpy_htod(&[lr], &mut self.lr)
            .map_err(Error::driver(OP))
    }

    /// Device address of the f32 learning rate, for schedules computed on the device (CUDA
    /// graphs). It must stay finite and `>= 0`: values written there are not checked.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// use fusedreg::cudarc::driver::{result, DevicePtr};
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// // A warm-up schedule kept on the device; step k copies entry k into place (capturable).
    /// let sched: Vec<f32> = (1..=100).map(|k| 1e-5 * k as f32).collect();
    /// let sched = h.stream().clone_htod(&sched).unwrap();
    /// let (base, _guard) = sched.device_ptr(h.stream());
    /// for k in 0..100u64 {
    ///     let (dst, src, stream) = (opt.lr_device_ptr(), base + 4 * k, h.stream().cu_stream());
    ///     // SAFETY: two live f32s of the handle's context, ordered on its stream.
    ///     unsafe { result::memcpy_dtod_async(dst, src, 4, stream) }.unwrap();
    ///     opt.step(&mut set, None)?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lr_device_ptr(&self) -> u64 {
        self.lr_ptr
    }

    pub(crate) fn check_set(&self, set: &TensorSet) -> Result<()> {
        if set.id() == self.set_id {
            Ok(())
        } else {
            Err(Error::invalid(
                OP,
                "this AdamW was created for another TensorSet: create one per set",
            ))
        }
    }

    /// Launches the update over chunks `block_offset .. block_offset + grid` of the set.
    pub(crate) fn launch(
        &self,
        set: &TensorSet,
        grad_scale: u64,
        nonfinite: u64,
        block_offset: u32,
        grid: u32,
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let st = set.state(OP)?;
        let p_kind = set.param_dtype().expect("a set with state has params");
        let (stochastic, seed) = match self.config.rounding {
            Rounding::Stochastic { seed } if p_kind != DtypeKind::F32 => (1, seed),
            _ => (0, 0),
        };
        let p = AdamWParams {
            tensors: set.tensors_ptr(),
            blocks: set.blocks_ptr(),
            chunk_steps: raw(&self.handle, &st.chunk_steps),
            skip: raw(&self.handle, &st.skip),
            lr: self.lr_ptr,
            grad_scale,
            nonfinite,
            seed,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            block_offset,
            stochastic,
            pad: 0,
        };
        self.handle.launch(
            adamw_kernel(p_kind, set.grad_dtype()),
            (grid, 1, 1),
            (ADAMW_THREADS, 1, 1),
            0,
            &p,
        )
    }

    /// One AdamW step over every tensor of the set: one launch, no host sync. With `norm`, the
    /// gradients are multiplied by its device `grad_scale` and the step is skipped entirely
    /// (nothing changes) when its non-finite flag is set; run the norm first
    /// ([`GlobalNorm::compute`]) or use [`AdamW::clip_and_step`].
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::global_norm::GlobalNorm;
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// opt.step(&mut set, None)?; // plain AdamW: grad_scale 1, no flag
    /// // With a norm computed first: clipped gradients, skipped when non-finite.
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// norm.compute(&set)?;
    /// opt.step(&mut set, Some(&norm))?;
    /// # Ok(()) }
    /// ```
    pub fn step(&self, set: &mut TensorSet, norm: Option<&GlobalNorm>) -> Result<()> {
        self.check_set(set)?;
        let (grad_scale, nonfinite) = match norm {
            Some(n) => {
                n.check_for(set)?;
                (n.grad_scale_device_ptr(), n.nonfinite_device_ptr())
            }
            None => (0, 0),
        };
        self.launch(set, grad_scale, nonfinite, 0, set.num_chunks_u32())
    }

    /// The whole step: norm partials, reduce + finalize (clip coefficient, non-finite flag),
    /// AdamW reading both from device memory. 3 launches, no host sync, gradients read twice.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::global_norm::GlobalNorm;
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// let before = h.launch_count();
    /// opt.clip_and_step(&mut set, &mut norm)?;
    /// println!("{} launches", h.launch_count() - before); // 3
    /// println!("norm before clipping: {}", norm.read()?.norm); // blocking, only if wanted
    /// # Ok(()) }
    /// ```
    pub fn clip_and_step(&self, set: &mut TensorSet, norm: &mut GlobalNorm) -> Result<()> {
        self.check_set(set)?;
        norm.compute(set)?;
        self.step(set, Some(norm))
    }
}

impl TensorSet {
    fn state_header(&self) -> Result<StateHeader> {
        Ok(StateHeader {
            param_dtype: self
                .param_dtype()
                .ok_or_else(|| Error::invalid(OP, "a gradients-only set has no optimizer state"))?,
            lens: self.layout().lens().to_vec(),
        })
    }

    /// Sets the per-tensor skip flags for the following steps (one per tensor; `true` = this
    /// tensor's parameters, moments and step count stay untouched, e.g. the block was dropped by
    /// stochastic depth): a copy of one byte per tensor from pageable host memory (small; CUDA
    /// may stage it synchronously), the tables are not re-uploaded. Flags persist until changed.
    /// A skipped tensor has no gradient this step, so the global norm leaves it out too (the norm
    /// does not read its stale gradient); the standalone scale pass
    /// (`GlobalNorm::scale_grads`) still scales it, harmlessly, since AdamW skips it.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// // The block owning tensor 1 was dropped this step: leave it alone.
    /// set.set_skip(&[false, true])?;
    /// opt.step(&mut set, None)?;
    /// set.set_skip(&[false, false])?; // flags persist until changed
    /// # Ok(()) }
    /// ```
    pub fn set_skip(&mut self, skip: &[bool]) -> Result<()> {
        crate::error::check_len(OP, "skip", skip.len(), self.len())?;
        let bytes: Vec<u8> = skip.iter().map(|&b| u8::from(b)).collect();
        let stream = self.handle().stream().clone();
        let st = self
            .state
            .as_mut()
            .ok_or_else(|| Error::invalid(OP, "a gradients-only set has no skip flags"))?;
        stream
            .memcpy_htod(&bytes, &mut st.skip)
            .map_err(Error::driver(OP))
    }

    /// Device address of the skip flags (one `u8` per tensor, non-zero = skip), for callers
    /// that decide on the device which blocks were dropped.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let set = b.build()?;
    /// use fusedreg::cudarc::driver::result;
    /// let flags = set.skip_device_ptr()?; // one u8 per tensor
    /// // Skip tensor 0 from the device side (e.g. inside a captured graph).
    /// // SAFETY: the flags live as long as the set, in the handle's context.
    /// unsafe { result::memset_d8_async(flags, 1, 1, h.stream().cu_stream()) }.unwrap();
    /// # Ok(()) }
    /// ```
    pub fn skip_device_ptr(&self) -> Result<u64> {
        let st = self.state(OP)?;
        Ok(raw(self.handle(), &st.skip))
    }

    /// The step count of every tensor (blocking read). Zero-size tensors have no chunk and
    /// report 0.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// opt.step(&mut set, None)?;
    /// opt.step(&mut set, None)?;
    /// println!("{:?}", set.step_counts()?); // [2]
    /// # Ok(()) }
    /// ```
    pub fn step_counts(&self) -> Result<Vec<u32>> {
        let st = self.state(OP)?;
        let chunk_steps = self
            .handle()
            .stream()
            .clone_dtoh(&st.chunk_steps)
            .map_err(Error::driver(OP))?;
        Ok((0..self.len())
            .map(|t| {
                let r = self.layout().chunks(t);
                if r.is_empty() {
                    0
                } else {
                    chunk_steps[r.start]
                }
            })
            .collect())
    }

    /// The optimizer state (moments, master weights, step counts) as bytes in the
    /// [versioned format](super::state) (blocking).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// opt.step(&mut set, None)?;
    /// let bytes = set.save_state()?;
    /// std::fs::write("optimizer.state", &bytes).unwrap();
    /// let header = fusedreg::adamw::state::peek(&bytes)?; // f32 params, lens [4096]
    /// # let _ = header;
    /// # Ok(()) }
    /// ```
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let header = self.state_header()?;
        let st = self.state(OP)?;
        let s = self.handle().stream();
        let m = s.clone_dtoh(&st.m).map_err(Error::driver(OP))?;
        let v = s.clone_dtoh(&st.v).map_err(Error::driver(OP))?;
        let master = match &st.master {
            Some(x) => s.clone_dtoh(x).map_err(Error::driver(OP))?,
            None => Vec::new(),
        };
        let steps = self.step_counts()?;
        let lens = self.layout().lens();
        let range = |i: usize| {
            let off = st.offsets[i] as usize;
            off..off + lens[i] as usize
        };
        Ok(state::encode(
            &header,
            &steps,
            |i| &m[range(i)],
            |i| &v[range(i)],
            |i| {
                if master.is_empty() {
                    &[]
                } else {
                    &master[range(i)]
                }
            },
        ))
    }

    /// Restores state written by [`TensorSet::save_state`] (or `adamw::cpu::save_state`) into
    /// this set, which must hold the same parameter dtype and tensor lengths in the same order
    /// (an error naming the first difference otherwise, and nothing is changed). The parameters
    /// themselves are the model's: load them from the model checkpoint. Training then resumes
    /// bit for bit.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap(), 0.01)?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default())?;
    /// let bytes = std::fs::read("optimizer.state").unwrap();
    /// set.restore_state(&bytes)?; // moments and step counts; load the params separately
    /// opt.step(&mut set, None)?;  // continues where the saved run stopped
    /// # Ok(()) }
    /// ```
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let header = self.state_header()?;
        let view = state::decode(bytes, &header)?;
        let layout = self.layout().clone();
        let stream = self.handle().stream().clone();
        let st = self.state.as_mut().expect("checked by state_header");
        let arena = st.m.len();
        let mut m = vec![0f32; arena];
        let mut v = vec![0f32; arena];
        let mut master = st.master.as_ref().map(|_| vec![0f32; arena]);
        let mut steps = vec![0u32; st.chunk_steps.len()];
        for (i, &n) in layout.lens().iter().enumerate() {
            let r = st.offsets[i] as usize..(st.offsets[i] + n) as usize;
            view.fill_into(
                i,
                &mut m[r.clone()],
                &mut v[r.clone()],
                master.as_mut().map(|x| &mut x[r]),
            );
            for c in layout.chunks(i) {
                steps[c] = view.steps[i];
            }
        }
        let drv = || Error::driver(OP);
        stream.memcpy_htod(&m, &mut st.m).map_err(drv())?;
        stream.memcpy_htod(&v, &mut st.v).map_err(drv())?;
        if let (Some(h), Some(d)) = (&master, st.master.as_mut()) {
            stream.memcpy_htod(h, d).map_err(drv())?;
        }
        stream
            .memcpy_htod(&steps, &mut st.chunk_steps)
            .map_err(drv())
    }
}
