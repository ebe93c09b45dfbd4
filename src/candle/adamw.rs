//! fusedreg's AdamW over candle Vars: see [`AdamW`].

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::Optimizer;
use half::{bf16, f16};

use super::shell::{unsupported, Elem};
use super::vars::{check_grad, check_vars};
use super::wrap;
use crate::adamw::cpu::{self as reference, CpuTensor, StepInputs};
use crate::adamw::{check_lr, weight_decay_by_rank, AdamWConfig};
use crate::error::Error;
use crate::global_norm::{check_max_norm, cpu as norm_cpu};
use crate::multi_tensor::Layout;

const OP: &str = "candle AdamW";

/// The settings of [`AdamW`] ([`Optimizer::Config`]): fusedreg's [`AdamWConfig`] (lr, betas,
/// eps, rounding of 16-bit parameters, lean state layout), the weight decay of
/// [`Optimizer::new`] (applied to every Var, as candle does; see [`AdamW::grouped`] and
/// [`AdamW::with_weight_decay`] for per-Var decay) and optional global-norm clipping.
///
/// The defaults are PyTorch's and candle's: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay
/// 0.01, no clipping.
///
/// # Examples
///
/// ```
/// use fusedreg::candle::AdamWParams;
/// let p = AdamWParams { max_grad_norm: Some(1.0), ..Default::default() };
/// assert_eq!((p.config.lr, p.weight_decay), (1e-3, 0.01));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// lr, betas, eps, rounding and state layout.
    pub config: AdamWConfig,
    /// Weight decay of every Var for [`Optimizer::new`]; the group value for [`AdamW::grouped`].
    pub weight_decay: f32,
    /// Clip the gradients' global L2 norm to this (`clip_grad_norm_`); `None`: no clipping.
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWParams {
    /// PyTorch's defaults, no clipping.
    ///
    /// ```
    /// let p = fusedreg::candle::AdamWParams::default();
    /// assert_eq!((p.config.beta1, p.config.beta2, p.config.eps), (0.9, 0.999, 1e-8));
    /// assert_eq!(p.max_grad_norm, None);
    /// ```
    fn default() -> Self {
        AdamWParams {
            config: AdamWConfig::default(),
            weight_decay: crate::adamw::DEFAULT_WEIGHT_DECAY,
            max_grad_norm: None,
        }
    }
}

/// The CPU reference's tensors, one per Var, in the Vars' dtype.
enum CpuState {
    F32(Vec<CpuTensor<f32, f32>>),
    F16(Vec<CpuTensor<f16, f16>>),
    Bf16(Vec<CpuTensor<bf16, bf16>>),
}

/// Runs `$body` with `$t` bound to the typed tensor list of a [`CpuState`].
macro_rules! with_cpu {
    ($state:expr, $t:ident => $body:expr) => {
        match $state {
            CpuState::F32($t) => $body,
            CpuState::F16($t) => $body,
            CpuState::Bf16($t) => $body,
        }
    };
}

enum Backend {
    /// No Vars: every step does nothing.
    Empty,
    Cpu(CpuState),
    #[cfg(feature = "candle-cuda")]
    Cuda(Box<cuda::CudaState>),
}

