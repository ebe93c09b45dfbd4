//! CPU references of the MLP building blocks (plain loops; for tests and the CPU run of the
//! example). `tanh` comes from libm here and from CUDA's `tanhf` on the device, so GELU agrees
//! to a few ulps, not bit for bit; everything else uses the kernels' order of operations.

use super::{colsum_slab_rows, gelu, gelu_grad, rows_of, MSE_PER_BLOCK};
use crate::kernels::check_len;
use fusedreg::{Error, Result};

const OP: &str = "mlp";

/// `n` zeros, or an error when they cannot be allocated.
fn zeros(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|e| {
        Error::shape(
            OP,
            format!("an output of {n} floats cannot be allocated: {e}"),
        )
    })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// `a * b`, or an error when it overflows.
fn product(a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::shape(OP, format!("{a} x {b} overflows")))
}

/// `out = gelu(h + bias[col])` on row-major `[rows, cols]`.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{cpu::bias_gelu_fwd, gelu};
/// let h = [0.5f32, -1.0, 2.0, 0.0, 1.0, -0.5]; // [2, 3]
/// let bias = [0.1f32, 0.2, 0.3];
/// let mut out = [0.0f32; 6];
/// bias_gelu_fwd(&h, &bias, &mut out).unwrap();
/// assert_eq!(out[4], gelu(1.0 + 0.2)); // row 1, column 1
/// assert!(bias_gelu_fwd(&h, &[0.0; 4], &mut out).is_err()); // 6 is not rows of 4
/// ```
pub fn bias_gelu_fwd(h: &[f32], bias: &[f32], out: &mut [f32]) -> Result<()> {
    let cols = bias.len();
    rows_of("h", h.len(), cols)?;
    check_len(OP, "out", out.len(), h.len())?;
    for (i, (o, &x)) in out.iter_mut().zip(h).enumerate() {
        *o = gelu(x + bias[i % cols]);
    }
    Ok(())
}

/// `out = da * gelu'(h + bias[col])`.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{cpu::bias_gelu_bwd, gelu_grad};
/// let (h, bias, da) = ([0.5f32, -1.0, 2.0, 0.0], [0.1f32, 0.2], [1.0f32, 2.0, 3.0, 4.0]);
/// let mut out = [0.0f32; 4];
/// bias_gelu_bwd(&h, &bias, &da, &mut out).unwrap();
/// assert_eq!(out[3], 4.0 * gelu_grad(0.0 + 0.2));
/// assert!(bias_gelu_bwd(&h, &bias, &da[..3], &mut out).is_err()); // da is too short
/// ```
pub fn bias_gelu_bwd(h: &[f32], bias: &[f32], da: &[f32], out: &mut [f32]) -> Result<()> {
    let cols = bias.len();
    rows_of("h", h.len(), cols)?;
    check_len(OP, "da", da.len(), h.len())?;
    check_len(OP, "out", out.len(), h.len())?;
    for (i, o) in out.iter_mut().enumerate() {
        *o = da[i] * gelu_grad(h[i] + bias[i % cols]);
    }
    Ok(())
}

/// Column sums of row-major `[rows, cols]`, in the kernels' slab order (bit-exact with them).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::cpu::colsum;
/// let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]; // [3, 2]
/// assert_eq!(colsum(&x, 3, 2).unwrap(), vec![9.0, 12.0]);
/// assert!(colsum(&x, 2, 2).is_err()); // 6 elements are not [2, 2]
/// assert_eq!(colsum(&[], 0, 3).unwrap(), vec![0.0; 3]); // no rows: zero sums
/// assert!(colsum(&[], 0, usize::MAX).is_err()); // an output that cannot exist: an error
/// ```
pub fn colsum(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    check_len(OP, "x", x.len(), product(rows, cols)?)?;
    let slab = colsum_slab_rows(rows) as usize;
    // `rows x cols` may be 0 with any `cols`: allocate fallibly, so an impossible output size is
    // an error, not a capacity-overflow panic or an allocation abort.
    let mut out = zeros(cols)?;
    if rows == 0 {
        return Ok(out);
    }
    let mut partial = zeros(cols)?;
    for r0 in (0..rows).step_by(slab.max(1)) {
        partial.iter_mut().for_each(|p| *p = 0.0);
        for r in r0..(r0 + slab).min(rows) {
            for (p, &v) in partial.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                *p += v;
            }
        }
        for (o, p) in out.iter_mut().zip(&partial) {
            *o += p;
        }
    }
    Ok(out)
}

