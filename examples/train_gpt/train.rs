//! Data, optimizer and one training step of the `train_gpt` example, for both paths (shared with
//! `tests/candle_gpt.rs`).

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use fusedreg::candle::{AdamWParams, CrossEntropy, StepKeys};

use super::model::{cross_entropy, Gpt, Path};

/// The corpus committed in the repository (provenance and license in its header).
pub const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/paradise_lost.txt");

/// The line that ends the corpus file's header.
const MARKER: &[u8] = b"\n=== TEXT ===\n";

/// A byte-level corpus split into a training part and a held-out part.
pub struct Corpus {
    pub train: Vec<u8>,
    pub heldout: Vec<u8>,
}

impl Corpus {
    /// Reads `path`, drops the header (everything up to the marker line) and splits
    /// deterministically: the last `heldout_fraction` of the bytes are held out (the text's last
    /// books: a contiguous tail, so no training window overlaps a held-out one).
    pub fn load(path: &str, heldout_fraction: f64) -> std::io::Result<Self> {
        let all = std::fs::read(path)?;
        let start = all
            .windows(MARKER.len())
            .position(|w| w == MARKER)
            .map(|i| i + MARKER.len())
            .ok_or_else(|| std::io::Error::other(format!("{path}: no \"=== TEXT ===\" line")))?;
        let text = &all[start..];
        let cut = text.len() - (text.len() as f64 * heldout_fraction) as usize;
        Ok(Corpus {
            train: text[..cut].to_vec(),
            heldout: text[cut..].to_vec(),
        })
    }
}

/// SplitMix64: the batch sampler's generator (seeded, the same sequence for both runs).
pub struct Sampler(pub u64);

impl Sampler {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is below `n / 2^64`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `batch` windows of `t + 1` bytes at random offsets of `data`.
    pub fn offsets(&mut self, data_len: usize, batch: usize, t: usize) -> Vec<usize> {
        let span = (data_len - t) as u64; // callers check data_len > t
        (0..batch)
            .map(|_| (self.next_u64() % span) as usize)
            .collect()
    }
}

/// Inputs `[batch, t]` and next-byte targets `[batch * t]` (u32) of the windows at `offsets`.
pub fn batch(data: &[u8], offsets: &[usize], t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    if data.len() <= t {
        candle_core::bail!("text of {} bytes is too short for context {t}", data.len());
    }
    let mut x = Vec::with_capacity(offsets.len() * t);
    let mut y = Vec::with_capacity(offsets.len() * t);
    for &o in offsets {
        x.extend(data[o..o + t].iter().map(|&c| u32::from(c)));
        y.extend(data[o + 1..o + t + 1].iter().map(|&c| u32::from(c)));
    }
    Ok((
        Tensor::from_vec(x, (offsets.len(), t), dev)?,
        Tensor::from_vec(y, offsets.len() * t, dev)?,
    ))
}

/// Optimizer settings shared by both runs.
#[derive(Clone, Debug)]
pub struct OptimConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clipping threshold (0 = none).
    pub clip: f64,
}

/// The optimizer of one run: AdamW with weight decay on the matrices only, after global-norm
/// clipping.
pub enum Optim {
    /// candle_nn's AdamW, two instances (it has one weight decay for all its Vars), clipping in
    /// candle ops (on the device, no host sync).
    Candle {
        decay: AdamW,
        no_decay: AdamW,
        vars: Vec<Var>,
        clip: f64,
    },
    /// fusedreg's AdamW: one optimizer for all Vars, per-Var weight decay, clipping inside its
    /// step (on CUDA: the multi-tensor norm and AdamW kernels, Vars updated in place).
    Fused(fusedreg::candle::AdamW),
}

impl Optim {
    /// The optimizer of `path` over `model`'s parameters.
    pub fn new(path: Path, model: &Gpt, cfg: &OptimConfig) -> Result<Self> {
        let params = |wd: f64| ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: wd,
        };
        let vars = model.vars();
        let pick = |decay: bool| -> Vec<Var> {
            vars.iter()
                .filter(|(_, d)| *d == decay)
                .map(|(v, _)| v.clone())
                .collect()
        };
        match path {
            Path::Fused => {
                let params = AdamWParams {
                    config: fusedreg::adamw::AdamWConfig {
                        lr: cfg.lr as f32,
                        beta1: cfg.beta1 as f32,
                        beta2: cfg.beta2 as f32,
                        eps: cfg.eps as f32,
                        ..Default::default()
                    },
                    weight_decay: cfg.weight_decay as f32,
                    max_grad_norm: (cfg.clip > 0.0).then_some(cfg.clip as f32),
                };
                // The same grouping as the candle run (rank >= 2 decays).
                let flags: Vec<bool> = vars.iter().map(|(_, d)| *d).collect();
                let vars = vars.into_iter().map(|(v, _)| v).collect();
                let wd = cfg.weight_decay as f32;
                Ok(Optim::Fused(fusedreg::candle::AdamW::with_weight_decay(
                    vars,
                    params,
                    |i, _| if flags[i] { wd } else { 0.0 },
                )?))
            }
            Path::Candle => Ok(Optim::Candle {
                decay: AdamW::new(pick(true), params(cfg.weight_decay))?,
                no_decay: AdamW::new(pick(false), params(0.0))?,
                vars: vars.into_iter().map(|(v, _)| v).collect(),
                clip: cfg.clip,
            }),
        }
    }

    /// Sets the learning rate (the schedule calls this every step).
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optim::Candle {
                decay, no_decay, ..
            } => {
                decay.set_learning_rate(lr);
                no_decay.set_learning_rate(lr);
            }
            Optim::Fused(opt) => opt.set_learning_rate(lr),
        }
    }

    /// Clips and applies `grads`.
    pub fn step(&mut self, mut grads: GradStore) -> Result<()> {
        match self {
            Optim::Candle {
                decay,
                no_decay,
                vars,
                clip,
            } => {
                if *clip > 0.0 {
                    clip_in_candle_ops(vars, &mut grads, *clip)?;
                }
                decay.step(&grads)?;
                no_decay.step(&grads)
            }
            Optim::Fused(opt) => opt.step(&grads),
        }
    }
}

