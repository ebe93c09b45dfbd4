//! The CPU reference: the same operations in the same order as `kernels/bias_act_dropout.cu`
//! (see the [module docs](super) for the pinned arithmetic), so the kernels match it bit for bit.
//!
//! ```
//! use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
//! use fusedreg::Dtype;
//! # fn main() -> fusedreg::Result<()> {
//! let cfg = Config::new(2, 3, Activation::Relu, 0.5, 1, 2)?;
//! let x = [1.0f32, -2.0, 3.0, -4.0, 5.0, 6.0];
//! let mut y = [f32::NAN; 6];
//! cpu::forward(&cfg, &x, None, &mut y, None)?;
//! for i in 0..6 {
//!     let kept = cfg.keeps(f32::KIND, i as u64); // f32: 32-bit keys by default
//!     assert_eq!(y[i], if kept { 2.0 * x[i].max(0.0) } else { 0.0 });
//! }
//! // Backward: dx = 2 dy where kept and x > 0; dbias sums dx over rows.
//! let dy = [1.0f32; 6];
//! let (mut dx, mut dbias) = ([f32::NAN; 6], [f32::NAN; 3]);
//! cpu::backward(&cfg, &dy, Preact::X { x: &x[..], bias: None }, &mut dx, Some(&mut dbias))?;
//! assert_eq!(dbias[0], dx[0] + dx[3]);
//! # Ok(()) }
//! ```

use super::{check_backward, check_forward, Activation, Config, Preact, OP};
use crate::dropping::DbiasSums;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::fmath;

/// `1/sqrt(2)`, `1/sqrt(2 pi)`, `sqrt(2/pi)`, `0.044715`, `3 * 0.044715` as f32 (the kernel's
/// `K_*` bit patterns).
const FRAC_1_SQRT_2: f32 = f32::from_bits(0x3f35_04f3);
const FRAC_1_SQRT_2PI: f32 = f32::from_bits(0x3ecc_422a);
const SQRT_2_PI: f32 = f32::from_bits(0x3f4c_422a);
const GELU_C: f32 = f32::from_bits(0x3d37_2713);
const GELU_3C: f32 = f32::from_bits(0x3e09_5d4f);

/// `act(h)`, as `act_fwd` in the kernel.
pub(crate) fn act_fwd(act: Activation, h: f32) -> f32 {
    let ah = h.abs();
    let sat = |bound: f32| (ah >= bound).then(|| if h > 0.0 { h } else { -0.0 });
    match act {
        Activation::GeluErf => sat(16.0).unwrap_or_else(|| {
            let c = fmath::erf(h * FRAC_1_SQRT_2).mul_add(0.5, 0.5);
            h * c
        }),
        Activation::GeluTanh => sat(16.0).unwrap_or_else(|| {
            let h3 = (h * h) * h;
            let t = fmath::tanh(SQRT_2_PI * GELU_C.mul_add(h3, h));
            h * t.mul_add(0.5, 0.5)
        }),
        Activation::Silu => sat(128.0).unwrap_or_else(|| h * fmath::sigmoid(h)),
        Activation::Relu => {
            if h > 0.0 || h.is_nan() {
                h
            } else {
                0.0
            }
        }
    }
}

/// `act'(h)`, as `act_grad` in the kernel.
pub(crate) fn act_grad(act: Activation, h: f32) -> f32 {
    let ah = h.abs();
    let sat = |bound: f32| (ah >= bound).then_some(if h > 0.0 { 1.0 } else { 0.0 });
    match act {
        Activation::GeluErf => sat(16.0).unwrap_or_else(|| {
            let c = fmath::erf(h * FRAC_1_SQRT_2).mul_add(0.5, 0.5);
            let pdf = fmath::exp((-0.5 * h) * h) * FRAC_1_SQRT_2PI;
            h.mul_add(pdf, c)
        }),
        Activation::GeluTanh => sat(16.0).unwrap_or_else(|| {
            let h2 = h * h;
            let h3 = h2 * h;
            let t = fmath::tanh(SQRT_2_PI * GELU_C.mul_add(h3, h));
            let c = t.mul_add(0.5, 0.5);
            let s = (-t).mul_add(t, 1.0);
            let w = (0.5 * h) * s;
            let z = SQRT_2_PI * GELU_3C.mul_add(h2, 1.0);
            w.mul_add(z, c)
        }),
        Activation::Silu => sat(128.0).unwrap_or_else(|| {
            let sg = fmath::sigmoid(h);
            sg * h.mul_add(1.0 - sg, 1.0)
        }),
        Activation::Relu => {
            if h > 0.0 {
                1.0
            } else if h <= 0.0 {
                0.0
            } else {
                h // NaN
            }
        }
    }
}

