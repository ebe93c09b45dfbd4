//! [`DropoutAddNorm`]: `s = residual + rowscale * dropout(x + bias)`, `out = norm(s) * scale` on
//! candle tensors, with autograd into both outputs, through [`crate::dropout_add_norm`].
//!
//! # How the two outputs and the statistics travel
//!
//! A candle custom op has one output, so the forward op returns one packed `[2, rows, cols]`
//! buffer (`out`, then `s`) that [`DropoutAddNorm::forward`] splits with `narrow` (views, no
//! copy); gradients of either half reach the op's `bwd` as one `[2, rows, cols]` gradient (candle
//! fills the half nobody used with zeros), which gives the fused backward its `d_out` and `d_s`.
//!
//! The per-row statistics (mean, rstd: `2 * rows` f32) are kept, not recomputed: the forward op
//! writes them into a buffer that the op object in candle's graph holds (behind a mutex, set once
//! by the forward) until the graph is dropped. Recomputing them would mean reading `s` once more
//! in the backward (a full pass over `[rows, cols]`) to save `8 * rows` bytes; PyTorch and the
//! fused kernels' own interface make the same choice. The backward reads `s` from the forward's
//! packed output, which candle's graph keeps anyway.
//!
//! `gamma`, `beta` and `bias` are joined into one `[k * cols]` tensor with `Tensor::cat` (a
//! `k * cols` copy; candle's custom ops take at most three inputs) and their gradients come back
//! the same way, from one packed backward buffer.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::storage::{check_tensor, cpu_out, cpu_slice, dispatch, rows_cols, Elem};
use super::{check_site, wrap, StepKeys};
use crate::dropout_add_norm::{cpu, layer_norm_scaling, Config, DropPath, Norm};
use crate::dropping::DropRate;
use crate::error::Error;

const OP: &str = "candle::DropoutAddNorm";
const FWD: &str = "fusedreg-dropout-add-norm";
const BWD: &str = "fusedreg-dropout-add-norm-bwd";

/// One pre-norm site of a transformer block: the sub-block's output `x` (plus `bias`) goes through
/// dropout (and an optional drop path), joins the residual stream, and the new stream is
/// normalised (LayerNorm or RMSNorm) and scaled:
///
/// ```text
/// s   = residual + rowscale[row] * keep(i) * (x + bias[col]) / (1 - p)    the new stream
/// out = norm(s) * gamma (+ beta) * layer_scale                           the next sub-block's input
/// ```
///
/// [`forward`](Self::forward) returns `(out, s)`; both are differentiable, and one fused backward
/// gives the gradients of `x`, `residual`, `bias`, `gamma` and `beta` from those of `out` and `s`
/// (see *Gradients and memory* below). The arithmetic, the mask, the drop path and the
/// reduction orders are those of [`crate::dropout_add_norm`], so the CPU device gives the bits of
/// [`crate::dropout_add_norm::cpu`] and the CUDA device the kernels' (the same bits). Masks come
/// from the [`StepKeys`] and the site (random stream 0: element mask, 1: drop path) and are
/// regenerated in the backward. `layer_scale` is 1, or `1 / sqrt(layer)` with
/// [`with_layer_norm_scaling`](Self::with_layer_norm_scaling).
///
/// # Gradients and memory
///
/// `out` and `s` are two views of one `[2, rows, cols]` buffer; their gradients reach the fused
/// backward together (candle fills the half nobody used with zeros, which adds nothing). The
/// per-row statistics (`8 * rows` bytes) are kept from the forward until candle's graph is
/// dropped rather than recomputed, which would cost another read of `s`. `gamma`, `beta` and
/// `bias` are joined with `Tensor::cat` (a `cols`-sized copy each) into one input of the custom
/// op. No dropout mask is stored: the backward regenerates it from the keys.
///
/// # Examples
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use fusedreg::candle::{DropoutAddNorm, StepKeys};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let x = Var::randn(0f32, 1.0, (2, 8, 32), &dev)?; // the attention output
/// let stream = Var::randn(0f32, 1.0, (2, 8, 32), &dev)?; // the residual stream
/// let gamma = Var::ones(32, DType::F32, &dev)?;
/// let beta = Var::zeros(32, DType::F32, &dev)?;
/// let site = DropoutAddNorm::layer_norm(1e-5, 3)?.with_dropout(0.1)?.with_layer_norm_scaling(4)?;
/// let keys = StepKeys::new(42, 0);
/// let (out, s) = site.forward(&x, Some(&stream), None, &gamma, Some(&beta), Some(&keys))?;
/// // `out` feeds the MLP, `s` continues the stream: gradients flow from both.
/// let loss = (out.sqr()?.sum_all()? + s.sum_all()?)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&x).unwrap().dims(), &[2, 8, 32]);
/// assert_eq!(grads.get(&gamma).unwrap().dims(), &[32]);
/// // Each row of `out` has mean about beta = 0 and scale 1 / sqrt(4).
/// let row: Vec<f32> = out.get(0)?.get(0)?.to_vec1()?;
/// assert!((row.iter().sum::<f32>() / 32.0).abs() < 1e-5);
/// let var = row.iter().map(|v| v * v).sum::<f32>() / 32.0;
/// assert!((var - 0.25).abs() < 1e-3);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutAddNorm {
    norm: Norm,
    eps: f32,
    site: u32,
    rate: DropRate,
    /// (rate, rows per sample); None when there is no drop path or its rate is 0.
    drop_path: Option<(DropRate, usize)>,
    /// LayerNorm Scaling's 1-based layer; None: layer scale 1.
    layer: Option<usize>,
}

