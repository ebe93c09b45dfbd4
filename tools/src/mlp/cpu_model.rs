//! The residual MLP on the CPU: the reference implementations of every op (fusedreg's
//! `cpu` modules) and plain-loop matrix products. Small sizes only.

use super::config::{check_block, check_slot, Backend, Branch, MlpConfig, Sites};
use super::cpu;
use super::init::{host_init, student_tensors, BlockParams};
use super::prenorm::{self, branch_io, not_prenorm, t as tp};
use super::steps::{backend_steps, Steps};
use fusedreg::adamw::cpu::CpuTensor;
use fusedreg::adamw::{self, AdamWConfig};
use fusedreg::dropout::{self as dr, Config};
use fusedreg::dropout_add_norm as dan;
use fusedreg::global_norm::cpu as norm_cpu;
use fusedreg::Result;

/// The CPU model's pre-norm activations (host buffers, nothing else).
type PreState = prenorm::State<Vec<f32>>;

/// The CPU model state.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{CpuMlp, MlpConfig, Trainer};
/// let mut t = Trainer::cpu(MlpConfig { blocks: 2, ..MlpConfig::cpu() }).unwrap();
/// t.step(false).unwrap();
/// let model: &CpuMlp = &t.model;
/// assert_eq!(model.tensors().len(), 2 * 4); // W1, b1, W2, b2 per block
/// ```
pub struct CpuMlp {
    sites: Sites,
    adamw: AdamWConfig,
    max_norm: f32,
    /// W1, b1, W2, b2 of each block, with their gradients and AdamW state.
    tensors: Vec<CpuTensor<f32, f32>>,
    inputs: Vec<Vec<f32>>,
    targets: Vec<Vec<f32>>,
    /// Activation slots: the input of block 0, then each block's output.
    acts: Vec<Vec<f32>>,
    /// Per block: `W1 x` (pre-activation without bias) and `gelu(W1 x + b1)`.
    h: Vec<Vec<f32>>,
    a: Vec<Vec<f32>>,
    /// Per block: its stochastic-depth residual scale as a row scale (empty without).
    rowscale: Vec<Vec<f32>>,
    o: Vec<f32>,
    g: Vec<f32>,
    d_o: Vec<f32>,
    d_a: Vec<f32>,
    du: Vec<f32>,
    /// Optimizer tensors per block (4, or 6 for the pre-norm variant).
    per_block: usize,
    /// The pre-norm variant's state, or none (the residual model).
    pre: Option<PreState>,
}

/// Index of tensor `k` (0 W1, 1 b1, 2 W2, 3 b2) of block `l`.
fn t(l: usize, k: usize) -> usize {
    MlpConfig::TENSORS_PER_BLOCK * l + k
}

