//! The pre-norm variant of the residual MLP ([`MlpConfig::prenorm`](super::MlpConfig)): every
//! block's entry is fusedreg's `dropout_add_norm`, with LayerNorm Scaling on or off.
//!
//! With `s_0` the input batch, block `l` (0-based; layer `l + 1` for LayerNorm Scaling) runs
//!
//! ```text
//! s_l = s_{l-1} + rowscale_{l-1} * dropout(o_{l-1} + b2_{l-1})    the entry (block 0: s_0 = input)
//! n_l = norm(s_l) * gamma_l + beta_l   [* 1 / sqrt(l + 1) with LayerNorm Scaling]
//! o_l = W2_l gelu(W1_l n_l + b1_l)
//! ```
//!
//! and the exit `y = s_{L-1} + rowscale_{L-1} * dropout(o_{L-1} + b2_{L-1})` (fusedreg's
//! `dropout` with its residual) goes into the MSE loss **without a final norm**: the targets are the
//! residual teacher's unnormalised outputs, whose per-row mean and scale a final norm would have
//! to relearn from its per-column gamma and beta. (LayerNorm Scaling never applies to a final
//! norm anyway, so the comparison is unaffected by this choice.)
//!
//! The backward of each entry is the op's fused backward: from the gradient of `n_l` and the
//! gradient flowing along the stream it gives the gradient of the previous block's output (its
//! `dx`), of the stream before (`d_residual`), `dgamma_l`, `dbeta_l` and the previous block's
//! `db2` (`dbias`).
//!
//! **Stochastic depth.** A dropped block launches nothing: no entry norm (its `n_l` would feed
//! only itself), no products, and its output is not added. The add of block `j`'s output is
//! fused into the entry of the next block `k` that runs (or into the exit), which normalises
//! with its own `gamma_k`, `beta_k` and `1 / sqrt(k + 1)`; with no block before it that ran,
//! the entry has no `x` and normalises the input itself. So the stream is exactly the one of the
//! model in which dropped blocks contribute zero, with no launch and no zero row scale spent on
//! them. The dropout on `o_j` is keyed by the call id of the block whose entry adds it (the
//! exit's call for the last one), and scaled by block `j`'s row scale `1 / (1 - p_j)`.
//!
//! Per block the optimizer tensors are W1, b1, W2, b2, gamma, beta ([`PreNorm::TENSORS`]);
//! gamma starts at 1 and beta at 0, and neither gets weight decay.

use fusedreg::dropout_add_norm::Norm;
use fusedreg::{Error, Result};

/// The pre-norm variant: which normaliser, whether LayerNorm Scaling is on, and eps.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::Norm;
/// use fusedreg_tools::mlp::{MlpConfig, PreNorm, Trainer};
/// let cfg = MlpConfig { blocks: 3, prenorm: Some(PreNorm::new(Norm::LayerNorm, true)), ..MlpConfig::cpu() };
/// let mut t = Trainer::cpu(cfg.clone()).unwrap();
/// assert_eq!(t.model.tensors().len(), 3 * 6); // W1, b1, W2, b2, gamma, beta per block
/// assert!(t.step(true).unwrap() > 0.0);
/// let bad = PreNorm { eps: 0.0, ..PreNorm::new(Norm::RmsNorm, false) };
/// assert!(Trainer::cpu(MlpConfig { prenorm: Some(bad), ..cfg }).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreNorm {
    /// LayerNorm (with beta) or RMSNorm (beta is then a plain learned shift after the norm).
    pub norm: Norm,
    /// Scale the entry norm of block `l` (0-based) by `1 / sqrt(l + 1)` (Sun et al. 2025).
    pub layer_norm_scaling: bool,
    /// The normaliser's eps (finite, > 0).
    pub eps: f32,
}

impl PreNorm {
    /// Optimizer tensors per block: W1, b1, W2, b2, gamma, beta.
    pub const TENSORS: usize = 6;

    /// `norm` with eps `1e-5`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::Norm;
    /// use fusedreg_tools::mlp::PreNorm;
    /// let p = PreNorm::new(Norm::RmsNorm, true);
    /// assert_eq!((p.norm, p.layer_norm_scaling, p.eps), (Norm::RmsNorm, true, 1e-5));
    /// ```
    pub fn new(norm: Norm, layer_norm_scaling: bool) -> Self {
        PreNorm {
            norm,
            layer_norm_scaling,
            eps: 1e-5,
        }
    }
}

