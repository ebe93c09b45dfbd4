//! The trainer's configuration, the interface every backend implements, and what the backends
//! share: the dropout sites' keying (`Sites`), where a block's branch reads and writes (`Branch`)
//! and the argument checks. The models (`cpu_model`, `gpu_model`) and the training loop (`train`)
//! build on this module; it depends on neither, so the module graph has no circle.

use fusedreg::adamw::AdamWConfig;
use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
use fusedreg::{dropout, dropout_add_norm};
use fusedreg::{Error, Result};

use super::prenorm::PreNorm;

/// What happens to the parameters of a block dropped this step (they got no gradient).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{DroppedParams, MlpConfig, Trainer};
/// use fusedreg::stochastic_depth::Schedule;
/// let depth = Some(Schedule::Custom(vec![0.0, 0.9])); // block 1 is usually dropped
/// let cfg = MlpConfig { blocks: 2, depth, dropped: DroppedParams::Skip, ..MlpConfig::cpu() };
/// let mut t = Trainer::cpu(cfg).unwrap();
/// while t.next_plan().runs(1) {
///     t.step(false).unwrap();
/// }
/// let w1 = t.model.param(4).to_vec(); // block 1's W1
/// t.step(false).unwrap(); // block 1 dropped: skipped by the optimizer
/// assert_eq!(t.model.param(4), &w1[..]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DroppedParams {
    /// Skip them in the optimizer: parameters, moments and step counts stay as they were, and
    /// they are left out of the gradient norm (no momentum drift; tensorflow/addons #2032).
    Skip,
    /// Step them with a zero gradient: the moments decay and momentum keeps moving them.
    ZeroGrad,
}

/// The model and its training hyperparameters.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{MlpConfig, Trainer};
/// let cfg = MlpConfig { blocks: 3, hidden: 32, tokens: 64, depth: None, ..MlpConfig::cpu() };
/// assert!(Trainer::cpu(cfg.clone()).is_ok());
/// assert!(Trainer::cpu(MlpConfig { hidden: 0, ..cfg.clone() }).is_err());
/// assert!(Trainer::cpu(MlpConfig { dropout: 1.5, ..cfg }).is_err());
/// ```
#[derive(Clone, Debug)]
pub struct MlpConfig {
    /// Residual blocks of the student.
    pub blocks: usize,
    /// Hidden size (inputs, outputs and the inner layer).
    pub hidden: usize,
    /// Tokens (rows) per step.
    pub tokens: usize,
    /// Residual blocks of the fixed random teacher whose outputs are the targets.
    pub teacher_blocks: usize,
    /// Distinct batches of synthetic inputs, cycled through.
    pub batches: usize,
    /// Dropout probability inside every block's residual add.
    pub dropout: f64,
    /// Stochastic depth (batch mode: dropped blocks launch nothing), or none.
    pub depth: Option<Schedule>,
    /// What the optimizer does with dropped blocks' parameters.
    pub dropped: DroppedParams,
    /// AdamW hyperparameters.
    pub adamw: AdamWConfig,
    /// Decoupled weight decay of the weight matrices (the biases get none).
    pub weight_decay: f32,
    /// Global-norm clipping threshold.
    pub max_norm: f32,
    /// Seed of the data, the initialization, dropout and the stochastic-depth plans.
    pub seed: u64,
    /// The pre-norm variant (every block's entry a fused dropout + add + norm), or none: the
    /// residual model without norms.
    pub prenorm: Option<PreNorm>,
}

impl MlpConfig {
    /// The GPU-sized run of the example: 24 blocks, hidden 1024, 4096 tokens per step,
    /// stochastic depth with a linear schedule to 0.5.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::stochastic_depth::Schedule;
    /// use fusedreg_tools::mlp::MlpConfig;
    /// let cfg = MlpConfig::gpu();
    /// assert_eq!((cfg.blocks, cfg.hidden, cfg.tokens), (24, 1024, 4096));
    /// assert_eq!(cfg.depth, Some(Schedule::linear(0.5)));
    /// ```
    pub fn gpu() -> Self {
        MlpConfig {
            blocks: 24,
            hidden: 1024,
            tokens: 4096,
            teacher_blocks: 2,
            batches: 8,
            dropout: 0.1,
            depth: Some(Schedule::linear(0.5)),
            dropped: DroppedParams::Skip,
            adamw: AdamWConfig {
                lr: 1e-3,
                ..AdamWConfig::default()
            },
            weight_decay: 0.01,
            max_norm: 1.0,
            seed: 2024,
            prenorm: None,
        }
    }