/// `x_out = x_in + (W2 gelu(W1 x_in + b1) + b2)` for a teacher block (no dropout).
fn teacher_block(p: &BlockParams, x: &[f32], hidden: usize) -> Result<Vec<f32>> {
    let n = x.len();
    let (mut hbuf, mut a, mut o, mut y) = (vec![0.0; n], vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    cpu::linear_fwd(x, &p[0], &mut hbuf, hidden, hidden)?;
    cpu::bias_gelu_fwd(&hbuf, &p[1], &mut a)?;
    cpu::linear_fwd(&a, &p[2], &mut o, hidden, hidden)?;
    let cfg = Config::new(n / hidden, hidden, 0.0, 0, 0)?;
    let opts = dr::cpu::ForwardOptions {
        bias: Some(&p[3]),
        residual: Some(x),
        ..Default::default()
    };
    dr::cpu::forward(&cfg, &o, &mut y, opts)?;
    Ok(y)
}

impl CpuMlp {
    pub(crate) fn new(cfg: &MlpConfig) -> Result<Self> {
        let init = host_init(cfg);
        let (n, hd) = (cfg.tokens * cfg.hidden, cfg.hidden);
        let mut targets = Vec::new();
        for x in &init.inputs {
            let mut y = x.clone();
            for p in &init.teacher {
                y = teacher_block(p, &y, hd)?;
            }
            targets.push(y);
        }
        let mut tensors = Vec::new();
        for (v, wd) in student_tensors(cfg, init.student) {
            let len = v.len();
            tensors.push(CpuTensor::new(v, vec![0.0; len], wd)?);
        }
        // The pre-norm variant keeps its streams in its own state; only slot 0 (the input) here.
        let slots = if cfg.prenorm.is_some() {
            1
        } else {
            cfg.blocks + 1
        };
        let rowscale = match cfg.depth()? {
            Some(sd) => sd
                .rates()
                .iter()
                .map(|r| vec![r.scale(); cfg.tokens])
                .collect(),
            None => vec![Vec::new(); cfg.blocks],
        };
        Ok(CpuMlp {
            sites: Sites::of(cfg),
            adamw: cfg.adamw,
            max_norm: cfg.max_norm,
            tensors,
            inputs: init.inputs,
            targets,
            acts: vec![vec![0.0; n]; slots],
            h: vec![vec![0.0; n]; cfg.blocks],
            a: vec![vec![0.0; n]; cfg.blocks],
            rowscale,
            o: vec![0.0; n],
            g: vec![0.0; n],
            d_o: vec![0.0; n],
            d_a: vec![0.0; n],
            du: vec![0.0; n],
            per_block: cfg.tensors_per_block(),
            pre: cfg
                .prenorm
                .map(|p| {
                    let zeros = |len| Ok(vec![0.0; len]);
                    prenorm::State::new(p, (cfg.blocks, cfg.tokens, hd), zeros, ())
                })
                .transpose()?,
        })
    }

    /// The parameters of optimizer tensor `i` (W1, b1, W2, b2 of each block in turn).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let cfg = MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() }; // every block runs
    /// let mut t = Trainer::cpu(cfg).unwrap();
    /// assert_eq!((t.model.param(0).len(), t.model.param(1).len()), (48 * 48, 48)); // W1, b1
    /// let b2 = t.model.param(3).to_vec();
    /// t.step(false).unwrap();
    /// assert_ne!(t.model.param(3), &b2[..]); // trained
    /// ```
    pub fn param(&self, i: usize) -> &[f32] {
        &self.tensors[i].param
    }

    /// Every optimizer tensor with its gradient and AdamW state.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let cfg = MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() };
    /// let mut t = Trainer::cpu(cfg.clone()).unwrap();
    /// t.step(false).unwrap();
    /// let w1 = &t.model.tensors()[0];
    /// assert_eq!((w1.weight_decay, t.model.tensors()[1].weight_decay), (cfg.weight_decay, 0.0));
    /// assert_eq!(w1.step, 1);
    /// ```
    pub fn tensors(&self) -> &[CpuTensor<f32, f32>] {
        &self.tensors
    }

    /// Batch `batch`'s inputs and targets (None past the last batch), for references that
    /// recompute the model.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let cfg = MlpConfig { blocks: 2, ..MlpConfig::cpu() };
    /// let t = Trainer::cpu(cfg.clone()).unwrap();
    /// let (x, y) = t.model.data(0).unwrap();
    /// assert_eq!((x.len(), y.len()), (cfg.tokens * cfg.hidden, cfg.tokens * cfg.hidden));
    /// assert!(t.model.data(cfg.batches).is_none());
    /// ```
    pub fn data(&self, batch: usize) -> Option<(&[f32], &[f32])> {
        Some((self.inputs.get(batch)?, self.targets.get(batch)?))
    }

    /// The parameters of optimizer tensor `i`, to change (gradient checks perturb them).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let mut t = Trainer::cpu(MlpConfig { blocks: 2, depth: None, ..MlpConfig::cpu() }).unwrap();
    /// let before = t.step(true).unwrap();
    /// t.model.param_mut(3)[0] += 1.0; // block 0's b2
    /// assert_eq!(t.model.param(3)[0], t.model.tensors()[3].param[0]);
    /// assert_ne!(t.step(true).unwrap(), before);
    /// ```
    pub fn param_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.tensors[i].param
    }
}

impl Backend for CpuMlp {
    fn begin(&mut self, batch: usize) -> Result<()> {
        check_slot(0, 1, batch, self.inputs.len())?;
        if let Some(p) = self.pre.as_mut() {
            p.exit_from = None; // a new forward: the last exit is stale
        }
        self.acts[0].copy_from_slice(&self.inputs[batch]);
        Ok(())
    }

    backend_steps!();