/// Index of tensor `k` (0 W1, 1 b1, 2 W2, 3 b2, 4 gamma, 5 beta) of block `l`.
pub(super) fn t(l: usize, k: usize) -> usize {
    PreNorm::TENSORS * l + k
}

/// The error of a pre-norm call on a model built without the variant.
pub(super) fn not_prenorm() -> Error {
    Error::invalid(
        "mlp",
        "a pre-norm call on a model without the pre-norm variant",
    )
}

/// Block `l`'s branch buffers in the pre-norm model: its input `n_l`, and where its output `o_l`
/// goes (`backward`: where the gradient of `n_l` goes).
pub(super) fn branch_io<B, S>(
    pre: &mut Option<State<B, S>>,
    l: usize,
    backward: bool,
) -> Result<(&B, &mut B)> {
    let p = pre.as_mut().ok_or_else(not_prenorm)?;
    Ok((&p.nrm[l], if backward { &mut p.dn } else { &mut p.outs[l] }))
}

/// Per-block activations of the pre-norm model in buffers `B` (`Vec<f32>` in the CPU model,
/// `CudaSlice<f32>` in the GPU model), and `S`, what only one of them keeps (slot `k > 0` is
/// block `k - 1`'s output `o` together with the stream `s` that block read).
pub(super) struct State<B, S = ()> {
    pub(super) cfg: PreNorm,
    /// Per block: the stream at its entry `s_l`, its normalised input `n_l`, the row statistics
    /// and its output `o_l` (before b2; the consumer's entry adds it).
    pub(super) stream: Vec<B>,
    pub(super) nrm: Vec<B>,
    pub(super) mean: Vec<B>,
    pub(super) rstd: Vec<B>,
    pub(super) outs: Vec<B>,
    /// The exit's stream (the model's output) and the slot it was computed from.
    pub(super) exit: B,
    pub(super) exit_from: Option<usize>,
    /// Gradient of `n_l`, and the second stream-gradient buffer (`d_residual` is written here,
    /// then swapped with the running gradient: the op's `d_s` and `d_residual` are distinct
    /// buffers).
    pub(super) dn: B,
    pub(super) g2: B,
    pub(super) scratch: S,
}

impl<B, S> State<B, S> {
    /// Zeroed activations for `blocks` blocks of `tokens` rows of `hidden`, each buffer from
    /// `zeros(len)`.
    pub(super) fn new(
        cfg: PreNorm,
        (blocks, tokens, hidden): (usize, usize, usize),
        mut zeros: impl FnMut(usize) -> Result<B>,
        scratch: S,
    ) -> Result<Self> {
        let n = tokens * hidden;
        let mut many = |len: usize| (0..blocks).map(|_| zeros(len)).collect::<Result<Vec<_>>>();
        Ok(State {
            cfg,
            stream: many(n)?,
            nrm: many(n)?,
            mean: many(tokens)?,
            rstd: many(tokens)?,
            outs: many(n)?,
            exit: zeros(n)?,
            exit_from: None,
            dn: zeros(n)?,
            g2: zeros(n)?,
            scratch,
        })
    }

    /// Starts the exit from slot `output` (`backward`: its backward, which needs its forward from
    /// the same slot). `None` for slot 0, which is then done: every block was dropped, the output
    /// is the input, and there is nothing to add or differentiate. Otherwise `Some(j)`, the block
    /// whose output the exit adds.
    pub(super) fn begin_exit(&mut self, output: usize, backward: bool) -> Result<Option<usize>> {
        if backward && self.exit_from != Some(output) {
            return Err(Error::invalid(
                "mlp",
                format!("the exit's backward from slot {output} without its forward"),
            ));
        }
        if output == 0 {
            self.exit_from = Some(0);
            return Ok(None);
        }
        Ok(Some(output - 1))
    }

    /// What the loss of slot `output` reads: the exit's output, which must have run from that
    /// slot; for slot 0 (every block dropped) the exit left the stream at the model's `input`.
    pub(super) fn output<'a>(&'a self, output: usize, input: &'a B) -> Result<&'a B> {
        if self.exit_from != Some(output) {
            return Err(Error::invalid(
                "mlp",
                format!("the pre-norm loss of slot {output} needs exit_forward({output}) first"),
            ));
        }
        Ok(if output == 0 { input } else { &self.exit })
    }
}