/// `y = dropout(act(x + bias))`; `h_out`, when given, receives `T(x + bias)` (for a backward
/// with [`Preact::H`]).
///
/// Errors: [`crate::Error::ShapeMismatch`] when a length disagrees with the config.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::{cpu, Activation, Config};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(1, 4, Activation::Silu, 0.0, 1, 2)?; // p = 0: no dropout
/// let (x, b) = ([0.0f32, 1.0, -1.0, 2.0], [1.0f32; 4]);
/// let (mut y, mut h) = ([0.0f32; 4], [0.0f32; 4]);
/// cpu::forward(&cfg, &x, Some(&b), &mut y, Some(&mut h))?;
/// assert_eq!(h, [1.0, 2.0, 0.0, 3.0]);
/// assert_eq!(y[2], 0.0);
/// assert_eq!(y[0], Activation::Silu.forward(1.0));
/// assert!(cpu::forward(&cfg, &x[..3], None, &mut y, None).is_err());
/// # Ok(()) }
/// ```
pub fn forward<T: Dtype>(
    cfg: &Config,
    x: &[T],
    bias: Option<&[T]>,
    y: &mut [T],
    mut h_out: Option<&mut [T]>,
) -> Result<()> {
    check_forward(
        cfg,
        x.len(),
        bias.map(<[T]>::len),
        y.len(),
        h_out.as_ref().map(|h| h.len()),
    )?;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let keying = cfg.keying(T::KIND);
    let scale = keying.scale();
    let mut bits = keying.keep_bits();
    for row in 0..rows {
        for col in 0..cols {
            let i = row * cols + col;
            let mut h = x[i].to_f32();
            if let Some(b) = bias {
                h += b[col].to_f32();
            }
            if let Some(ho) = h_out.as_deref_mut() {
                ho[i] = T::from_f32_rn(h);
            }
            let v = if bits.get(i as u64) {
                act_fwd(cfg.act(), h) * scale
            } else {
                0.0
            };
            y[i] = T::from_f32_rn(v);
        }
    }
    Ok(())
}

/// `dx = dropout'(dy) * act'(h)` and, when `dbias` is given, its column sums (see the
/// [module docs](super) for the summation order).
///
/// Errors: [`crate::Error::ShapeMismatch`] when a length disagrees with the config;
/// [`crate::Error::HostAlloc`] when the dbias scratch (5 f32 per column, only with `dbias`)
/// cannot be allocated. An empty config allocates nothing and zeroes `dbias`.
///
/// # Examples
///
/// ```
/// use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
/// # fn main() -> fusedreg::Result<()> {
/// let cfg = Config::new(2, 2, Activation::GeluErf, 0.0, 1, 2)?;
/// let x = [0.0f32; 4];
/// let dy = [1.0f32, 2.0, 3.0, 4.0];
/// let (mut dx, mut db) = ([0.0f32; 4], [0.0f32; 2]);
/// cpu::backward(&cfg, &dy, Preact::X { x: &x[..], bias: None }, &mut dx, Some(&mut db))?;
/// assert_eq!(dx, [0.5, 1.0, 1.5, 2.0]); // GELU'(0) = 1/2
/// assert_eq!(db, [2.0, 3.0]);
/// # Ok(()) }
/// ```
pub fn backward<T: Dtype>(
    cfg: &Config,
    dy: &[T],
    pre: Preact<&[T]>,
    dx: &mut [T],
    dbias: Option<&mut [T]>,
) -> Result<()> {
    let db = dbias.as_ref().map(|d| d.len());
    check_backward(cfg, dy.len(), &pre.lens(|b| b.len()), dx.len(), db)?;
    let (rows, cols) = (cfg.rows(), cfg.cols());
    if cfg.is_empty() {
        // No rows (or no columns): dx is empty and the column sums are zero. Nothing is
        // allocated, whatever the other dimension says.
        if let Some(db) = dbias {
            db.fill(T::from_f32_rn(0.0));
        }
        return Ok(());
    }
    let keying = cfg.keying(T::KIND);
    let scale = keying.scale();
    let mut bits = keying.keep_bits();
    // Only with dbias: its length (cols) was checked, so the scratch is a few times its size.
    let width = if dbias.is_some() { cols } else { 0 };
    let mut sums = DbiasSums::new(OP, rows, cols, T::KIND, width)?;
    for row in 0..rows {
        let partial = sums.lane(row);
        for col in 0..cols {
            let i = row * cols + col;
            let d = if bits.get(i as u64) {
                let h = match pre {
                    Preact::X { x, bias } => {
                        let mut h = x[i].to_f32();
                        if let Some(b) = bias {
                            h += b[col].to_f32();
                        }
                        h
                    }
                    Preact::H(h) => h[i].to_f32(),
                };
                (dy[i].to_f32() * scale) * act_grad(cfg.act(), h)
            } else {
                0.0
            };
            dx[i] = T::from_f32_rn(d);
            if let Some(part) = partial.get_mut(col) {
                *part += d;
            }
        }
        sums.end_row(row, rows);
    }
    sums.finish(dbias);
    Ok(())
}
