//! The residual MLP on the GPU: matrix products through cuBLAS, everything else fusedreg's
//! kernels, all on the handle's stream, with no host sync inside a step (the loss is read only
//! when asked for).

use cudarc::driver::CudaSlice;

use super::config::{check_block, check_slot, Backend, Branch, MlpConfig, Sites};
use super::gpu::{self as k, Blas};
use super::init::{host_init, student_tensors, BlockParams};
use super::prenorm::{branch_io, not_prenorm, t as tp};
use super::steps::{backend_steps, Steps};
use fusedreg::adamw::AdamW;
use fusedreg::dropout::{self as dr, BackwardOptions, Config, ForwardOptions, Workspace};
use fusedreg::dropout_add_norm as dan;
use fusedreg::global_norm::GlobalNorm;
use fusedreg::multi_tensor::TensorSet;
use fusedreg::Handle;
use fusedreg::{Error, Result};

const OP: &str = "mlp";

#[path = "gpu_prenorm.rs"]
mod prenorm;

/// The GPU model state.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg_tools::mlp::{GpuMlp, MlpConfig, Trainer};
/// let h = fusedreg::Handle::new(0)?;
/// let mut t = Trainer::gpu(&h, MlpConfig { blocks: 4, ..MlpConfig::cpu() })?;
/// t.step(false)?;
/// let model: &GpuMlp = &t.model;
/// assert_eq!(model.set().len(), 4 * 4); // W1, b1, W2, b2 per block
/// # Ok(()) }
/// ```
pub struct GpuMlp {
    handle: Handle,
    blas: Blas,
    sites: Sites,
    /// W1, b1, W2, b2 of each block (parameters and gradients), registered once.
    set: TensorSet,
    opt: AdamW,
    norm: GlobalNorm,
    inputs: Vec<CudaSlice<f32>>,
    targets: Vec<CudaSlice<f32>>,
    batch: usize,
    /// Activation slots 1..=blocks (slot 0 is the current input batch).
    acts: Vec<CudaSlice<f32>>,
    hpre: Vec<CudaSlice<f32>>,
    a: Vec<CudaSlice<f32>>,
    rowscale: Vec<CudaSlice<f32>>,
    o: CudaSlice<f32>,
    g: CudaSlice<f32>,
    d_o: CudaSlice<f32>,
    d_a: CudaSlice<f32>,
    du: CudaSlice<f32>,
    colsum_scratch: CudaSlice<f32>,
    mse_partials: CudaSlice<f32>,
    ws: Workspace,
    skip: Vec<bool>,
    /// Optimizer tensors per block (4, or 6 for the pre-norm variant).
    per_block: usize,
    /// The pre-norm variant's state, or none (the residual model).
    pre: Option<prenorm::State>,
}

fn t(l: usize, k: usize) -> usize {
    MlpConfig::TENSORS_PER_BLOCK * l + k
}

