//! Launch wrappers of AdamW: [`AdamW`] owns the optimizer state of one [`TensorSet`] (moments,
//! master weights, per-tensor weight decay, per-chunk step counts, skip flags, the device
//! learning rate) and its own per-tensor device table; the set knows only its tensors.

use cudarc::driver::{CudaSlice, CudaView, ValidAsZeroBits};

use super::state::{self, StateHeader};
use super::{check_lr, check_weight_decay, AdamWConfig, MomentDtype, Rounding, StateOptions, OP};
use crate::dtype::{Dtype, DtypeKind};
use crate::error::{check_len, Error, Result};
use crate::global_norm::GlobalNorm;
use crate::multi_tensor::{resident_addr, Layout, TensorSet};
use crate::runtime::device_params;
use crate::runtime::kernels::Kernel;
use crate::runtime::{DeviceScalar, Handle};

crate::kernel_list! {
    "adamw" => {
        [f32 AdamwPf32Gf32, f16 AdamwPf32Gf16, bf16 AdamwPf32Gbf16] = "adamw_pf32_g",
        [f32 AdamwPf16Gf32, f16 AdamwPf16Gf16, bf16 AdamwPf16Gbf16] = "adamw_pf16_g",
        [f32 AdamwPbf16Gf32, f16 AdamwPbf16Gf16, bf16 AdamwPbf16Gbf16] = "adamw_pbf16_g",
        [f32 AdamwPf32Gf32Mbf16, f16 AdamwPf32Gf16Mbf16, bf16 AdamwPf32Gbf16Mbf16] = "adamw_pf32_g", "_mbf16",
        [f32 AdamwPf16Gf32Mbf16, f16 AdamwPf16Gf16Mbf16, bf16 AdamwPf16Gbf16Mbf16] = "adamw_pf16_g", "_mbf16",
        [f32 AdamwPbf16Gf32Mbf16, f16 AdamwPbf16Gf16Mbf16, bf16 AdamwPbf16Gbf16Mbf16] = "adamw_pbf16_g", "_mbf16",
        [f32 AdamwPf16Gf32Nomaster, f16 AdamwPf16Gf16Nomaster, bf16 AdamwPf16Gbf16Nomaster] = "adamw_pf16_g", "_nomaster",
        [f32 AdamwPbf16Gf32Nomaster, f16 AdamwPbf16Gf16Nomaster, bf16 AdamwPbf16Gbf16Nomaster] = "adamw_pbf16_g", "_nomaster",
        [f32 AdamwPf16Gf32Mbf16Nomaster, f16 AdamwPf16Gf16Mbf16Nomaster, bf16 AdamwPf16Gbf16Mbf16Nomaster] = "adamw_pf16_g", "_mbf16_nomaster",
        [f32 AdamwPbf16Gf32Mbf16Nomaster, f16 AdamwPbf16Gf16Mbf16Nomaster, bf16 AdamwPbf16Gbf16Mbf16Nomaster] = "adamw_pbf16_g", "_mbf16_nomaster",
        [f16 AdamwInitMasterF16, bf16 AdamwInitMasterBf16] = "adamw_init_master_",
    }
}

const ADAMW_THREADS: u32 = 512;

/// Every tensor's state (m, v, master) starts at a multiple of this many elements of its arena,
/// so the state is always aligned for the kernel's vector path (256 bytes of f32).
const STATE_ALIGN: u64 = 64;

device_params! {
    /// The optimizer's own row per tensor (`AdamWTensor` in `kernels/adamw.cu`).
    #[derive(Debug, Default, PartialEq)]
    struct AdamWTensor(32) {
        m: u64,
        v: u64,
        master: u64,
        weight_decay: f32,
        pad: u32,
    }
}
// SAFETY: all fields are integers or floats, for which zero bits are valid.
unsafe impl ValidAsZeroBits for AdamWTensor {}

