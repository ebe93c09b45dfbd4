//! The pre-norm variant of the CPU model (see [`PreNorm`](crate::mlp::PreNorm) for the model,
//! the exit and how stochastic depth combines with the fused entry): each block's entry is
//! `dropout_add_norm`'s CPU reference, the exit `dropout`'s with a residual.

use super::CpuMlp;
use crate::mlp::config::{check_slot, Branch};
use crate::mlp::prenorm::{self, not_prenorm, t};
use fusedreg::dropout as dr;
use fusedreg::dropout_add_norm as dan;
use fusedreg::Result;

/// The CPU model's pre-norm activations (host buffers, nothing else).
pub(super) type State = prenorm::State<Vec<f32>>;

impl CpuMlp {
    /// Entry of block `l` (adding slot `input`), then its MLP.
    pub(super) fn pre_forward_block(
        &mut self,
        l: usize,
        input: usize,
        call: u64,
        scale: bool,
    ) -> Result<()> {
        self.check_block_call(l, input, scale)?;
        let p = self.pre.as_ref().ok_or_else(not_prenorm)?;
        let cfg = self.sites.entry(&p.cfg, l, input > 0, call)?;
        // The row scale of slot `input`'s block (none for slot 0: nothing is added).
        let rowscale = (scale && input > 0).then(|| &self.rowscale[input - 1][..]);
        let tensors = &self.tensors;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let (gamma, beta) = (&tensors[t(l, 4)].param, &tensors[t(l, 5)].param);
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
                bias: Some(&tensors[t(input - 1, 3)].param),
                rowscale,
                ..dan::cpu::ForwardArgs::new(&p.outs[input - 1], gamma)
            }
        };
        let outs = dan::cpu::ForwardOut {
            out: &mut p.nrm[l],
            s: &mut after[0],
            mean: &mut p.mean[l],
            rstd: &mut p.rstd[l],
        };
        dan::cpu::forward(&cfg, args, outs)?;
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
        let blocks = self.h.len();
        check_slot(output, blocks + 1, 0, 1)?;
        if output > 0 {
            self.check_block_call(output - 1, 0, scale)?;
        }
        let pre = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let Some(j) = pre.begin_exit(output, backward)? else {
            return Ok(());
        };
        let cfg = self.sites.dropout(call)?;
        let rowscale = scale.then(|| &self.rowscale[j][..]);
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        if backward {
            // d o_j from the loss gradient; the stream's gradient passes through unchanged.
            let opts = dr::cpu::BackwardOptions {
                rowscale,
                dbias: Some(&mut self.tensors[t(j, 3)].grad),
                ..Default::default()
            };
            return dr::cpu::backward(&cfg, &self.g, &mut self.d_o, opts);
        }
        let opts = dr::cpu::ForwardOptions {
            bias: Some(&self.tensors[t(j, 3)].param),
            residual: Some(&p.stream[j]),
            rowscale,
            ..Default::default()
        };
        dr::cpu::forward(&cfg, &p.outs[j], &mut p.exit, opts)?;
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
        let hd = self.sites.hidden;
        self.branch_backward(l, Branch::PreNorm)?;
        let p = self.pre.as_mut().ok_or_else(not_prenorm)?;
        let cfg = self.sites.entry(&p.cfg, l, input > 0, call)?;
        let ts = &mut self.tensors;
        // The entry's fused backward. Its column gradients go to buffers of their own first:
        // gamma is read from the same tensor list.
        let (mut dgamma, mut dbeta, mut dbias) = (vec![0.0; hd], vec![0.0; hd], vec![0.0; hd]);
        let adds = input > 0;
        let args = dan::cpu::BackwardArgs {
            d_s: Some(&self.g),
            rowscale: (scale && adds).then(|| &self.rowscale[input - 1][..]),
            ..dan::cpu::BackwardArgs::new(
                &p.dn,
                &p.stream[l],
                &ts[t(l, 4)].param,
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
        dan::cpu::backward(&cfg, args, outs)?;
        ts[t(l, 4)].grad = dgamma;
        ts[t(l, 5)].grad = dbeta;
        if adds {
            ts[t(input - 1, 3)].grad = dbias;
            std::mem::swap(&mut self.g, &mut p.g2);
        }
        Ok(())
    }
}
