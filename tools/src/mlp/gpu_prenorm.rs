//! The pre-norm variant of the GPU model (see [`PreNorm`](crate::mlp::PreNorm) for the model,
//! the exit and how stochastic depth combines with the fused entry): each block's entry is
//! `dropout_add_norm`'s fused kernel pair, the exit `dropout`'s with a residual; the same operations in
//! the same order as the CPU model (`cpu_prenorm.rs`).

use cudarc::driver::CudaSlice;

use super::GpuMlp;
use crate::mlp::config::{check_slot, Branch};
use crate::mlp::prenorm::{self, not_prenorm, t};
use crate::mlp::PreNorm;
use fusedreg::dropout::{self as dr, BackwardOptions, ForwardOptions};
use fusedreg::dropout_add_norm as dan;
use fusedreg::{Error, Handle, Result};

const OP: &str = "mlp";

/// The GPU model's pre-norm activations (device buffers) and its entry backward's scratch.
pub(super) type State = prenorm::State<CudaSlice<f32>, EntryScratch>;

/// The entry backward's column gradients, copied into the tensor set afterwards (the set lends
/// one gradient at a time, and gamma is read from it in the same call), and its workspace.
pub(super) struct EntryScratch {
    dgamma: CudaSlice<f32>,
    dbeta: CudaSlice<f32>,
    dbias: CudaSlice<f32>,
    ws: dan::Workspace,
}

/// [`State`] on the handle's stream.
pub(super) fn new_state(
    h: &Handle,
    cfg: PreNorm,
    blocks: usize,
    tokens: usize,
    hidden: usize,
) -> Result<State> {
    let zeros = |n: usize| h.stream().alloc_zeros::<f32>(n).map_err(Error::driver(OP));
    let scratch = EntryScratch {
        dgamma: zeros(hidden)?,
        dbeta: zeros(hidden)?,
        dbias: zeros(hidden)?,
        ws: dan::Workspace::new(),
    };
    State::new(cfg, (blocks, tokens, hidden), zeros, scratch)
}

impl GpuMlp {
    /// Entry of block `l` (adding slot `input`), then its MLP.
    pub(super) fn pre_forward_block(
        &mut self,
        l: usize,
        input: usize,
        call: u64,
        scale: bool,
    ) -> Result<()> {
        self.check_block_call(l, input, scale)?;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = self.sites.entry(&p.cfg, l, input > 0, call)?;
        let set = &self.set;
        let (gamma, beta) = (set.param::<f32>(t(l, 4))?, set.param::<f32>(t(l, 5))?);
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
                bias: Some(set.param::<f32>(t(input - 1, 3))?),
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
        dan::forward(&self.handle, &cfg, args, outs)?;
        self.branch_forward(l, Branch::PreNorm)
    }

    /// The exit (`backward`: its backward): slot `output`'s block output added to the stream it
    /// read, under dropout keyed by `call`.
    pub(super) fn pre_exit(
        &mut self,
        output: usize,
        call: u64,
        scale: bool,
        backward: bool,
    ) -> Result<()> {
        let blocks = self.hpre.len();
        check_slot(output, blocks + 1, 0, 1)?;
        if output > 0 {
            self.check_block_call(output - 1, 0, scale)?;
        }
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let Some(j) = p.begin_exit(output, backward)? else {
            return Ok(());
        };
        let cfg = self.sites.dropout(call)?;
        let rowscale = scale.then(|| self.rowscale[j].as_view());
        if backward {
            // d o_j from the loss gradient; the stream's gradient passes through unchanged.
            let opts = BackwardOptions {
                rowscale,
                dbias: Some(self.set.grad_mut::<f32>(t(j, 3))?),
                workspace: Some(&mut self.ws),
                ..Default::default()
            };
            return dr::backward(&self.handle, &cfg, &self.g, &mut self.d_o, opts);
        }
        let opts = ForwardOptions {
            bias: Some(self.set.param::<f32>(t(j, 3))?),
            residual: Some(p.stream[j].as_view()),
            rowscale,
            ..Default::default()
        };
        dr::forward(&self.handle, &cfg, &p.outs[j], &mut p.exit, opts)?;
        p.exit_from = Some(output);
        Ok(())
    }

    /// Backward of block `l`: on entry `d_o` holds the gradient of its output and `g` the
    /// stream's gradient at its entry (from later blocks); on return `d_o` holds the gradient of
    /// slot `input`'s block output and `g` the stream's gradient before the entry.
    pub(super) fn pre_backward_block(
        &mut self,
        l: usize,
        input: usize,
        call: u64,
        scale: bool,
    ) -> Result<()> {
        self.check_block_call(l, input, scale)?;
        self.branch_backward(l, Branch::PreNorm)?;
        let h = &self.handle;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = self.sites.entry(&p.cfg, l, input > 0, call)?;
        let set = &mut self.set;
        // The entry's fused backward.
        let adds = input > 0;
        let args = dan::BackwardArgs {
            d_s: Some(self.g.as_view()),
            rowscale: (scale && adds).then(|| self.rowscale[input - 1].as_view()),
            workspace: Some(&mut p.scratch.ws),
            ..dan::BackwardArgs::new(
                p.dn.as_view(),
                p.stream[l].as_view(),
                set.param::<f32>(t(l, 4))?,
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
        dan::backward(h, &cfg, args, outs)?;
        let stream = h.stream();
        let mut copy = |src: &CudaSlice<f32>, i: usize| {
            stream
                .memcpy_dtod(src, &mut set.grad_mut::<f32>(i)?)
                .map_err(Error::driver(OP))
        };
        copy(&p.scratch.dgamma, t(l, 4))?;
        copy(&p.scratch.dbeta, t(l, 5))?;
        if adds {
            copy(&p.scratch.dbias, t(input - 1, 3))?;
            std::mem::swap(&mut self.g, &mut p.g2);
        }
        Ok(())
    }
}