/// fusedreg's AdamW as a [`candle_nn::optim::Optimizer`] over candle [`Var`]s.
///
/// * CPU device: each step runs fusedreg's CPU reference ([`crate::adamw::cpu::step`]) on the
///   Vars' values and gradients and writes the new values back with [`Var::set`]; the result is
///   bit for bit what the CPU reference gives.
/// * CUDA device (feature `candle-cuda`): the Vars' device memory is registered once in a
///   [`TensorSet`](crate::multi_tensor::TensorSet) by raw address and updated **in place** by
///   fusedreg's multi-tensor kernels on candle's stream (norm and AdamW: 1 to 3 launches per step
///   for any number of Vars). fusedreg's AdamW is bit-exact between CPU and GPU, so both devices
///   give the same bits for the same gradients (candle's own CPU and CUDA backward passes may
///   produce different gradients).
///
/// # Why the registered addresses stay valid
///
/// The optimizer keeps a clone of every [`Var`]: a `Var` is an `Arc` to its storage, so the
/// storage (and its device allocation) lives at least as long as the optimizer. Nothing in candle
/// 0.11 replaces a Var's storage: [`Var::set`] (candle-core `variable.rs`) takes
/// `storage_mut_and_layout()` and copies the source *into* the existing storage
/// (`copy_strided_src`), so the address registered at construction is the address of the
/// Var's values for the Var's whole life. Gradients are new tensors every step (a new
/// `GradStore`), so their addresses are handed to the engine each step
/// ([`TensorSet::set_grads_raw`](crate::multi_tensor::TensorSet::set_grads_raw); the table is
/// re-uploaded only when an address changed). The gradients are read by kernels queued on
/// candle's stream; when they are dropped, cudarc frees them on that same stream (or after
/// synchronising it), so they are not freed before the kernels have read them.
///
/// # Semantics
///
/// PyTorch's AdamW (see [`crate::adamw`] for the exact operation order): decoupled weight decay
/// `p *= 1 - lr*wd`, bias corrections, `eps` outside the square root. Hyperparameters are f32
/// whatever the Var dtype (candle's AdamW converts them to the Var dtype: in bf16, 0.999 is 1).
///
/// * All Vars of one optimizer share one device and one dtype (f32, f16 or bf16); gradients have
///   the Var's dtype and shape. Anything else is an error. Use one optimizer per dtype.
/// * A Var without a gradient in the `GradStore` (not used by the loss, or its block dropped by
///   stochastic depth) **skips the step**: no decay, no moment update, its step count unchanged,
///   and it adds nothing to the clipping norm — as with [`AdamW::set_skip`]. (candle's AdamW
///   also leaves such a Var alone, but its one step counter for all Vars still advances, so the
///   Var's next bias correction differs from ours, which counts steps per Var as PyTorch does.)
/// * On CUDA a step queues 1 (no clipping) or 3 launches. Host-to-device copies happen only
///   when something changed: the gradient-address table (40 bytes per Var), the skip flags, the
///   learning rate. They are copies from pageable memory, for which CUDA may first wait for the
///   stream: a step that changes one of them can synchronise with the GPU once; a step where candle
///   hands out the same gradient addresses as the step before (its stream-ordered pool often
///   does) and nothing else changed does not. A pinned ring buffer would remove that wait.
/// * With f32 master weights (the default for f16/bf16 Vars) the optimizer's master copy is
///   the truth: each step writes the master's rounding into the Var. A value written into such a
///   Var from outside (`Var::set`, loading a checkpoint into the `VarMap`) after the optimizer
///   was built is therefore replaced at the next step. Load weights before building the
///   optimizer (or build a new one after loading). f32 Vars have no master and are read as they
///   are at every step.
/// * [`AdamW::save_state`] / [`AdamW::load_state`] match Vars by position: build the optimizer
///   from the same Vars in the same order in every process. `VarMap::all_vars()` returns them
///   in a per-process random order (a `HashMap`); use [`vars_by_name`](super::vars_by_name) instead. A load whose
///   tensor lengths differ is an error; a different order of equally long Vars cannot be
///   detected.
/// * Non-contiguous gradients are copied to a contiguous tensor first.
/// * When clipping is on and the gradient norm is NaN or infinite, the whole step is skipped:
///   no Var and no state bit changes.
/// * [`Optimizer::set_learning_rate`] cannot return an error: an invalid rate (negative, NaN)
///   is reported by the next [`Optimizer::step`].
///
/// # Examples
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::optim::Optimizer;
/// use fusedreg::candle::{AdamW, AdamWParams};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let w = Var::randn(0f32, 1.0, (8, 4), &dev)?;
/// let b = Var::zeros(4, candle_core::DType::F32, &dev)?;
/// let params = AdamWParams { max_grad_norm: Some(1.0), ..Default::default() };
/// // Decay the matrix, not the bias.
/// let mut opt = AdamW::grouped(vec![w.clone(), b.clone()], params)?;
/// assert_eq!(opt.weight_decay(), &[0.01, 0.0]);
/// let x = Tensor::randn(0f32, 1.0, (2, 8), &dev)?;
/// let before = w.to_vec2::<f32>()?;
/// let loss = x.matmul(&w)?.broadcast_add(&b)?.sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// assert_ne!(w.to_vec2::<f32>()?, before);
/// opt.set_learning_rate(1e-4); // a schedule
/// assert_eq!(opt.learning_rate(), 1e-4);
/// # Ok(()) }
/// ```
pub struct AdamW {
    vars: Vec<Var>,
    config: AdamWConfig,
    lr: f64,
    weight_decay: Vec<f32>,
    max_grad_norm: Option<f32>,
    skip: Vec<bool>,
    backend: Backend,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("vars", &self.vars.len())
            .field("config", &self.config)
            .field("lr", &self.lr)
            .field("max_grad_norm", &self.max_grad_norm)
            .finish()
    }
}

