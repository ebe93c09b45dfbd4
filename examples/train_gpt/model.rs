//! The model of the `train_gpt` example: a small GPT-style, pre-norm, byte-level transformer whose
//! parameters are candle `Var`s, with one forward written twice over the same weights:
//!
//! * [`Path::Candle`]: candle's own ops only (`candle_nn::ops::dropout`, LayerNorm and
//!   label-smoothed cross-entropy written with candle ops that have a backward, drop path written
//!   with candle ops: candle has none);
//! * [`Path::Fused`]: the same model through fusedreg's candle adapter (see [`fused`]).
//!
//! Both compute the same function; with dropout off (evaluation) they agree up to rounding, which
//! `tests/candle_gpt.rs` checks. Shared by the example and that test (`#[path]` include), so it
//! holds no `main` and prints nothing.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use fusedreg::candle::StepKeys;

/// Model and regularisation settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GptConfig {
    /// Token alphabet size (256: bytes).
    pub vocab: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size (divisible by `heads`).
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Context length (positions).
    pub context: usize,
    /// MLP width = `mlp_ratio * hidden`.
    pub mlp_ratio: usize,
    /// Element dropout at every site except the attention probabilities.
    pub dropout: f64,
    /// Dropout of the attention probabilities.
    pub attn_dropout: f64,
    /// Drop path rate of the last block; block `l` (0-based) gets `drop_path * l / (layers - 1)`
    /// (the linear schedule of Huang et al. 2016 / timm: the first block is never dropped).
    pub drop_path: f64,
    /// Label smoothing of the training loss.
    pub label_smoothing: f64,
    /// LayerNorm Scaling (Sun et al. 2025): both pre-norms of block `l` (1-based) scaled by
    /// `1/sqrt(l)`; the final norm is not scaled.
    pub layer_norm_scaling: bool,
    /// LayerNorm epsilon.
    pub eps: f64,
}

impl GptConfig {
    /// The drop path rate of block `block` (0-based) under the linear schedule.
    pub fn drop_path_rate(&self, block: usize) -> f64 {
        if self.layers <= 1 {
            0.0
        } else {
            self.drop_path * block as f64 / (self.layers - 1) as f64
        }
    }

    /// The output scale of block `block`'s (0-based) pre-norms.
    pub fn norm_scale(&self, block: usize) -> f64 {
        if self.layer_norm_scaling {
            1.0 / ((block + 1) as f64).sqrt()
        } else {
            1.0
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Checks the shape settings (an error, not a panic later in a reshape).
    pub fn validate(&self) -> Result<()> {
        let ok = self.vocab > 0
            && self.layers > 0
            && self.heads > 0
            && self.hidden > 0
            && self.hidden % self.heads == 0
            && self.context > 0
            && self.mlp_ratio > 0;
        if !ok {
            candle_core::bail!("bad model shape {self:?} (hidden must be a multiple of heads)");
        }
        for p in [self.dropout, self.attn_dropout, self.drop_path] {
            if !(0.0..1.0).contains(&p) {
                candle_core::bail!("dropout rates must lie in [0, 1), got {p}");
            }
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            candle_core::bail!("label smoothing must lie in [0, 1]");
        }
        Ok(())
    }
}

/// Which implementation of the regularisation and loss a forward uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// candle's own ops.
    Candle,
    /// fusedreg's adapter ops.
    Fused,
}

impl Path {
    /// Lower-case name (CSV column values, file names).
    pub fn name(self) -> &'static str {
        match self {
            Path::Candle => "candle",
            Path::Fused => "fusedreg",
        }
    }
}

/// One transformer block's parameters (weights stored `[in, out]`, applied as `x @ w`).
pub struct Block {
    pub ln1_g: Var,
    pub ln1_b: Var,
    pub w_qkv: Var,
    pub b_qkv: Var,
    pub w_o: Var,
    pub b_o: Var,
    pub ln2_g: Var,
    pub ln2_b: Var,
    pub w_fc: Var,
    pub b_fc: Var,
    pub w_proj: Var,
    pub b_proj: Var,
}

