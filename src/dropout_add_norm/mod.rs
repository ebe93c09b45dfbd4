//! Fused dropout + residual add + LayerNorm / RMSNorm, with LayerNorm Scaling and drop path: the
//! entry of every pre-norm transformer sub-block, forward and backward, on row-major
//! `[rows, cols]` tensors (`cols` = hidden size):
//!
//! ```text
//! s   = residual + rowscale[row] * dropout(x + bias)      the new residual stream
//! out = norm(s) * layer_scale                             norm = LayerNorm(gamma, beta) or RMSNorm(gamma)
//! ```
//!
//! Done separately (dropout + add, then a norm) the stream is read and written twice; fused,
//! once: the forward reads x and the residual and writes `s` and `out`; the backward reads
//! `d_out`, `d_s` and `s` and writes `dx` and `d_residual` ([`fused_forward_bytes`],
//! [`fused_backward_bytes`]).
//!
//! * `residual`, `bias` (per column), `beta` and the row scale are optional. The row scale is
//!   either given (f32 per row) or a generated drop path ([`DropPath`], its own call id).
//! * Dropout is keyed exactly as [`dropout`](crate::dropout): the keep bit of
//!   element `i = row * cols + col` is `DropRate::keeps(mask_word(seed, call, i))`, a pure
//!   function of `(seed, call, 64-bit i)`; p = 0 and p = 1 are exact and do no generator work.
//!   The mask is regenerated in the backward, never stored.
//! * `layer_scale` multiplies the normaliser's output; [`layer_norm_scaling`] gives the `1 /
//!   sqrt(l)` of LayerNorm Scaling (see there).
//! * `s` is always written (the backward reads it: one read is cheaper than recomputing it from
//!   x and the residual); it may be the residual buffer itself (`forward_inplace`). In the
//!   backward, `d_s` is the gradient that flows along the stream past this sub-block (prenorm
//!   mode: `s` has a second consumer); without it only `d_out` flows back.
//! * `residual_in_f32`: the stream (`residual`, `s`, `d_s`, `d_residual`) may be f32 while x is
//!   f16 or bf16 (the second type parameter `S`); otherwise it has x's dtype.
//! * Per-row statistics `mean` (0 for RMSNorm) and `rstd` are f32 outputs of the forward and
//!   inputs of the backward.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! Every operation below is one IEEE f32 operation (the kernels are built with `--fmad=false`;
//! `fma` is an explicit fused multiply-add on both sides). `S(v)` rounds to the stream type,
//! `T(v)` to x's type, both to nearest even.
//!
//! Forward, per row, with `rowm = scale * rs` (`scale = 1 / (1 - p)`, 0 for p = 1; `rowm =
//! scale` without a row scale) and `m = keep(i) ? rowm : 0`:
//!
//! * `s[j] = m != 0 ? S(fma(t, m, r)) : residual[j]` with `t = x + bias[j]` (`t = x` without
//!   bias) and `r` the residual (`+0.0` without one; a dropped element is then `S(0)`). A
//!   dropped element keeps the residual's own bits and never reads x.
//! * `v[j] = f32(s[j])`: the statistics and the output use the stored (rounded) stream, so the
//!   backward, which reads `s`, sees exactly what the forward normalised.
//! * LayerNorm: `mean = rowsum(v) / n`, `var = rowsum((v - mean) * (v - mean)) / n` (two
//!   passes), `rstd = 1 / sqrt(var + eps)`, `xhat = (v - mean) * rstd`.
//!   RMSNorm: `mean = 0` (stored), `rstd = 1 / sqrt(rowsum(v * v) / n + eps)`, `xhat = v * rstd`.
//!   `n = cols as f32`; `1 / sqrt(.)` is a correctly rounded square root then a correctly
//!   rounded division (never an approximate reciprocal square root).
//! * `out[j] = T(o * layer_scale)` with `o = fma(xhat, gamma[j], beta[j])`, or `o = xhat *
//!   gamma[j]` without beta.
//!
//! Backward, per row (mean and rstd read back, `xhat` recomputed from `s` as above):
//!
//! * `g = d_out[j] * layer_scale`, `w = g * gamma[j]`;
//!   `c1 = rowsum(xhat * w) / n`, and for LayerNorm `c2 = rowsum(w) / n`;
//! * `ds = (w - u) * rstd` with `u = fma(xhat, c1, c2)` (LayerNorm) or `u = xhat * c1`
//!   (RMSNorm); `ds = ds + d_s[j]` when `d_s` is given; `d_residual[j] = S(ds)`;
//! * `dt = m != 0 ? ds * m : 0`, `dx[j] = T(dt)`;
//! * column sums `dgamma[j] = T(colsum(g * xhat))`, `dbeta[j] = T(colsum(g))`,
//!   `dbias[j] = T(colsum(dt))` (the unrounded f32 `dt`).
//!
//! `rowsum` (the row reductions) has an order that is a function of `cols` only: element `j`
//! belongs to group `j / 8`, group `k` to partial `k % P` with `P = `[`row_partials`]`(cols)`;
//! each partial is a sequential f32 sum from `+0.0` over its groups in increasing order (the 8
//! elements of a group in order); each run of 32 partials is combined by the tree `a[l] += a[l +
//! o]` for `o = 16, 8, 4, 2, 1`, and the `P / 32` results are added left to right.
//!
//! `colsum` (the column reductions) is the slab scheme of `dropout`'s dbias: rows are
//! cut into slabs of [`colsum_slab_rows`] rows (a function of `rows` only); each slab's partial is a
//! sequential f32 sum from `+0.0` over its rows in increasing order, and the slabs' partials are
//! added in slab order. So dgamma, dbeta and dbias are identical from run to run and GPU to GPU,
//! and the CPU reference reproduces them. No float atomics anywhere.
//!
//! # Redundancy statistics (optional)
//!
//! With a meter site in the forward's arguments (`redundancy`, see [`crate::redundancy`]), each
//! row also yields `dot = r·s`, `rr = |r|²` and `ss = |s|²`, with `r[j]` the stream before the
//! add (`f32(residual[j])`, the stream's own value in place, `+0.0` without a residual) and `s[j]`
//! the stored stream after it (`v[j]` above). For `dot` and `rr` each group of 8 elements (the
//! groups of `rowsum`) gives `g = fma(a, b, g)` from `+0.0` over its elements in order; partial
//! `q` is the sequential f32 sum from `+0.0` of its groups' `g`, in `rowsum`'s partition, and the
//! partials are combined by `rowsum`'s tree ([`cpu::stat_sums2`]). `ss` comes from the norm's
//! own sums ([`cpu::norm_ss`]): RMSNorm's `rowsum(s²)`; LayerNorm's `fma(rowsum(s), mean,
//! rowsum((s - mean)²))` (one multiply-add per element fewer than a third sum; its rounding is
//! in the bound, [`cpu::norm_stats_chain`]). The row then goes to the site as
//! [`crate::redundancy::row_cos`] says: rows without a residual are excluded (`rr = 0`), so a
//! site's BI measures the sub-block whose output `x` is added here. Every other output is the
//! same, bit for bit, with or without the statistics; without them nothing is computed.
//!
//! On the device the statistics run in their own entries of the same kernels
//! (`dropout_add_norm_fwd_stats_*`, a template flag; `kernels/dropout_add_norm/stats.cuh`), so
//! the default forwards compile to the same instructions as without the option. Thread 0 of a
//! block finishes each of its rows and the block adds its rows' integers to the site's three
//! words with one integer atomic per word at its end: the words do not depend on the grid or on
//! which block finishes first. The norm-only pass of the unfused baseline takes no meter.
//!
//! # Example (CPU reference; the GPU functions take the same [`Config`])
//!
//! ```
//! use fusedreg::dropout_add_norm::{cpu, layer_norm_scaling, Config, Norm};
//! # fn main() -> fusedreg::Result<()> {
//! let (rows, cols) = (2, 4);
//! let cfg = Config::new(rows, cols, Norm::LayerNorm, 1e-5)?
//!     .with_dropout(0.1, /* seed */ 42, /* call */ 7)?
//!     .with_layer_scale(layer_norm_scaling(4)?)?; // the 4th layer: 1 / 2
//! let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5, 2.0, 0.25];
//! let residual = [0.5f32; 8];
//! let gamma = [1.0f32; 4];
//! let (mut out, mut s, mut mean, mut rstd) = ([0f32; 8], [0f32; 8], [0f32; 2], [0f32; 2]);
//! let args = cpu::ForwardArgs { residual: Some(&residual), ..cpu::ForwardArgs::new(&x, &gamma) };
//! let outs = cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd };
//! cpu::forward(&cfg, args, outs)?;
//! // Each row of out is normalised, then halved: mean 0, variance about 1/4.
//! let m: f32 = out[..4].iter().sum::<f32>() / 4.0;
//! assert!(m.abs() < 1e-6);
//! # Ok(()) }
//! ```

