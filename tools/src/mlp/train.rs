//! Training the residual MLP: the configuration, the step every backend shares, and the plan
//! logic that keeps dropped blocks from launching anything.
//!
//! One step on batch `b` under a stochastic-depth plan:
//!
//! 1. forward: for each block that runs, `x_out = x_in + s_l * dropout(W2 gelu(W1 x_in + b1) + b2)`
//!    (4 ops; `s_l = 1 / (1 - p_l)` is folded into the fused residual add as its row scale);
//!    a dropped block does nothing at all — its output *is* its input;
//! 2. the MSE loss against the teacher's output and its gradient (the pre-norm variant first
//!    adds the last block's output to the stream, its exit: see [`PreNorm`](super::PreNorm));
//! 3. backward through the blocks that ran, in reverse (the residual path passes the gradient
//!    through unchanged: `dresidual = dy`, no copy);
//! 4. global-norm clipping + AdamW in one multi-tensor pass, with the parameters of dropped blocks
//!    skipped ([`DroppedParams::Skip`]) or stepped with a zero gradient
//!    ([`DroppedParams::ZeroGrad`]).

use super::config::{Backend, DroppedParams, MlpConfig};
use super::cpu_model::CpuMlp;
use super::gpu_model::GpuMlp;
use fusedreg::stochastic_depth::{Mode, Plan, Schedule, StochasticDepth};
use fusedreg::{Error, Handle, Result};

/// The plan in which every block runs (the plan of every step without stochastic depth).
fn every_block(blocks: usize) -> Result<Plan> {
    Ok(StochasticDepth::new(Schedule::Constant(0.0), blocks, 0, Mode::Batch)?.eval_plan())
}

/// The dropout call id of block `l` at `step` (distinct for every pair).
pub(crate) fn dropout_call(step: u64, l: usize) -> u64 {
    (step << 16) | l as u64
}

/// One training step of `model` on `batch` under `plan`. Returns the loss if `want_loss`.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{train_step, MlpConfig, Trainer};
/// use fusedreg::stochastic_depth::{Mode, StochasticDepth};
/// let cfg = MlpConfig::cpu();
/// let mut t = Trainer::cpu(cfg.clone()).unwrap();
/// let sd = StochasticDepth::new(cfg.depth.clone().unwrap(), cfg.blocks, 99, Mode::Batch).unwrap();
/// let plan = sd.plan(0); // any plan: blocks it drops are neither run nor stepped
/// let loss = train_step(&mut t.model, &cfg, &plan, 0, true).unwrap();
/// assert!(loss.is_finite() && loss > 0.0);
/// ```
pub fn train_step<B: Backend>(
    model: &mut B,
    cfg: &MlpConfig,
    plan: &Plan,
    step: u64,
    want_loss: bool,
) -> Result<f64> {
    let loss = forward_backward(model, cfg, plan, step, want_loss)?;
    let skip = match cfg.dropped {
        DroppedParams::Skip => plan.skip_flags(&cfg.owners()),
        DroppedParams::ZeroGrad => vec![false; cfg.blocks * cfg.tensors_per_block()],
    };
    model.optimizer_step(&skip)?;
    Ok(loss)
}

/// [`train_step`] without the optimizer step: the forward, the loss and every gradient (the
/// gradients of dropped blocks are left alone, or zeroed under [`DroppedParams::ZeroGrad`]).
/// Returns the loss if `want_loss`. For gradient checks.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{forward_backward, MlpConfig, Trainer};
/// let cfg = MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() };
/// let mut t = Trainer::cpu(cfg.clone()).unwrap();
/// let plan = t.next_plan();
/// let w1 = t.model.param(0).to_vec();
/// let loss = forward_backward(&mut t.model, &cfg, &plan, 0, true).unwrap();
/// assert!(loss > 0.0);
/// assert_eq!(t.model.param(0), &w1[..]); // no step taken
/// assert!(t.model.tensors()[0].grad.iter().any(|&g| g != 0.0)); // but a gradient
/// ```
pub fn forward_backward<B: Backend>(
    model: &mut B,
    cfg: &MlpConfig,
    plan: &Plan,
    step: u64,
    want_loss: bool,
) -> Result<f64> {
    if plan.blocks().len() != cfg.blocks || cfg.batches == 0 {
        // A plan for another depth would silently run a different network.
        return Err(Error::shape(
            "mlp",
            format!(
                "a plan of {} blocks for a model of {} blocks ({} batches)",
                plan.blocks().len(),
                cfg.blocks,
                cfg.batches
            ),
        ));
    }
    let batch = (step % cfg.batches as u64) as usize;
    let scaled = cfg.depth.is_some();
    model.begin(batch)?;
    // Activation slot of each block's input: a dropped block's output is its input.
    let mut input = vec![0usize; cfg.blocks + 1];
    for l in 0..cfg.blocks {
        if plan.runs(l) {
            model.forward_block(l, input[l], dropout_call(step, l), scaled)?;
            input[l + 1] = l + 1;
        } else {
            input[l + 1] = input[l];
        }
    }
    let (output, exit_call) = (input[cfg.blocks], dropout_call(step, cfg.blocks));
    model.exit_forward(output, exit_call, scaled)?;
    let loss = model.loss(output, batch, want_loss)?;
    model.exit_backward(output, exit_call, scaled)?;
    for l in (0..cfg.blocks).rev() {
        if plan.runs(l) {
            model.backward_block(l, input[l], dropout_call(step, l), scaled)?;
        } else if cfg.dropped == DroppedParams::ZeroGrad {
            model.zero_grads(l)?;
        }
    }
    Ok(loss)
}

