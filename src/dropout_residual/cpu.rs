//! The CPU reference: the same operations in the same order as `kernels/dropout_residual.cu`
//! (see the [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//!
//! ```
//! use fusedreg::dropout_residual::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 3, 0.5, 1, 2)?;
//! let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let r = [10.0f32; 6];
//! let mut y = [0.0f32; 6];
//! let mut mask = [0u32; 1];
//! let opts = cpu::ForwardOptions { mask_out: Some(&mut mask), ..Default::default() };
//! cpu::forward(&cfg, &x, &r, &mut y, opts)?;
//! for i in 0..6 {
//!     let kept = mask[0] >> i & 1 == 1;
//!     assert_eq!(y[i], if kept { x[i].mul_add(2.0, 10.0) } else { 10.0 });
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
use crate::dropping::{backward_cpu, row_multiplier, row_scales, set_bit};
use crate::dropping::{check_backward, check_forward, ForwardLens};
/// The CPU options are the shared ones (every dropping op takes the same).
pub use crate::dropping::{
    CpuBackwardOptions as BackwardOptions, CpuForwardOptions as ForwardOptions,
};
use crate::dtype::Dtype;
use crate::error::Result;

/// `y = residual + dropout(x + bias)` into `y` (see the [module docs](super)).
///
/// Errors: [`crate::Error::ShapeMismatch`] when a length disagrees with the config,
/// [`crate::Error::InvalidArgument`] for a rowscale together with a drop path, or rowscale_out
/// without one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(4, 8, 0.25, 42, 7)?;
/// let (x, r, mut y) = (vec![1.0f32; 32], vec![0.5f32; 32], vec![0.0f32; 32]);
/// cpu::forward(&cfg, &x, &r, &mut y, Default::default())?;
/// for i in 0..32 {
///     let kept = 1.0f32.mul_add(cfg.rate().scale(), 0.5);
///     assert_eq!(y[i], if cfg.keeps(i as u64) { kept } else { 0.5 });
/// }
/// assert!(cpu::forward(&cfg, &x[..31], &r, &mut y, Default::default()).is_err());
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    cfg: &Config,
    x: &[T],
    residual: &[T],
    y: &mut [T],
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    cfg.require_bits32(OP)?;
    check_forward(
        OP,
        cfg,
        &forward_lens(cfg, x, residual.len(), Some(y.len()), &opts),
    )?;
    y.copy_from_slice(residual);
    forward_core(cfg, x, y, opts);
    Ok(())
}

/// [`forward`] updating the residual stream in place: `residual += dropout(x + bias)`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::{cpu, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::flat(1000, 0.1, 42, 7)?;
/// let x = vec![1.0f32; 1000];
/// let mut stream = vec![0.5f32; 1000];
/// cpu::forward_inplace(&cfg, &x, &mut stream, Default::default())?;
/// // The same bits as the out-of-place forward.
/// let mut y = vec![0.0f32; 1000];
/// cpu::forward(&cfg, &x, &vec![0.5f32; 1000], &mut y, Default::default())?;
/// assert_eq!(stream, y);
/// # Ok(()) }
/// ```
pub fn forward_inplace<T: Dtype>(
    cfg: &Config,
    x: &[T],
    residual: &mut [T],
    opts: ForwardOptions<'_, T>,
) -> Result<()> {
    cfg.require_bits32(OP)?;
    check_forward(OP, cfg, &forward_lens(cfg, x, residual.len(), None, &opts))?;
    forward_core(cfg, x, residual, opts);
    Ok(())
}

fn forward_lens<T>(
    _cfg: &Config,
    x: &[T],
    residual: usize,
    y: Option<usize>,
    opts: &ForwardOptions<'_, T>,
) -> ForwardLens {
    ForwardLens {
        x: x.len(),
        residual: Some(residual),
        y,
        bias: opts.bias.map(<[T]>::len),
        rowscale: opts.rowscale.map(<[f32]>::len),
        mask_out: opts.mask_out.as_ref().map(|m| m.len()),
        rowscale_out: opts.rowscale_out.as_ref().map(|m| m.len()),
    }
}

/// `ry` holds the residual on entry and y on return.
fn forward_core<T: Dtype>(cfg: &Config, x: &[T], ry: &mut [T], opts: ForwardOptions<'_, T>) {
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
            if m != 0.0 {
                let mut t = x[i].to_f32();
                if let Some(b) = opts.bias {
                    t += b[col].to_f32();
                }
                ry[i] = T::from_f32_rn(t.mul_add(m, ry[i].to_f32()));
            }
            // else: y = r, the residual's own bits.
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
/// use fusedreg::dropout_residual::{cpu, Config};
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
    cfg.require_bits32(OP)?;
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