use cudarc::driver::{CudaView, CudaViewMut};

use crate::dropping::{check_shape, config_methods, KeySetting};
use crate::dtype::DtypeKind;
use crate::error::{check_len, Error, Result};

/// The [`ForwardLens`] of a forward's arguments and outputs: the GPU's views or the CPU's
/// slices, in fields of the same names.
macro_rules! forward_lens {
    ($a:expr, $o:expr) => {
        $crate::dropout_add_norm::ForwardLens {
            x: $a.x.len(),
            residual: $a.residual.as_ref().map(|v| v.len()),
            gamma: $a.gamma.len(),
            beta: $a.beta.as_ref().map(|v| v.len()),
            bias: $a.bias.as_ref().map(|v| v.len()),
            rowscale: $a.rowscale.as_ref().map(|v| v.len()),
            out: $o.out.len(),
            s: $o.s.len(),
            mean: $o.mean.len(),
            rstd: $o.rstd.len(),
        }
    };
}

/// The [`BackwardLens`] of a backward's arguments and outputs (as [`forward_lens!`]).
macro_rules! backward_lens {
    ($a:expr, $o:expr) => {
        $crate::dropout_add_norm::BackwardLens {
            d_out: $a.d_out.len(),
            d_s: $a.d_s.as_ref().map(|v| v.len()),
            s: $a.s.len(),
            gamma: $a.gamma.len(),
            mean: $a.mean.len(),
            rstd: $a.rstd.len(),
            rowscale: $a.rowscale.as_ref().map(|v| v.len()),
            dx: $o.dx.len(),
            d_residual: $o.d_residual.as_ref().map(|v| v.len()),
            dgamma: $o.dgamma.len(),
            dbeta: $o.dbeta.as_ref().map(|v| v.len()),
            dbias: $o.dbias.as_ref().map(|v| v.len()),
        }
    };
}

