//! Which sub-blocks are redundant, and what removing them costs: the pieces of the example's
//! `--prune` mode (see `experiment.rs`), shared with `tests/candle_gpt.rs`.
//!
//! * Block Influence per sub-block, `BI_i = 1 - mean over tokens of cos(x_i, x_{i+1})` with `x_i`
//!   the residual stream entering sub-block `i` (ShortGPT, Men et al. 2024; per sub-layer as in
//!   He et al. 2024), recomputed here in f64 from the streams of an evaluation forward written
//!   in candle ops ([`bi_f64`]): the check of the fused ops' meter.
//! * Pruned forwards: every sub-block kept, skipped (the stream passes unchanged) or replaced by
//!   a linear map ([`Action`], [`hidden`]).
//! * ReplaceMe (Shopkhoev et al. 2025): each contiguous span of removed sub-blocks replaced by
//!   one linear map fitted by least squares on calibration text ([`fit_spans`]).
//!
//! Sub-block `i` is the attention of layer `i / 2` when `i` is even and its MLP when `i` is odd:
//! the order in which they add to the stream.

use candle_core::{DType, Device, Result, Tensor};

use super::model::{cross_entropy, layer_norm, Gpt};
use super::train;

/// The ridge of ReplaceMe's normal equations, relative to the mean diagonal of `X_in^T X_in`.
pub const RIDGE: f64 = 1e-3;

/// The name of sub-block `i` (`attn3`, `mlp3`).
pub fn name(i: usize) -> String {
    format!("{}{}", if i % 2 == 0 { "attn" } else { "mlp" }, i / 2)
}

/// What a pruned forward does with one sub-block.
#[derive(Clone, Debug)]
pub enum Action {
    /// Computed as trained.
    Keep,
    /// Removed: the stream passes unchanged.
    Skip,
    /// Replaced, with the rest of its span, by `x + x D` (`D` is `[d, d]`): the linear map `I +
    /// D` of ReplaceMe, applied at the span's first sub-block (the others are [`Action::Skip`]).
    Map(Tensor),
}

/// `f_i(x)`: what sub-block `i` adds to the stream `x` (`[b*t, d]`), without dropout.
pub fn sub_block(m: &Gpt, i: usize, x: &Tensor, bt: (usize, usize)) -> Result<Tensor> {
    let (l, c) = (i / 2, &m.cfg);
    let blk = &m.blocks[l];
    let scale = c.norm_scale(l);
    if i % 2 == 0 {
        let h = layer_norm(x, &blk.ln1_g, &blk.ln1_b, c.eps, scale)?;
        m.attention(blk, &h, bt, |a| Ok(a.clone()))?
            .broadcast_add(&blk.b_o)
    } else {
        let h = layer_norm(x, &blk.ln2_g, &blk.ln2_b, c.eps, scale)?;
        h.matmul(&blk.w_fc)?
            .broadcast_add(&blk.b_fc)?
            .gelu()?
            .matmul(&blk.w_proj)?
            .broadcast_add(&blk.b_proj)
    }
}

/// Every sub-block kept.
pub fn full_plan(m: &Gpt) -> Vec<Action> {
    vec![Action::Keep; 2 * m.cfg.layers]
}

/// The sub-blocks in `removed` skipped, the others kept.
pub fn removal_plan(m: &Gpt, removed: &[usize]) -> Vec<Action> {
    let mut plan = full_plan(m);
    for &i in removed {
        plan[i] = Action::Skip;
    }
    plan
}

/// The final-normed hidden states `[b*t, d]` of `tokens` under `plan` (one action per sub-block),
/// in evaluation (no dropout). With `streams`, pushes the stream entering every sub-block and
/// the stream after the last one (`2 * layers + 1` tensors).
pub fn hidden(
    m: &Gpt,
    tokens: &Tensor,
    plan: &[Action],
    mut streams: Option<&mut Vec<Tensor>>,
) -> Result<Tensor> {
    if plan.len() != 2 * m.cfg.layers {
        candle_core::bail!(
            "a plan has one action per sub-block: {} for {} layers",
            plan.len(),
            m.cfg.layers
        );
    }
    let (mut x, b, t) = m.embed(tokens)?;
    for (i, act) in plan.iter().enumerate() {
        if let Some(s) = streams.as_deref_mut() {
            s.push(x.clone());
        }
        x = match act {
            Action::Keep => (&x + sub_block(m, i, &x, (b, t))?)?,
            Action::Skip => x,
            Action::Map(dm) => (&x + x.matmul(dm)?)?,
        };
    }
    if let Some(s) = streams {
        s.push(x.clone());
    }
    layer_norm(&x, &m.lnf_g, &m.lnf_b, m.cfg.eps, 1.0)
}