impl GpuMlp {
    pub(crate) fn new(handle: &Handle, cfg: &MlpConfig) -> Result<Self> {
        let h = handle;
        let s = h.stream();
        let up = |v: &[f32]| s.clone_htod(v).map_err(Error::driver(OP));
        let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(Error::driver(OP));
        let (n, hd) = (cfg.tokens * cfg.hidden, cfg.hidden);
        let init = host_init(cfg);
        let blas = Blas::new(h)?;

        let inputs = init
            .inputs
            .iter()
            .map(|x| up(x))
            .collect::<Result<Vec<_>>>()?;
        let mut targets = Vec::new();
        {
            let teacher: Vec<Vec<CudaSlice<f32>>> = init
                .teacher
                .iter()
                .map(|p: &BlockParams| p.iter().map(|v| up(v)).collect::<Result<Vec<_>>>())
                .collect::<Result<_>>()?;
            let (mut hb, mut a, mut o) = (zeros(n)?, zeros(n)?, zeros(n)?);
            let no_drop = Config::new(cfg.tokens, hd, 0.0, 0, 0)?;
            for x in &inputs {
                let mut y = s.clone_dtod(x).map_err(Error::driver(OP))?;
                for p in &teacher {
                    blas.linear_fwd(&y, &p[0], &mut hb, hd, hd)?;
                    k::bias_gelu_fwd(h, &hb, &p[1], &mut a)?;
                    blas.linear_fwd(&a, &p[2], &mut o, hd, hd)?;
                    let opts = ForwardOptions {
                        bias: Some(p[3].as_view()),
                        ..Default::default()
                    };
                    dr::forward_inplace(h, &no_drop, &o, &mut y, opts)?;
                }
                targets.push(y);
            }
        }

        let mut b = TensorSet::builder(h);
        let mut wds = Vec::new();
        for (v, wd) in student_tensors(cfg, init.student) {
            wds.push(wd);
            b.push::<f32, f32>(up(&v)?, zeros(v.len())?)?;
        }
        let set = b.build()?;
        let opt = AdamW::new(&set, cfg.adamw, &wds)?;
        let norm = GlobalNorm::new(&set, Some(cfg.max_norm))?;
        let rowscale = match cfg.depth()? {
            Some(sd) => sd
                .rates()
                .iter()
                .map(|r| up(&vec![r.scale(); cfg.tokens]))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let many = |count: usize| (0..count).map(|_| zeros(n)).collect::<Result<Vec<_>>>();
        // The pre-norm variant keeps its streams in its own state: no activation slots here.
        let slots = if cfg.prenorm.is_some() {
            0
        } else {
            cfg.blocks + 1
        };
        let pre = cfg
            .prenorm
            .map(|p| prenorm::new_state(h, p, cfg.blocks, cfg.tokens, hd))
            .transpose()?;
        Ok(GpuMlp {
            handle: h.clone(),
            blas,
            sites: Sites::of(cfg),
            opt,
            norm,
            inputs,
            targets,
            batch: 0,
            acts: many(slots)?,
            hpre: many(cfg.blocks)?,
            a: many(cfg.blocks)?,
            rowscale,
            o: zeros(n)?,
            g: zeros(n)?,
            d_o: zeros(n)?,
            d_a: zeros(n)?,
            du: zeros(n)?,
            colsum_scratch: zeros(k::colsum_scratch_len(cfg.tokens, hd))?,
            mse_partials: zeros(k::mse_scratch_len(n))?,
            ws: Workspace::new(),
            skip: vec![false; set.len()],
            set,
            per_block: cfg.tensors_per_block(),
            pre,
        })
    }

    /// cuBLAS products issued so far (counted by the cuBLAS wrapper as it issues them;
    /// fusedreg's own kernels are counted by [`Handle::launch_count`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// let cfg = MlpConfig { blocks: 3, depth: None, ..MlpConfig::cpu() }; // every block runs
    /// let mut t = Trainer::gpu(&h, cfg)?;
    /// let before = t.model.gemm_count();
    /// t.step(false)?;
    /// assert_eq!(t.model.gemm_count() - before, 3 * 6); // 2 forward + 4 backward per block
    /// # Ok(()) }
    /// ```
    pub fn gemm_count(&self) -> u64 {
        self.blas.gemm_count()
    }

    /// The parameters of optimizer tensor `i`, copied to the host.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// let cfg = MlpConfig { blocks: 2, ..MlpConfig::cpu() };
    /// let (gpu, cpu) = (Trainer::gpu(&h, cfg.clone())?, Trainer::cpu(cfg)?);
    /// assert_eq!(gpu.model.param(0)?, cpu.model.param(0)); // same initialization
    /// # Ok(()) }
    /// ```
    pub fn param(&self, i: usize) -> Result<Vec<f32>> {
        let v = self.set.param::<f32>(i)?;
        self.handle
            .stream()
            .clone_dtoh(&v)
            .map_err(Error::driver(OP))
    }

    /// The handle the model runs on.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// let mut t = Trainer::gpu(&h, MlpConfig { blocks: 2, ..MlpConfig::cpu() })?;
    /// let before = t.model.handle().launch_count();
    /// t.step(false)?;
    /// println!("{} fusedreg kernels", t.model.handle().launch_count() - before);
    /// t.model.handle().synchronize()?;
    /// # Ok(()) }
    /// ```
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The optimizer's tensor set (W1, b1, W2, b2 of each block: parameters, gradients and
    /// AdamW state).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// let cfg = MlpConfig { blocks: 2, ..MlpConfig::cpu() };
    /// let t = Trainer::gpu(&h, cfg.clone())?;
    /// assert_eq!(t.model.set().len(), 2 * 4);
    /// assert_eq!(t.model.set().layout().lens()[0], (cfg.hidden * cfg.hidden) as u64); // block 0's W1
    /// # Ok(()) }
    /// ```
    pub fn set(&self) -> &TensorSet {
        &self.set
    }

    /// The optimizer: it owns the state of [`GpuMlp::set`] (moments, weight decay, steps).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg_tools::mlp::{MlpConfig, Trainer};
    /// let h = fusedreg::Handle::new(0)?;
    /// let t = Trainer::gpu(&h, MlpConfig { blocks: 2, ..MlpConfig::cpu() })?;
    /// assert_eq!(t.model.optimizer().step_counts()?, vec![0; 8]);
    /// # Ok(()) }
    /// ```
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }
}