pub mod cpu;
pub(crate) mod gpu;
pub mod unfused;

pub use crate::dropping::rows::{row_partials, GROUP};
pub use crate::dropping::{DropPath, Workspace};
pub use gpu::{backward, forward, forward_inplace};

/// The name used in errors.
pub(crate) const OP: &str = "dropout_add_norm";

/// Which normaliser.
///
/// ```
/// use fusedreg::dropout_add_norm::Norm;
/// assert_ne!(Norm::LayerNorm, Norm::RmsNorm);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `(s - mean) / sqrt(var + eps) * gamma + beta` (Ba et al. 2016).
    LayerNorm,
    /// `s / sqrt(mean(s^2) + eps) * gamma (+ beta)` (Zhang and Sennrich 2019).
    RmsNorm,
}

/// The LayerNorm Scaling factor of the `layer`-th layer (1-based): `1 / sqrt(layer)`, computed in
/// f64 and rounded once to f32, so layer 1 is exactly 1 (unscaled).
///
/// LayerNorm Scaling comes from Sun et al. 2025, "The Curse of Depth in Large Language Models"
/// (arXiv 2502.05795; code lmsdss/LayerNorm-Scaling): in deep Pre-LN stacks the output variance
/// grows with depth and deep blocks degenerate to near-identity maps; multiplying the output of
/// each pre-norm by `1 / sqrt(l)` fixes it. It applies to both pre-norms of every block (before
/// attention and before the MLP), not to the final norm, and has no parameter, so it folds into
/// the normaliser's output scale ([`Config::with_layer_norm_scaling`]). Note: the reference
/// repository's released switch compares a lower-cased string with `"LNS"` and so never turns
/// the scaling on; this implementation follows the paper's formula, and the tests check it
/// against that formula.
///
/// Errors: [`Error::InvalidArgument`] for `layer == 0`.
///
/// ```
/// use fusedreg::dropout_add_norm::layer_norm_scaling;
/// # fn main() -> fusedreg::Result<()> {
/// assert_eq!(layer_norm_scaling(1)?, 1.0);
/// assert_eq!(layer_norm_scaling(4)?, 0.5);
/// assert_eq!(layer_norm_scaling(2)?, std::f32::consts::FRAC_1_SQRT_2);
/// assert!(layer_norm_scaling(0).is_err());
/// # Ok(()) }
/// ```
pub fn layer_norm_scaling(layer: usize) -> Result<f32> {
    if layer == 0 {
        return Err(Error::invalid(
            OP,
            "LayerNorm Scaling takes a 1-based layer index; got 0",
        ));
    }
    Ok((1.0 / (layer as f64).sqrt()) as f32)
}

/// Rows per slab of the column reductions (dgamma, dbeta, dbias): `ceil(rows / 1024)`, at least
/// 1, so there are at most 1024 slabs (one backward block each). A function of `rows` only.
///
/// ```
/// use fusedreg::dropout_add_norm::{colsum_slab_count, colsum_slab_rows};
/// assert_eq!(colsum_slab_rows(16384), 16);
/// assert_eq!(colsum_slab_rows(100), 1);
/// assert_eq!(colsum_slab_count(16385), 964); // 17 rows per slab
/// ```
pub fn colsum_slab_rows(rows: usize) -> usize {
    rows.div_ceil(MAX_SLABS).max(1)
}

/// Number of slabs, `ceil(rows / colsum_slab_rows(rows))` (0 for no rows).
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::colsum_slab_count;
/// assert_eq!(colsum_slab_count(0), 0);
/// assert_eq!(colsum_slab_count(1000), 1000);
/// assert_eq!(colsum_slab_count(4096), 1024);
/// ```
pub fn colsum_slab_count(rows: usize) -> usize {
    rows.div_ceil(colsum_slab_rows(rows))
}

const MAX_SLABS: usize = 1024;