/// Mean plain cross-entropy under `plan` over the windows at `offsets` of `data`, `batch` windows
/// at a time (the held-out metric of [`train::eval_loss`], for a pruned model).
pub fn loss(
    m: &Gpt,
    plan: &[Action],
    data: &[u8],
    offsets: &[usize],
    batch: usize,
    dev: &Device,
) -> Result<f64> {
    let mut total = 0.0;
    for chunk in offsets.chunks(batch.max(1)) {
        let (x, y) = train::batch(data, chunk, m.cfg.context, dev)?;
        let logits = hidden(m, &x, plan, None)?.matmul(m.head.as_tensor())?;
        total +=
            f64::from(cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()?) * chunk.len() as f64;
    }
    Ok(if offsets.is_empty() {
        f64::NAN
    } else {
        total / offsets.len() as f64
    })
}

/// Rows of `[rows, d]` f32 tensors, on the host.
fn rows_of(t: &Tensor) -> Result<(Vec<f32>, usize)> {
    let d = t.dim(1)?;
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, d))
}

/// BI of every sub-block of the full model on the windows at `offsets`, in f64 from the streams
/// of [`hidden`]: `1 - mean cos(x_i, x_{i+1})` over the rows where neither stream is zero (the
/// meter's convention; `None` when no row counts).
pub fn bi_f64(
    m: &Gpt,
    data: &[u8],
    offsets: &[usize],
    batch: usize,
    dev: &Device,
) -> Result<Vec<Option<f64>>> {
    let n = 2 * m.cfg.layers;
    let (mut sum, mut count) = (vec![0.0f64; n], vec![0usize; n]);
    for chunk in offsets.chunks(batch.max(1)) {
        let (x, _) = train::batch(data, chunk, m.cfg.context, dev)?;
        let mut streams = Vec::with_capacity(n + 1);
        hidden(m, &x, &full_plan(m), Some(&mut streams))?;
        let host = streams.iter().map(rows_of).collect::<Result<Vec<_>>>()?;
        for i in 0..n {
            let ((r, d), (s, _)) = (&host[i], &host[i + 1]);
            for (rr, ss) in r.chunks(*d).zip(s.chunks(*d)) {
                let (mut dot, mut nr, mut ns) = (0.0f64, 0.0f64, 0.0f64);
                for (&a, &b) in rr.iter().zip(ss) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    dot += a * b;
                    nr += a * a;
                    ns += b * b;
                }
                if nr > 0.0 && ns > 0.0 {
                    sum[i] += dot / (nr.sqrt() * ns.sqrt());
                    count[i] += 1;
                }
            }
        }
    }
    Ok(sum
        .iter()
        .zip(&count)
        .map(|(&s, &c)| (c > 0).then(|| 1.0 - s / c as f64))
        .collect())
}