/// A model, its training configuration and its stochastic-depth schedule.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{MlpConfig, Trainer};
/// let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() }).unwrap();
/// let first = t.step(true).unwrap(); // batch 0
/// for _ in 1..40 {
///     t.step(false).unwrap();
/// }
/// let later = t.step(true).unwrap(); // step 40: batch 0 again
/// assert!(later < first);
/// ```
pub struct Trainer<B: Backend> {
    /// The backend's model state.
    pub model: B,
    /// The configuration it was built with.
    pub config: MlpConfig,
    depth: Option<StochasticDepth>,
    every_block: Plan,
    step: u64,
}

impl<B: Backend> Trainer<B> {
    /// The plan of the next step.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut t = Trainer::cpu(MlpConfig::cpu()).unwrap(); // linear schedule to 0.5
    /// let plan = t.next_plan();
    /// assert_eq!(plan.step(), 0);
    /// println!("step 0 runs {} of 6 blocks", plan.running());
    /// t.step(false).unwrap();
    /// assert_eq!(t.next_plan().step(), 1);
    /// ```
    pub fn next_plan(&self) -> Plan {
        match &self.depth {
            Some(sd) => sd.plan(self.step),
            None => self.every_block.clone(),
        }
    }

    /// Runs one step; returns the loss when `want_loss`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() }).unwrap();
    /// let loss = t.step(true).unwrap();
    /// assert!(loss.is_finite() && loss > 0.0);
    /// assert_eq!(t.steps(), 1);
    /// ```
    pub fn step(&mut self, want_loss: bool) -> Result<f64> {
        let plan = self.next_plan();
        let loss = train_step(&mut self.model, &self.config, &plan, self.step, want_loss)?;
        self.step += 1;
        Ok(loss)
    }

    /// Runs `steps` steps (at least one), each reading its loss, and returns the first step's
    /// loss and the last's: whether training learns.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() }).unwrap();
    /// let (first, last) = t.first_and_last_loss(41).unwrap(); // steps 0 and 40: both batch 0
    /// assert!(last < first);
    /// assert_eq!(t.steps(), 41);
    /// assert!(t.first_and_last_loss(0).is_err());
    /// ```
    pub fn first_and_last_loss(&mut self, steps: usize) -> Result<(f64, f64)> {
        if steps == 0 {
            return Err(Error::invalid("mlp", "the losses of no steps"));
        }
        let first = self.step(true)?;
        let mut last = first;
        for _ in 1..steps {
            last = self.step(true)?;
        }
        Ok((first, last))
    }

    /// Steps taken.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() }).unwrap();
    /// assert_eq!(t.steps(), 0);
    /// t.step(false).unwrap();
    /// t.step(false).unwrap();
    /// assert_eq!(t.steps(), 2);
    /// ```
    pub fn steps(&self) -> u64 {
        self.step
    }
}

impl Trainer<CpuMlp> {
    /// A trainer on the CPU reference implementations.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut cfg = MlpConfig::cpu();
    /// cfg.blocks = 2;
    /// let mut t = Trainer::cpu(cfg).unwrap();
    /// let first = t.step(true).unwrap();
    /// assert!(first.is_finite());
    /// ```
    pub fn cpu(config: MlpConfig) -> Result<Self> {
        config.validate()?;
        Ok(Trainer {
            model: CpuMlp::new(&config)?,
            depth: config.depth()?,
            every_block: every_block(config.blocks)?,
            config,
            step: 0,
        })
    }
}

impl Trainer<GpuMlp> {
    /// A trainer on the GPU (fusedreg's kernels and cuBLAS).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// // `MlpConfig::gpu()` is the example's full size; this one is small.
    /// let mut t = Trainer::gpu(&h, MlpConfig { blocks: 4, ..MlpConfig::cpu() })?;
    /// let loss = t.step(true)?; // reads the loss back: a sync
    /// assert!(loss.is_finite());
    /// assert!(t.step(false)?.is_nan()); // no sync, no loss
    /// # Ok(()) }
    /// ```
    pub fn gpu(handle: &Handle, config: MlpConfig) -> Result<Self> {
        config.validate()?;
        Ok(Trainer {
            model: GpuMlp::new(handle, &config)?,
            depth: config.depth()?,
            every_block: every_block(config.blocks)?,
            config,
            step: 0,
        })
    }
}