/// Shape, normaliser, eps, layer scale and the dropout of one call: everything but the buffers.
/// Validated on construction; the CPU reference and the GPU kernels take the same `Config`.
///
/// ```
/// use fusedreg::dropout_add_norm::{Config, DropPath, Norm};
/// use fusedreg::dropping::MaskResolution;
/// use fusedreg::philox::mask_word;
/// use fusedreg::DtypeKind::{Bf16, F32};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1024, 4096, Norm::RmsNorm, 1e-6)?
///     .with_dropout(0.1, 42, 7)?
///     .with_drop_path(DropPath::new(0.2, 8)?)
///     .with_layer_norm_scaling(12)?;
/// assert_eq!(cfg.len(), 1 << 22);
/// assert_eq!(cfg.layer_scale(), (1.0 / 12f64.sqrt()) as f32);
/// assert!(Config::new(4, 8, Norm::LayerNorm, 0.0).is_err()); // eps must be > 0
/// // The keying methods are those of its `KeySetting` (fusedreg::dropping).
/// assert!(Config::new(1, 8, Norm::RmsNorm, 1e-6)?.rate().keeps_all()); // no dropout by default
/// assert_eq!(cfg.rate().threshold(), 429_496_730);
/// assert_eq!(cfg.keeps(F32, 69), cfg.rate().keeps(mask_word(42, 7, 69)));
/// assert_eq!(cfg.keying(Bf16).resolution(), MaskResolution::Bits16);
/// assert_eq!(cfg.scale(F32), cfg.rate().scale());
/// // The resolution is kept by `with_dropout`, in either order.
/// let cfg8 = Config::new(2, 64, Norm::LayerNorm, 1e-5)?
///     .with_resolution(MaskResolution::Bits8)
///     .with_dropout(0.1, 42, 7)?;
/// assert_eq!(cfg8.resolution(), Some(MaskResolution::Bits8));
/// assert_eq!(cfg8.effective_p(F32), 26.0 / 256.0);
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    rows: usize,
    cols: usize,
    keys: KeySetting,
    drop_path: Option<DropPath>,
    norm: Norm,
    eps: f32,
    layer_scale: f32,
}

impl Config {
    /// A `[rows, cols]` tensor normalised by `norm` with `eps`, no dropout, layer scale 1.
    ///
    /// Errors: [`Error::ShapeMismatch`] when `rows * cols` overflows;
    /// [`Error::InvalidArgument`] when `cols == 0` (nothing to normalise over) or `eps` is not
    /// finite and positive.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::{Config, Norm};
    /// use fusedreg::Error;
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(8, 1024, Norm::LayerNorm, 1e-5)?;
    /// assert_eq!((cfg.rows(), cfg.cols(), cfg.eps()), (8, 1024, 1e-5));
    /// assert!(matches!(Config::new(8, 1024, Norm::LayerNorm, f32::NAN), Err(Error::InvalidArgument { .. })));
    /// assert!(matches!(Config::new(8, 1024, Norm::LayerNorm, -1.0), Err(Error::InvalidArgument { .. })));
    /// assert!(matches!(Config::new(8, 0, Norm::LayerNorm, 1e-5), Err(Error::InvalidArgument { .. })));
    /// assert!(matches!(Config::new(usize::MAX, 2, Norm::LayerNorm, 1e-5), Err(Error::ShapeMismatch { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(rows: usize, cols: usize, norm: Norm, eps: f32) -> Result<Self> {
        if cols == 0 {
            return Err(Error::invalid(
                OP,
                "cols = 0: a norm needs at least one column",
            ));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("eps = {eps} must be finite and > 0"),
            ));
        }
        check_shape(OP, rows, cols)?;
        Ok(Config {
            rows,
            cols,
            keys: KeySetting::NONE,
            drop_path: None,
            norm,
            eps,
            layer_scale: 1.0,
        })
    }

    /// Dropout with probability `p` keyed by `(seed, call)` (the `dropout` contract).
    ///
    /// Errors: [`Error::InvalidArgument`] when `p` is NaN or outside `[0, 1]`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::{Config, Norm};
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(4, 8, Norm::LayerNorm, 1e-5)?.with_dropout(0.5, 42, 7)?;
    /// assert_eq!((cfg.rate().p(), cfg.seed(), cfg.call()), (0.5, 42, 7));
    /// assert!(Config::new(4, 8, Norm::LayerNorm, 1e-5)?.with_dropout(1.5, 0, 0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_dropout(self, p: f64, seed: u64, call: u64) -> Result<Self> {
        Ok(Config {
            keys: self.keys.rekeyed(OP, p, seed, call)?,
            ..self
        })
    }

    config_methods!(
        "Every kernel of this op implements every resolution. Kept by"
        "[`Config::with_dropout`], in either order. A call resolves it for the element type of"
        "`x` (the stream's type does not matter)."
    );

    /// Adds a generated drop path (stochastic depth): the row scale drawn from its own call id.
    /// It cannot be combined with a caller-supplied row scale.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::{Config, DropPath, Norm};
    /// # fn main() -> fusedreg::Result<()> {
    /// let path = DropPath::new(0.2, 8)?;
    /// let cfg = Config::new(4, 8, Norm::RmsNorm, 1e-5)?.with_drop_path(path);
    /// assert_eq!(cfg.drop_path(), Some(path));
    /// # Ok(()) }
    /// ```
    pub fn with_drop_path(self, path: DropPath) -> Self {
        Config {
            drop_path: Some(path),
            ..self
        }
    }

    /// Multiplies the normaliser's output by `layer_scale` (1 by default).
    ///
    /// Errors: [`Error::InvalidArgument`] when it is not finite.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::{Config, Norm};
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(4, 8, Norm::LayerNorm, 1e-5)?;
    /// assert_eq!(cfg.layer_scale(), 1.0);
    /// assert_eq!(cfg.with_layer_scale(0.25)?.layer_scale(), 0.25);
    /// assert!(cfg.with_layer_scale(f32::INFINITY).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_layer_scale(self, layer_scale: f32) -> Result<Self> {
        if !layer_scale.is_finite() {
            return Err(Error::invalid(
                OP,
                format!("layer_scale = {layer_scale} is not finite"),
            ));
        }
        Ok(Config {
            layer_scale,
            ..self
        })
    }

    /// LayerNorm Scaling for the `layer`-th (1-based) layer: layer scale
    /// [`layer_norm_scaling`]`(layer)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::{Config, Norm};
    /// # fn main() -> fusedreg::Result<()> {
    /// let cfg = Config::new(4, 8, Norm::LayerNorm, 1e-5)?;
    /// assert_eq!(cfg.with_layer_norm_scaling(1)?.layer_scale(), 1.0);
    /// assert_eq!(cfg.with_layer_norm_scaling(16)?.layer_scale(), 0.25);
    /// assert!(cfg.with_layer_norm_scaling(0).is_err());
    /// # Ok(()) }
    /// ```
    pub fn with_layer_norm_scaling(self, layer: usize) -> Result<Self> {
        self.with_layer_scale(layer_norm_scaling(layer)?)
    }

    /// The normaliser.
    pub fn norm(&self) -> Norm {
        self.norm
    }

    /// The epsilon added to the variance (mean square for RMSNorm).
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The output scale (1, or `1 / sqrt(l)` under LayerNorm Scaling).
    pub fn layer_scale(&self) -> f32 {
        self.layer_scale
    }

    /// The generated drop path, if any.
    pub fn drop_path(&self) -> Option<DropPath> {
        self.drop_path
    }

    /// The same shape and norm without dropout or row scale (the unfused baseline's norm).
    pub(crate) fn without_dropout(&self) -> Config {
        Config {
            keys: KeySetting::NONE,
            drop_path: None,
            ..*self
        }
    }

    /// The dropout part as a `dropout` config (the unfused baseline's first op), with the same
    /// resolution setting (the baseline resolves it its own way: 32 bits, see
    /// `dropping::Config::keying_bits32`).
    pub(crate) fn dropout_config(&self) -> Result<crate::dropping::Config> {
        let c = crate::dropping::Config::keyed(OP, self.rows, self.cols, self.keys)?;
        Ok(match self.drop_path {
            Some(path) => c.with_drop_path(path),
            None => c,
        })
    }
}