/// The contiguous runs `[a, b)` of the sub-block indices in `removed`, in order.
///
/// `spans(&[5, 1, 2, 7, 6])` is `[(1, 3), (5, 8)]`.
pub fn spans(removed: &[usize]) -> Vec<(usize, usize)> {
    let mut v = removed.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for i in v {
        match out.last_mut() {
            Some((_, b)) if *b == i => *b = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// ReplaceMe: for each span `[a, b)`, the `D` (`[d, d]`) minimising `|X_a (I + D) - X_b|² +
/// lambda |D|²` over the calibration windows at `offsets`, `X_a` and `X_b` the full model's
/// streams entering sub-block `a` and leaving sub-block `b - 1`. The Gram matrices
/// `X_a^T X_a` and `X_a^T (X_b - X_a)` are candle matmuls (f32, on the model's device); the
/// `d x d` normal equations `(X_a^T X_a + lambda I) D = X_a^T (X_b - X_a)` are solved on the host
/// in f64 by Cholesky, with `lambda = `[`RIDGE`]` * trace(X_a^T X_a) / d`. The ridge pulls `D`
/// towards 0, i.e. the map towards the identity (plain removal), never towards the zero map.
/// Each span is fitted on the unpruned model's streams, independently of the others.
pub fn fit_spans(
    m: &Gpt,
    spans: &[(usize, usize)],
    data: &[u8],
    offsets: &[usize],
    batch: usize,
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let d = m.cfg.hidden;
    let mut grams: Vec<Option<(Tensor, Tensor)>> = vec![None; spans.len()];
    for chunk in offsets.chunks(batch.max(1)) {
        let (x, _) = train::batch(data, chunk, m.cfg.context, dev)?;
        let mut streams = Vec::new();
        hidden(m, &x, &full_plan(m), Some(&mut streams))?;
        for (g, &(a, b)) in grams.iter_mut().zip(spans) {
            let (xa, xb) = (&streams[a], &streams[b]);
            let xat = xa.t()?;
            let gg = xat.matmul(xa)?;
            let cc = xat.matmul(&(xb - xa)?)?;
            *g = Some(match g.take() {
                None => (gg, cc),
                Some((g0, c0)) => ((g0 + gg)?, (c0 + cc)?),
            });
        }
    }
    let mut maps = Vec::with_capacity(spans.len());
    for g in grams {
        let Some((gg, cc)) = g else {
            candle_core::bail!("ReplaceMe needs calibration windows");
        };
        let to_f64 = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let (mut a, c) = (to_f64(&gg)?, to_f64(&cc)?);
        let lambda = RIDGE * (0..d).map(|i| a[i * d + i]).sum::<f64>() / d as f64;
        for i in 0..d {
            a[i * d + i] += lambda.max(f64::MIN_POSITIVE);
        }
        let Some(sol) = solve_spd(&a, &c, d) else {
            candle_core::bail!("ReplaceMe: the normal equations are not positive definite");
        };
        let sol: Vec<f32> = sol.into_iter().map(|v| v as f32).collect();
        maps.push(Tensor::from_vec(sol, (d, d), dev)?);
    }
    Ok(maps)
}

/// The plan that replaces each span by its map (see [`Action::Map`]).
pub fn replaceme_plan(m: &Gpt, spans: &[(usize, usize)], maps: &[Tensor]) -> Vec<Action> {
    let mut plan = full_plan(m);
    for (&(a, b), dm) in spans.iter().zip(maps) {
        plan[a] = Action::Map(dm.clone());
        for p in &mut plan[a + 1..b] {
            *p = Action::Skip;
        }
    }
    plan
}

/// Solves `A X = B` for a symmetric positive definite `A` (`d x d`, row-major) and `B` (`d x
/// c`, row-major, `c = b.len() / d`) by Cholesky, in f64; `None` when `A` is not positive
/// definite.
pub fn solve_spd(a: &[f64], b: &[f64], d: usize) -> Option<Vec<f64>> {
    // A = L L^T, L lower triangular, row-major.
    let mut l = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = a[i * d + i] - s;
                // Negated on purpose: NaN is not positive definite either.
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                if !(v > 0.0) {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    let c = b.len() / d;
    let mut x = b.to_vec();
    for col in 0..c {
        // L y = b, then L^T x = y, in place in column `col`.
        for i in 0..d {
            let s: f64 = (0..i).map(|k| l[i * d + k] * x[k * c + col]).sum();
            x[i * c + col] = (x[i * c + col] - s) / l[i * d + i];
        }
        for i in (0..d).rev() {
            let s: f64 = (i + 1..d).map(|k| l[k * d + i] * x[k * c + col]).sum();
            x[i * c + col] = (x[i * c + col] - s) / l[i * d + i];
        }
    }
    Some(x)
}

/// The `k` sub-blocks of lowest BI (a sub-block without a BI ranks last), ties by index.
pub fn lowest(bi: &[Option<f64>], k: usize) -> Vec<usize> {
    let key = |i: usize| bi[i].filter(|b| !b.is_nan()).unwrap_or(f64::INFINITY);
    let mut idx: Vec<usize> = (0..bi.len()).collect();
    idx.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// `k` distinct sub-blocks of `n`, drawn uniformly from the generator (a partial Fisher-Yates
/// shuffle), sorted.
pub fn random(n: usize, k: usize, rng: &mut train::Sampler) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx.sort_unstable();
    idx
}