device_params! {
    struct AdamWParams(96) {
        tensors: u64,
        blocks: u64,
        state: u64,
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
}

device_params! {
    struct InitMasterParams(32) {
        tensors: u64,
        blocks: u64,
        state: u64,
        block_offset: u32,
        pad: u32,
    }
}

/// One kernel family (a state layout) as a match on the (param, grad) dtype pair: the rows are
/// the parameter dtypes, the columns the gradient dtypes f32, f16, bf16 (`kernels/adamw.cu`
/// instantiates the same families with one macro).
macro_rules! by_pair {
    ($p:expr, $g:expr; $($pk:ident => [$f32:ident, $f16:ident, $bf16:ident]),* $(,)?) => {
        match ($p, $g) {
            $(
                (DtypeKind::$pk, DtypeKind::F32) => Some(Kernel::$f32),
                (DtypeKind::$pk, DtypeKind::F16) => Some(Kernel::$f16),
                (DtypeKind::$pk, DtypeKind::Bf16) => Some(Kernel::$bf16),
            )*
            #[allow(unreachable_patterns)]
            _ => None,
        }
    };
}

/// The kernel for a dtype pair and state layout. f32 params have no master weights whatever the
/// option says, so they always use a family with master (where the flag has no effect).
fn adamw_kernel(p: DtypeKind, g: DtypeKind, state: StateOptions) -> Kernel {
    let k = match (state.moments, state.has_master(p) || p == DtypeKind::F32) {
        (MomentDtype::F32, true) => by_pair!(p, g;
            F32 => [AdamwPf32Gf32, AdamwPf32Gf16, AdamwPf32Gbf16],
            F16 => [AdamwPf16Gf32, AdamwPf16Gf16, AdamwPf16Gbf16],
            Bf16 => [AdamwPbf16Gf32, AdamwPbf16Gf16, AdamwPbf16Gbf16],
        ),
        (MomentDtype::Bf16, true) => by_pair!(p, g;
            F32 => [AdamwPf32Gf32Mbf16, AdamwPf32Gf16Mbf16, AdamwPf32Gbf16Mbf16],
            F16 => [AdamwPf16Gf32Mbf16, AdamwPf16Gf16Mbf16, AdamwPf16Gbf16Mbf16],
            Bf16 => [AdamwPbf16Gf32Mbf16, AdamwPbf16Gf16Mbf16, AdamwPbf16Gbf16Mbf16],
        ),
        (MomentDtype::F32, false) => by_pair!(p, g;
            F16 => [AdamwPf16Gf32Nomaster, AdamwPf16Gf16Nomaster, AdamwPf16Gbf16Nomaster],
            Bf16 => [AdamwPbf16Gf32Nomaster, AdamwPbf16Gf16Nomaster, AdamwPbf16Gbf16Nomaster],
        ),
        (MomentDtype::Bf16, false) => by_pair!(p, g;
            F16 => [
                AdamwPf16Gf32Mbf16Nomaster,
                AdamwPf16Gf16Mbf16Nomaster,
                AdamwPf16Gbf16Mbf16Nomaster
            ],
            Bf16 => [
                AdamwPbf16Gf32Mbf16Nomaster,
                AdamwPbf16Gf16Mbf16Nomaster,
                AdamwPbf16Gbf16Mbf16Nomaster
            ],
        ),
    };
    k.expect("every layout without master weights has 16-bit params")
}

/// The moments of every tensor, in arenas of the layout's dtype.
enum Moments {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    Bf16(CudaSlice<half::bf16>, CudaSlice<half::bf16>),
}

/// Fused multi-tensor AdamW over one [`TensorSet`]: it owns the set's optimizer state (see the
/// [module docs](super)) and launches one kernel per step for any number of tensors.
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::adamw::{weight_decay_by_rank, AdamW, AdamWConfig};
/// use fusedreg::{global_norm::GlobalNorm, multi_tensor::TensorSet};
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let mut b = TensorSet::builder(&h);
/// b.push(s.clone_htod(&vec![0.1f32; 4096]).unwrap(), s.alloc_zeros::<f32>(4096).unwrap())?;
/// b.push(s.clone_htod(&vec![0.0f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
/// let mut set = b.build()?;
/// // Decay the 64x64 matrix, not the bias.
/// let wd = weight_decay_by_rank(&[2, 1], 0.01);
/// let opt = AdamW::new(&set, AdamWConfig::default(), &wd)?;
/// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
/// for _ in 0..3 {
///     // ... the backward pass writes the gradients ...
///     opt.clip_and_step(&mut set, &mut norm)?; // 3 launches, no host sync
/// }
/// # Ok(()) }
/// ```
pub struct AdamW {
    handle: Handle,
    set_id: u64,
    config: AdamWConfig,
    lr: DeviceScalar<f32>,
    layout: Layout,
    param_dtype: DtypeKind,
    weight_decay: Vec<f32>,
    /// Offset of each tensor's state in the arenas, in elements (multiples of STATE_ALIGN).
    offsets: Vec<u64>,
    /// m and v, f32 or bf16 (the layout's moment dtype).
    moments: Moments,
    /// f32 master weights, for 16-bit parameters only.
    master: Option<CudaSlice<f32>>,
    /// One step count per global chunk (each block advances only its own).
    chunk_steps: CudaSlice<u32>,
    /// One skip flag per tensor.
    skip: CudaSlice<u8>,
    #[allow(dead_code)] // keeps the uploaded table alive; launches use `table_ptr`
    table: CudaSlice<AdamWTensor>,
    table_ptr: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("tensors", &self.layout.num_tensors())
            .field("param_dtype", &self.param_dtype)
            .finish()
    }
}