/// Minimal device-memory bytes of the fused forward on `n` elements: read x and the residual,
/// write out and s (`2 t + 2 s` with `t`, `s` the element sizes of x and of the stream; without
/// a residual `t + t + s`). Per-row statistics (8 bytes per row) and per-column vectors are
/// negligible and not counted. bf16: 8 B per element; bf16 with the stream in f32: 12 B.
/// Saturates instead of overflowing.
///
/// ```
/// use fusedreg::dropout_add_norm::fused_forward_bytes;
/// use fusedreg::DtypeKind::{Bf16, F32};
/// assert_eq!(fused_forward_bytes(Bf16, Bf16, 1024, true), 8 * 1024);
/// assert_eq!(fused_forward_bytes(Bf16, F32, 1024, true), 12 * 1024);
/// assert_eq!(fused_forward_bytes(F32, F32, 1024, false), 12 * 1024);
/// assert_eq!(fused_forward_bytes(F32, F32, u64::MAX, true), u64::MAX);
/// ```
pub fn fused_forward_bytes(x: DtypeKind, stream: DtypeKind, n: u64, residual: bool) -> u64 {
    let (t, s) = (x.size() as u64, stream.size() as u64);
    let per = 2 * t + s + if residual { s } else { 0 };
    n.saturating_mul(per)
}

/// Minimal bytes of the fused backward: read `d_out` and `s` (and `d_s` in prenorm mode),
/// write `dx` and `d_residual` (when there is a residual): `2 t + 2 s (+ s)`. bf16 prenorm with a
/// residual: 10 B per element (18 B forward + backward, the issue's floor). The column partials
/// (3 f32 per slab and column) are not counted. Saturates.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::fused_backward_bytes;
/// use fusedreg::DtypeKind::{Bf16, F32};
/// assert_eq!(fused_backward_bytes(Bf16, Bf16, 1024, true, true), 10 * 1024);
/// assert_eq!(fused_backward_bytes(Bf16, Bf16, 1024, false, true), 8 * 1024);
/// assert_eq!(fused_backward_bytes(F32, F32, 1024, false, false), 12 * 1024);
/// ```
pub fn fused_backward_bytes(
    x: DtypeKind,
    stream: DtypeKind,
    n: u64,
    prenorm: bool,
    residual: bool,
) -> u64 {
    let (t, s) = (x.size() as u64, stream.size() as u64);
    let per = 2 * t + s + if prenorm { s } else { 0 } + if residual { s } else { 0 };
    n.saturating_mul(per)
}