impl DropoutAddNorm {
    /// A LayerNorm site (`(s - mean) / sqrt(var + eps) * gamma + beta`) numbered `site` (`< 2^24`,
    /// unique among the model's dropout sites), with no dropout yet.
    ///
    /// Errors: `eps` that is not finite and positive as an f32; `site >= 2^24`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutAddNorm;
    /// use fusedreg::dropout_add_norm::Norm;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutAddNorm::layer_norm(1e-5, 2)?;
    /// assert_eq!((site.norm(), site.eps(), site.site(), site.p()), (Norm::LayerNorm, 1e-5, 2, 0.0));
    /// assert!(DropoutAddNorm::layer_norm(0.0, 2).is_err());
    /// assert!(DropoutAddNorm::layer_norm(1e-60, 2).is_err()); // 0 as an f32
    /// assert!(DropoutAddNorm::layer_norm(1e-5, 1 << 24).is_err());
    /// # Ok(()) }
    /// ```
    pub fn layer_norm(eps: f64, site: u32) -> candle_core::Result<Self> {
        Self::new(Norm::LayerNorm, eps, site)
    }

    /// An RMSNorm site (`s / sqrt(mean(s^2) + eps) * gamma (+ beta)`), otherwise as
    /// [`layer_norm`](Self::layer_norm).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutAddNorm;
    /// use fusedreg::dropout_add_norm::Norm;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(DropoutAddNorm::rms_norm(1e-6, 0)?.norm(), Norm::RmsNorm);
    /// assert!(DropoutAddNorm::rms_norm(f64::NAN, 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn rms_norm(eps: f64, site: u32) -> candle_core::Result<Self> {
        Self::new(Norm::RmsNorm, eps, site)
    }

    fn new(norm: Norm, eps: f64, site: u32) -> candle_core::Result<Self> {
        check_site(site)?;
        let eps32 = eps as f32;
        // The op's own check (finite, > 0) on the value it will use.
        Config::new(0, 1, norm, eps32)?;
        Ok(DropoutAddNorm {
            norm,
            eps: eps32,
            site,
            rate: DropRate::ZERO,
            drop_path: None,
            layer: None,
        })
    }

    /// Drops elements of `x + bias` with probability `p` (in `[0, 1]`) in training.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutAddNorm;
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(DropoutAddNorm::rms_norm(1e-6, 0)?.with_dropout(0.1)?.p(), 0.1);
    /// assert!(DropoutAddNorm::rms_norm(1e-6, 0)?.with_dropout(-0.1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_dropout(self, p: f64) -> candle_core::Result<Self> {
        Ok(DropoutAddNorm {
            rate: DropRate::new(p)?,
            ..self
        })
    }

    /// Adds a drop path in training: whole samples of `rows_per_sample` consecutive rows (the
    /// sequence length of a `[batch, seq, hidden]` tensor; 1 for per-row) lose their `x` with
    /// probability `p_path`, kept ones scale it by `1 / (1 - p_path)`. `p_path = 0` means none.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutAddNorm;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutAddNorm::layer_norm(1e-5, 0)?.with_drop_path(0.2, 128)?;
    /// assert_eq!(site.drop_path(), Some((0.2, 128)));
    /// assert!(DropoutAddNorm::layer_norm(1e-5, 0)?.with_drop_path(0.2, 0).is_err());
    /// assert!(DropoutAddNorm::layer_norm(1e-5, 0)?.with_drop_path(1.5, 1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, p_path: f64, rows_per_sample: usize) -> candle_core::Result<Self> {
        let path = DropPath::new(p_path, 0).and_then(|p| p.per_sample(rows_per_sample))?;
        Ok(DropoutAddNorm {
            drop_path: (p_path > 0.0).then_some((path.rate(), rows_per_sample)),
            ..self
        })
    }

    /// LayerNorm Scaling (Sun et al. 2025): the output is multiplied by `1 / sqrt(layer)` for the
    /// `layer`-th block (1-based; see [`layer_norm_scaling`]). It is part of the model, so it
    /// applies in evaluation (no keys) too.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::DropoutAddNorm;
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutAddNorm::layer_norm(1e-5, 0)?;
    /// assert_eq!(site.layer_scale(), 1.0);
    /// assert_eq!(site.with_layer_norm_scaling(16)?.layer_scale(), 0.25);
    /// assert!(site.with_layer_norm_scaling(0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_layer_norm_scaling(self, layer: usize) -> candle_core::Result<Self> {
        layer_norm_scaling(layer)?;
        Ok(DropoutAddNorm {
            layer: Some(layer),
            ..self
        })
    }

    /// The normaliser.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// use fusedreg::dropout_add_norm::Norm;
    /// assert_eq!(fusedreg::candle::DropoutAddNorm::layer_norm(1e-5, 0)?.norm(), Norm::LayerNorm);
    /// # Ok(()) }
    /// ```
    pub fn norm(&self) -> Norm {
        self.norm
    }

    /// The normaliser's eps, as the f32 the op uses.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::DropoutAddNorm::rms_norm(1e-6, 0)?.eps(), 1e-6f32);
    /// # Ok(()) }
    /// ```
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The site number.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// assert_eq!(fusedreg::candle::DropoutAddNorm::rms_norm(1e-6, 9)?.site(), 9);
    /// # Ok(()) }
    /// ```
    pub fn site(&self) -> u32 {
        self.site
    }

    /// The element drop probability in training.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// let site = fusedreg::candle::DropoutAddNorm::rms_norm(1e-6, 0)?;
    /// assert_eq!(site.with_dropout(0.25)?.p(), 0.25);
    /// # Ok(()) }
    /// ```
    pub fn p(&self) -> f64 {
        self.rate.p()
    }

    /// The drop path's `(p_path, rows_per_sample)`, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// let site = fusedreg::candle::DropoutAddNorm::rms_norm(1e-6, 0)?;
    /// assert_eq!(site.drop_path(), None);
    /// assert_eq!(site.with_drop_path(0.5, 4)?.drop_path(), Some((0.5, 4)));
    /// # Ok(()) }
    /// ```
    pub fn drop_path(&self) -> Option<(f64, usize)> {
        self.drop_path.map(|(r, n)| (r.p(), n))
    }

    /// The factor the normaliser's output is multiplied by: `1 / sqrt(layer)` with LayerNorm
    /// Scaling, else 1.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// let site = fusedreg::candle::DropoutAddNorm::rms_norm(1e-6, 0)?.with_layer_norm_scaling(4)?;
    /// assert_eq!(site.layer_scale(), 0.5);
    /// # Ok(()) }
    /// ```
    pub fn layer_scale(&self) -> f32 {
        // Validated when set.
        self.layer
            .map_or(1.0, |l| layer_norm_scaling(l).unwrap_or(1.0))
    }

    /// The [`Config`] a call on a `[rows, cols]` tensor uses: with `keys`, the site's dropout and
    /// drop path with that step's call ids; without (evaluation), p = 0 and no drop path. The
    /// layer scale is there in both. Use it to reproduce a mask (`cfg.keeps(i)`) or to call
    /// [`crate::dropout_add_norm::cpu`] directly.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::candle::{DropoutAddNorm, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let site = DropoutAddNorm::layer_norm(1e-5, 7)?.with_dropout(0.1)?.with_layer_norm_scaling(4)?;
    /// let keys = StepKeys::new(42, 3);
    /// let cfg = site.config(4, 16, Some(&keys))?;
    /// assert_eq!((cfg.seed(), cfg.call(), cfg.layer_scale()), (42, keys.call(7, 0)?, 0.5));
    /// let eval = site.config(4, 16, None)?;
    /// assert_eq!((eval.rate().p(), eval.layer_scale()), (0.0, 0.5));
    /// assert!(site.config(4, 0, None).is_err()); // no columns to normalise over
    /// # Ok(()) }
    /// ```
    pub fn config(
        &self,
        rows: usize,
        cols: usize,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<Config> {
        let mut cfg = Config::new(rows, cols, self.norm, self.eps)?;
        if let Some(layer) = self.layer {
            cfg = cfg.with_layer_norm_scaling(layer)?;
        }
        let Some(keys) = keys else {
            return Ok(cfg);
        };
        cfg = cfg.with_dropout(self.rate.p(), keys.seed(), keys.call(self.site, 0)?)?;
        if let Some((rate, per_sample)) = self.drop_path {
            let path = DropPath::new(rate.p(), keys.call(self.site, 1)?)
                .and_then(|p| p.per_sample(per_sample))?;
            cfg = cfg.with_drop_path(path);
        }
        Ok(cfg)
    }

    /// `(out, s)`: `s = residual + rowscale * dropout(x + bias)` with the masks of `keys`
    /// (training) or `s = residual + x + bias` without keys (evaluation), and `out = norm(s) *
    /// gamma (+ beta) * layer_scale`. `x` and `residual` are `[..., cols]` (rows = the product of
    /// the leading dimensions); `bias`, `gamma` and `beta` are `[cols]`; f32, f16 or bf16, all
    /// the same, on one device. Without a residual `s = rowscale * dropout(x + bias)` (the first
    /// block). Non-contiguous inputs are copied first.
    ///
    /// Errors: a dtype other than f32/f16/bf16, arguments of different dtypes or devices,
    /// `residual` of another shape than `x`, a scalar `x` or one with no columns, `gamma`, `beta`
    /// or `bias` that is not `[cols]`, a per-sample drop path on 2^32 rows or more.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::candle::{DropoutAddNorm, StepKeys};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [0.5, 0.5, -1.0, 2.0]], &dev)?;
    /// let r = Tensor::ones((2, 4), DType::F32, &dev)?;
    /// let gamma = Tensor::ones(4, DType::F32, &dev)?;
    /// let site = DropoutAddNorm::rms_norm(1e-6, 0)?.with_dropout(0.5)?;
    /// // Evaluation: s = x + r exactly.
    /// let (out, s) = site.forward(&x, Some(&r), None, &gamma, None, None)?;
    /// assert_eq!(s.to_vec2::<f32>()?, (&x + &r)?.to_vec2::<f32>()?);
    /// let ms: f32 = out.sqr()?.mean_all()?.to_scalar()?;
    /// assert!((ms - 1.0).abs() < 1e-4); // RMSNorm: unit mean square with gamma = 1
    /// // Training: an element is dropped (s = r) or kept ((x / 0.5) + r).
    /// let (_, s) = site.forward(&x, Some(&r), None, &gamma, None, Some(&StepKeys::new(1, 0)))?;
    /// let (sv, xv) = (s.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
    /// assert!(sv.iter().zip(&xv).all(|(&s, &x)| s == 1.0 || s == x * 2.0 + 1.0));
    /// // Bad input is an error: gamma of the wrong length, mixed dtypes.
    /// let g3 = Tensor::ones(3, DType::F32, &dev)?;
    /// assert!(site.forward(&x, Some(&r), None, &g3, None, None).is_err());
    /// let r16 = r.to_dtype(DType::F16)?;
    /// assert!(site.forward(&x, Some(&r16), None, &gamma, None, None).is_err());
    /// # Ok(()) }
    /// ```
    pub fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        bias: Option<&Tensor>,
        gamma: &Tensor,
        beta: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        check_tensor(OP, "x", x, x)?;
        if let Some(r) = residual {
            check_tensor(OP, "residual", r, x)?;
            if r.dims() != x.dims() {
                return Err(wrap(Error::shape(
                    OP,
                    format!("residual {:?} and x {:?} differ", r.dims(), x.dims()),
                )));
            }
        }
        let (rows, cols) = rows_cols(OP, "x", x)?;
        let per_column = [("gamma", Some(gamma)), ("beta", beta), ("bias", bias)];
        for (what, t) in per_column {
            if let Some(t) = t {
                check_tensor(OP, what, t, x)?;
                if t.dims() != [cols] {
                    return Err(wrap(Error::shape(
                        OP,
                        format!(
                            "{what} is {:?}, expected [{cols}] (one per column)",
                            t.dims()
                        ),
                    )));
                }
            }
        }
        let cfg = self.config(rows, cols, keys)?;
        let layout = Packing::new(&cfg, residual.is_some(), beta.is_some(), bias.is_some())?;
        // gamma, then beta, then bias: one input of the custom op.
        let params: Vec<Tensor> = per_column.iter().filter_map(|(_, t)| t.cloned()).collect();
        let params = if params.len() == 1 {
            gamma.contiguous()?
        } else {
            Tensor::cat(&params, 0)?
        };
        let op = Fwd {
            cfg,
            layout,
            stats: Arc::new(Mutex::new(None)),
        };
        let x = x.contiguous()?;
        let packed = match residual {
            None => x.apply_op2(&params, op)?,
            Some(r) => x.apply_op3(&r.contiguous()?, &params, op)?,
        };
        let out = packed.narrow(0, 0, 1)?.reshape(x.shape())?;
        let s = packed.narrow(0, 1, 1)?.reshape(x.shape())?;
        Ok((out, s))
    }
}