impl AdamW {
    /// An optimizer for `set` (which must hold parameters), with decoupled weight decay
    /// `weight_decay[i]` for tensor `i` (see [`weight_decay_by_rank`](super::weight_decay_by_rank)
    /// for the usual grouping). Allocates the state: moments zeroed, f32 master weights copied
    /// from 16-bit parameters (one launch), step counts 0, no skip flags.
    ///
    /// Errors: invalid hyperparameters ([`AdamWConfig::validate`]), a gradients-only set, a
    /// weight-decay list of the wrong length, a weight decay negative or not finite.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap())?;
    /// # let mut set = b.build()?;
    /// let cfg = AdamWConfig { lr: 3e-4, beta2: 0.95, ..Default::default() };
    /// let opt = AdamW::new(&set, cfg, &[0.01])?; // validates, allocates the state
    /// opt.step(&mut set, None)?;
    /// # Ok(()) }
    /// ```
    pub fn new(set: &TensorSet, config: AdamWConfig, weight_decay: &[f32]) -> Result<Self> {
        config.validate()?;
        let param_dtype = set.param_dtype().ok_or_else(|| {
            Error::invalid(
                OP,
                "this set holds gradients only: register parameters with TensorSetBuilder::push \
                 or push_raw to use an optimizer",
            )
        })?;
        check_len(OP, "weight_decay", weight_decay.len(), set.len())?;
        for (i, &wd) in weight_decay.iter().enumerate() {
            check_weight_decay(wd).map_err(|e| Error::invalid(OP, format!("tensor {i}: {e}")))?;
        }
        let handle = set.handle().clone();
        let stream = handle.stream().clone();
        let layout = set.layout().clone();

        // State arenas: each tensor's m, v, master start at a multiple of STATE_ALIGN elements.
        let mut offsets = Vec::with_capacity(layout.num_tensors());
        let mut arena = 0u64;
        for &n in layout.lens() {
            offsets.push(arena);
            arena = n
                .div_ceil(STATE_ALIGN)
                .checked_mul(STATE_ALIGN)
                .and_then(|x| x.checked_add(arena))
                .ok_or_else(|| Error::invalid(OP, "the optimizer state does not fit in memory"))?;
        }
        let arena_len = usize::try_from(arena.max(1))
            .map_err(|_| Error::invalid(OP, "the optimizer state does not fit in memory"))?;
        let drv = || Error::driver(OP);
        let moments = match config.state.moments {
            MomentDtype::F32 => Moments::F32(
                stream.alloc_zeros::<f32>(arena_len).map_err(drv())?,
                stream.alloc_zeros::<f32>(arena_len).map_err(drv())?,
            ),
            MomentDtype::Bf16 => Moments::Bf16(
                stream.alloc_zeros::<half::bf16>(arena_len).map_err(drv())?,
                stream.alloc_zeros::<half::bf16>(arena_len).map_err(drv())?,
            ),
        };
        let master = if config.state.has_master(param_dtype) {
            Some(stream.alloc_zeros::<f32>(arena_len).map_err(drv())?)
        } else {
            None
        };
        let chunk_steps = stream
            .alloc_zeros::<u32>(layout.num_chunks().max(1))
            .map_err(drv())?;
        let skip = stream
            .alloc_zeros::<u8>(layout.num_tensors())
            .map_err(drv())?;

        let (m_base, v_base) = match &moments {
            Moments::F32(m, v) => (resident_addr(&handle, m), resident_addr(&handle, v)),
            Moments::Bf16(m, v) => (resident_addr(&handle, m), resident_addr(&handle, v)),
        };
        let msize = config.state.moments.size() as u64;
        let master_base = master.as_ref().map_or(0, |x| resident_addr(&handle, x));
        let rows: Vec<AdamWTensor> = offsets
            .iter()
            .zip(weight_decay)
            .map(|(&off, &wd)| {
                let at = |b: u64, size: u64| if b == 0 { 0 } else { b + off * size };
                AdamWTensor {
                    m: at(m_base, msize),
                    v: at(v_base, msize),
                    master: at(master_base, 4),
                    weight_decay: wd,
                    pad: 0,
                }
            })
            .collect();
        let table = stream.clone_htod(&rows).map_err(drv())?;
        let table_ptr = resident_addr(&handle, &table);
        let lr = DeviceScalar::new(&handle, OP, config.lr)?;
        let opt = AdamW {
            handle,
            set_id: set.id(),
            config,
            lr,
            layout,
            param_dtype,
            weight_decay: weight_decay.to_vec(),
            offsets,
            moments,
            master,
            chunk_steps,
            skip,
            table,
            table_ptr,
        };
        opt.init_master(set)?;
        Ok(opt)
    }