/// Minimal bytes of the unfused baseline's forward ([`unfused`]): `dropout` with a residual (read x and
/// the residual, write s: `3 s`, the fused dropout op at its own floor), then the norm (read s,
/// write out: `2 s`): `5 s` = 10 B bf16, 20 B f32 per element. Saturates.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024), 10 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024), 20 * 1024);
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64) -> u64 {
    n.saturating_mul(5 * dtype.size() as u64)
}

/// Minimal bytes of the unfused backward ([`unfused::backward`], prenorm): the norm backward
/// (read d_out, s and d_s, write the stream gradient d_residual: `4 s`; it adds d_s itself, as a
/// framework's gradient accumulation into the stream would cost a further `3 s`), then
/// `dropout`'s backward (read d_residual, write dx: `2 s`): `6 s` = 12 B bf16, 24 B f32.
/// Saturates.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024), 12 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1024), 24 * 1024);
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64) -> u64 {
    n.saturating_mul(6 * dtype.size() as u64)
}

/// Launch knobs for tests: results never depend on them. Not part of the stable API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchTuning {
    /// Take the scalar path even when the vector path is possible.
    pub force_scalar: bool,
    /// Cap on the forward's grid (blocks loop over the remaining rows).
    pub max_grid: u32,
    /// Never use dynamic shared memory in the generic kernels (the forward's row cache, the
    /// backward's partials).
    pub no_smem: bool,
    /// Take the generic kernels even where a register tier holds the row.
    pub generic: bool,
}

impl Default for LaunchTuning {
    fn default() -> Self {
        LaunchTuning {
            force_scalar: false,
            max_grid: 1 << 20,
            no_smem: false,
            generic: false,
        }
    }
}

/// The inputs of a GPU [`forward`] / [`forward_inplace`].
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{self as dan, Config, ForwardArgs, ForwardOut, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(64, 1024, Norm::LayerNorm, 1e-5)?.with_dropout(0.1, 42, 7)?;
/// let x = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let r = s.alloc_zeros::<f32>(cfg.len()).unwrap();
/// let gamma = s.clone_htod(&vec![1.0f32; 1024]).unwrap();
/// let (mut out, mut st) = (s.alloc_zeros::<f32>(cfg.len()).unwrap(), s.alloc_zeros::<f32>(cfg.len()).unwrap());
/// let (mut mean, mut rstd) = (s.alloc_zeros::<f32>(64).unwrap(), s.alloc_zeros::<f32>(64).unwrap());
/// let args = ForwardArgs { residual: Some(r.as_view()), ..ForwardArgs::new(x.as_view(), gamma.as_view()) };
/// let outs = ForwardOut {
///     out: out.as_view_mut(), s: st.as_view_mut(), mean: mean.as_view_mut(), rstd: rstd.as_view_mut(),
/// };
/// dan::forward(&h, &cfg, args, outs)?;
/// # Ok(()) }
/// ```
pub struct ForwardArgs<'a, T, S> {
    /// The sub-block output, `len == rows * cols`.
    pub x: CudaView<'a, T>,
    /// The residual stream, `len == rows * cols` (None: the first block, or in place).
    pub residual: Option<CudaView<'a, S>>,
    /// Norm weight, `len == cols`.
    pub gamma: CudaView<'a, T>,
    /// Norm bias, `len == cols`.
    pub beta: Option<CudaView<'a, T>>,
    /// Bias added to x before dropout, `len == cols`.
    pub bias: Option<CudaView<'a, T>>,
    /// Caller-supplied row scale, `len == rows` (not with a drop path in the config).
    pub rowscale: Option<CudaView<'a, f32>>,
    /// The meter site this call adds its rows' `cos(residual, s)` to ([`crate::redundancy`],
    /// the module docs' *Redundancy statistics*); `None`: nothing is computed or launched for
    /// it.
    pub redundancy: Option<crate::redundancy::Site<'a>>,
    #[doc(hidden)]
    pub tuning: LaunchTuning,
}

