//! The CPU reference: the same operations in the same order as `kernels/dropout.cu` (see the
//! [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//!
//! ```
//! use fusedreg::dropout::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 3, 0.5, 1, 2)?;
//! let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let r = [10.0f32; 6];
//! let (mut y, mut yr) = ([0.0f32; 6], [0.0f32; 6]);
//! let mut mask = [0u32; 1];
//! let opts = cpu::ForwardOptions { mask_out: Some(&mut mask), ..Default::default() };
//! cpu::forward(&cfg, &x, &mut y, opts)?;
//! let opts = cpu::ForwardOptions { residual: Some(&r), ..Default::default() };
//! cpu::forward(&cfg, &x, &mut yr, opts)?;
//! for i in 0..6 {
//!     let kept = mask[0] >> i & 1 == 1;
//!     assert_eq!(y[i], if kept { 2.0 * x[i] } else { 0.0 });
//!     assert_eq!(yr[i], if kept { x[i].mul_add(2.0, 10.0) } else { 10.0 });
//! }
//! // Backward: dx = 2 dy where kept, 0 where dropped; dbias sums dx over rows.
//! let dy = [1.0f32; 6];
//! let (mut dx, mut dbias) = ([f32::NAN; 6], [f32::NAN; 3]);
//! let opts = cpu::BackwardOptions { mask: Some(&mask), dbias: Some(&mut dbias), ..Default::default() };
//! cpu::backward(&cfg, &dy, &mut dx, opts)?;
//! assert_eq!(dbias[0], dx[0] + dx[3]);
//! # Ok(()) }
//! ```

use super::{Config, OP};
use crate::dropping::rows::stat_sums;
use crate::dropping::{
    backward_cpu, check_backward, check_forward, row_multiplier, row_scales, set_bit, ForwardLens,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::redundancy::row_cos;

/// The CPU options are the shared ones (every dropping op takes the same).
pub use crate::dropping::{
    CpuBackwardOptions as BackwardOptions, CpuForwardOptions as ForwardOptions,
};

/// `y = dropout(x + bias)`, or `y = residual + dropout(x + bias)` with `opts.residual`, into `y`
/// (see the [module docs](super)).
///
/// Errors: [`crate::Error::ShapeMismatch`] when a length disagrees with the config,
/// [`crate::Error::InvalidArgument`] for a rowscale together with a drop path, or rowscale_out
/// without one. Nothing is written on error.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(4, 8, 0.25, 42, 7)?;
/// let (x, r, mut y) = (vec![1.5f32; 32], vec![0.5f32; 32], vec![0.0f32; 32]);
/// cpu::forward(&cfg, &x, &mut y, Default::default())?;
/// for i in 0..32 {
///     assert_eq!(y[i], if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) { 1.5 * cfg.rate().scale() } else { 0.0 });
/// }
/// let opts = cpu::ForwardOptions { residual: Some(&r), ..Default::default() };
/// cpu::forward(&cfg, &x, &mut y, opts)?;
/// for i in 0..32 {
///     let kept = 1.5f32.mul_add(cfg.rate().scale(), 0.5);
///     assert_eq!(y[i], if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) { kept } else { 0.5 });
/// }
/// assert!(cpu::forward(&cfg, &x[..31], &mut y, Default::default()).is_err());
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    cfg: &Config,
    x: &[T],
    y: &mut [T],
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    check_forward(
        OP,
        cfg,
        &forward_lens(x, opts.residual.map(<[T]>::len), Some(y.len()), &opts),
    )?;
    let residual = opts.residual;
    super::check_redundancy(
        opts.redundancy.is_some(),
        residual.is_some(),
        opts.mask_out.is_some(),
    )?;
    if let Some(r) = residual {
        y.copy_from_slice(r);
    }
    forward_core(cfg, x, y, residual.is_some(), opts);
    Ok(())
}

/// [`forward`] updating the residual stream in place: `residual += dropout(x + bias)`, with the
/// bits of the out-of-place forward (`opts.residual` must be `None`: the residual is the output).
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::flat(1000, 0.1, 42, 7)?;
/// let x = vec![1.0f32; 1000];
/// let mut stream = vec![0.5f32; 1000];
/// cpu::forward_inplace(&cfg, &x, &mut stream, Default::default())?;
/// // The same bits as the out-of-place forward.
/// let (r, mut y) = (vec![0.5f32; 1000], vec![0.0f32; 1000]);
/// cpu::forward(&cfg, &x, &mut y, cpu::ForwardOptions { residual: Some(&r), ..Default::default() })?;
/// assert_eq!(stream, y);
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype>(
    cfg: &Config,
    x: &[T],
    residual: &mut [T],
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    if opts.residual.is_some() {
        return Err(Error::invalid(OP, IN_PLACE_RESIDUAL));
    }
    check_forward(OP, cfg, &forward_lens(x, Some(residual.len()), None, &opts))?;
    super::check_redundancy(opts.redundancy.is_some(), true, opts.mask_out.is_some())?;
    forward_core(cfg, x, residual, true, opts);
    Ok(())
}