    /// master = f32(param) for 16-bit parameters: one launch over the set.
    fn init_master(&self, set: &TensorSet) -> Result<()> {
        if self.master.is_none() {
            return Ok(());
        }
        let grid = set.num_chunks_u32();
        let k = match self.param_dtype {
            DtypeKind::F16 => Kernel::AdamwInitMasterF16,
            DtypeKind::Bf16 => Kernel::AdamwInitMasterBf16,
            DtypeKind::F32 => return Ok(()),
        };
        let params = InitMasterParams {
            tensors: set.tensors_ptr(),
            blocks: set.blocks_ptr(),
            state: self.table_ptr,
            block_offset: 0,
            pad: 0,
        };
        set.launch_chunks(k, grid, ADAMW_THREADS, &params)
    }

    /// The hyperparameters (the learning rate as created; see [`AdamW::set_lr`]).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// assert_eq!(opt.config().beta2, 0.999);
    /// # Ok(()) }
    /// ```
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Sets the learning rate for the following steps: a 4-byte asynchronous copy, no sync.
    /// Errors on a negative or non-finite `lr`.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let mut set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// for step in 0..100u32 {
    ///     opt.set_lr(1e-3 * (1.0 - step as f32 / 100.0))?; // linear decay
    ///     opt.step(&mut set, None)?;
    /// }
    /// assert!(opt.set_lr(f32::NAN).is_err());
    /// # Ok(()) }
    /// ```
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        check_lr(lr)?;
        self.lr.set(lr)
    }

    /// Device address of the learning rate (an f32), for a scheduler kernel or a CUDA graph.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// println!("lr lives at {:#x}", opt.lr_device_ptr());
    /// # Ok(()) }
    /// ```
    pub fn lr_device_ptr(&self) -> u64 {
        self.lr.device_ptr()
    }

    /// Weight decay of tensor `i`.
    ///
    /// # Panics
    /// When `i` is not a tensor of the set, as slice indexing does.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.1f32; 8]).unwrap(), s.alloc_zeros::<f32>(8).unwrap())?;
    /// # let set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01, 0.0])?;
    /// assert_eq!((opt.weight_decay(0), opt.weight_decay(1)), (0.01, 0.0));
    /// # Ok(()) }
    /// ```
    pub fn weight_decay(&self, i: usize) -> f32 {
        self.weight_decay[i]
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

    pub(crate) fn skip_ptr(&self) -> u64 {
        resident_addr(&self.handle, &self.skip)
    }

    /// One launch over chunks `block_offset .. block_offset + grid` of the set.
    pub(crate) fn launch(
        &self,
        set: &TensorSet,
        grad_scale: u64,
        nonfinite: u64,
        block_offset: u32,
        grid: u32,
    ) -> Result<()> {
        let (stochastic, seed) = match self.config.rounding {
            Rounding::Stochastic { seed } if self.param_dtype != DtypeKind::F32 => (1, seed),
            _ => (0, 0),
        };
        let p = AdamWParams {
            tensors: set.tensors_ptr(),
            blocks: set.blocks_ptr(),
            state: self.table_ptr,
            chunk_steps: resident_addr(&self.handle, &self.chunk_steps),
            skip: self.skip_ptr(),
            lr: self.lr.device_ptr(),
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
        let kernel = adamw_kernel(self.param_dtype, set.grad_dtype(), self.config.state);
        set.launch_chunks(kernel, grid, ADAMW_THREADS, &p)
    }

    /// One AdamW step over every tensor of the set: one launch. With `norm`, the gradients are
    /// multiplied by its device `grad_scale` and the step is skipped entirely (no bit changes)
    /// when its non-finite flag is set; without, `grad_scale` is 1.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::global_norm::GlobalNorm;
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap())?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01])?;
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

    /// The whole step: norm partials (tensors skipped by [`AdamW::set_skip`] add exactly 0),
    /// reduce + finalize (clip coefficient, non-finite flag), AdamW reading both from device
    /// memory. 3 launches, no host sync, gradients read twice.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::global_norm::GlobalNorm;
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # let p = s.clone_htod(&vec![0.1f32; 4096]).unwrap();
    /// # b.push(p, s.alloc_zeros::<f32>(4096).unwrap())?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.01])?;
    /// let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    /// let before = h.launch_count();
    /// opt.clip_and_step(&mut set, &mut norm)?;
    /// println!("{} launches", h.launch_count() - before); // 3
    /// println!("norm before clipping: {}", norm.read()?.norm); // blocking, only if wanted
    /// # Ok(()) }
    /// ```
    pub fn clip_and_step(&self, set: &mut TensorSet, norm: &mut GlobalNorm) -> Result<()> {
        self.check_set(set)?;
        norm.compute_skipping(set, self.skip_ptr())?;
        self.step(set, Some(norm))
    }

    /// Sets the per-tensor skip flags (a tiny asynchronous copy): a skipped tensor (the block of
    /// a dropped stochastic-depth layer) gets no decay, no moment update and no step, and adds
    /// nothing to the norm of [`AdamW::clip_and_step`]. Flags persist until changed.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # b.push(s.clone_htod(&vec![0.1f32; 8]).unwrap(), s.alloc_zeros::<f32>(8).unwrap())?;
    /// # let mut set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig::default(), &[0.01, 0.0])?;
    /// // The block owning tensor 1 was dropped this step: leave it alone.
    /// opt.set_skip(&[false, true])?;
    /// opt.step(&mut set, None)?;
    /// opt.set_skip(&[false, false])?;
    /// assert!(opt.set_skip(&[true]).is_err()); // one flag per tensor
    /// # Ok(()) }
    /// ```
    pub fn set_skip(&mut self, skip: &[bool]) -> Result<()> {
        check_len(OP, "skip", skip.len(), self.layout.num_tensors())?;
        let bytes: Vec<u8> = skip.iter().map(|&b| u8::from(b)).collect();
        self.handle
            .stream()
            .memcpy_htod(&bytes, &mut self.skip)
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
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// use fusedreg::cudarc::driver::result;
    /// let flags = opt.skip_device_ptr(); // one u8 per tensor
    /// // Skip tensor 0 from the device side (e.g. inside a captured graph).
    /// // SAFETY: the flags live as long as the optimizer, in the handle's context.
    /// unsafe { result::memset_d8_async(flags, 1, 1, h.stream().cu_stream()) }.unwrap();
    /// # Ok(()) }
    /// ```
    pub fn skip_device_ptr(&self) -> u64 {
        self.skip_ptr()
    }

    /// The step count of every tensor (synchronises; 0 for zero-size tensors, which own no
    /// chunk). Counts saturate at `u32::MAX` (see the [module docs](super)).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// opt.step(&mut set, None)?;
    /// assert_eq!(opt.step_counts()?, vec![1]);
    /// # Ok(()) }
    /// ```
    pub fn step_counts(&self) -> Result<Vec<u32>> {
        let chunk_steps = self.handle.to_host(OP, &self.chunk_steps)?;
        Ok((0..self.layout.num_tensors())
            .map(|t| {
                let r = self.layout.chunks(t);
                if r.is_empty() {
                    0
                } else {
                    chunk_steps[r.start]
                }
            })
            .collect())
    }

    fn state_view<'a, T>(&'a self, s: &'a CudaSlice<T>, i: usize) -> Result<CudaView<'a, T>> {
        if i >= self.layout.num_tensors() {
            return Err(Error::invalid(
                OP,
                format!(
                    "tensor {i} does not exist (the set holds {})",
                    self.layout.num_tensors()
                ),
            ));
        }
        let off = self.offsets[i] as usize;
        Ok(s.slice(off..off + self.layout.lens()[i] as usize))
    }

    /// Tensor `i`'s first moment, as `M`: f32 or bf16, the layout's [`MomentDtype`] (any other
    /// type is an error).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 1000]).unwrap(), s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// opt.step(&mut set, None)?;
    /// let m = h.stream().clone_dtoh(&opt.exp_avg::<f32>(0)?).unwrap(); // 1000 f32
    /// // The moments' type is the layout's: bf16 is an error here (f32 moments).
    /// assert!(opt.exp_avg::<half::bf16>(0).is_err());
    /// # drop(m);
    /// # Ok(()) }
    /// ```
    pub fn exp_avg<M: Dtype>(&self, i: usize) -> Result<CudaView<'_, M>> {
        self.moment::<M>(i, 0)
    }

    /// Moment `which` (0: m, 1: v) of tensor `i` as `M`, which must be the layout's dtype.
    fn moment<M: Dtype>(&self, i: usize, which: usize) -> Result<CudaView<'_, M>> {
        let (m, v): (&dyn std::any::Any, &dyn std::any::Any) = match &self.moments {
            Moments::F32(m, v) => (m, v),
            Moments::Bf16(m, v) => (m, v),
        };
        let s = if which == 0 { m } else { v };
        let s = s.downcast_ref::<CudaSlice<M>>().ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "the moments are {:?}, not {}: read them as that type",
                    self.config.state.moments,
                    M::KIND.name()
                ),
            )
        })?;
        self.state_view(s, i)
    }

    /// Tensor `i`'s second moment, as `M` (see [`AdamW::exp_avg`]).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 1000]).unwrap(), s.alloc_zeros::<f32>(1000).unwrap())?;
    /// # let mut set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// opt.step(&mut set, None)?;
    /// let v = h.stream().clone_dtoh(&opt.exp_avg_sq::<f32>(0)?).unwrap(); // 1000 f32
    /// # drop(v);
    /// # Ok(()) }
    /// ```
    pub fn exp_avg_sq<M: Dtype>(&self, i: usize) -> Result<CudaView<'_, M>> {
        self.moment::<M>(i, 1)
    }

    /// Tensor `i`'s f32 master weights (16-bit parameters with [`MasterWeights::F32`](super::MasterWeights::F32)
    /// only; an error otherwise).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// use half::bf16;
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = h.stream();
    /// let mut b = TensorSet::builder(&h);
    /// let p = s.clone_htod(&vec![bf16::from_f32(0.5); 256]).unwrap();
    /// b.push(p, s.alloc_zeros::<bf16>(256).unwrap())?;
    /// let set = b.build()?;
    /// let opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// let master = s.clone_dtoh(&opt.master(0)?).unwrap(); // 0.5 in f32, the optimizer's truth
    /// # drop(master);
    /// # Ok(()) }
    /// ```
    pub fn master(&self, i: usize) -> Result<CudaView<'_, f32>> {
        let m = self.master.as_ref().ok_or_else(|| {
            Error::invalid(
                OP,
                "no master weights (f32 parameters, or MasterWeights::None): read the params",
            )
        })?;
        self.state_view(m, i)
    }

    fn state_header(&self) -> StateHeader {
        StateHeader {
            param_dtype: self.param_dtype,
            lens: self.layout.lens().to_vec(),
            options: self.config.state,
        }
    }

    /// Both moment arenas downloaded and widened to f32 (exact for bf16).
    fn moments_f32(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let h = &self.handle;
        Ok(match &self.moments {
            Moments::F32(m, v) => (h.to_host(OP, m)?, h.to_host(OP, v)?),
            Moments::Bf16(m, v) => {
                let widen = |x: Vec<half::bf16>| x.iter().map(|b| b.to_f32()).collect();
                (widen(h.to_host(OP, m)?), widen(h.to_host(OP, v)?))
            }
        })
    }

    /// The whole optimizer state as bytes (see the [module docs](super) for the format):
    /// moments, master weights and step counts. Synchronises.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let mut set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// opt.step(&mut set, None)?;
    /// let bytes = opt.save_state()?;
    /// opt.restore_state(&bytes)?; // training resumes bit for bit
    /// # Ok(()) }
    /// ```
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let header = self.state_header();
        let (m, v) = self.moments_f32()?;
        let master = match &self.master {
            Some(x) => self.handle.to_host(OP, x)?,
            None => Vec::new(),
        };
        let steps = self.step_counts()?;
        let lens = self.layout.lens();
        let range = |i: usize| {
            let off = self.offsets[i] as usize;
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

    /// Restores a state written by [`AdamW::save_state`] or [`cpu::save_state`](super::cpu::save_state)
    /// for the same parameter dtype and tensor lengths; checks everything first (an error names
    /// the first difference) and changes nothing on error.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// # use fusedreg::{adamw::{AdamW, AdamWConfig}, multi_tensor::TensorSet};
    /// let h = fusedreg::Handle::new(0)?;
    /// # let s = h.stream();
    /// # let mut b = TensorSet::builder(&h);
    /// # b.push(s.clone_htod(&vec![0.1f32; 64]).unwrap(), s.alloc_zeros::<f32>(64).unwrap())?;
    /// # let set = b.build()?;
    /// let mut opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    /// let bytes = opt.save_state()?;
    /// assert!(opt.restore_state(&bytes[..bytes.len() - 1]).is_err()); // truncated
    /// opt.restore_state(&bytes)?;
    /// # Ok(()) }
    /// ```
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let header = self.state_header();
        let view = state::decode(bytes, &header)?;
        let arena = match &self.moments {
            Moments::F32(m, _) => m.len(),
            Moments::Bf16(m, _) => m.len(),
        };
        let mut m = vec![0f32; arena];
        let mut v = vec![0f32; arena];
        let mut master = self.master.as_ref().map(|_| vec![0f32; arena]);
        let mut steps = vec![0u32; self.chunk_steps.len()];
        for (i, &n) in self.layout.lens().iter().enumerate() {
            let r = self.offsets[i] as usize..(self.offsets[i] + n) as usize;
            view.fill_into(
                i,
                &mut m[r.clone()],
                &mut v[r.clone()],
                master.as_mut().map(|x| &mut x[r]),
            );
            for c in self.layout.chunks(i) {
                steps[c] = view.steps[i];
            }
        }
        let stream = self.handle.stream().clone();
        let drv = || Error::driver(OP);
        match &mut self.moments {
            Moments::F32(dm, dv) => {
                stream.memcpy_htod(&m, dm).map_err(drv())?;
                stream.memcpy_htod(&v, dv).map_err(drv())?;
            }
            Moments::Bf16(dm, dv) => {
                // The state holds bf16 values: the narrowing is exact.
                let narrow = |x: &[f32]| -> Vec<half::bf16> {
                    x.iter().map(|&f| half::bf16::from_f32(f)).collect()
                };
                stream.memcpy_htod(&narrow(&m), dm).map_err(drv())?;
                stream.memcpy_htod(&narrow(&v), dv).map_err(drv())?;
            }
        }
        if let (Some(h), Some(d)) = (&master, self.master.as_mut()) {
            stream.memcpy_htod(h, d).map_err(drv())?;
        }
        stream
            .memcpy_htod(&steps, &mut self.chunk_steps)
            .map_err(drv())
    }
}