impl<'a, T, S> ForwardArgs<'a, T, S> {
    /// The required inputs; every option `None`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use fusedreg::dropout_add_norm::ForwardArgs;
    /// # let h = fusedreg::Handle::new(0).unwrap();
    /// # let (x, g) = (h.stream().alloc_zeros::<f32>(8).unwrap(), h.stream().alloc_zeros::<f32>(8).unwrap());
    /// let args: ForwardArgs<'_, f32, f32> = ForwardArgs::new(x.as_view(), g.as_view());
    /// assert!(args.residual.is_none());
    /// ```
    pub fn new(x: CudaView<'a, T>, gamma: CudaView<'a, T>) -> Self {
        ForwardArgs {
            x,
            residual: None,
            gamma,
            beta: None,
            bias: None,
            rowscale: None,
            redundancy: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// The outputs of a GPU [`forward`] (see [`ForwardArgs`] for an example).
pub struct ForwardOut<'a, T, S> {
    /// `norm(s) * layer_scale`, `len == rows * cols`.
    pub out: CudaViewMut<'a, T>,
    /// The new stream, `len == rows * cols` (holds the residual on entry to
    /// [`forward_inplace`]).
    pub s: CudaViewMut<'a, S>,
    /// Per-row mean (0 for RMSNorm), `len == rows`.
    pub mean: CudaViewMut<'a, f32>,
    /// Per-row `1 / sqrt(var + eps)`, `len == rows`.
    pub rstd: CudaViewMut<'a, f32>,
}

/// The inputs of a GPU [`backward`].
///
/// # Examples
///
/// ```no_run
/// use fusedreg::dropout_add_norm::{self as dan, BackwardArgs, BackwardOut, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let s = h.stream();
/// let cfg = Config::new(64, 1024, Norm::RmsNorm, 1e-5)?;
/// let z = |n| s.alloc_zeros::<f32>(n).unwrap();
/// let (d_out, st, gamma, mean, rstd) = (z(cfg.len()), z(cfg.len()), z(1024), z(64), z(64));
/// let (mut dx, mut dgamma) = (z(cfg.len()), z(1024));
/// let args = BackwardArgs::new(d_out.as_view(), st.as_view(), gamma.as_view(), mean.as_view(), rstd.as_view());
/// let outs = BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut());
/// dan::backward(&h, &cfg, args, outs)?;
/// # Ok(()) }
/// ```
pub struct BackwardArgs<'a, T, S> {
    /// Gradient of `out`, `len == rows * cols`.
    pub d_out: CudaView<'a, T>,
    /// Gradient flowing along the stream past this sub-block (prenorm mode), `len == rows *
    /// cols`.
    pub d_s: Option<CudaView<'a, S>>,
    /// The forward's `s`.
    pub s: CudaView<'a, S>,
    /// Norm weight, `len == cols`.
    pub gamma: CudaView<'a, T>,
    /// The forward's per-row mean and rstd.
    pub mean: CudaView<'a, f32>,
    /// See `mean`.
    pub rstd: CudaView<'a, f32>,
    /// The caller-supplied row scale the forward used, `len == rows`.
    pub rowscale: Option<CudaView<'a, f32>>,
    /// Reusable space for the column partials (allocated per call when `None`).
    pub workspace: Option<&'a mut Workspace>,
    /// The caller's memory for the column partials instead (at least
    /// [`crate::workspace::dropout_add_norm_backward_size`] bytes; not with `workspace`).
    pub workspace_view: Option<crate::runtime::WorkspaceView<'a>>,
    #[doc(hidden)]
    pub tuning: LaunchTuning,
}

impl<'a, T, S> BackwardArgs<'a, T, S> {
    /// The required inputs; every option `None`.
    ///
    /// # Examples
    ///
    /// See [`BackwardArgs`].
    ///
    /// ```no_run
    /// # let h = fusedreg::Handle::new(0).unwrap();
    /// # let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
    /// # let (d, s, g, m, r) = (z(8), z(8), z(8), z(1), z(1));
    /// let args = fusedreg::dropout_add_norm::BackwardArgs::<f32, f32>::new(
    ///     d.as_view(), s.as_view(), g.as_view(), m.as_view(), r.as_view());
    /// assert!(args.d_s.is_none());
    /// ```
    pub fn new(
        d_out: CudaView<'a, T>,
        s: CudaView<'a, S>,
        gamma: CudaView<'a, T>,
        mean: CudaView<'a, f32>,
        rstd: CudaView<'a, f32>,
    ) -> Self {
        BackwardArgs {
            d_out,
            d_s: None,
            s,
            gamma,
            mean,
            rstd,
            rowscale: None,
            workspace: None,
            workspace_view: None,
            tuning: LaunchTuning::default(),
        }
    }
}

/// The outputs of a GPU [`backward`] (see [`BackwardArgs`] for an example).
pub struct BackwardOut<'a, T, S> {
    /// Gradient of x, `len == rows * cols`.
    pub dx: CudaViewMut<'a, T>,
    /// Gradient of the residual (= of `s`), `len == rows * cols`.
    pub d_residual: Option<CudaViewMut<'a, S>>,
    /// Gradient of gamma, `len == cols`.
    pub dgamma: CudaViewMut<'a, T>,
    /// Gradient of beta, `len == cols`.
    pub dbeta: Option<CudaViewMut<'a, T>>,
    /// Gradient of the dropout bias, `len == cols`.
    pub dbias: Option<CudaViewMut<'a, T>>,
}

impl<'a, T, S> BackwardOut<'a, T, S> {
    /// The required outputs; every option `None`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let h = fusedreg::Handle::new(0).unwrap();
    /// # let z = |n| h.stream().alloc_zeros::<f32>(n).unwrap();
    /// # let (mut dx, mut dg) = (z(8), z(8));
    /// let outs = fusedreg::dropout_add_norm::BackwardOut::<f32, f32>::new(dx.as_view_mut(), dg.as_view_mut());
    /// assert!(outs.dbias.is_none());
    /// ```
    pub fn new(dx: CudaViewMut<'a, T>, dgamma: CudaViewMut<'a, T>) -> Self {
        BackwardOut {
            dx,
            d_residual: None,
            dgamma,
            dbeta: None,
            dbias: None,
        }
    }
}

/// Buffer lengths of a forward, checked the same way on the CPU and the GPU.
pub(crate) struct ForwardLens {
    pub x: usize,
    pub residual: Option<usize>,
    pub gamma: usize,
    pub beta: Option<usize>,
    pub bias: Option<usize>,
    pub rowscale: Option<usize>,
    pub out: usize,
    pub s: usize,
    pub mean: usize,
    pub rstd: usize,
}

