//! The CPU reference: the same operations in the same order as `kernels/dropout_add_norm.cu`
//! (see the [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//!
//! ```
//! use fusedreg::dropout_add_norm::{cpu, Config, Norm};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(1, 4, Norm::RmsNorm, 1e-6)?;
//! let x = [1.0f32, -1.0, 1.0, -1.0];
//! let gamma = [2.0f32; 4];
//! let (mut out, mut s, mut mean, mut rstd) = ([0f32; 4], [0f32; 4], [0f32; 1], [0f32; 1]);
//! let outs = cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd };
//! cpu::forward(&cfg, cpu::ForwardArgs::new(&x, &gamma), outs)?;
//! assert_eq!(s, x); // no residual, no dropout: s = x
//! assert_eq!(mean[0], 0.0); // RMSNorm stores no mean
//! assert!((out[0] - 2.0).abs() < 1e-5 && (out[1] + 2.0).abs() < 1e-5);
//! # Ok(()) }
//! ```

use super::{
    check_backward, check_forward, check_stream_dtype, colsum_slab_rows, row_partials, Config,
    Norm, GROUP,
};
pub use crate::dropping::rows::{row_sum, stat_sums, stat_sums2};
use crate::dropping::{row_multiplier, row_scales};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::redundancy::{self, row_cos};

/// The inputs of [`forward`] / [`forward_inplace`].
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::ForwardArgs;
/// let (x, gamma, beta) = ([1.0f32; 8], [1.0f32; 4], [0.0f32; 4]);
/// let args: ForwardArgs<'_, f32, f32> = ForwardArgs { beta: Some(&beta), ..ForwardArgs::new(&x, &gamma) };
/// assert!(args.residual.is_none() && args.beta.is_some());
/// ```
#[derive(Clone, Copy)]
pub struct ForwardArgs<'a, T, S> {
    /// The sub-block output, `len == rows * cols`.
    pub x: &'a [T],
    /// The residual stream (None: the first block, or in place).
    pub residual: Option<&'a [S]>,
    /// Norm weight, `len == cols`.
    pub gamma: &'a [T],
    /// Norm bias, `len == cols`.
    pub beta: Option<&'a [T]>,
    /// Bias added to x before dropout, `len == cols`.
    pub bias: Option<&'a [T]>,
    /// Caller-supplied row scale, `len == rows` (not with a drop path).
    pub rowscale: Option<&'a [f32]>,
    /// The meter site this call adds its rows' `cos(residual, s)` to (see
    /// [`crate::redundancy`] and the [module docs](super)); `None`: nothing is computed.
    pub redundancy: Option<redundancy::cpu::Site<'a>>,
}

impl<'a, T, S> ForwardArgs<'a, T, S> {
    /// The required inputs; every option `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::cpu::ForwardArgs;
    /// let args = ForwardArgs::<f32, f32>::new(&[1.0; 4], &[1.0; 4]);
    /// assert!(args.bias.is_none() && args.rowscale.is_none());
    /// ```
    pub fn new(x: &'a [T], gamma: &'a [T]) -> Self {
        ForwardArgs {
            x,
            residual: None,
            gamma,
            beta: None,
            bias: None,
            rowscale: None,
            redundancy: None,
        }
    }
}

/// The outputs of [`forward`] (see the [module](self) example).
pub struct ForwardOut<'a, T, S> {
    /// `norm(s) * layer_scale`.
    pub out: &'a mut [T],
    /// The new stream (holds the residual on entry to [`forward_inplace`]).
    pub s: &'a mut [S],
    /// Per-row mean (0 for RMSNorm).
    pub mean: &'a mut [f32],
    /// Per-row `1 / sqrt(var + eps)`.
    pub rstd: &'a mut [f32],
}

/// The inputs of [`backward`].
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::BackwardArgs;
/// let (d, s, g, m, r) = ([1.0f32; 4], [1.0f32; 4], [1.0f32; 4], [0.0f32], [1.0f32]);
/// let args = BackwardArgs::<f32, f32>::new(&d, &s, &g, &m, &r);
/// assert!(args.d_s.is_none());
/// ```
#[derive(Clone, Copy)]
pub struct BackwardArgs<'a, T, S> {
    /// Gradient of `out`.
    pub d_out: &'a [T],
    /// Gradient along the stream past this sub-block (prenorm mode).
    pub d_s: Option<&'a [S]>,
    /// The forward's `s`.
    pub s: &'a [S],
    /// Norm weight.
    pub gamma: &'a [T],
    /// The forward's per-row mean.
    pub mean: &'a [f32],
    /// The forward's per-row rstd.
    pub rstd: &'a [f32],
    /// The caller-supplied row scale the forward used.
    pub rowscale: Option<&'a [f32]>,
}