impl Backend for GpuMlp {
    fn begin(&mut self, batch: usize) -> Result<()> {
        check_slot(0, 1, batch, self.inputs.len())?;
        if let Some(p) = self.pre.as_mut() {
            p.exit_from = None; // a new forward: the last exit is stale
        }
        self.batch = batch;
        Ok(())
    }

    backend_steps!();

    fn loss(&mut self, output: usize, batch: usize, want_loss: bool) -> Result<f64> {
        let y = match &self.pre {
            None => {
                check_slot(output, self.acts.len(), batch, self.targets.len())?;
                if output == 0 {
                    &self.inputs[batch]
                } else {
                    &self.acts[output]
                }
            }
            Some(p) => {
                check_slot(output, self.hpre.len() + 1, batch, self.targets.len())?;
                // Slot 0: the stream never left the input batch of `begin` (as the CPU model).
                p.output(output, &self.inputs[self.batch])?
            }
        };
        k::mse_grad(
            &self.handle,
            y,
            &self.targets[batch],
            &mut self.g,
            &mut self.mse_partials,
        )?;
        if want_loss {
            k::mse_from_partials(
                &self.handle,
                &self.mse_partials,
                self.sites.tokens * self.sites.hidden,
            )
        } else {
            Ok(f64::NAN)
        }
    }

    fn zero_grads(&mut self, l: usize) -> Result<()> {
        check_block(l, 0, self.hpre.len(), false, true)?;
        let stream = self.handle.stream().clone();
        for kk in 0..self.per_block {
            let mut g = self.set.grad_mut::<f32>(self.per_block * l + kk)?;
            stream.memset_zeros(&mut g).map_err(Error::driver(OP))?;
        }
        Ok(())
    }

    fn optimizer_step(&mut self, skip: &[bool]) -> Result<()> {
        if skip != self.skip.as_slice() {
            self.opt.set_skip(skip)?;
            self.skip = skip.to_vec();
        }
        self.opt.clip_and_step(&mut self.set, &mut self.norm)
    }
}

/// The residual block's add is `dropout`'s kernel with a residual; the pre-norm variant's entry
/// is `dropout_add_norm`'s fused kernel pair, its exit `dropout`'s with a residual (see
/// [`PreNorm`](crate::mlp::PreNorm)): the same operations in the same order as the CPU model.
impl Steps for GpuMlp {
    type Buf = CudaSlice<f32>;
    type Scratch = prenorm::EntryScratch;