/// Which optional inputs a call has, and the element counts of the packed buffers.
#[derive(Clone, Copy, Debug)]
struct Packing {
    residual: bool,
    beta: bool,
    bias: bool,
    /// rows * cols.
    n: usize,
    cols: usize,
}

impl Packing {
    fn new(cfg: &Config, residual: bool, beta: bool, bias: bool) -> candle_core::Result<Self> {
        let p = Packing {
            residual,
            beta,
            bias,
            n: cfg.len(),
            cols: cfg.cols(),
        };
        // Both packed sizes must exist before any buffer is sized from them.
        p.n.checked_mul(2)
            .ok_or_else(|| wrap(Error::shape(OP, "2 * rows * cols overflows")))?;
        p.grads_len()?;
        Ok(p)
    }

    /// gamma, beta?, bias?: vectors of `cols` in the params input and its gradient.
    fn params(&self) -> usize {
        1 + usize::from(self.beta) + usize::from(self.bias)
    }

    /// dx, d_residual?, then the params' gradients.
    fn grads_len(&self) -> candle_core::Result<usize> {
        let streams = if self.residual { 2 } else { 1 };
        self.n
            .checked_mul(streams)
            .and_then(|a| a.checked_add(self.params() * self.cols))
            .ok_or_else(|| wrap(Error::shape(OP, "the packed gradient's size overflows")))
    }