impl<'a, T, S> BackwardArgs<'a, T, S> {
    /// The required inputs; every option `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::cpu::BackwardArgs;
    /// let args = BackwardArgs::<f32, f32>::new(&[1.0; 2], &[1.0; 2], &[1.0; 2], &[0.0], &[1.0]);
    /// assert!(args.rowscale.is_none());
    /// ```
    pub fn new(
        d_out: &'a [T],
        s: &'a [S],
        gamma: &'a [T],
        mean: &'a [f32],
        rstd: &'a [f32],
    ) -> Self {
        BackwardArgs {
            d_out,
            d_s: None,
            s,
            gamma,
            mean,
            rstd,
            rowscale: None,
        }
    }
}

/// The outputs of [`backward`].
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::BackwardOut;
/// let (mut dx, mut dg) = ([0.0f32; 4], [0.0f32; 2]);
/// let outs = BackwardOut::<f32, f32>::new(&mut dx, &mut dg);
/// assert!(outs.d_residual.is_none());
/// ```
pub struct BackwardOut<'a, T, S> {
    /// Gradient of x.
    pub dx: &'a mut [T],
    /// Gradient of the residual.
    pub d_residual: Option<&'a mut [S]>,
    /// Gradient of gamma.
    pub dgamma: &'a mut [T],
    /// Gradient of beta.
    pub dbeta: Option<&'a mut [T]>,
    /// Gradient of the dropout bias.
    pub dbias: Option<&'a mut [T]>,
}

impl<'a, T, S> BackwardOut<'a, T, S> {
    /// The required outputs; every option `None`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::dropout_add_norm::cpu::BackwardOut;
    /// let (mut dx, mut dg) = ([0.0f32; 2], [0.0f32; 2]);
    /// assert!(BackwardOut::<f32, f32>::new(&mut dx, &mut dg).dbeta.is_none());
    /// ```
    pub fn new(dx: &'a mut [T], dgamma: &'a mut [T]) -> Self {
        BackwardOut {
            dx,
            d_residual: None,
            dgamma,
            dbeta: None,
            dbias: None,
        }
    }
}

/// `|s|²` of a row from the norm's own row sums, as the forward's statistics take it: RMSNorm's
/// `sum` (the [`row_sum`] of `s²`) as it is; LayerNorm's `fma(sum, mean, sq)` with `sum` the row
/// sum of `s`, `mean = sum / cols` and `sq` the row sum of `(s - mean)²` (`sq + mean·sum = |s|²
/// - mean (sum - cols·mean)`: the mean's rounding, bounded in [`norm_stats_chain`]).
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu::norm_ss, Norm};
/// // s = [1, 3]: sum 4, mean 2, sq 2, |s|² = 10.
/// assert_eq!(norm_ss(Norm::LayerNorm, 4.0, 2.0, 2.0), 10.0);
/// assert_eq!(norm_ss(Norm::RmsNorm, 10.0, 0.0, 0.0), 10.0);
/// ```
pub fn norm_ss(norm: Norm, sum: f32, mean: f32, sq: f32) -> f32 {
    match norm {
        Norm::LayerNorm => sum.mul_add(mean, sq),
        Norm::RmsNorm => sum,
    }
}

/// The longest chain of f32 roundings in one of [`stat_sums`]' sums for `cols` columns: 8 fused
/// multiply-adds of a group, one add per group of a partial, 5 tree levels, one add per further
/// run of 32 partials. The BI bound of [`crate::redundancy`] is `(2 k + 6) * 2^-24 + 2^-33`
/// (`dropout`'s residual forward: `k = stats_chain(cols)`; `dropout_add_norm`:
/// [`norm_stats_chain`]).
///
/// ```
/// use fusedreg::dropout_add_norm::cpu::stats_chain;
/// assert_eq!(stats_chain(4096), 8 + 2 + 5 + 7); // 512 groups over 256 partials
/// assert_eq!(stats_chain(1), 8 + 1 + 5);
/// ```
pub fn stats_chain(cols: usize) -> usize {
    let p = row_partials(cols);
    GROUP + cols.div_ceil(GROUP).div_ceil(p) + 5 + (p / 32 - 1)
}