    fn blocks(&self) -> usize {
        self.hpre.len()
    }

    fn pre(&mut self) -> Option<&mut prenorm::State> {
        self.pre.as_mut()
    }

    fn check_block_call(&self, l: usize, input: usize, scale: bool) -> Result<()> {
        check_block(l, input, self.hpre.len(), scale, !self.rowscale.is_empty())
    }

    fn branch_forward(&mut self, l: usize, branch: Branch) -> Result<()> {
        let (x, o) = match branch {
            Branch::Residual { input: 0 } => (&self.inputs[self.batch], &mut self.o),
            Branch::Residual { input } => (&self.acts[input], &mut self.o),
            Branch::PreNorm => branch_io(&mut self.pre, l, false)?,
        };
        let (hd, set) = (self.sites.hidden, &self.set);
        let t = |k: usize| self.per_block * l + k;
        self.blas
            .linear_fwd(x, &set.param::<f32>(t(0))?, &mut self.hpre[l], hd, hd)?;
        k::bias_gelu_fwd(
            &self.handle,
            &self.hpre[l],
            &set.param::<f32>(t(1))?,
            &mut self.a[l],
        )?;
        self.blas
            .linear_fwd(&self.a[l], &set.param::<f32>(t(2))?, o, hd, hd)
    }

    fn branch_backward(&mut self, l: usize, branch: Branch) -> Result<()> {
        let accumulate = matches!(branch, Branch::Residual { .. });
        let (x, d_x) = match branch {
            Branch::Residual { input: 0 } => (&self.inputs[self.batch], &mut self.g),
            Branch::Residual { input } => (&self.acts[input], &mut self.g),
            Branch::PreNorm => branch_io(&mut self.pre, l, true)?,
        };
        let (hd, h, set) = (self.sites.hidden, &self.handle, &mut self.set);
        let t = |k: usize| self.per_block * l + k;
        self.blas.linear_bwd_weight(
            &self.d_o,
            &self.a[l],
            &mut set.grad_mut::<f32>(t(2))?,
            hd,
            hd,
        )?;
        self.blas.linear_bwd_input(
            &self.d_o,
            &set.param::<f32>(t(2))?,
            &mut self.d_a,
            hd,
            hd,
            false,
        )?;
        k::bias_gelu_bwd(
            h,
            &self.hpre[l],
            &set.param::<f32>(t(1))?,
            &self.d_a,
            &mut self.du,
        )?;
        k::colsum(
            h,
            &self.du,
            self.sites.tokens,
            &mut self.colsum_scratch,
            &mut set.grad_mut::<f32>(t(1))?,
        )?;
        self.blas
            .linear_bwd_weight(&self.du, x, &mut set.grad_mut::<f32>(t(0))?, hd, hd)?;
        self.blas
            .linear_bwd_input(&self.du, &set.param::<f32>(t(0))?, d_x, hd, hd, accumulate)
    }