/// The error of an in-place forward given a separate residual.
pub(super) const IN_PLACE_RESIDUAL: &str =
    "forward_inplace reads the residual from the stream it updates; opts.residual must be None";

fn forward_lens<T>(
    x: &[T],
    residual: Option<usize>,
    y: Option<usize>,
    opts: &ForwardOptions<'_, T>,
) -> ForwardLens {
    ForwardLens {
        x: x.len(),
        residual,
        y,
        bias: opts.bias.map(<[T]>::len),
        rowscale: opts.rowscale.map(<[f32]>::len),
        mask_out: opts.mask_out.as_ref().map(|m| m.len()),
        rowscale_out: opts.rowscale_out.as_ref().map(|m| m.len()),
    }
}

/// The forward on checked buffers; `y` holds the residual on entry when `residual`.
fn forward_core<T: Dtype>(
    cfg: &Config,
    x: &[T],
    y: &mut [T],
    residual: bool,
    opts: ForwardOptions<'_, T>,
) {
    let (rows, cols) = (cfg.rows(), cfg.cols());
    if cfg.is_empty() {
        // As the kernels: nothing is launched, so nothing is written.
        return;
    }
    let rs = row_scales(cfg.seed(), rows, opts.rowscale, cfg.drop_path());
    if let (Some(out), Some(v)) = (opts.rowscale_out, &rs) {
        out.copy_from_slice(v);
    }
    let mut mask = opts.mask_out;
    if let Some(m) = mask.as_deref_mut() {
        m.fill(0);
    }
    let keying = cfg.keying(T::KIND);
    let mut bits = keying.keep_bits();
    let scale = keying.scale();
    // The statistics: the row of the residual before the update (y holds it on entry).
    let site = opts.redundancy.filter(|_| residual);
    let mut r_row = vec![0.0f32; if site.is_some() { cols } else { 0 }];
    for row in 0..rows {
        if site.is_some() {
            for (r, v) in r_row.iter_mut().zip(&y[row * cols..(row + 1) * cols]) {
                *r = v.to_f32();
            }
        }
        let rowm = row_multiplier(scale, &rs, row);
        for col in 0..cols {
            let i = row * cols + col;
            let keep = bits.get(i as u64);
            if let (Some(m), true) = (mask.as_deref_mut(), keep) {
                set_bit(m, i);
            }
            let m = if keep { rowm } else { 0.0 };
            if m == 0.0 {
                if !residual {
                    y[i] = T::from_f32_rn(0.0); // +0: a dropped element is exactly zero
                } // with a residual y[i] keeps the residual's own bits
                continue;
            }
            let mut t = x[i].to_f32();
            if let Some(b) = opts.bias {
                t += b[col].to_f32();
            }
            y[i] = if residual {
                T::from_f32_rn(t.mul_add(m, y[i].to_f32()))
            } else {
                T::from_f32_rn(t * m)
            };
        }
        if let Some(site) = site {
            let out = &y[row * cols..(row + 1) * cols];
            let [dot, rr, ss] = stat_sums(cols, |j| r_row[j], |j| out[j].to_f32());
            site.add(row_cos(dot, rr, ss));
        }
    }
}

/// `dx = dropout'(dy)` and optionally `dbias` (see the [module docs](super)); `dresidual = dy`.
///
/// The keep mask is read from `opts.mask` when given, otherwise regenerated from the config; the
/// row scale is `opts.rowscale` or the config's drop path. dbias uses the slab partition of
/// [`super::slab_rows`]. When `rows` is 0, dbias is all zeros.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(4, 8, 0.5, 42, 7)?;
/// let dy = vec![1.0f32; 32];
/// let (mut dx, mut dbias) = (vec![f32::NAN; 32], vec![f32::NAN; 8]);
/// let opts = cpu::BackwardOptions { dbias: Some(&mut dbias), ..Default::default() };
/// cpu::backward(&cfg, &dy, &mut dx, opts)?;
/// for i in 0..32 {
///     assert_eq!(dx[i], if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) { 2.0 } else { 0.0 });
/// }
/// assert_eq!(dbias[0], dx[0] + dx[8] + dx[16] + dx[24]);
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    cfg: &Config,
    dy: &[T],
    dx: &mut [T],
    opts: BackwardOptions<'_, T>,
) -> Result<()> {
    check_backward(
        OP,
        cfg,
        dy.len(),
        dx.len(),
        opts.rowscale.map(<[f32]>::len),
        opts.mask.map(<[u32]>::len),
        opts.dbias.as_ref().map(|d| d.len()),
    )?;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    if cfg.is_empty() {
        if let Some(db) = opts.dbias {
            db.fill(T::from_f32_rn(0.0));
        }
        return Ok(());
    }
    let rs = row_scales(cfg.seed(), rows, opts.rowscale, cfg.drop_path());
    backward_cpu(
        rows,
        cols,
        &cfg.keying(T::KIND),
        rs,
        opts.mask,
        dy,
        dx,
        opts.dbias,
    )
}
