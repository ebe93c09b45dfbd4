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

use candle_core::{Result, Shape, Tensor};

use super::redundancy::BlockInfluence;
use super::shell::{
    self, cpu_out, packed_len, split_parts, unpack, CpuInputs, CpuOut, Elem, Op, Pass,
};
use super::site::{site_methods, Site};
use super::StepKeys;
use crate::dropout_add_norm::{cpu, layer_norm_scaling, Config, Norm};
use crate::error::{check_len, Error};
#[cfg(feature = "candle-cuda")]
use {
    super::shell::{CudaInputs, CudaOut},
    crate::Handle,
};

const OP: &str = "candle::DropoutAddNorm";

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
    /// The dropout rate (0 until [`with_dropout`](Self::with_dropout)), site and drop path.
    site: Site,
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
    pub fn layer_norm(eps: f64, site: u32) -> Result<Self> {
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
    pub fn rms_norm(eps: f64, site: u32) -> Result<Self> {
        Self::new(Norm::RmsNorm, eps, site)
    }

    fn new(norm: Norm, eps: f64, site: u32) -> Result<Self> {
        let site = Site::new(0.0, site)?;
        let eps32 = eps as f32;
        // The op's own check (finite, > 0) on the value it will use.
        Config::new(0, 1, norm, eps32)?;
        Ok(DropoutAddNorm {
            norm,
            eps: eps32,
            site,
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
    pub fn with_dropout(self, p: f64) -> Result<Self> {
        Ok(DropoutAddNorm {
            site: self.site.with_rate(p)?,
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
    pub fn with_layer_norm_scaling(self, layer: usize) -> Result<Self> {
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

    site_methods!(drop_path);

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
    /// layer scale is there in both. Use it to reproduce a mask (`cfg.keeps(dtype, i)`) or to call
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
    pub fn config(&self, rows: usize, cols: usize, keys: Option<&StepKeys>) -> Result<Config> {
        let mut cfg = Config::new(rows, cols, self.norm, self.eps)?;
        if let Some(layer) = self.layer {
            cfg = cfg.with_layer_norm_scaling(layer)?;
        }
        let Some(d) = self.site.draw(keys)? else {
            return Ok(cfg);
        };
        cfg = cfg.with_dropout(d.p, d.seed, d.call)?;
        if let Some(path) = d.path {
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
    ) -> Result<(Tensor, Tensor)> {
        self.run(x, residual, bias, gamma, beta, keys, None)
    }

    /// This site with every forward's rows' `cos(residual, s)` added to `meter`'s site `site`
    /// (Block Influence, see [`BlockInfluence`]). The outputs and gradients are those of
    /// [`forward`](Self::forward).
    ///
    /// Errors: `site` not below the meter's sites. A forward on another device than the
    /// meter's is an error.
    ///
    /// # Examples
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use fusedreg::candle::{BlockInfluence, DropoutAddNorm};
    /// # fn main() -> candle_core::Result<()> {
    /// let (dev, meter) = (Device::Cpu, BlockInfluence::new(1, &Device::Cpu)?);
    /// let site = DropoutAddNorm::rms_norm(1e-6, 0)?;
    /// let x = Tensor::randn(0f32, 1.0, (3, 16), &dev)?;
    /// let gamma = Tensor::ones(16, DType::F32, &dev)?;
    /// let (out, s) = site.measured(&meter, 0)?.forward(&x, Some(&x), None, &gamma, None, None)?;
    /// assert_eq!(meter.stats()?[0].rows, 3); // s = 2x: cos 1 on every row
    /// assert!(meter.bi()?[0].unwrap().abs() < 1e-6);
    /// assert!(site.measured(&meter, 1).is_err());
    /// # let _ = (out, s);
    /// # Ok(()) }
    /// ```
    pub fn measured<'m>(&'m self, meter: &'m BlockInfluence, site: usize) -> Result<Measured<'m>> {
        meter.check_site(site)?;
        Ok(Measured {
            op: self,
            meter,
            site,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        bias: Option<&Tensor>,
        gamma: &Tensor,
        beta: Option<&Tensor>,
        keys: Option<&StepKeys>,
        meter: Option<(BlockInfluence, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        shell::check_tensor(OP, "x", x, x)?;
        shell::check_same_shape(OP, "residual", residual, x)?;
        let (rows, cols) = shell::rows_cols(OP, "x", x)?;
        let per_column = [("gamma", Some(gamma)), ("beta", beta), ("bias", bias)];
        for (what, t) in per_column {
            shell::check_per_column(OP, what, t, x, cols)?;
        }
        let cfg = self.config(rows, cols, keys)?;
        let layout = Packing::new(&cfg, residual.is_some(), beta.is_some(), bias.is_some())?;
        // gamma, then beta, then bias: one input of the custom op.
        let params: Vec<Tensor> = per_column.iter().filter_map(|(_, t)| t.cloned()).collect();
        let params = if params.len() == 1 {
            gamma.clone()
        } else {
            Tensor::cat(&params, 0)?
        };
        let op = Fwd {
            cfg,
            layout,
            stats: Arc::new(Mutex::new(None)),
            meter,
        };
        let ins: Vec<&Tensor> = [Some(x), residual, Some(&params)]
            .into_iter()
            .flatten()
            .collect();
        let packed = Op(op).apply(&ins)?;
        let out = packed.narrow(0, 0, 1)?.reshape(x.shape())?;
        let s = packed.narrow(0, 1, 1)?.reshape(x.shape())?;
        Ok((out, s))
    }
}

/// A [`DropoutAddNorm`] site measured by a [`BlockInfluence`] meter
/// ([`DropoutAddNorm::measured`]).
#[derive(Clone, Copy, Debug)]
pub struct Measured<'m> {
    op: &'m DropoutAddNorm,
    meter: &'m BlockInfluence,
    site: usize,
}

impl Measured<'_> {
    /// [`DropoutAddNorm::forward`], adding the rows' `cos(residual, s)` to the meter's site.
    pub fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        bias: Option<&Tensor>,
        gamma: &Tensor,
        beta: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> Result<(Tensor, Tensor)> {
        let meter = Some((self.meter.clone(), self.site));
        self.op.run(x, residual, bias, gamma, beta, keys, meter)
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
    fn new(cfg: &Config, residual: bool, beta: bool, bias: bool) -> Result<Self> {
        let p = Packing {
            residual,
            beta,
            bias,
            n: cfg.len(),
            cols: cfg.cols(),
        };
        // Both packed sizes must exist before any buffer is sized from them.
        p.n.checked_mul(2)
            .ok_or_else(|| Error::shape(OP, "2 * rows * cols overflows"))?;
        packed_len(OP, &p.grads_lens())?;
        Ok(p)
    }

    /// gamma, beta?, bias?: vectors of `cols` in the params input and its gradient.
    fn params(&self) -> usize {
        1 + usize::from(self.beta) + usize::from(self.bias)
    }

    /// The packed gradient's parts: dx, d_residual (0 without a residual), dgamma, dbeta, dbias
    /// (0 without beta, bias).
    fn grads_lens(&self) -> [usize; 5] {
        let (n, c) = (self.n, self.cols);
        let has = |b: bool, len: usize| if b { len } else { 0 };
        [
            n,
            has(self.residual, n),
            c,
            has(self.beta, c),
            has(self.bias, c),
        ]
    }

    /// The params input's length: gamma, beta?, bias?.
    fn params_len(&self) -> usize {
        self.params() * self.cols
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

/// The forward pass on (x, [residual], params): `[2, rows, cols]` (out, s).
struct Fwd {
    cfg: Config,
    layout: Packing,
    /// Set by the forward, read by `bwd` (see the module docs).
    stats: Arc<Mutex<Option<Arc<Stats>>>>,
    /// The Block Influence meter and site the forward adds its rows to.
    meter: Option<(BlockInfluence, usize)>,
}

impl Fwd {
    fn keep(&self, stats: Stats) {
        // A panic elsewhere while the lock was held cannot leave a half-written Option.
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(stats));
    }

    fn out_shape(&self) -> Shape {
        Shape::from((2, self.cfg.rows(), self.cfg.cols()))
    }

    /// The input index of params (after x and the residual, if any).
    fn params_at(&self) -> usize {
        1 + usize::from(self.layout.residual)
    }
}

impl Pass for Fwd {
    const NAME: &'static str = "fusedreg-dropout-add-norm";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let l = self.layout;
        let x = ins.slice::<T>(0, "x")?;
        let residual = l.residual.then(|| ins.slice(1, "residual")).transpose()?;
        let params = ins.slice(self.params_at(), "params")?;
        check_len(Self::NAME, "params", params.len(), l.params_len())?;
        let (gamma, beta, bias) = l.split(params);
        let rows = self.cfg.rows();
        let meter = self.meter.as_ref().map(|(m, site)| (m.lock(), *site));
        let redundancy = meter
            .as_ref()
            .map(|(m, site)| m.cpu_site(OP, *site))
            .transpose()?;
        let mut packed = vec![T::default(); 2 * l.n];
        let mut stats = vec![0f32; 2 * rows];
        {
            split_parts!(packed.as_mut_slice() => out: l.n, s: l.n);
            split_parts!(stats.as_mut_slice() => mean: rows, rstd: rows);
            let args = cpu::ForwardArgs {
                residual,
                beta,
                bias,
                redundancy,
                ..cpu::ForwardArgs::new(x, gamma)
            };
            let outs = cpu::ForwardOut { out, s, mean, rstd };
            cpu::forward(&self.cfg, args, outs)?;
        }
        self.keep(Stats::Cpu(stats));
        Ok(cpu_out(packed, self.out_shape()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        use crate::dropout_add_norm::{ForwardArgs, ForwardOut};
        let l = self.layout;
        let x = ins.view::<T>(0, "x")?;
        let residual = l.residual.then(|| ins.view(1, "residual")).transpose()?;
        let params = ins.view(self.params_at(), "params")?;
        check_len(Self::NAME, "params", params.len(), l.params_len())?;
        let (gamma, beta, bias) = l.split(params);
        let rows = self.cfg.rows();
        let mut meter = self.meter.as_ref().map(|(m, site)| (m.lock(), *site));
        let redundancy = meter
            .as_mut()
            .map(|(m, site)| m.cuda_site(OP, *site))
            .transpose()?;
        // SAFETY: the forward writes every element of out, s, mean and rstd.
        let mut packed = unsafe { ins.alloc::<T>(2 * l.n)? };
        // SAFETY: as above.
        let mut stats = unsafe { ins.alloc::<f32>(2 * rows)? };
        {
            split_parts!(packed.slice_mut(..) => out: l.n, s: l.n);
            split_parts!(stats.slice_mut(..) => mean: rows, rstd: rows);
            let args = ForwardArgs {
                residual,
                beta,
                bias,
                redundancy,
                ..ForwardArgs::new(x, gamma)
            };
            let outs = ForwardOut { out, s, mean, rstd };
            crate::dropout_add_norm::forward(h, &self.cfg, args, outs)?;
        }
        self.keep(Stats::Cuda(stats));
        Ok(ins.out(packed, self.out_shape()))
    }

    fn bwd(&self, ins: &[&Tensor], packed: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::invalid(Bwd::NAME, "the forward kept no statistics (it did not run)")
            })?;
        let l = self.layout;
        let params = ins[self.params_at()];
        let bwd = Bwd {
            cfg: self.cfg,
            layout: l,
            stats,
        };
        let grads = Op(bwd).apply_no_bwd(&[grad, packed, params])?;
        let x_dims = ins[0].shape();
        let [dx, d_res, d_params] = unpack(
            &grads,
            [
                Some(x_dims.clone()),
                l.residual.then(|| x_dims.clone()),
                Some(Shape::from(l.params_len())),
            ],
        )?;
        let d_res = l.residual.then_some(d_res);
        Ok([Some(dx), d_res, Some(d_params)]
            .into_iter()
            .flatten()
            .collect())
    }
}

/// The backward pass on (grad of the packed output, the packed output, params): one buffer of
/// dx, d_residual (with a residual), then dgamma, dbeta?, dbias?.
struct Bwd {
    cfg: Config,
    layout: Packing,
    stats: Arc<Stats>,
}

impl Pass for Bwd {
    const NAME: &'static str = "fusedreg-dropout-add-norm-bwd";

    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut> {
        let stats = self.stats.cpu().ok_or_else(|| {
            Error::invalid(Self::NAME, "the forward's statistics are on another device")
        })?;
        let l = self.layout;
        let (n, rows) = (l.n, self.cfg.rows());
        let grad = ins.slice::<T>(0, "grad")?;
        let packed = ins.slice::<T>(1, "packed output")?;
        let params = ins.slice::<T>(2, "params")?;
        check_len(Self::NAME, "grad", grad.len(), 2 * n)?;
        check_len(Self::NAME, "packed output", packed.len(), 2 * n)?;
        check_len(Self::NAME, "params", params.len(), l.params_len())?;
        let (d_out, d_s) = grad.split_at(n);
        let s = &packed[n..];
        let (gamma, _, _) = l.split(params);
        let (mean, rstd) = stats.split_at(rows);
        let lens = l.grads_lens();
        let total = packed_len(Self::NAME, &lens)?;
        let mut out = vec![T::default(); total];
        {
            let [nx, nr, nc, nbeta, nbias] = lens;
            split_parts!(out.as_mut_slice() =>
                dx: nx, d_res: nr, dgamma: nc, dbeta: nbeta, dbias: nbias);
            let args = cpu::BackwardArgs {
                d_s: Some(d_s),
                ..cpu::BackwardArgs::new(d_out, s, gamma, mean, rstd)
            };
            let outs = cpu::BackwardOut {
                d_residual: l.residual.then_some(d_res),
                dbeta: l.beta.then_some(dbeta),
                dbias: l.bias.then_some(dbias),
                ..cpu::BackwardOut::new(dx, dgamma)
            };
            cpu::backward(&self.cfg, args, outs)?;
        }
        Ok(cpu_out(out, total))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &Handle, ins: &CudaInputs<'_>) -> Result<CudaOut> {
        use crate::dropout_add_norm::{BackwardArgs, BackwardOut};
        let Stats::Cuda(stats) = &*self.stats else {
            return Err(Error::invalid(
                Self::NAME,
                "the forward's statistics are on another device",
            )
            .into());
        };
        let l = self.layout;
        let (n, rows) = (l.n, self.cfg.rows());
        let grad = ins.view::<T>(0, "grad")?;
        let packed = ins.view::<T>(1, "packed output")?;
        let params = ins.view::<T>(2, "params")?;
        check_len(Self::NAME, "grad", grad.len(), 2 * n)?;
        check_len(Self::NAME, "packed output", packed.len(), 2 * n)?;
        check_len(Self::NAME, "params", params.len(), l.params_len())?;
        let (d_out, d_s) = grad.split_at(n);
        let s = packed.slice(n..2 * n);
        let (gamma, _, _) = l.split(params);
        let mean = stats.slice(..rows);
        let rstd = stats.slice(rows..2 * rows);
        let lens = l.grads_lens();
        let total = packed_len(Self::NAME, &lens)?;
        // SAFETY: the backward writes dx, d_residual and every column gradient (zeros with no
        // rows).
        let mut out = unsafe { ins.alloc::<T>(total)? };
        {
            let [nx, nr, nc, nbeta, nbias] = lens;
            split_parts!(out.slice_mut(..) =>
                dx: nx, d_res: nr, dgamma: nc, dbeta: nbeta, dbias: nbias);
            let args = BackwardArgs {
                d_s: Some(d_s),
                ..BackwardArgs::new(d_out, s, gamma, mean, rstd)
            };
            let outs = BackwardOut {
                d_residual: l.residual.then_some(d_res),
                dbeta: l.beta.then_some(dbeta),
                dbias: l.bias.then_some(dbias),
                ..BackwardOut::new(dx, dgamma)
            };
            crate::dropout_add_norm::backward(h, &self.cfg, args, outs)?;
        }
        Ok(ins.out(out, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candle::shell::assert_fails_with;
    use candle_core::{DType, Device};

    fn fwd(cfg: Config) -> Result<Op<Fwd>> {
        Ok(Op(Fwd {
            cfg,
            layout: Packing::new(&cfg, false, false, false)?,
            stats: Arc::new(Mutex::new(None)),
            meter: None,
        }))
    }

    /// The custom op refuses strided layouts (the public `forward` copies before reaching it).
    #[test]
    fn custom_op_refuses_non_contiguous() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?.t()?; // [6, 4], strided
        let gamma = Tensor::ones(4, DType::F32, &dev)?;
        let cfg = Config::new(6, 4, Norm::LayerNorm, 1e-5)?;
        assert_fails_with(x.apply_op2_no_bwd(&gamma, &fwd(cfg)?), "not contiguous");
        Ok(())
    }

    /// Storage of another dtype than the first argument's is refused by the op itself, and a
    /// backward whose statistics never came is an error, not a panic.
    #[test]
    fn custom_op_refuses_mixed_dtypes_and_missing_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let gamma = Tensor::zeros(3, DType::BF16, &dev)?;
        let cfg = Config::new(2, 3, Norm::RmsNorm, 1e-5)?;
        let op = fwd(cfg)?;
        assert_fails_with(x.apply_op2_no_bwd(&gamma, &op), "dtype");
        let packed = Tensor::zeros((2, 2, 3), DType::F32, &dev)?;
        assert_fails_with(op.0.bwd(&[&x, &gamma], &packed, &packed), "statistics");
        Ok(())
    }
}