    fn residual_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let (lo, hi) = self.acts.split_at_mut(l + 1);
        let x = if input == 0 {
            &self.inputs[self.batch]
        } else {
            &lo[input]
        };
        let opts = ForwardOptions {
            bias: Some(self.set.param::<f32>(t(l, 3))?),
            residual: Some(x.as_view()),
            rowscale: scale.then(|| self.rowscale[l].as_view()),
            ..Default::default()
        };
        dr::forward(&self.handle, cfg, &self.o, &mut hi[0], opts)
    }

    fn residual_backward(&mut self, l: usize, call: u64, scale: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let opts = BackwardOptions {
            rowscale: scale.then(|| self.rowscale[l].as_view()),
            dbias: Some(self.set.grad_mut::<f32>(t(l, 3))?),
            workspace: Some(&mut self.ws),
            ..Default::default()
        };
        dr::backward(&self.handle, cfg, &self.g, &mut self.d_o, opts)
    }

    fn entry_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = &self.sites.entry(&p.cfg, l, input > 0, call)?;
        let set = &self.set;
        let (gamma, beta) = (set.param::<f32>(tp(l, 4))?, set.param::<f32>(tp(l, 5))?);
        let (before, after) = p.stream.split_at_mut(l);
        let args = if input == 0 {
            dan::ForwardArgs {
                beta: Some(beta),
                ..dan::ForwardArgs::new(self.inputs[self.batch].as_view(), gamma)
            }
        } else {
            dan::ForwardArgs {
                residual: Some(before[input - 1].as_view()),
                beta: Some(beta),
                bias: Some(set.param::<f32>(tp(input - 1, 3))?),
                rowscale: scale.then(|| self.rowscale[input - 1].as_view()),
                ..dan::ForwardArgs::new(p.outs[input - 1].as_view(), gamma)
            }
        };
        let outs = dan::ForwardOut {
            out: p.nrm[l].as_view_mut(),
            s: after[0].as_view_mut(),
            mean: p.mean[l].as_view_mut(),
            rstd: p.rstd[l].as_view_mut(),
        };
        dan::forward(&self.handle, cfg, args, outs)
    }

    fn entry_backward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        let h = &self.handle;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = &self.sites.entry(&p.cfg, l, input > 0, call)?;
        let set = &mut self.set;
        let adds = input > 0;
        let args = dan::BackwardArgs {
            d_s: Some(self.g.as_view()),
            rowscale: (scale && adds).then(|| self.rowscale[input - 1].as_view()),
            workspace: Some(&mut p.scratch.ws),
            ..dan::BackwardArgs::new(
                p.dn.as_view(),
                p.stream[l].as_view(),
                set.param::<f32>(tp(l, 4))?,
                p.mean[l].as_view(),
                p.rstd[l].as_view(),
            )
        };
        let outs = dan::BackwardOut {
            // Without an add, dx is the input's gradient: nobody needs it or the residual's.
            d_residual: adds.then(|| p.g2.as_view_mut()),
            dbeta: Some(p.scratch.dbeta.as_view_mut()),
            dbias: adds.then(|| p.scratch.dbias.as_view_mut()),
            ..dan::BackwardOut::new(self.d_o.as_view_mut(), p.scratch.dgamma.as_view_mut())
        };
        dan::backward(h, cfg, args, outs)?;
        let stream = h.stream();
        let mut copy = |src: &CudaSlice<f32>, i: usize| {
            stream
                .memcpy_dtod(src, &mut set.grad_mut::<f32>(i)?)
                .map_err(Error::driver(OP))
        };
        copy(&p.scratch.dgamma, tp(l, 4))?;
        copy(&p.scratch.dbeta, tp(l, 5))?;
        if adds {
            copy(&p.scratch.dbias, tp(input - 1, 3))?;
            std::mem::swap(&mut self.g, &mut p.g2);
        }
        Ok(())
    }

    fn exit_add(&mut self, j: usize, call: u64, scale: bool, backward: bool) -> Result<()> {
        let cfg = &self.sites.dropout(call)?;
        let rowscale = scale.then(|| self.rowscale[j].as_view());
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        if backward {
            // d o_j from the loss gradient; the stream's gradient passes through unchanged.
            let opts = BackwardOptions {
                rowscale,
                dbias: Some(self.set.grad_mut::<f32>(tp(j, 3))?),
                workspace: Some(&mut self.ws),
                ..Default::default()
            };
            return dr::backward(&self.handle, cfg, &self.g, &mut self.d_o, opts);
        }
        let opts = ForwardOptions {
            bias: Some(self.set.param::<f32>(tp(j, 3))?),
            residual: Some(p.stream[j].as_view()),
            rowscale,
            ..Default::default()
        };
        dr::forward(&self.handle, cfg, &p.outs[j], &mut p.exit, opts)
    }
}