/// `dy = (2 / n) * (y - target)`; returns the mean squared error (partials in the kernel's
/// order, summed in f64).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::cpu::mse_grad;
/// let (y, target) = ([1.0f32, 2.0], [0.0f32, 0.0]);
/// let mut dy = [0.0f32; 2];
/// assert_eq!(mse_grad(&y, &target, &mut dy).unwrap(), 2.5); // (1 + 4) / 2
/// assert_eq!(dy, [1.0, 2.0]); // (2 / n) * (y - target)
/// assert!(mse_grad(&[], &[], &mut []).is_err()); // the MSE of nothing
/// ```
pub fn mse_grad(y: &[f32], target: &[f32], dy: &mut [f32]) -> Result<f64> {
    let n = y.len();
    check_len(OP, "target", target.len(), n)?;
    check_len(OP, "dy", dy.len(), n)?;
    if n == 0 {
        return Err(Error::invalid(OP, "the MSE of nothing is undefined"));
    }
    let scale = 2.0 / n as f32;
    let mut total = 0.0f64;
    for chunk in (0..n).step_by(MSE_PER_BLOCK) {
        let end = (chunk + MSE_PER_BLOCK).min(n);
        // The kernel's tree: 256 threads each accumulate a strided subset, then pairwise halving.
        let mut lanes = [0.0f32; 256];
        for (k, i) in (chunk..end).enumerate() {
            let d = y[i] - target[i];
            dy[i] = scale * d;
            lanes[k % 256] = d.mul_add(d, lanes[k % 256]);
        }
        let mut w = 128;
        while w > 0 {
            for t in 0..w {
                lanes[t] += lanes[t + w];
            }
            w /= 2;
        }
        total += f64::from(lanes[0]);
    }
    Ok(total / n as f64)
}

/// `y[T, out] = x[T, in] · w[out, in]^T` (+ `beta * y`).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::cpu::linear_fwd;
/// let x = [1.0f32, 2.0]; // [T = 1, in = 2]
/// let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]; // [out = 3, in = 2]
/// let mut y = [0.0f32; 3];
/// linear_fwd(&x, &w, &mut y, 2, 3).unwrap();
/// assert_eq!(y, [1.0, 2.0, 3.0]);
/// assert!(linear_fwd(&x, &w[..4], &mut y, 2, 3).is_err()); // w is not [3, 2]
/// ```
pub fn linear_fwd(x: &[f32], w: &[f32], y: &mut [f32], inp: usize, out: usize) -> Result<()> {
    let t = rows_of("x", x.len(), inp)?;
    check_len(OP, "w", w.len(), product(out, inp)?)?;
    check_len(OP, "y", y.len(), product(t, out)?)?;
    for r in 0..t {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let wr = &w[o * inp..(o + 1) * inp];
            y[r * out + o] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
    Ok(())
}

/// `dx[T, in] (+)= dy[T, out] · w[out, in]`.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::cpu::linear_bwd_input;
/// let dy = [1.0f32, 1.0, 1.0]; // [T = 1, out = 3]
/// let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0]; // [out = 3, in = 2]
/// let mut dx = [10.0f32; 2];
/// linear_bwd_input(&dy, &w, &mut dx, 2, 3, false).unwrap();
/// assert_eq!(dx, [2.0, 2.0]);
/// linear_bwd_input(&dy, &w, &mut dx, 2, 3, true).unwrap(); // accumulate
/// assert_eq!(dx, [4.0, 4.0]);
/// ```
pub fn linear_bwd_input(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    inp: usize,
    out: usize,
    accumulate: bool,
) -> Result<()> {
    let t = rows_of("dy", dy.len(), out)?;
    check_len(OP, "w", w.len(), product(out, inp)?)?;
    check_len(OP, "dx", dx.len(), product(t, inp)?)?;
    for r in 0..t {
        let dxr = &mut dx[r * inp..(r + 1) * inp];
        if !accumulate {
            dxr.iter_mut().for_each(|v| *v = 0.0);
        }
        for o in 0..out {
            let g = dy[r * out + o];
            for (d, &wv) in dxr.iter_mut().zip(&w[o * inp..(o + 1) * inp]) {
                *d += g * wv;
            }
        }
    }
    Ok(())
}

/// `dw[out, in] = dy[T, out]^T · x[T, in]`.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::cpu::linear_bwd_weight;
/// let (dy, x) = ([1.0f32, 2.0, 3.0], [1.0f32, 2.0]); // [T = 1, out = 3], [T = 1, in = 2]
/// let mut dw = [0.0f32; 6];
/// linear_bwd_weight(&dy, &x, &mut dw, 2, 3).unwrap();
/// assert_eq!(dw, [1.0, 2.0, 2.0, 4.0, 3.0, 6.0]); // outer product dy x^T
/// assert!(linear_bwd_weight(&dy, &x, &mut dw[..5], 2, 3).is_err());
/// ```
pub fn linear_bwd_weight(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    inp: usize,
    out: usize,
) -> Result<()> {
    let t = rows_of("dy", dy.len(), out)?;
    check_len(OP, "x", x.len(), product(t, inp)?)?;
    check_len(OP, "dw", dw.len(), product(out, inp)?)?;
    dw.iter_mut().for_each(|v| *v = 0.0);
    for r in 0..t {
        let xr = &x[r * inp..(r + 1) * inp];
        for o in 0..out {
            let g = dy[r * out + o];
            for (d, &xv) in dw[o * inp..(o + 1) * inp].iter_mut().zip(xr) {
                *d += g * xv;
            }
        }
    }
    Ok(())
}