fn err(msg: impl Into<String>) -> candle_core::Error {
    wrap(Error::invalid(OP, msg))
}

impl Optimizer for AdamW {
    type Config = AdamWParams;

    /// Every Var decayed by `params.weight_decay` (candle's and PyTorch's behaviour with one
    /// parameter group). Errors: Vars on different devices or of different dtypes, a dtype other
    /// than f32/f16/bf16, an invalid config, weight decay or clipping threshold.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// use fusedreg::candle::{AdamW, AdamWParams};
    /// let v = Var::zeros(3, candle_core::DType::U32, &Device::Cpu).unwrap();
    /// assert!(AdamW::new(vec![v], AdamWParams::default()).is_err()); // not a float dtype
    /// ```
    fn new(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let wd = vec![params.weight_decay; vars.len()];
        Self::build(vars, params, wd)
    }

    /// One AdamW step with the gradients in `grads` (clipped first when a threshold is set).
    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        check_lr(self.lr as f32)?;
        let lr = self.lr as f32;
        match &mut self.backend {
            Backend::Empty => Ok(()),
            Backend::Cpu(state) => with_cpu!(state, t => cpu_step(
                t, &self.vars, grads, &self.skip, &self.config, lr, self.max_grad_norm
            )),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(state) => {
                state.step(&self.vars, grads, &self.skip, lr, self.max_grad_norm)
            }
        }
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate of the following steps (kept as given; used as f32). An invalid
    /// rate is reported by the next [`Optimizer::step`].
    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
}

impl AdamW {
    /// The usual grouping: Vars of rank >= 2 (weight matrices, embeddings) decayed by
    /// `params.weight_decay`, Vars of rank 0 or 1 (biases, norm gains and shifts) not decayed
    /// ([`weight_decay_by_rank`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use fusedreg::candle::{AdamW, AdamWParams};
    /// # fn main() -> candle_core::Result<()> {
    /// let (w, g) = (Var::zeros((4, 4), DType::F32, &Device::Cpu)?, Var::ones(4, DType::F32, &Device::Cpu)?);
    /// let p = AdamWParams { weight_decay: 0.1, ..Default::default() };
    /// assert_eq!(AdamW::grouped(vec![w, g], p)?.weight_decay(), &[0.1, 0.0]);
    /// # Ok(()) }
    /// ```
    pub fn grouped(vars: Vec<Var>, params: AdamWParams) -> candle_core::Result<Self> {
        let ranks: Vec<usize> = vars.iter().map(|v| v.rank()).collect();
        let wd = weight_decay_by_rank(&ranks, params.weight_decay);
        Self::build(vars, params, wd)
    }