    fn loss(&mut self, output: usize, batch: usize, _want_loss: bool) -> Result<f64> {
        let y = match &self.pre {
            None => {
                check_slot(output, self.acts.len(), batch, self.targets.len())?;
                &self.acts[output]
            }
            Some(p) => {
                check_slot(output, self.h.len() + 1, batch, self.targets.len())?;
                p.output(output, &self.acts[0])?
            }
        };
        cpu::mse_grad(y, &self.targets[batch], &mut self.g)
    }

    fn zero_grads(&mut self, l: usize) -> Result<()> {
        check_block(l, 0, self.h.len(), false, true)?;
        for k in 0..self.per_block {
            self.tensors[self.per_block * l + k].grad.fill(0.0);
        }
        Ok(())
    }

    fn optimizer_step(&mut self, skip: &[bool]) -> Result<()> {
        // A skipped tensor has no gradient this step: it contributes 0 to the norm (as the
        // GPU norm, which honours the skip flags).
        let longest = self.tensors.iter().map(|t| t.len()).max().unwrap_or(0);
        let zeros = vec![0.0f32; longest];
        let grads: Vec<&[f32]> = self
            .tensors
            .iter()
            .zip(skip)
            .map(|(t, &s)| if s { &zeros[..t.len()] } else { &t.grad[..] })
            .collect();
        let norm = norm_cpu::global_norm(&grads, Some(self.max_norm), 1.0)?;
        let inputs = adamw::cpu::StepInputs::from_norm(self.adamw.lr, &norm);
        adamw::cpu::step(&mut self.tensors, &self.adamw, &inputs, skip)
    }
}

/// The residual block's add is `dropout`'s CPU reference with a residual; the pre-norm variant's
/// entry is `dropout_add_norm`'s CPU reference, its exit `dropout`'s with a residual (see
/// [`PreNorm`](crate::mlp::PreNorm) for the model, the exit and how stochastic depth combines
/// with the fused entry).
impl Steps for CpuMlp {
    type Buf = Vec<f32>;
    type Scratch = ();

    fn blocks(&self) -> usize {
        self.h.len()
    }

    fn pre(&mut self) -> Option<&mut PreState> {
        self.pre.as_mut()
    }

    fn check_block_call(&self, l: usize, input: usize, scale: bool) -> Result<()> {
        check_block(
            l,
            input,
            self.h.len(),
            scale,
            self.rowscale.iter().all(|r| !r.is_empty()),
        )
    }

    fn branch_forward(&mut self, l: usize, branch: Branch) -> Result<()> {
        let (x, o) = match branch {
            Branch::Residual { input } => (&self.acts[input], &mut self.o),
            Branch::PreNorm => branch_io(&mut self.pre, l, false)?,
        };
        let (hd, ts) = (self.sites.hidden, &self.tensors);
        let t = |k: usize| self.per_block * l + k;
        cpu::linear_fwd(x, &ts[t(0)].param, &mut self.h[l], hd, hd)?;
        cpu::bias_gelu_fwd(&self.h[l], &ts[t(1)].param, &mut self.a[l])?;
        cpu::linear_fwd(&self.a[l], &ts[t(2)].param, o, hd, hd)
    }

    fn branch_backward(&mut self, l: usize, branch: Branch) -> Result<()> {
        let accumulate = matches!(branch, Branch::Residual { .. });
        let (x, d_x) = match branch {
            Branch::Residual { input } => (&self.acts[input], &mut self.g),
            Branch::PreNorm => branch_io(&mut self.pre, l, true)?,
        };
        let (hd, ts) = (self.sites.hidden, &mut self.tensors);
        let t = |k: usize| self.per_block * l + k;
        cpu::linear_bwd_weight(&self.d_o, &self.a[l], &mut ts[t(2)].grad, hd, hd)?;
        cpu::linear_bwd_input(&self.d_o, &ts[t(2)].param, &mut self.d_a, hd, hd, false)?;
        cpu::bias_gelu_bwd(&self.h[l], &ts[t(1)].param, &self.d_a, &mut self.du)?;
        ts[t(1)].grad = cpu::colsum(&self.du, self.sites.tokens, hd)?;
        cpu::linear_bwd_weight(&self.du, x, &mut ts[t(0)].grad, hd, hd)?;
        cpu::linear_bwd_input(&self.du, &ts[t(0)].param, d_x, hd, hd, accumulate)
    }

