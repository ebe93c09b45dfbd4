//! The order of one block's operations, the same in the CPU and the GPU model: each model
//! implements [`Steps`] (its own launches: the branch, the residual add, the pre-norm entry and
//! exit), and [`backend_steps!`] writes its [`Backend`](super::Backend) methods from the
//! sequences here.

use super::config::{check_slot, Branch};
use super::prenorm::{not_prenorm, State};
use fusedreg::Result;

/// One model's launches, in buffers `Buf` with pre-norm scratch `Scratch`.
pub(super) trait Steps {
    type Buf;
    type Scratch;

    /// The number of blocks.
    fn blocks(&self) -> usize;
    /// The pre-norm variant's state, or none (the residual model).
    fn pre(&mut self) -> Option<&mut State<Self::Buf, Self::Scratch>>;
    /// Checks the slot, and the stochastic-depth scale request against the model.
    fn check_block_call(&self, l: usize, input: usize, scale: bool) -> Result<()>;
    /// Block `l`'s branch `o = W2 gelu(W1 x + b1)`, with `x` and `o` where `branch` says.
    fn branch_forward(&mut self, l: usize, branch: Branch) -> Result<()>;
    /// Backward through block `l`'s branch from `d_o`.
    fn branch_backward(&mut self, l: usize, branch: Branch) -> Result<()>;
    /// The residual model's add: slot `l + 1` = slot `input` + dropout(`o` + b2).
    fn residual_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()>;
    /// Its backward: `d_o` and block `l`'s `db2` from the running gradient.
    fn residual_backward(&mut self, l: usize, call: u64, scale: bool) -> Result<()>;
    /// The pre-norm entry of block `l` (adding slot `input`): its stream, `n_l` and statistics.
    fn entry_forward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()>;
    /// The entry's fused backward: on return `d_o` holds the gradient of slot `input`'s block
    /// output and `g` the stream's gradient before the entry.
    fn entry_backward(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()>;
    /// The pre-norm exit's add of block `j`'s output to the stream it read (`backward`: `d_o`
    /// and block `j`'s `db2` from the loss gradient).
    fn exit_add(&mut self, j: usize, call: u64, scale: bool, backward: bool) -> Result<()>;

    /// [`Backend::forward_block`](super::Backend::forward_block).
    fn run_forward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        self.check_block_call(l, input, scale)?;
        if self.pre().is_some() {
            self.entry_forward(l, input, call, scale)?;
            return self.branch_forward(l, Branch::PreNorm);
        }
        self.branch_forward(l, Branch::Residual { input })?;
        self.residual_forward(l, input, call, scale)
    }

    /// [`Backend::backward_block`](super::Backend::backward_block).
    fn run_backward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
        self.check_block_call(l, input, scale)?;
        if self.pre().is_some() {
            self.branch_backward(l, Branch::PreNorm)?;
            return self.entry_backward(l, input, call, scale);
        }
        self.residual_backward(l, call, scale)?;
        self.branch_backward(l, Branch::Residual { input })
    }

    /// [`Backend::exit_forward`](super::Backend::exit_forward) (`backward`: its backward): for
    /// the pre-norm model slot `output`'s block output added to the stream it read, under
    /// dropout keyed by `call`; nothing for the residual model.
    fn run_exit(&mut self, output: usize, call: u64, scale: bool, backward: bool) -> Result<()> {
        if self.pre().is_none() {
            return Ok(());
        }
        check_slot(output, self.blocks() + 1, 0, 1)?;
        if output > 0 {
            self.check_block_call(output - 1, 0, scale)?;
        }
        let p = self.pre().ok_or_else(not_prenorm)?;
        let Some(j) = p.begin_exit(output, backward)? else {
            return Ok(());
        };
        self.exit_add(j, call, scale, backward)?;
        if !backward {
            self.pre().ok_or_else(not_prenorm)?.exit_from = Some(output);
        }
        Ok(())
    }
}

/// The [`Backend`](super::Backend) methods that are [`Steps`]' sequences, in an `impl Backend`.
macro_rules! backend_steps {
    () => {
        fn forward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
            self.run_forward_block(l, input, call, scale)
        }

        fn exit_forward(&mut self, output: usize, call: u64, scale: bool) -> Result<()> {
            self.run_exit(output, call, scale, false)
        }

        fn exit_backward(&mut self, output: usize, call: u64, scale: bool) -> Result<()> {
            self.run_exit(output, call, scale, true)
        }

        fn backward_block(&mut self, l: usize, input: usize, call: u64, scale: bool) -> Result<()> {
            self.run_backward_block(l, input, call, scale)
        }
    };
}
pub(super) use backend_steps;