    /// (gamma, beta, bias) cut from the params input.
    fn split<'a, V: Sliceable<'a>>(&self, params: V) -> (V, Option<V>, Option<V>) {
        let c = self.cols;
        let beta = self.beta.then(|| params.sub(c, 2 * c));
        let at = if self.beta { 2 * c } else { c };
        let bias = self.bias.then(|| params.sub(at, at + c));
        (params.sub(0, c), beta, bias)
    }
}

/// What `Packing::split` cuts: a CPU slice or a CUDA view.
trait Sliceable<'a>: Sized {
    fn sub(&self, from: usize, to: usize) -> Self;
}

impl<'a, T> Sliceable<'a> for &'a [T] {
    fn sub(&self, from: usize, to: usize) -> Self {
        let all: &'a [T] = self;
        &all[from..to]
    }
}

#[cfg(feature = "candle-cuda")]
impl<'a, T> Sliceable<'a> for cudarc::driver::CudaView<'a, T> {
    fn sub(&self, from: usize, to: usize) -> Self {
        self.slice(from..to)
    }
}

/// The per-row mean then rstd (`2 * rows` f32) the forward wrote, on the device it ran on.
enum Stats {
    Cpu(Vec<f32>),
    #[cfg(feature = "candle-cuda")]
    Cuda(cudarc::driver::CudaSlice<f32>),
}