    /// A size the CPU reference trains in seconds: 6 blocks, hidden 48, 96 tokens.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::MlpConfig;
    /// let cfg = MlpConfig::cpu();
    /// assert_eq!((cfg.blocks, cfg.hidden, cfg.tokens), (6, 48, 96));
    /// assert_eq!(cfg.depth, MlpConfig::gpu().depth); // the same schedule, smaller model
    /// ```
    pub fn cpu() -> Self {
        MlpConfig {
            blocks: 6,
            hidden: 48,
            tokens: 96,
            batches: 4,
            adamw: AdamWConfig {
                lr: 3e-3,
                ..AdamWConfig::default()
            },
            ..Self::gpu()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let op = "mlp";
        if self.blocks == 0 || self.hidden == 0 || self.tokens == 0 || self.batches == 0 {
            return Err(Error::invalid(
                op,
                "blocks, hidden, tokens and batches must be > 0",
            ));
        }
        if self.blocks > 1 << 20 {
            // Stochastic depth's limit (plans are drawn per block), checked before allocating.
            return Err(Error::invalid(op, "at most 2^20 blocks"));
        }
        if self.hidden > i32::MAX as usize / self.tokens.max(self.hidden) {
            return Err(Error::invalid(
                op,
                "hidden x tokens exceeds cuBLAS's 32-bit sizes",
            ));
        }
        fusedreg::dropping::DropRate::new(self.dropout)?;
        fusedreg::global_norm::check_max_norm(Some(self.max_norm))?;
        if let Some(p) = &self.prenorm {
            // The entry's own checks (eps finite and > 0), on a one-row shape.
            let one_row = Sites {
                tokens: 1,
                ..Sites::of(self)
            };
            one_row.entry(p, 0, false, 0)?;
        }
        self.adamw.validate()
    }

    /// The stochastic-depth schedule in effect (batch mode), if any.
    pub(crate) fn depth(&self) -> Result<Option<StochasticDepth>> {
        self.depth
            .clone()
            .map(|s| StochasticDepth::new(s, self.blocks, self.seed ^ 0x5eed, Mode::Batch))
            .transpose()
    }

    /// Optimizer tensors per block of the residual model: W1, b1, W2, b2.
    pub(crate) const TENSORS_PER_BLOCK: usize = 4;

    /// Optimizer tensors per block of this model (the pre-norm variant adds gamma and beta).
    pub(crate) fn tensors_per_block(&self) -> usize {
        match self.prenorm {
            Some(_) => PreNorm::TENSORS,
            None => Self::TENSORS_PER_BLOCK,
        }
    }

    /// The block owning each optimizer tensor.
    pub(crate) fn owners(&self) -> Vec<Option<usize>> {
        let per = self.tensors_per_block();
        (0..self.blocks * per).map(|i| Some(i / per)).collect()
    }
}

/// What every dropout site of the model shares, on either backend: the activations' shape
/// `[tokens, hidden]`, the dropout probability and the seed its masks are keyed by (each site
/// adds its own call id).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sites {
    pub(crate) tokens: usize,
    pub(crate) hidden: usize,
    pub(crate) p: f64,
    pub(crate) seed: u64,
}

impl Sites {
    pub(crate) fn of(cfg: &MlpConfig) -> Self {
        Sites {
            tokens: cfg.tokens,
            hidden: cfg.hidden,
            p: cfg.dropout,
            seed: cfg.seed,
        }
    }

    /// The dropout of a residual add (a block's, or the pre-norm exit's) keyed by `call`.
    pub(crate) fn dropout(&self, call: u64) -> Result<dropout::Config> {
        dropout::Config::new(self.tokens, self.hidden, self.p, self.seed, call)
    }

    /// The pre-norm entry of block `l`: with `adds` it adds a previous block's output under the
    /// sites' dropout keyed by `call`; without, it only normalises (no dropout on the input).
    pub(crate) fn entry(
        &self,
        pre: &PreNorm,
        l: usize,
        adds: bool,
        call: u64,
    ) -> Result<dropout_add_norm::Config> {
        let mut cfg = dropout_add_norm::Config::new(self.tokens, self.hidden, pre.norm, pre.eps)?;
        if adds {
            cfg = cfg.with_dropout(self.p, self.seed, call)?;
        }
        if pre.layer_norm_scaling {
            cfg = cfg.with_layer_norm_scaling(l + 1)?;
        }
        Ok(cfg)
    }
}