/// The model: token and position embeddings, `layers` pre-norm blocks, final LayerNorm, untied
/// head.
pub struct Gpt {
    pub cfg: GptConfig,
    pub tok: Var,
    pub pos: Var,
    pub blocks: Vec<Block>,
    pub lnf_g: Var,
    pub lnf_b: Var,
    pub head: Var,
    /// `[context, context]`: 0 on and below the diagonal, -inf above (causal attention).
    causal: Tensor,
}

/// A seeded generator for the initial weights (SplitMix64 + Box-Muller), so that both runs of
/// the example start from the same bits on any device without depending on candle's RNG.
struct InitRng(u64);

impl InitRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2) = (self.uniform(), self.uniform());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (z * std) as f32
            })
            .collect()
    }
}

impl Gpt {
    /// GPT-2's initialisation from `seed`: weights N(0, 0.02) (the two projections into the
    /// residual stream by a further `1/sqrt(2 layers)`), biases 0, norm gains 1.
    pub fn new(cfg: &GptConfig, seed: u64, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = InitRng(seed);
        let (d, v, t, f) = (
            cfg.hidden,
            cfg.vocab,
            cfg.context,
            cfg.hidden * cfg.mlp_ratio,
        );
        let proj_std = 0.02 / (2.0 * cfg.layers as f64).sqrt();
        let mut normal = |dims: (usize, usize), std: f64| {
            Var::from_vec(rng.normal(dims.0 * dims.1, std), dims, dev)
        };
        let zeros = |n: usize| Var::zeros(n, DType::F32, dev);
        let ones = |n: usize| Var::ones(n, DType::F32, dev);
        let tok = normal((v, d), 0.02)?;
        let pos = normal((t, d), 0.02)?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            blocks.push(Block {
                ln1_g: ones(d)?,
                ln1_b: zeros(d)?,
                w_qkv: normal((d, 3 * d), 0.02)?,
                b_qkv: zeros(3 * d)?,
                w_o: normal((d, d), proj_std)?,
                b_o: zeros(d)?,
                ln2_g: ones(d)?,
                ln2_b: zeros(d)?,
                w_fc: normal((d, f), 0.02)?,
                b_fc: zeros(f)?,
                w_proj: normal((f, d), proj_std)?,
                b_proj: zeros(d)?,
            });
        }
        let head = normal((d, v), 0.02)?;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Gpt {
            cfg: cfg.clone(),
            tok,
            pos,
            blocks,
            lnf_g: ones(d)?,
            lnf_b: zeros(d)?,
            head,
            causal: Tensor::from_vec(mask, (t, t), dev)?,
        })
    }

    /// Every parameter, each with whether it takes weight decay (the 2-d matrices and embeddings
    /// do; biases and norm gains do not, as in GPT-2 / nanoGPT).
    pub fn vars(&self) -> Vec<(Var, bool)> {
        let mut out = vec![(self.tok.clone(), true), (self.pos.clone(), true)];
        for b in &self.blocks {
            for v in [
                &b.ln1_g, &b.ln1_b, &b.w_qkv, &b.b_qkv, &b.w_o, &b.b_o, &b.ln2_g, &b.ln2_b,
                &b.w_fc, &b.b_fc, &b.w_proj, &b.b_proj,
            ] {
                out.push((v.clone(), v.rank() == 2));
            }
        }
        out.push((self.lnf_g.clone(), false));
        out.push((self.lnf_b.clone(), false));
        out.push((self.head.clone(), true));
        out
    }

    /// Number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.vars().iter().map(|(v, _)| v.elem_count()).sum()
    }

    /// Logits `[batch * seq, vocab]` for `tokens` (`[batch, seq]`, u32, `seq <= context`).
    /// `keys = Some` trains (every dropout site and drop path on; the candle path ignores the
    /// keys' values and draws from candle's RNG), `None` evaluates (no dropout).
    pub fn forward(&self, path: Path, tokens: &Tensor, keys: Option<&StepKeys>) -> Result<Tensor> {
        let (emb, b, t) = self.embed(tokens)?;
        let h = match path {
            Path::Candle => plain::trunk(self, emb, b, t, keys.is_some())?,
            Path::Fused => fused::trunk(self, emb, b, t, keys)?,
        };
        h.matmul(self.head.as_tensor())
    }

    /// The embedding output `[b*t, d]` (token plus position) of `tokens` (`[b, t]`, u32, `t <=
    /// context`), with `b` and `t`.
    pub fn embed(&self, tokens: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (b, t) = tokens.dims2()?;
        if t == 0 || t > self.cfg.context {
            candle_core::bail!("sequence length {t} must lie in 1..={}", self.cfg.context);
        }
        let d = self.cfg.hidden;
        let ids = tokens.flatten_all()?;
        let emb = self
            .tok
            .embedding(&ids)?
            .reshape((b, t, d))?
            .broadcast_add(&self.pos.narrow(0, 0, t)?)?
            .reshape((b * t, d))?;
        Ok((emb, b, t))
    }

    /// Causal self-attention of block `blk` on the normed input `h` (`[b*t, d]`), up to (not
    /// including) the output bias; `probs_dropout` is applied to the attention probabilities.
    pub fn attention(
        &self,
        blk: &Block,
        h: &Tensor,
        (b, t): (usize, usize),
        probs_dropout: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (d, nh, hd) = (self.cfg.hidden, self.cfg.heads, self.cfg.head_dim());
        let qkv = h
            .matmul(blk.w_qkv.as_tensor())?
            .broadcast_add(blk.b_qkv.as_tensor())?
            .reshape((b, t, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?; // [3, b, heads, t, hd]
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let mask = self.causal.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let att = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?
            .broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?; // composed ops: has a backward
        let att = probs_dropout(&att)?;
        att.matmul(&v)? // [b, heads, t, hd]
            .transpose(1, 2)?
            .reshape((b * t, d))?
            .matmul(blk.w_o.as_tensor())
    }
}

/// LayerNorm over the last dimension written with candle ops (all with a backward; candle-nn's
/// fused `layer_norm` has none), times `scale` (LayerNorm Scaling; 1 = none). Biased variance,
/// as `torch.nn.LayerNorm`.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    scale: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let y = xn.broadcast_mul(gamma)?.broadcast_add(beta)?;
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

/// Label-smoothed cross-entropy in candle ops, PyTorch's definition: mean over rows of
/// `(1 - alpha) * (-log p[target]) + alpha * mean_j(-log p[j])`. `alpha = 0` is the plain
/// cross-entropy (the held-out metric of both runs).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, alpha: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    if alpha == 0.0 {
        return nll.mean_all();
    }
    let smooth = logp.mean(D::Minus1)?.neg()?;
    ((nll * (1.0 - alpha))? + (smooth * alpha)?)?.mean_all()
}