impl Stats {
    fn cpu(&self) -> Option<&[f32]> {
        match self {
            Stats::Cpu(v) => Some(v),
            #[cfg(feature = "candle-cuda")]
            Stats::Cuda(_) => None,
        }
    }
}

/// The forward custom op: (x, params) or (x, residual, params) -> `[2, rows, cols]` (out, s).
struct Fwd {
    cfg: Config,
    layout: Packing,
    /// Set by the forward, read by `bwd` (see the module docs).
    stats: Arc<Mutex<Option<Arc<Stats>>>>,
}

impl Fwd {
    fn keep(&self, stats: Stats) {
        // A panic elsewhere while the lock was held cannot leave a half-written Option.
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(stats));
    }

    fn out_shape(&self) -> Shape {
        Shape::from((2, self.cfg.rows(), self.cfg.cols()))
    }

    fn bwd_impl(
        &self,
        x: &Tensor,
        params: &Tensor,
        packed: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                wrap(Error::invalid(
                    BWD,
                    "the forward kept no statistics (it did not run)",
                ))
            })?;
        let op = Bwd {
            cfg: self.cfg,
            layout: self.layout,
            stats,
        };
        let l = self.layout;
        let grads = grad
            .contiguous()?
            .apply_op3_no_bwd(&packed.contiguous()?, params, &op)?;
        let x_dims = x.shape();
        let dx = grads.narrow(0, 0, l.n)?.reshape(x_dims)?;
        let (d_res, at) = if l.residual {
            (Some(grads.narrow(0, l.n, l.n)?.reshape(x_dims)?), 2 * l.n)
        } else {
            (None, l.n)
        };
        let d_params = grads.narrow(0, at, l.params() * l.cols)?;
        Ok((dx, d_res, d_params))
    }
}

