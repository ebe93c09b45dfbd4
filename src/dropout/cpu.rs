//! The CPU reference: the same operations in the same order as `kernels/dropout.cu` (see the
//! [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//!
//! ```
//! use fusedreg::dropout::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 3, 0.5, 1, 2)?;
//! let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let mut y = [0.0f32; 6];
//! let mut mask = [0u32; 1];
//! let opts = cpu::ForwardOptions { mask_out: Some(&mut mask), ..Default::default() };
//! cpu::forward(&cfg, &x, &mut y, opts)?;
//! for i in 0..6 {
//!     let kept = mask[0] >> i & 1 == 1;
//!     assert_eq!(y[i], if kept { 2.0 * x[i] } else { 0.0 });
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
use crate::dropping::{
    backward_cpu, check_backward, check_forward, row_multiplier, row_scales, set_bit, ForwardLens,
};
use crate::dtype::Dtype;
use crate::error::Result;

/// The CPU options are the shared ones (every dropping op takes the same).
pub use crate::dropping::{
    CpuBackwardOptions as BackwardOptions, CpuForwardOptions as ForwardOptions,
};

/// `y = dropout(x + bias)` into `y` (see the [module docs](super)).
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
/// let (x, mut y) = (vec![1.5f32; 32], vec![0.0f32; 32]);
/// cpu::forward(&cfg, &x, &mut y, Default::default())?;
/// for i in 0..32 {
///     assert_eq!(y[i], if cfg.keeps(i as u64) { 1.5 * cfg.rate().scale() } else { 0.0 });
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
    let lens = ForwardLens {
        x: x.len(),
        residual: None,
        y: Some(y.len()),
        bias: opts.bias.map(<[T]>::len),
        rowscale: opts.rowscale.map(<[f32]>::len),
        mask_out: opts.mask_out.as_ref().map(|m| m.len()),
        rowscale_out: opts.rowscale_out.as_ref().map(|m| m.len()),
    };
    check_forward(OP, cfg, &lens)?;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    if cfg.is_empty() {
        // As the kernels: nothing is launched, so nothing is written.
        return Ok(());
    }
    let rs = row_scales(cfg.seed(), rows, opts.rowscale, cfg.drop_path());
    if let (Some(out), Some(v)) = (opts.rowscale_out, &rs) {
        out.copy_from_slice(v);
    }
    let mut mask = opts.mask_out;
    if let Some(m) = mask.as_deref_mut() {
        m.fill(0);
    }
    let mut bits = cfg.keying().keep_bits();
    let scale = cfg.rate().scale();
    for row in 0..rows {
        let rowm = row_multiplier(scale, &rs, row);
        for col in 0..cols {
            let i = row * cols + col;
            let keep = bits.get(i as u64);
            if let (Some(m), true) = (mask.as_deref_mut(), keep) {
                set_bit(m, i);
            }
            let m = if keep { rowm } else { 0.0 };
            y[i] = if m != 0.0 {
                let mut t = x[i].to_f32();
                if let Some(b) = opts.bias {
                    t += b[col].to_f32();
                }
                T::from_f32_rn(t * m)
            } else {
                T::from_f32_rn(0.0) // +0: a dropped element is exactly zero
            };
        }
    }
    Ok(())
}

/// `dx = dropout'(dy)` and optionally `dbias` (see the [module docs](super)).
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
///     assert_eq!(dx[i], if cfg.keeps(i as u64) { 2.0 } else { 0.0 });
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
    backward_cpu(rows, cols, &cfg.keying(), rs, opts.mask, dy, dx, opts.dbias);
    Ok(())
}