/// The candle-only path.
mod plain {
    use super::*;

    fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
        if train && p > 0.0 {
            candle_nn::ops::dropout(x, p as f32)
        } else {
            Ok(x.clone())
        }
    }

    /// Drop path on `x` (`[b*t, d]`): each sample's rows zeroed with probability `p`, kept ones
    /// scaled by `1/(1-p)` (candle has no such op: a per-sample mask from `Tensor::rand`).
    fn drop_path(x: &Tensor, p: f64, (b, t): (usize, usize), train: bool) -> Result<Tensor> {
        if !train || p == 0.0 {
            return Ok(x.clone());
        }
        let keep = Tensor::rand(0f32, 1f32, (b, 1, 1), x.device())?.ge(p)?;
        let scale = (keep.to_dtype(x.dtype())? * (1.0 / (1.0 - p)))?;
        let d = x.dim(1)?;
        x.reshape((b, t, d))?
            .broadcast_mul(&scale)?
            .reshape((b * t, d))
    }

    /// Embedding output -> final-normed hidden states `[b*t, d]`.
    pub(super) fn trunk(m: &Gpt, emb: Tensor, b: usize, t: usize, train: bool) -> Result<Tensor> {
        let c = &m.cfg;
        let mut x = dropout(&emb, c.dropout, train)?;
        for (l, blk) in m.blocks.iter().enumerate() {
            let (p_path, scale) = (c.drop_path_rate(l), c.norm_scale(l));
            let h = layer_norm(&x, &blk.ln1_g, &blk.ln1_b, c.eps, scale)?;
            let a = m.attention(blk, &h, (b, t), |att| dropout(att, c.attn_dropout, train))?;
            let a = dropout(&a.broadcast_add(&blk.b_o)?, c.dropout, train)?;
            x = (x + drop_path(&a, p_path, (b, t), train)?)?;
            let h = layer_norm(&x, &blk.ln2_g, &blk.ln2_b, c.eps, scale)?;
            let u = h.matmul(&blk.w_fc)?.broadcast_add(&blk.b_fc)?.gelu()?;
            let u = dropout(&u, c.dropout, train)?;
            let o = u.matmul(&blk.w_proj)?.broadcast_add(&blk.b_proj)?;
            let o = dropout(&o, c.dropout, train)?;
            x = (x + drop_path(&o, p_path, (b, t), train)?)?;
        }
        layer_norm(&x, &m.lnf_g, &m.lnf_b, c.eps, 1.0)
    }
}