fn fwd_cpu<T: Elem>(
    op: &Fwd,
    (sx, lx): (&CpuStorage, &Layout),
    residual: Option<(&CpuStorage, &Layout)>,
    (sp, lp): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = cpu_slice::<T>(FWD, "x", sx, lx)?;
    let r = residual
        .map(|(s, l)| cpu_slice::<T>(FWD, "residual", s, l))
        .transpose()?;
    let params = cpu_slice::<T>(FWD, "params", sp, lp)?;
    check_len(
        FWD,
        "params",
        params.len(),
        op.layout.params() * op.layout.cols,
    )?;
    let (gamma, beta, bias) = op.layout.split(params);
    let n = op.layout.n;
    let rows = op.cfg.rows();
    let mut packed = vec![T::default(); 2 * n];
    let mut stats = vec![0f32; 2 * rows];
    {
        let (out, s) = packed.split_at_mut(n);
        let (mean, rstd) = stats.split_at_mut(rows);
        let args = cpu::ForwardArgs {
            residual: r,
            beta,
            bias,
            ..cpu::ForwardArgs::new(x, gamma)
        };
        let outs = cpu::ForwardOut { out, s, mean, rstd };
        cpu::forward(&op.cfg, args, outs)?;
    }
    op.keep(Stats::Cpu(stats));
    Ok(cpu_out(packed, op.out_shape()))
}

#[cfg(feature = "candle-cuda")]
fn fwd_cuda<T: Elem>(
    op: &Fwd,
    (sx, lx): (&candle_core::CudaStorage, &Layout),
    residual: Option<(&candle_core::CudaStorage, &Layout)>,
    (sp, lp): (&candle_core::CudaStorage, &Layout),
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    use crate::dropout_add_norm::{ForwardArgs, ForwardOut};
    let dev = &sx.device;
    let h = cuda_handle(dev)?;
    let x = cuda_view::<T>(FWD, "x", sx, lx)?;
    let r = residual
        .map(|(s, l)| cuda_view::<T>(FWD, "residual", s, l))
        .transpose()?;
    let params = cuda_view::<T>(FWD, "params", sp, lp)?;
    check_len(
        FWD,
        "params",
        params.len(),
        op.layout.params() * op.layout.cols,
    )?;
    let (gamma, beta, bias) = op.layout.split(params);
    let n = op.layout.n;
    let rows = op.cfg.rows();
    // SAFETY: the forward writes every element of out, s, mean and rstd.
    let mut packed = unsafe { cuda_alloc::<T>(dev, 2 * n)? };
    // SAFETY: as above.
    let mut stats = unsafe { cuda_alloc::<f32>(dev, 2 * rows)? };
    {
        let (out, mut s) = packed.split_at_mut(n);
        let s = s.slice_mut(..n);
        let (mean, mut rstd) = stats.split_at_mut(rows);
        let rstd = rstd.slice_mut(..rows);
        let args = ForwardArgs {
            residual: r,
            beta,
            bias,
            ..ForwardArgs::new(x, gamma)
        };
        let outs = ForwardOut { out, s, mean, rstd };
        crate::dropout_add_norm::forward(&h, &op.cfg, args, outs)?;
    }
    op.keep(Stats::Cuda(stats));
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(packed, dev.clone()),
        op.out_shape(),
    ))
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> candle_core::Result<()> {
    crate::error::check_len(op, what, got, want).map_err(wrap)
}

