//! A deep residual MLP trained end to end with fusedreg's ops — the workload of the
//! `train_mlp` example and of the stochastic-depth row of the benchmark report.
//!
//! Block `l` computes `x <- x + dropout(W2_l · gelu(W1_l · x + b1_l) + b2_l)`, with the residual
//! add, dropout and (in row mode) the per-sample drop path fused in `dropout` (with its residual), the
//! matrix products through cuBLAS (CPU: plain loops), and the optimizer step as global-norm
//! clipping + AdamW in one multi-tensor pass. Under a stochastic-depth plan a dropped block
//! launches nothing, forward or backward, and its parameters skip the optimizer step.
//! [`PreNorm`] is the pre-norm variant: each block's entry a fused dropout + add + LayerNorm /
//! RMSNorm (`dropout_add_norm`), with LayerNorm Scaling on or off.
//!
//! This module also holds the few kernels the model needs beyond cuBLAS and the crate's ops
//! (`tools/kernels/mlp.cu`: bias + GELU, column sums, MSE gradient), each with its CPU reference.

mod config;
pub mod cpu;
mod cpu_model;
pub mod gpu;
mod gpu_model;
mod init;
mod prenorm;
mod steps;
pub mod train;

pub use config::{Backend, DroppedParams, MlpConfig};
pub use cpu_model::CpuMlp;
pub use gpu_model::GpuMlp;
pub use prenorm::PreNorm;
pub use train::{forward_backward, train_step, Trainer};

/// sqrt(2 / pi), rounded to f32 from the same literal as the kernel's.
#[allow(clippy::excessive_precision)]
const K0: f32 = 0.797_884_560_802_865_4;
const K1: f32 = 0.044_715;

/// Elements per block of the MSE kernel (its partial sums are per block).
pub(crate) const MSE_PER_BLOCK: usize = 4096;

/// GELU, tanh form (as the kernel computes it).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::gelu;
/// assert_eq!(gelu(0.0), 0.0);
/// assert!((gelu(1.0) - 0.841_192).abs() < 1e-6);
/// assert!((gelu(-1.0) + 0.158_808).abs() < 1e-6);
/// ```
pub fn gelu(u: f32) -> f32 {
    let z = K0 * (K1 * u).mul_add(u * u, u);
    0.5 * u * (1.0 + z.tanh())
}

/// d gelu(u) / du (as the kernel computes it).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::mlp::{gelu, gelu_grad};
/// assert_eq!(gelu_grad(0.0), 0.5);
/// // Agrees with a central difference of `gelu`.
/// let (u, h) = (0.7f32, 1e-2f32);
/// let numeric = (gelu(u + h) - gelu(u - h)) / (2.0 * h);
/// assert!((gelu_grad(u) - numeric).abs() < 1e-3);
/// ```
pub fn gelu_grad(u: f32) -> f32 {
    let z = K0 * (K1 * u).mul_add(u * u, u);
    let t = z.tanh();
    (0.5 * u * K0 * (3.0 * K1).mul_add(u * u, 1.0)).mul_add(1.0 - t * t, 0.5 * (1.0 + t))
}

/// Rows of a row-major buffer of `len` elements and `width` columns (both checked), shared by the
/// CPU references and the kernel wrappers so both refuse the same shapes with the same words.
pub(crate) fn rows_of(what: &str, len: usize, width: usize) -> fusedreg::Result<usize> {
    if width == 0 || len % width != 0 {
        return Err(fusedreg::Error::shape(
            "mlp",
            format!("{what} has {len} elements: not whole rows of {width}"),
        ));
    }
    Ok(len / width)
}

/// Rows per slab of the column-sum partials: a function of the shape only, so the sums are the
/// same on every GPU and on the CPU.
pub(crate) fn colsum_slab_rows(rows: usize) -> u64 {
    (rows as u64)
        .div_ceil(64)
        .clamp(1, 256)
        .max((rows as u64).div_ceil(65_535))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_its_definition_and_derivative() {
        for &u in &[-3.0f32, -1.0, -0.1, 0.0, 0.3, 1.0, 2.5] {
            let exact = 0.5
                * f64::from(u)
                * (1.0
                    + (0.797_884_560_802_865_4
                        * (f64::from(u) + 0.044_715 * f64::from(u).powi(3)))
                    .tanh());
            assert!((f64::from(gelu(u)) - exact).abs() < 1e-6, "gelu({u})");
            let h = 1e-3f64;
            let g = |v: f64| {
                0.5 * v * (1.0 + (0.797_884_560_802_865_4 * (v + 0.044_715 * v.powi(3))).tanh())
            };
            let num = (g(f64::from(u) + h) - g(f64::from(u) - h)) / (2.0 * h);
            assert!(
                (f64::from(gelu_grad(u)) - num).abs() < 1e-4,
                "gelu'({u}): {} vs {num}",
                gelu_grad(u)
            );
        }
    }

    #[test]
    fn colsum_and_mse_references() {
        let (rows, cols) = (300, 7);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let s = cpu::colsum(&x, rows, cols).unwrap();
        for c in 0..cols {
            let exact: f64 = (0..rows).map(|r| f64::from(x[r * cols + c])).sum();
            assert!((f64::from(s[c]) - exact).abs() < 1e-3, "col {c}");
        }
        let t: Vec<f32> = x.iter().map(|v| v * 0.5 + 0.1).collect();
        let mut dy = vec![0.0; x.len()];
        let loss = cpu::mse_grad(&x, &t, &mut dy).unwrap();
        let exact: f64 = x
            .iter()
            .zip(&t)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / x.len() as f64;
        assert!((loss - exact).abs() < 1e-5 * exact);
        assert_eq!(dy[5], 2.0 / x.len() as f32 * (x[5] - t[5]));
    }
}