/// The fusedreg path. Every dropout site is a fusedreg op keyed by the step's keys and a site
/// number, so no mask is stored for the backward. Sites: 0 = the embedding dropout (at the first
/// norm's entry); block `l` uses `1 + 4 l + k` with k = 0 attention probabilities
/// ([`Dropout`]), 1 attention output (the entry of the block's second norm), 2 MLP hidden
/// ([`BiasActDropout`]: bias + GELU + dropout), 3 MLP output (the entry of the next norm).
pub mod fused {
    use super::*;
    use fusedreg::bias_act_dropout::Activation;
    use fusedreg::candle::{BiasActDropout, Dropout, DropoutAddNorm};

    /// The site number of block `block`'s site `k` (see the module docs).
    pub fn site(block: usize, k: u32) -> u32 {
        1 + 4 * block as u32 + k
    }

    /// The fused entry of a pre-norm: `s = residual + rowscale * dropout(x + bias)` and
    /// `out = LayerNorm(s) * 1/sqrt(layer)` (LayerNorm Scaling when `layer` is given).
    fn entry(
        c: &GptConfig,
        site: u32,
        (p_path, rows_per_sample): (f64, usize),
        layer: Option<usize>,
    ) -> Result<DropoutAddNorm> {
        let op = DropoutAddNorm::layer_norm(c.eps, site)?
            .with_dropout(c.dropout)?
            .with_drop_path(p_path, rows_per_sample)?;
        match layer {
            Some(l) if c.layer_norm_scaling => op.with_layer_norm_scaling(l),
            _ => Ok(op),
        }
    }

    /// Embedding output -> final-normed hidden states `[b*t, d]`.
    pub(super) fn trunk(
        m: &Gpt,
        emb: Tensor,
        b: usize,
        t: usize,
        keys: Option<&StepKeys>,
    ) -> Result<Tensor> {
        let c = &m.cfg;
        let first = &m.blocks[0];
        let (mut h, mut s) = entry(c, 0, (0.0, t), Some(1))?.forward(
            &emb,
            None,
            None,
            &first.ln1_g,
            Some(&first.ln1_b),
            keys,
        )?;
        let mlp = |l: usize| BiasActDropout::new(Activation::GeluTanh, c.dropout, site(l, 2));
        for (l, blk) in m.blocks.iter().enumerate() {
            let p_path = c.drop_path_rate(l);
            let probs = Dropout::new(c.attn_dropout, site(l, 0))?;
            let a = m.attention(blk, &h, (b, t), |att| probs.forward(att, None, keys))?;
            let (h2, s2) = entry(c, site(l, 1), (p_path, t), Some(l + 1))?.forward(
                &a,
                Some(&s),
                Some(&blk.b_o),
                &blk.ln2_g,
                Some(&blk.ln2_b),
                keys,
            )?;
            let u = mlp(l)?.forward(&h2.matmul(&blk.w_fc)?, Some(&blk.b_fc), keys)?;
            let o = u.matmul(&blk.w_proj)?;
            // The next pre-norm: the next block's first (layer l + 2), or the final norm (not
            // scaled).
            let (gamma, beta, layer) = match m.blocks.get(l + 1) {
                Some(next) => (&next.ln1_g, &next.ln1_b, Some(l + 2)),
                None => (&m.lnf_g, &m.lnf_b, None),
            };
            (h, s) = entry(c, site(l, 3), (p_path, t), layer)?.forward(
                &o,
                Some(&s2),
                Some(&blk.b_proj),
                gamma,
                Some(beta),
                keys,
            )?;
        }
        Ok(h)
    }
}