/// Scales every gradient by `min(1, clip / (norm + 1e-6))`, `norm` the global L2 norm (PyTorch's
/// `clip_grad_norm_`), with candle ops on the device.
fn clip_in_candle_ops(vars: &[Var], grads: &mut GradStore, clip: f64) -> Result<()> {
    let mut squares = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v) {
            squares.push(g.sqr()?.sum_all()?);
        }
    }
    if squares.is_empty() {
        return Ok(());
    }
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?;
    let factor = ((norm + 1e-6)?.recip()? * clip)?.clamp(0f32, 1f32)?;
    for v in vars {
        if let Some(g) = grads.remove(v) {
            grads.insert(v, g.broadcast_mul(&factor)?);
        }
    }
    Ok(())
}

/// The learning rate at `step` (0-based) of `steps`: linear warm-up over the first 10% of the
/// steps, then cosine decay to 10% of `peak`.
pub fn lr_at(step: usize, steps: usize, peak: f64) -> f64 {
    let warm = (steps / 10).max(1);
    if step < warm {
        return peak * (step + 1) as f64 / warm as f64;
    }
    let progress = (step - warm) as f64 / (steps - warm).max(1) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
    peak * (0.1 + 0.9 * cosine)
}

/// One training step of `path`: forward with dropout on, the training loss (label-smoothed),
/// backward, clip + optimizer step. Returns the loss tensor (reading it syncs the device).
#[allow(dead_code)] // used by tests/candle_gpt.rs
pub fn train_step(
    path: Path,
    model: &Gpt,
    opt: &mut Optim,
    batch: (&Tensor, &Tensor),
    keys: &StepKeys,
) -> Result<Tensor> {
    train_step_sampled(path, model, opt, batch, keys, || {})
}

/// [`train_step`], calling `sample` after the forward, the backward and the optimizer step (the
/// example samples device memory there).
pub fn train_step_sampled(
    path: Path,
    model: &Gpt,
    opt: &mut Optim,
    (x, y): (&Tensor, &Tensor),
    keys: &StepKeys,
    mut sample: impl FnMut(),
) -> Result<Tensor> {
    let logits = model.forward(path, x, Some(keys))?;
    let alpha = model.cfg.label_smoothing;
    let loss = match path {
        Path::Candle => cross_entropy(&logits, y, alpha)?,
        // Byte targets are always in [0, 256): no out-of-range check, so no host wait on CUDA
        // (the candle run does not wait there either).
        Path::Fused => CrossEntropy::new()
            .without_target_check()
            .with_label_smoothing(alpha)?
            .forward(&logits, y)?,
    };
    sample();
    let grads = loss.backward()?;
    sample();
    opt.step(grads)?;
    sample();
    Ok(loss)
}

/// Mean plain (unsmoothed) cross-entropy of `model` without dropout over the windows at
/// `offsets` of `data`, `batch` windows at a time: the held-out metric, computed by the same
/// candle ops for both runs.
pub fn eval_loss(
    path: Path,
    model: &Gpt,
    data: &[u8],
    offsets: &[usize],
    batch_size: usize,
    dev: &Device,
) -> Result<f64> {
    let t = model.cfg.context;
    let mut total = 0.0;
    let mut n = 0usize;
    for chunk in offsets.chunks(batch_size.max(1)) {
        let (x, y) = batch(data, chunk, t, dev)?;
        let logits = model.forward(path, &x, None)?;
        total +=
            f64::from(cross_entropy(&logits, &y, 0.0)?.to_scalar::<f32>()?) * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(if n == 0 { f64::NAN } else { total / n as f64 })
}

/// `count` evenly spaced window offsets over `data` (the fixed held-out set).
pub fn even_offsets(data_len: usize, t: usize, count: usize) -> Vec<usize> {
    if data_len <= t || count == 0 {
        return Vec::new();
    }
    let span = data_len - t;
    (0..count).map(|i| i * span / count).collect()
}