/// `k` of the BI bound `(2 k + 6) * 2^-24 + 2^-33` for `dropout_add_norm`'s statistics: the
/// larger of [`stats_chain`] (`r·s`, `|r|²`) and the relative error of [`norm_ss`]'s `|s|²` in
/// units of `2^-24`. With `c` the chain of a [`row_sum`] (8 adds per group of a partial, 5 tree
/// levels, one add per further run of 32 partials): RMSNorm `c + 1` (the square's rounding);
/// LayerNorm `3 c + 5` (the sum of squares around the mean `c + 3`, the mean's rounding in
/// `sum - cols·mean` and in `mean·sum` `c + 1` each, the fused multiply-add 1; `|mean| sum|s|
/// <= |s|²` by Cauchy-Schwarz).
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu::{norm_stats_chain, stats_chain}, Norm};
/// let c = 8 * 2 + 5 + 7; // 4096 columns: 2 groups per partial of 256
/// assert_eq!(norm_stats_chain(4096, Norm::RmsNorm), c + 1);
/// assert_eq!(norm_stats_chain(4096, Norm::LayerNorm), 3 * c + 5);
/// assert!(norm_stats_chain(8, Norm::RmsNorm) >= stats_chain(8));
/// ```
pub fn norm_stats_chain(cols: usize, norm: Norm) -> usize {
    let p = row_partials(cols);
    let c = GROUP * cols.div_ceil(GROUP).div_ceil(p) + 5 + (p / 32 - 1);
    let ss = match norm {
        Norm::LayerNorm => 3 * c + 5,
        Norm::RmsNorm => c + 1,
    };
    ss.max(stats_chain(cols))
}

/// `1 / sqrt(v + eps)`: a correctly rounded square root, then a correctly rounded division.
fn rstd_of(v: f32, eps: f32) -> f32 {
    1.0 / (v + eps).sqrt()
}

/// `s = residual + rowscale * dropout(x + bias)`, `out = norm(s) * layer_scale` and the row
/// statistics (see the [module docs](super)).
///
/// Errors: [`crate::Error::ShapeMismatch`] when a length disagrees with the config;
/// [`crate::Error::InvalidArgument`] for a rowscale together with a drop path, or a stream type
/// other than x's or f32.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 2, Norm::LayerNorm, 1e-6)?;
/// let (x, r, gamma, beta) = ([1.0f32, 3.0], [1.0f32, 1.0], [1.0f32; 2], [0.5f32; 2]);
/// let (mut out, mut s, mut mean, mut rstd) = ([0f32; 2], [0f32; 2], [0f32; 1], [0f32; 1]);
/// let args = cpu::ForwardArgs { residual: Some(&r), beta: Some(&beta), ..cpu::ForwardArgs::new(&x, &gamma) };
/// cpu::forward(&cfg, args, cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd })?;
/// assert_eq!((s, mean[0]), ([2.0, 4.0], 3.0));
/// assert!((out[0] + 0.5).abs() < 1e-5 && (out[1] - 1.5).abs() < 1e-5);
/// // Lengths are checked:
/// let bad = cpu::ForwardOut { out: &mut out[..1], s: &mut s, mean: &mut mean, rstd: &mut rstd };
/// assert!(cpu::forward(&cfg, cpu::ForwardArgs::<f32, f32>::new(&x, &gamma), bad).is_err());
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype, S: Dtype>(
    cfg: &Config,
    args: ForwardArgs<'_, T, S>,
    out: ForwardOut<'_, T, S>,
) -> Result<()> {
    check_stream_dtype(T::KIND, S::KIND)?;
    check_forward(cfg, &forward_lens!(args, out))?;
    match args.residual {
        Some(r) => out.s.copy_from_slice(r),
        None => out.s.fill(S::from_f32_rn(0.0)),
    }
    forward_core(cfg, args, out, args.residual.is_some(), true);
    Ok(())
}

/// [`forward`] with the stream updated in place: `out.s` holds the residual on entry and `s` on
/// return (`args.residual` must be `None`).
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 8, Norm::RmsNorm, 1e-6)?.with_dropout(0.25, 1, 2)?;
/// let (x, gamma) = ([0.5f32; 16], [1.0f32; 8]);
/// let mut stream = [1.0f32; 16];
/// let (mut out, mut mean, mut rstd) = ([0f32; 16], [0f32; 2], [0f32; 2]);
/// let outs = cpu::ForwardOut { out: &mut out, s: &mut stream, mean: &mut mean, rstd: &mut rstd };
/// cpu::forward_inplace(&cfg, cpu::ForwardArgs::new(&x, &gamma), outs)?;
/// assert!(stream.iter().all(|&v| v == 1.0 || v == 0.5f32.mul_add(1.0 / 0.75, 1.0)));
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype, S: Dtype>(
    cfg: &Config,
    args: ForwardArgs<'_, T, S>,
    out: ForwardOut<'_, T, S>,
) -> Result<()> {
    check_stream_dtype(T::KIND, S::KIND)?;
    if args.residual.is_some() {
        return Err(crate::Error::invalid(
            super::OP,
            "forward_inplace reads the residual from out.s; args.residual must be None",
        ));
    }
    let mut lens = forward_lens!(args, out);
    lens.residual = Some(out.s.len());
    check_forward(cfg, &lens)?;
    forward_core(cfg, args, out, true, true);
    Ok(())
}