/// Where a block's branch `o = W2 gelu(W1 x + b1)` reads its input `x` and writes `o` and the
/// input's gradient: the one difference between a block of the residual model and one of the
/// pre-norm model, whose branches both backends compute once.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Branch {
    /// The residual model's block `x -> x + dropout(o + b2)`: its input is slot `input` (the
    /// batch for 0), `o` goes to a scratch buffer for the add, and the branch's input gradient
    /// is added to the stream's `g`.
    Residual { input: usize },
    /// The pre-norm model's block: its input is the entry's normalised `n_l`, `o` is kept as the
    /// block's output `o_l` (the next entry adds it), and the branch's input gradient goes to
    /// `dn` for the entry's backward.
    PreNorm,
}

/// The operations one training step is made of; the CPU reference and the GPU implement them.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
/// // Inference through every block, on either backend.
/// fn eval<B: Backend>(model: &mut B, blocks: usize, batch: usize) -> fusedreg::Result<f64> {
///     model.begin(batch)?;
///     for l in 0..blocks {
///         model.forward_block(l, l, 0, false)?; // slot l -> slot l + 1
///     }
///     model.loss(blocks, batch, true)
/// }
/// let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() }).unwrap();
/// assert!(eval(&mut t.model, 2, 0).unwrap() > 0.0);
/// ```
pub trait Backend {
    /// Loads batch `batch` as the input of block 0.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.model.begin(3)?; // batches 0..cfg.batches (4 here)
    /// assert!(t.model.begin(4).is_err());
    /// # Ok(()) }
    /// ```
    fn begin(&mut self, batch: usize) -> Result<()>;
    /// Runs block `l` from activation slot `input` into slot `l + 1`. With `scale` the block's
    /// stochastic-depth residual scale `1 / (1 - p_l)` is applied as the fused op's row scale;
    /// `call` keys its dropout mask.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.model.begin(0)?;
    /// t.model.forward_block(0, 0, 100, false)?; // slot 0 -> slot 1
    /// t.model.forward_block(1, 0, 101, false)?; // block 0 skipped: block 1 reads slot 0
    /// assert!(t.model.forward_block(1, 2, 101, false).is_err()); // slot 2 is not earlier
    /// assert!(t.model.forward_block(0, 0, 100, true).is_err()); // no stochastic depth: no scale
    /// # Ok(()) }
    /// ```
    fn forward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()>;
    /// MSE of activation slot `output` against the batch's targets; writes the gradient into
    /// the running gradient. Returns the loss when `want_loss` (the GPU then syncs); otherwise
    /// the GPU returns NaN (the CPU reference returns the loss either way).
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.model.begin(1)?;
    /// let identity = t.model.loss(0, 1, true)?; // every block dropped: the output is the input
    /// t.model.forward_block(0, 0, 0, false)?;
    /// t.model.forward_block(1, 1, 1, false)?;
    /// let loss = t.model.loss(2, 1, true)?;
    /// assert!(loss > 0.0 && identity > 0.0);
    /// # Ok(()) }
    /// ```
    fn loss(&mut self, output: usize, batch: usize, want_loss: bool) -> Result<f64>;
    /// The model's exit before the loss: the pre-norm variant adds the output of the last block
    /// that ran (slot `output`) to the stream, under dropout keyed by `call` (see
    /// [`PreNorm`]); the residual model has no exit (its blocks add their own outputs), which
    /// is this default.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, PreNorm, Trainer};
    /// # use fusedreg::dropout_add_norm::Norm;
    /// # fn main() -> fusedreg::Result<()> {
    /// let prenorm = Some(PreNorm::new(Norm::LayerNorm, true));
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, prenorm, ..MlpConfig::cpu() })?;
    /// t.model.begin(0)?;
    /// t.model.forward_block(0, 0, 10, false)?;
    /// assert!(t.model.loss(1, 0, true).is_err()); // the pre-norm loss reads the exit
    /// t.model.exit_forward(1, 11, false)?;
    /// assert!(t.model.loss(1, 0, true)? > 0.0);
    /// # Ok(()) }
    /// ```
    fn exit_forward(&mut self, output: usize, call: u64, scale: bool) -> Result<()> {
        let _ = (output, call, scale);
        Ok(())
    }
    /// Backward of [`Backend::exit_forward`], after [`Backend::loss`]: the gradient of the last
    /// block's output and its `db2`; the stream's gradient passes through. The default (no
    /// exit) does nothing.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, PreNorm, Trainer};
    /// # use fusedreg::dropout_add_norm::Norm;
    /// # fn main() -> fusedreg::Result<()> {
    /// let prenorm = Some(PreNorm::new(Norm::RmsNorm, false));
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 1, depth: None, prenorm, ..MlpConfig::cpu() })?;
    /// t.model.begin(0)?;
    /// t.model.forward_block(0, 0, 10, false)?;
    /// t.model.exit_forward(1, 11, false)?;
    /// t.model.loss(1, 0, false)?;
    /// t.model.exit_backward(1, 11, false)?; // block 0's db2
    /// assert!(t.model.tensors()[3].grad.iter().any(|&g| g != 0.0));
    /// # Ok(()) }
    /// ```
    fn exit_backward(&mut self, output: usize, call: u64, scale: bool) -> Result<()> {
        let _ = (output, call, scale);
        Ok(())
    }
    /// Backward of block `l` (whose input was slot `input`): its parameter gradients, and the
    /// running gradient updated in place.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.model.begin(0)?;
    /// t.model.forward_block(0, 0, 7, false)?;
    /// t.model.loss(1, 0, false)?; // block 1 dropped: block 0's output is the model's
    /// t.model.backward_block(0, 0, 7, false)?; // same call id as its forward
    /// assert!(t.model.tensors()[0].grad.iter().any(|&g| g != 0.0)); // block 0's dW1
    /// # Ok(()) }
    /// ```
    fn backward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()>;
    /// Zeroes the gradients of block `l`'s parameters ([`DroppedParams::ZeroGrad`]).
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.step(false)?; // leaves every block's gradients set
    /// t.model.zero_grads(1)?;
    /// let grads = &t.model.tensors()[4..8]; // W1, b1, W2, b2 of block 1
    /// assert!(grads.iter().all(|x| x.grad.iter().all(|&g| g == 0.0)));
    /// assert!(t.model.zero_grads(2).is_err()); // only 2 blocks
    /// # Ok(()) }
    /// ```
    fn zero_grads(&mut self, l: usize) -> Result<()>;
    /// Clip + AdamW over every parameter; `skip` has one flag per optimizer tensor.
    ///
    /// # Examples
    ///
    /// ```
    /// # use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};
    /// # fn main() -> fusedreg::Result<()> {
    /// # let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() })?;
    /// t.step(false)?; // gradients for every tensor
    /// let w1 = t.model.param(0).to_vec();
    /// t.model.optimizer_step(&[true; 8])?; // skip all 8 tensors: nothing moves
    /// assert_eq!(t.model.param(0), &w1[..]);
    /// t.model.optimizer_step(&[false; 8])?;
    /// assert_ne!(t.model.param(0), &w1[..]);
    /// # Ok(()) }
    /// ```
    fn optimizer_step(&mut self, skip: &[bool]) -> Result<()>;
}

/// Checks a block index, its input slot and the row-scale request against a model of `blocks`
/// blocks (`has_scales`: the model was built with stochastic depth).
pub(crate) fn check_block(
    l: usize,
    input: usize,
    blocks: usize,
    scale: bool,
    has_scales: bool,
) -> Result<()> {
    if l >= blocks || input > l {
        return Err(Error::invalid(
            "mlp",
            format!("block {l} with input slot {input}: the model has {blocks} blocks and a block reads an earlier slot"),
        ));
    }
    if scale && !has_scales {
        return Err(Error::invalid(
            "mlp",
            "a stochastic-depth scale was asked of a model built without stochastic depth",
        ));
    }
    Ok(())
}

/// Checks an activation slot and a batch index.
pub(crate) fn check_slot(slot: usize, slots: usize, batch: usize, batches: usize) -> Result<()> {
    if slot >= slots || batch >= batches {
        return Err(Error::invalid(
            "mlp",
            format!("slot {slot} of {slots} / batch {batch} of {batches} out of range"),
        ));
    }
    Ok(())
}