    /// Per-Var weight decay: `decay(index, var)` for each Var (`params.weight_decay` unused).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use fusedreg::candle::{AdamW, AdamWParams};
    /// # fn main() -> candle_core::Result<()> {
    /// let vars = vec![Var::zeros((2, 2), DType::F32, &Device::Cpu)?, Var::zeros(2, DType::F32, &Device::Cpu)?];
    /// let opt = AdamW::with_weight_decay(vars, AdamWParams::default(), |i, _| 0.1 * i as f32)?;
    /// assert_eq!(opt.weight_decay(), &[0.0, 0.1]);
    /// // A negative or non-finite decay is an error.
    /// let vars = vec![Var::zeros(2, DType::F32, &Device::Cpu)?];
    /// assert!(AdamW::with_weight_decay(vars, AdamWParams::default(), |_, _| -1.0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_weight_decay(
        vars: Vec<Var>,
        params: AdamWParams,
        decay: impl Fn(usize, &Var) -> f32,
    ) -> candle_core::Result<Self> {
        let wd = vars.iter().enumerate().map(|(i, v)| decay(i, v)).collect();
        Self::build(vars, params, wd)
    }

    fn build(vars: Vec<Var>, params: AdamWParams, wd: Vec<f32>) -> candle_core::Result<Self> {
        params.config.validate()?;
        check_max_norm(params.max_grad_norm)?;
        for (i, &d) in wd.iter().enumerate() {
            crate::adamw::check_weight_decay(d).map_err(|e| err(format!("Var {i}: {e}")))?;
        }
        let backend = match vars.first() {
            None => Backend::Empty,
            Some(first) => {
                check_vars(OP, &vars)?;
                match first.device() {
                    Device::Cpu => Backend::Cpu(match first.dtype() {
                        DType::F32 => CpuState::F32(cpu_tensors(&vars, &wd, &params.config)?),
                        DType::F16 => CpuState::F16(cpu_tensors(&vars, &wd, &params.config)?),
                        DType::BF16 => CpuState::Bf16(cpu_tensors(&vars, &wd, &params.config)?),
                        other => return Err(unsupported(OP, other)),
                    }),
                    #[cfg(feature = "candle-cuda")]
                    Device::Cuda(dev) => Backend::Cuda(Box::new(cuda::CudaState::new(
                        dev,
                        &vars,
                        &wd,
                        &params.config,
                        params.max_grad_norm,
                    )?)),
                    other => {
                        return Err(err(format!(
                            "device {:?} is not supported: use the CPU or (feature \
                             candle-cuda) a CUDA device",
                            other.location()
                        )))
                    }
                }
            }
        };
        Ok(AdamW {
            skip: vec![false; vars.len()],
            lr: f64::from(params.config.lr),
            config: params.config,
            weight_decay: wd,
            max_grad_norm: params.max_grad_norm,
            vars,
            backend,
        })
    }

    /// Clips the gradients' global L2 norm to `max_norm` before each step (builder form of
    /// [`AdamW::set_max_grad_norm`]).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// use fusedreg::candle::{AdamW, AdamWParams};
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::zeros((2, 2), DType::F32, &Device::Cpu)?;
    /// let opt = AdamW::new(vec![w], AdamWParams::default())?.with_max_grad_norm(1.0)?;
    /// assert_eq!(opt.max_grad_norm(), Some(1.0));
    /// # Ok(()) }
    /// ```
    pub fn with_max_grad_norm(mut self, max_norm: f32) -> candle_core::Result<Self> {
        self.set_max_grad_norm(Some(max_norm))?;
        Ok(self)
    }

    /// Sets (or with `None` turns off) global-norm clipping: `g *= min(1, max_norm / (norm +
    /// 1e-6))`, PyTorch's `clip_grad_norm_`. Errors unless `max_norm` is finite and > 0.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// use fusedreg::candle::{AdamW, AdamWParams};
    /// # fn main() -> candle_core::Result<()> {
    /// let mut opt = AdamW::new(vec![Var::zeros(2, DType::F32, &Device::Cpu)?], AdamWParams::default())?;
    /// assert!(opt.set_max_grad_norm(Some(0.0)).is_err());
    /// opt.set_max_grad_norm(None)?;
    /// # Ok(()) }
    /// ```
    pub fn set_max_grad_norm(&mut self, max_norm: Option<f32>) -> candle_core::Result<()> {
        check_max_norm(max_norm)?;
        self.max_grad_norm = max_norm;
        Ok(())
    }

    /// The clipping threshold, if any.
    ///
    /// ```
    /// use candle_nn::optim::Optimizer;
    /// let opt = fusedreg::candle::AdamW::new(vec![], Default::default()).unwrap();
    /// assert_eq!(opt.max_grad_norm(), None);
    /// ```
    pub fn max_grad_norm(&self) -> Option<f32> {
        self.max_grad_norm
    }

    /// The Vars, in registration order (the index every per-Var setting uses).
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    /// let opt = fusedreg::candle::AdamW::new(vec![v.clone()], Default::default()).unwrap();
    /// assert_eq!(opt.vars()[0].id(), v.id());
    /// ```
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The weight decay of each Var.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
    /// let opt = fusedreg::candle::AdamW::new(vec![v], Default::default()).unwrap();
    /// assert_eq!(opt.weight_decay(), &[0.01]);
    /// ```
    pub fn weight_decay(&self) -> &[f32] {
        &self.weight_decay
    }

    /// The config (its `lr` is the initial rate; see [`Optimizer::learning_rate`] for the
    /// current one).
    ///
    /// ```
    /// use candle_nn::optim::Optimizer;
    /// let opt = fusedreg::candle::AdamW::new(vec![], Default::default()).unwrap();
    /// assert_eq!(opt.config().beta2, 0.999);
    /// ```
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Skip flags, one per Var: a skipped Var is left alone by the following steps (no decay,
    /// no moment update, no step count; it adds 0 to the clipping norm) until the flag is
    /// cleared — for the parameters of a block dropped by stochastic depth (see
    /// [`DepthPlan::skip_flags`](super::DepthPlan::skip_flags)). Errors unless `skip.len()` is the
    /// number of Vars.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// # fn main() -> candle_core::Result<()> {
    /// let vars = vec![Var::zeros(2, DType::F32, &Device::Cpu)?, Var::zeros(2, DType::F32, &Device::Cpu)?];
    /// let mut opt = fusedreg::candle::AdamW::new(vars, Default::default())?;
    /// opt.set_skip(&[true, false])?;
    /// assert_eq!(opt.skip(), &[true, false]);
    /// assert!(opt.set_skip(&[true]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn set_skip(&mut self, skip: &[bool]) -> candle_core::Result<()> {
        crate::error::check_len(OP, "skip", skip.len(), self.vars.len())?;
        self.skip.copy_from_slice(skip);
        Ok(())
    }

    /// The skip flags set by [`AdamW::set_skip`].
    ///
    /// ```
    /// use candle_nn::optim::Optimizer;
    /// let opt = fusedreg::candle::AdamW::new(vec![], Default::default()).unwrap();
    /// assert!(opt.skip().is_empty());
    /// ```
    pub fn skip(&self) -> &[bool] {
        &self.skip
    }

    /// The optimizer state (moments, master weights, step counts) in fusedreg's state format
    /// (version 2, see [`crate::adamw`]); the Vars' values are not included (save them with
    /// candle, e.g. `VarMap::save`). The same bytes load on either device.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// # fn main() -> candle_core::Result<()> {
    /// let v = Var::ones(3, DType::F32, &Device::Cpu)?;
    /// let mut opt = fusedreg::candle::AdamW::new(vec![v.clone()], Default::default())?;
    /// opt.backward_step(&v.sqr()?.sum_all()?)?;
    /// let bytes = opt.save_state()?;
    /// let mut again = fusedreg::candle::AdamW::new(vec![v], Default::default())?;
    /// again.load_state(&bytes)?;
    /// assert_eq!(again.save_state()?, bytes);
    /// # Ok(()) }
    /// ```
    pub fn save_state(&self) -> candle_core::Result<Vec<u8>> {
        match &self.backend {
            Backend::Empty => Err(err("an optimizer without Vars has no state")),
            Backend::Cpu(state) => with_cpu!(state, t => reference::save_state(t).map_err(wrap)),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(state) => state.opt.save_state().map_err(wrap),
        }
    }

    /// Restores a state written by [`AdamW::save_state`] (by this optimizer or one with the same
    /// Vars' dtype and lengths and the same state layout). Training then continues bit for bit
    /// as if never interrupted (with the Vars' values restored too). Errors name the first
    /// difference (magic, version, dtype, layout, tensor count, a length); on error the state is
    /// unchanged.
    ///
    /// ```
    /// use candle_core::{DType, Device, Var};
    /// use candle_nn::optim::Optimizer;
    /// let v = Var::ones(3, DType::F32, &Device::Cpu).unwrap();
    /// let mut opt = fusedreg::candle::AdamW::new(vec![v], Default::default()).unwrap();
    /// assert!(opt.load_state(b"not a state").is_err());
    /// ```
    pub fn load_state(&mut self, bytes: &[u8]) -> candle_core::Result<()> {
        match &mut self.backend {
            Backend::Empty => Err(err("an optimizer without Vars has no state")),
            Backend::Cpu(state) => with_cpu!(state, t => {
                // Restore into a copy so that a bad state leaves this one as it was.
                let mut copy = t.clone();
                reference::restore_state(&mut copy, bytes)?;
                *t = copy;
                Ok(())
            }),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(state) => state.opt.restore_state(bytes).map_err(wrap),
        }
    }

    /// [`AdamW::save_state`] to a file.
    ///
    /// ```no_run
    /// # use candle_nn::optim::Optimizer;
    /// # let opt = fusedreg::candle::AdamW::new(vec![], Default::default()).unwrap();
    /// opt.save("adamw.state")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>) -> candle_core::Result<()> {
        std::fs::write(path, self.save_state()?)?;
        Ok(())
    }

    /// [`AdamW::load_state`] from a file.
    ///
    /// ```no_run
    /// # use candle_nn::optim::Optimizer;
    /// # let mut opt = fusedreg::candle::AdamW::new(vec![], Default::default()).unwrap();
    /// opt.load("adamw.state")?;
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn load(&mut self, path: impl AsRef<Path>) -> candle_core::Result<()> {
        let bytes = std::fs::read(path)?;
        self.load_state(&bytes)
    }
}

