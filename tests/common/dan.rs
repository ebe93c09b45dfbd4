//! `dropout_add_norm`'s CPU forward inputs and outputs as owned buffers, for the CPU tests
//! (through `tests/common/mod.rs`), the GPU and candle tests and the emulator's dump checks
//! (`tests/common/dan_dump.rs`).

#![allow(dead_code)] // each test binary uses a part

use fusedreg::dropout_add_norm::cpu::{ForwardArgs, ForwardOut};
use fusedreg::Dtype;

/// Everything the forward reads, as owned data (`None`: the forward goes without).
pub struct DanInputs<T, S> {
    pub x: Vec<T>,
    pub r: Option<Vec<S>>,
    pub gamma: Vec<T>,
    pub beta: Option<Vec<T>>,
    pub bias: Option<Vec<T>>,
    pub rowscale: Option<Vec<f32>>,
}

impl<T: Dtype, S: Dtype> DanInputs<T, S> {
    /// The CPU forward's arguments: every input held.
    pub fn args(&self) -> ForwardArgs<'_, T, S> {
        ForwardArgs {
            residual: self.r.as_deref(),
            beta: self.beta.as_deref(),
            bias: self.bias.as_deref(),
            rowscale: self.rowscale.as_deref(),
            ..ForwardArgs::new(&self.x, &self.gamma)
        }
    }
}

/// The four outputs of `dropout_add_norm`'s CPU forward as owned buffers: `out` and `s` of
/// `rows * cols` elements, `mean` and `rstd` of `rows`, all NaN to start with (an element the
/// forward never writes shows).
pub struct DanOut<T, S> {
    pub out: Vec<T>,
    pub s: Vec<S>,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl<T: Dtype, S: Dtype> DanOut<T, S> {
    pub fn new(rows: usize, cols: usize) -> Self {
        DanOut {
            out: vec![T::from_f32_rn(f32::NAN); rows * cols],
            s: vec![S::from_f32_rn(f32::NAN); rows * cols],
            mean: vec![f32::NAN; rows],
            rstd: vec![f32::NAN; rows],
        }
    }

    /// The buffers as the forward's output argument.
    pub fn outs(&mut self) -> ForwardOut<'_, T, S> {
        ForwardOut {
            out: &mut self.out,
            s: &mut self.s,
            mean: &mut self.mean,
            rstd: &mut self.rstd,
        }
    }
}