pub(crate) fn check_stream_dtype(x: DtypeKind, stream: DtypeKind) -> Result<()> {
    if stream == x || stream == DtypeKind::F32 {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            format!(
                "the stream (residual, s) must be {} like x or f32 (residual_in_f32), got {}",
                x.name(),
                stream.name()
            ),
        ))
    }
}

pub(crate) fn check_forward(cfg: &Config, l: &ForwardLens) -> Result<()> {
    let (n, rows, cols) = (cfg.len(), cfg.rows(), cfg.cols());
    check_len(OP, "x", l.x, n)?;
    if let Some(r) = l.residual {
        check_len(OP, "residual", r, n)?;
    }
    check_len(OP, "gamma (one per column)", l.gamma, cols)?;
    if let Some(b) = l.beta {
        check_len(OP, "beta (one per column)", b, cols)?;
    }
    if let Some(b) = l.bias {
        check_len(OP, "bias (one per column)", b, cols)?;
    }
    check_row_scale(cfg, l.rowscale)?;
    check_len(OP, "out", l.out, n)?;
    check_len(OP, "s", l.s, n)?;
    check_len(OP, "mean (one per row)", l.mean, rows)?;
    check_len(OP, "rstd (one per row)", l.rstd, rows)
}

/// Buffer lengths of a backward.
pub(crate) struct BackwardLens {
    pub d_out: usize,
    pub d_s: Option<usize>,
    pub s: usize,
    pub gamma: usize,
    pub mean: usize,
    pub rstd: usize,
    pub rowscale: Option<usize>,
    pub dx: usize,
    pub d_residual: Option<usize>,
    pub dgamma: usize,
    pub dbeta: Option<usize>,
    pub dbias: Option<usize>,
}

pub(crate) fn check_backward(cfg: &Config, l: &BackwardLens) -> Result<()> {
    let (n, rows, cols) = (cfg.len(), cfg.rows(), cfg.cols());
    check_len(OP, "d_out", l.d_out, n)?;
    if let Some(d) = l.d_s {
        check_len(OP, "d_s", d, n)?;
    }
    check_len(OP, "s", l.s, n)?;
    check_len(OP, "gamma (one per column)", l.gamma, cols)?;
    check_len(OP, "mean (one per row)", l.mean, rows)?;
    check_len(OP, "rstd (one per row)", l.rstd, rows)?;
    check_row_scale(cfg, l.rowscale)?;
    check_len(OP, "dx", l.dx, n)?;
    if let Some(d) = l.d_residual {
        check_len(OP, "d_residual", d, n)?;
    }
    check_len(OP, "dgamma (one per column)", l.dgamma, cols)?;
    if let Some(d) = l.dbeta {
        check_len(OP, "dbeta (one per column)", d, cols)?;
    }
    if let Some(d) = l.dbias {
        check_len(OP, "dbias (one per column)", d, cols)?;
    }
    Ok(())
}

fn check_row_scale(cfg: &Config, rowscale: Option<usize>) -> Result<()> {
    if let Some(r) = rowscale {
        if cfg.drop_path().is_some() {
            return Err(Error::invalid(
                OP,
                "a caller-supplied rowscale and a generated drop path exclude each other",
            ));
        }
        check_len(OP, "rowscale (one per row)", r, cfg.rows())?;
    }
    if let Some(path) = cfg.drop_path() {
        if path.rows_per_sample() > 1 && cfg.rows() > u32::MAX as usize {
            return Err(Error::invalid(
                OP,
                format!(
                    "a per-sample drop path needs fewer than 2^32 rows, got {}",
                    cfg.rows()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The issue's floor: 18 B per element forward + backward for bf16 prenorm with a residual.
    #[test]
    fn floor_bytes_match_the_issue() {
        use DtypeKind::Bf16;
        let n = 1 << 20;
        assert_eq!(
            fused_forward_bytes(Bf16, Bf16, n, true)
                + fused_backward_bytes(Bf16, Bf16, n, true, true),
            18 * n
        );
        assert_eq!(
            fused_backward_bytes(Bf16, Bf16, u64::MAX, true, true),
            u64::MAX
        );
        assert_eq!(unfused_forward_bytes(Bf16, u64::MAX), u64::MAX);
    }

    #[test]
    fn partition_is_a_function_of_the_shape() {
        for cols in [1usize, 7, 8, 9, 255, 256, 257, 2048, 2049, 16384, 1 << 20] {
            let p = row_partials(cols);
            assert!(
                p.is_power_of_two() && (32..=256).contains(&p),
                "{cols}: {p}"
            );
            assert!(p * GROUP >= cols.min(256 * GROUP));
        }
        for rows in [0usize, 1, 1023, 1024, 1025, 1 << 20, 1 << 40] {
            let (s, n) = (colsum_slab_rows(rows), colsum_slab_count(rows));
            assert!(s >= 1 && n <= MAX_SLABS);
            assert!(rows == 0 || (n * s >= rows && (n - 1) * s < rows));
        }
    }
}