    fn residual_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let (before, after) = self.acts.split_at_mut(l + 1);
        let opts = dr::cpu::ForwardOptions {
            bias: Some(&self.tensors[t(l, 3)].param),
            residual: Some(&before[input]),
            rowscale: scale.then_some(&self.rowscale[l][..]),
            ..Default::default()
        };
        dr::cpu::forward(cfg, &self.o, &mut after[0], opts)
    }

    fn residual_backward(&mut self, l: usize, call: u64, scale: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let opts = dr::cpu::BackwardOptions {
            rowscale: scale.then_some(&self.rowscale[l][..]),
            dbias: Some(&mut self.tensors[t(l, 3)].grad),
            ..Default::default()
        };
        dr::cpu::backward(cfg, &self.g, &mut self.d_o, opts)
    }

    fn entry_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let tensors = &self.tensors;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = &self.sites.entry(&p.cfg, l, input > 0, call)?;
        let (gamma, beta) = (&tensors[tp(l, 4)].param, &tensors[tp(l, 5)].param);
        let (before, after) = p.stream.split_at_mut(l);
        let args = if input == 0 {
            dan::cpu::ForwardArgs {
                beta: Some(beta),
                ..dan::cpu::ForwardArgs::new(&self.acts[0], gamma)
            }
        } else {
            dan::cpu::ForwardArgs {
                residual: Some(&before[input - 1]),
                beta: Some(beta),
                bias: Some(&tensors[tp(input - 1, 3)].param),
                // The row scale of slot `input`'s block.
                rowscale: scale.then(|| &self.rowscale[input - 1][..]),
                ..dan::cpu::ForwardArgs::new(&p.outs[input - 1], gamma)
            }
        };
        let outs = dan::cpu::ForwardOut {
            out: &mut p.nrm[l],
            s: &mut after[0],
            mean: &mut p.mean[l],
            rstd: &mut p.rstd[l],
        };
        dan::cpu::forward(cfg, args, outs)
    }

    fn entry_backward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let hd = self.sites.hidden;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = &self.sites.entry(&p.cfg, l, input > 0, call)?;
        let ts = &mut self.tensors;
        // Its column gradients go to buffers of their own first: gamma is read from the same
        // tensor list.
        let (mut dgamma, mut dbeta, mut dbias) = (vec![0.0; hd], vec![0.0; hd], vec![0.0; hd]);
        let adds = input > 0;
        let args = dan::cpu::BackwardArgs {
            d_s: Some(&self.g),
            rowscale: (scale && adds).then(|| &self.rowscale[input - 1][..]),
            ..dan::cpu::BackwardArgs::new(
                &p.dn,
                &p.stream[l],
                &ts[tp(l, 4)].param,
                &p.mean[l],
                &p.rstd[l],
            )
        };
        let outs = dan::cpu::BackwardOut {
            // Without an add, dx is the input's gradient: nobody needs it or the residual's.
            d_residual: adds.then_some(&mut p.g2[..]),
            dbeta: Some(&mut dbeta),
            dbias: adds.then_some(&mut dbias[..]),
            ..dan::cpu::BackwardOut::new(&mut self.d_o, &mut dgamma)
        };
        dan::cpu::backward(cfg, args, outs)?;
        ts[tp(l, 4)].grad = dgamma;
        ts[tp(l, 5)].grad = dbeta;
        if adds {
            ts[tp(input - 1, 3)].grad = dbias;
            std::mem::swap(&mut self.g, &mut p.g2);
        }
        Ok(())
    }

    fn exit_add(&mut self, j: usize, call: u64, scale: bool, backward: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let rowscale = scale.then(|| &self.rowscale[j][..]);
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        if backward {
            // d o_j from the loss gradient; the stream's gradient passes through unchanged.
            let opts = dr::cpu::BackwardOptions {
                rowscale,
                dbias: Some(&mut self.tensors[tp(j, 3)].grad),
                ..Default::default()
            };
            return dr::cpu::backward(cfg, &self.g, &mut self.d_o, opts);
        }
        let opts = dr::cpu::ForwardOptions {
            bias: Some(&self.tensors[tp(j, 3)].param),
            residual: Some(&p.stream[j]),
            rowscale,
            ..Default::default()
        };
        dr::cpu::forward(cfg, &p.outs[j], &mut p.exit, opts)
    }
}