fn host_values<T: Elem>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn cpu_tensors<T: Elem>(
    vars: &[Var],
    wd: &[f32],
    config: &AdamWConfig,
) -> candle_core::Result<Vec<CpuTensor<T, T>>> {
    vars.iter()
        .zip(wd)
        .map(|(v, &d)| {
            let p = host_values::<T>(v)?;
            let g = vec![T::from_f32_rn(0.0); p.len()];
            CpuTensor::with_state(p, g, d, config.state).map_err(wrap)
        })
        .collect()
}

/// One step on the CPU device: fusedreg's CPU reference (norm, then AdamW) on the Vars' values,
/// written back with [`Var::set`].
fn cpu_step<T: Elem>(
    tensors: &mut [CpuTensor<T, T>],
    vars: &[Var],
    grads: &GradStore,
    user_skip: &[bool],
    config: &AdamWConfig,
    lr: f32,
    max_norm: Option<f32>,
) -> candle_core::Result<()> {
    // Gather first, so that a bad gradient is reported before anything changes.
    let mut skip = user_skip.to_vec();
    let mut fresh: Vec<Option<(Vec<T>, Vec<T>)>> = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        let g = if skip[i] { None } else { grads.get(v) };
        match g {
            None => {
                skip[i] = true;
                fresh.push(None);
            }
            Some(g) => {
                let g = check_grad(OP, i, v, g)?;
                fresh.push(Some((host_values::<T>(v)?, host_values::<T>(&g)?)));
            }
        }
    }
    for (t, f) in tensors.iter_mut().zip(fresh) {
        if let Some((p, g)) = f {
            // An f32 Var is its own truth: its current value is what the step updates (as on
            // the GPU, which reads the Var's memory). 16-bit Vars with master weights are
            // updated from the master.
            t.param = p;
            t.grad = g;
        }
    }
    let inputs = match max_norm {
        None => StepInputs::new(lr),
        Some(_) => {
            // The kernels' chunk partials and reduction order; skipped Vars add 0.
            let lens: Vec<u64> = tensors.iter().map(|t| t.len() as u64).collect();
            let layout = Layout::new(&lens)?;
            let partials = norm_cpu::partials_with(&layout, |c| {
                let r = layout.chunk(c);
                if skip[r.tensor] {
                    0.0
                } else {
                    let s = r.start as usize;
                    norm_cpu::chunk_partial(&tensors[r.tensor].grad[s..s + r.len])
                }
            });
            let values = norm_cpu::finalize(norm_cpu::reduce(&partials), max_norm, 1.0);
            StepInputs::from_norm(lr, &values)
        }
    };
    reference::step(tensors, config, &inputs, &skip)?;
    if inputs.nonfinite {
        return Ok(());
    }
    for ((t, v), &s) in tensors.iter().zip(vars).zip(&skip) {
        if !s && !t.is_empty() {
            v.set(&Tensor::from_vec(t.param.clone(), v.dims(), v.device())?)?;
        }
    }
    Ok(())
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    //! The CUDA path: the Vars registered by address ([`VarSet`]), updated in place.

    use candle_core::backprop::GradStore;
    use candle_core::{CudaDevice, Var};

    use super::AdamWConfig;
    use crate::adamw::AdamW as Engine;
    use crate::candle::vars::VarSet;
    use crate::global_norm::GlobalNorm;

    pub(super) struct CudaState {
        vars: VarSet,
        pub(super) opt: Engine,
        norm: Option<GlobalNorm>,
        /// The skip flags last uploaded (uploaded again only when they change).
        uploaded_skip: Vec<bool>,
        lr: f32,
    }

    impl CudaState {
        pub(super) fn new(
            dev: &CudaDevice,
            vars: &[Var],
            wd: &[f32],
            config: &AdamWConfig,
            max_norm: Option<f32>,
        ) -> candle_core::Result<Self> {
            let set = VarSet::new(super::OP, dev, vars)?;
            let opt = Engine::new(set.set(), *config, wd)?;
            let norm = match max_norm {
                Some(m) => Some(GlobalNorm::new(set.set(), Some(m))?),
                None => None,
            };
            Ok(CudaState {
                uploaded_skip: vec![false; vars.len()],
                vars: set,
                opt,
                norm,
                lr: config.lr,
            })
        }

        pub(super) fn step(
            &mut self,
            vars: &[Var],
            grads: &GradStore,
            user_skip: &[bool],
            lr: f32,
            max_norm: Option<f32>,
        ) -> candle_core::Result<()> {
            let CudaState {
                vars: set,
                opt,
                norm,
                uploaded_skip,
                lr: set_lr,
            } = self;
            set.with_grads(vars, grads, user_skip, |set, skip| {
                if skip != uploaded_skip.as_slice() {
                    opt.set_skip(skip)?;
                    *uploaded_skip = skip.to_vec();
                }
                if lr != *set_lr {
                    opt.set_lr(lr)?;
                    *set_lr = lr;
                }
                match max_norm {
                    Some(m) => {
                        let norm = match norm {
                            Some(n) => {
                                if n.max_norm() != Some(m) {
                                    n.set_max_norm(Some(m))?;
                                }
                                n
                            }
                            slot => slot.insert(GlobalNorm::new(set, Some(m))?),
                        };
                        opt.clip_and_step(set, norm)?;
                    }
                    None => opt.step(set, None)?,
                }
                Ok(())
            })
        }
    }
}