/// `o.s` holds the residual (or zeros) on entry. `residual`: whether it is a real residual (in
/// both cases a dropped element keeps `o.s`'s bits; only the kept ones add the residual).
/// Without `compute_stream`, `o.s` already holds the stream and only the norm runs (the unfused
/// baseline's separate norm kernel).
pub(super) fn forward_core<T: Dtype, S: Dtype>(
    cfg: &Config,
    a: ForwardArgs<'_, T, S>,
    o: ForwardOut<'_, T, S>,
    residual: bool,
    compute_stream: bool,
) {
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let n = cols as f32;
    let rs = row_scales(cfg.seed(), cfg.rows(), a.rowscale, cfg.drop_path());
    let keying = cfg.keying(T::KIND);
    let mut bits = keying.keep_bits();
    let mut v = vec![0.0f32; cols];
    // The stream before the add, for the redundancy statistics only.
    let mut r_in = vec![0.0f32; if a.redundancy.is_some() { cols } else { 0 }];
    for row in 0..rows {
        let rowm = row_multiplier(keying.scale(), &rs, row);
        let base = row * cols;
        for (j, vj) in v.iter_mut().enumerate() {
            let i = base + j;
            if let Some(rj) = r_in.get_mut(j) {
                *rj = o.s[i].to_f32();
            }
            let m = if compute_stream && bits.get(i as u64) {
                rowm
            } else {
                0.0
            };
            if m != 0.0 {
                let mut t = a.x[i].to_f32();
                if let Some(b) = a.bias {
                    t += b[j].to_f32();
                }
                let r = if residual { o.s[i].to_f32() } else { 0.0 };
                o.s[i] = S::from_f32_rn(t.mul_add(m, r));
            }
            *vj = o.s[i].to_f32();
        }
        // The norm's row sums: (sum of s or of s², its mean, the sum of (s - mean)²).
        let (sum, mean, sq) = match cfg.norm() {
            Norm::LayerNorm => {
                let sum = row_sum(cols, |j| v[j]);
                let mean = sum / n;
                let sq = row_sum(cols, |j| {
                    let d = v[j] - mean;
                    d * d
                });
                (sum, mean, sq)
            }
            Norm::RmsNorm => (row_sum(cols, |j| v[j] * v[j]), 0.0, 0.0),
        };
        let rstd = match cfg.norm() {
            Norm::LayerNorm => rstd_of(sq / n, cfg.eps()),
            Norm::RmsNorm => rstd_of(sum / n, cfg.eps()),
        };
        o.mean[row] = mean;
        o.rstd[row] = rstd;
        if let Some(site) = a.redundancy {
            let [dot, rr] = stat_sums2(cols, |j| r_in[j], |j| v[j]);
            site.add(row_cos(dot, rr, norm_ss(cfg.norm(), sum, mean, sq)));
        }
        for (j, &vj) in v.iter().enumerate() {
            let xhat = xhat(cfg.norm(), vj, mean, rstd);
            let g = a.gamma[j].to_f32();
            let y = match a.beta {
                Some(b) => xhat.mul_add(g, b[j].to_f32()),
                None => xhat * g,
            };
            o.out[base + j] = T::from_f32_rn(y * cfg.layer_scale());
        }
    }
}

#[inline]
fn xhat(norm: Norm, v: f32, mean: f32, rstd: f32) -> f32 {
    match norm {
        Norm::LayerNorm => (v - mean) * rstd,
        Norm::RmsNorm => v * rstd,
    }
}