impl CustomOp2 for Fwd {
    fn name(&self) -> &'static str {
        FWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(FWD, s1.dtype(), fwd_cpu(self, (s1, l1), None, (s2, l2)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(FWD, s1.dtype(), fwd_cuda(self, (s1, l1), None, (s2, l2)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        packed: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, _, d_params) = self.bwd_impl(x, params, packed, grad)?;
        Ok((Some(dx), Some(d_params)))
    }
}

impl CustomOp3 for Fwd {
    fn name(&self) -> &'static str {
        FWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(
            FWD,
            s1.dtype(),
            fwd_cpu(self, (s1, l1), Some((s2, l2)), (s3, l3))
        )
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(
            FWD,
            s1.dtype(),
            fwd_cuda(self, (s1, l1), Some((s2, l2)), (s3, l3))
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        params: &Tensor,
        packed: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, d_res, d_params) = self.bwd_impl(x, params, packed, grad)?;
        Ok((Some(dx), d_res, Some(d_params)))
    }
}

/// The backward custom op on (grad of the packed output, the packed output, params): one buffer
/// of dx, d_residual (with a residual), then dgamma, dbeta?, dbias?. It has no backward of its
/// own (no second derivatives through this op).
struct Bwd {
    cfg: Config,
    layout: Packing,
    stats: Arc<Stats>,
}

fn bwd_cpu<T: Elem>(
    op: &Bwd,
    (sg, lg): (&CpuStorage, &Layout),
    (sp, lp): (&CpuStorage, &Layout),
    (sq, lq): (&CpuStorage, &Layout),
) -> candle_core::Result<(CpuStorage, Shape)> {
    let stats = op.stats.cpu().ok_or_else(|| {
        wrap(Error::invalid(
            BWD,
            "the forward's statistics are on another device",
        ))
    })?;
    let l = op.layout;
    let (n, rows) = (l.n, op.cfg.rows());
    let grad = cpu_slice::<T>(BWD, "grad", sg, lg)?;
    let packed = cpu_slice::<T>(BWD, "packed output", sp, lp)?;
    let params = cpu_slice::<T>(BWD, "params", sq, lq)?;
    check_len(BWD, "grad", grad.len(), 2 * n)?;
    check_len(BWD, "packed output", packed.len(), 2 * n)?;
    check_len(BWD, "params", params.len(), l.params() * l.cols)?;
    let (d_out, d_s) = grad.split_at(n);
    let s = &packed[n..];
    let (gamma, _, _) = l.split(params);
    let (mean, rstd) = stats.split_at(rows);
    let total = l.grads_len()?;
    let mut out = vec![T::default(); total];
    {
        let (dx, rest) = out.split_at_mut(n);
        let (d_res, rest) = if l.residual {
            let (d, rest) = rest.split_at_mut(n);
            (Some(d), rest)
        } else {
            (None, rest)
        };
        let (dgamma, rest) = rest.split_at_mut(l.cols);
        let (dbeta, dbias) = if l.beta {
            let (b, rest) = rest.split_at_mut(l.cols);
            (Some(b), rest)
        } else {
            (None, rest)
        };
        let args = cpu::BackwardArgs {
            d_s: Some(d_s),
            ..cpu::BackwardArgs::new(d_out, s, gamma, mean, rstd)
        };
        let outs = cpu::BackwardOut {
            d_residual: d_res,
            dbeta,
            dbias: l.bias.then_some(dbias),
            ..cpu::BackwardOut::new(dx, dgamma)
        };
        cpu::backward(&op.cfg, args, outs)?;
    }
    Ok(cpu_out(out, Shape::from(total)))
}

#[cfg(feature = "candle-cuda")]
fn bwd_cuda<T: Elem>(
    op: &Bwd,
    (sg, lg): (&candle_core::CudaStorage, &Layout),
    (sp, lp): (&candle_core::CudaStorage, &Layout),
    (sq, lq): (&candle_core::CudaStorage, &Layout),
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use super::storage::{cuda_alloc, cuda_handle, cuda_view};
    use crate::dropout_add_norm::{BackwardArgs, BackwardOut};
    let Stats::Cuda(stats) = &*op.stats else {
        return Err(wrap(Error::invalid(
            BWD,
            "the forward's statistics are on another device",
        )));
    };
    let dev = &sg.device;
    let h = cuda_handle(dev)?;
    let l = op.layout;
    let (n, rows) = (l.n, op.cfg.rows());
    let grad = cuda_view::<T>(BWD, "grad", sg, lg)?;
    let packed = cuda_view::<T>(BWD, "packed output", sp, lp)?;
    let params = cuda_view::<T>(BWD, "params", sq, lq)?;
    check_len(BWD, "grad", grad.len(), 2 * n)?;
    check_len(BWD, "packed output", packed.len(), 2 * n)?;
    check_len(BWD, "params", params.len(), l.params() * l.cols)?;
    let (d_out, d_s) = grad.split_at(n);
    let s = packed.slice(n..2 * n);
    let (gamma, _, _) = l.split(params);
    let mean = stats.slice(..rows);
    let rstd = stats.slice(rows..2 * rows);
    let total = l.grads_len()?;
    // SAFETY: the backward writes dx, d_residual and every column gradient (zeros with no rows).
    let mut out = unsafe { cuda_alloc::<T>(dev, total)? };
    {
        let mut all = out.slice_mut(..total);
        let (dx, mut rest) = all.split_at_mut(n);
        let (d_res, mut rest) = if l.residual {
            let (d, rest) = rest.split_at_mut(n);
            (Some(d), rest)
        } else {
            (None, rest.slice_mut(..))
        };
        let (dgamma, mut rest) = rest.split_at_mut(l.cols);
        let (dbeta, dbias) = if l.beta {
            let (b, rest) = rest.split_at_mut(l.cols);
            (Some(b), rest)
        } else {
            (None, rest.slice_mut(..))
        };
        let args = BackwardArgs {
            d_s: Some(d_s),
            ..BackwardArgs::new(d_out, s, gamma, mean, rstd)
        };
        let outs = BackwardOut {
            d_residual: d_res,
            dbeta,
            dbias: l.bias.then_some(dbias),
            ..BackwardOut::new(dx, dgamma)
        };
        crate::dropout_add_norm::backward(&h, &op.cfg, args, outs)?;
    }
    Ok((
        candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(total),
    ))
}

impl CustomOp3 for Bwd {
    fn name(&self) -> &'static str {
        BWD
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch!(BWD, s1.dtype(), bwd_cpu(self, (s1, l1), (s2, l2), (s3, l3)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        dispatch!(
            BWD,
            s1.dtype(),
            bwd_cuda(self, (s1, l1), (s2, l2), (s3, l3))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn fwd(cfg: Config) -> candle_core::Result<Fwd> {
        Ok(Fwd {
            cfg,
            layout: Packing::new(&cfg, false, false, false)?,
            stats: Arc::new(Mutex::new(None)),
        })
    }

    /// The custom op refuses strided layouts (the public `forward` copies before reaching it).
    #[test]
    fn custom_op_refuses_non_contiguous() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let gamma = Tensor::ones(4, DType::F32, &dev)?;
        let cfg = Config::new(6, 4, Norm::LayerNorm, 1e-5)?;
        let err = x.apply_op2_no_bwd(&gamma, &fwd(cfg)?).unwrap_err();
        assert!(err.to_string().contains("not contiguous"), "{err}");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the op itself, and a
    /// backward whose statistics never came is an error, not a panic.
    #[test]
    fn custom_op_refuses_mixed_dtypes_and_missing_statistics() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let gamma = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = Config::new(2, 3, Norm::RmsNorm, 1e-5)?;
        let op = fwd(cfg)?;
        let err = x.apply_op2_no_bwd(&gamma, &op).unwrap_err();
        assert!(err.to_string().contains("dtype"), "{err}");
        let packed = Tensor::zeros((2, 2, 3), DType::F32, &dev)?;
        let err = op.bwd_impl(&x, &gamma, &packed, &packed).unwrap_err();
        assert!(err.to_string().contains("statistics"), "{err}");
        Ok(())
    }
}