/// The backward (see the [module docs](super)): dx with the mask and row scale regenerated,
/// d_residual, and the column sums dgamma, dbeta, dbias in the slab order of
/// [`super::colsum_slab_rows`]. With no rows the column gradients are zeros.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_add_norm::{cpu, Config, Norm};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 4, Norm::LayerNorm, 1e-5)?;
/// let x = [1.0f32, 2.0, 4.0, 8.0, -1.0, 0.0, 1.0, 3.0];
/// let gamma = [1.0f32; 4];
/// let (mut out, mut s, mut mean, mut rstd) = ([0f32; 8], [0f32; 8], [0f32; 2], [0f32; 2]);
/// let outs = cpu::ForwardOut { out: &mut out, s: &mut s, mean: &mut mean, rstd: &mut rstd };
/// cpu::forward(&cfg, cpu::ForwardArgs::new(&x, &gamma), outs)?;
/// // A gradient along gamma's direction only: LayerNorm's dx sums to zero per row.
/// let d_out = [1.0f32, -2.0, 0.5, 3.0, 1.0, 1.0, -1.0, 2.0];
/// let (mut dx, mut dgamma, mut dbeta) = ([0f32; 8], [0f32; 4], [0f32; 4]);
/// let outs = cpu::BackwardOut { dbeta: Some(&mut dbeta), ..cpu::BackwardOut::new(&mut dx, &mut dgamma) };
/// cpu::backward(&cfg, cpu::BackwardArgs::new(&d_out, &s, &gamma, &mean, &rstd), outs)?;
/// assert!(dx[..4].iter().sum::<f32>().abs() < 1e-5);
/// assert_eq!(dbeta, [2.0, -1.0, -0.5, 5.0]);
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype, S: Dtype>(
    cfg: &Config,
    a: BackwardArgs<'_, T, S>,
    o: BackwardOut<'_, T, S>,
) -> Result<()> {
    check_stream_dtype(T::KIND, S::KIND)?;
    check_backward(cfg, &backward_lens!(a, o))?;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let n = cols as f32;
    let ls = cfg.layer_scale();
    let rs = row_scales(cfg.seed(), cfg.rows(), a.rowscale, cfg.drop_path());
    let keying = cfg.keying(T::KIND);
    let mut bits = keying.keep_bits();
    let slab = colsum_slab_rows(rows);
    // Column sums: the running slab partials and the totals over finished slabs.
    let mut part = [vec![0.0f32; cols], vec![0.0f32; cols], vec![0.0f32; cols]];
    let mut total = [vec![0.0f32; cols], vec![0.0f32; cols], vec![0.0f32; cols]];
    let (mut xh, mut w) = (vec![0.0f32; cols], vec![0.0f32; cols]);
    let mut d_residual = o.d_residual;
    for row in 0..rows {
        let rowm = row_multiplier(keying.scale(), &rs, row);
        let base = row * cols;
        let (mean, rstd) = (a.mean[row], a.rstd[row]);
        for j in 0..cols {
            let i = base + j;
            xh[j] = xhat(cfg.norm(), a.s[i].to_f32(), mean, rstd);
            let g = a.d_out[i].to_f32() * ls;
            w[j] = g * a.gamma[j].to_f32();
            part[0][j] += g * xh[j];
            part[1][j] += g;
        }
        let c1 = row_sum(cols, |j| xh[j] * w[j]) / n;
        let c2 = match cfg.norm() {
            Norm::LayerNorm => row_sum(cols, |j| w[j]) / n,
            Norm::RmsNorm => 0.0,
        };
        for j in 0..cols {
            let i = base + j;
            let u = match cfg.norm() {
                Norm::LayerNorm => xh[j].mul_add(c1, c2),
                Norm::RmsNorm => xh[j] * c1,
            };
            let mut ds = (w[j] - u) * rstd;
            if let Some(d) = a.d_s {
                ds += d[i].to_f32();
            }
            if let Some(dr) = d_residual.as_deref_mut() {
                dr[i] = S::from_f32_rn(ds);
            }
            let m = if bits.get(i as u64) { rowm } else { 0.0 };
            let dt = if m != 0.0 { ds * m } else { 0.0 };
            o.dx[i] = T::from_f32_rn(dt);
            part[2][j] += dt;
        }
        if (row + 1) % slab == 0 || row + 1 == rows {
            for (t, p) in total.iter_mut().zip(part.iter_mut()) {
                for (tj, pj) in t.iter_mut().zip(p.iter_mut()) {
                    *tj += *pj;
                    *pj = 0.0;
                }
            }
        }
    }
    let write = |dst: &mut [T], src: &[f32]| {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = T::from_f32_rn(v);
        }
    };
    write(o.dgamma, &total[0]);
    if let Some(d) = o.dbeta {
        write(d, &total[1]);
    }
    if let Some(d) = o.dbias {
        write(d, &total[2]);
    }
    Ok(())
}
