//! Fused bias + dropout + residual add, forward and backward, with an optional per-row scale
//! (stochastic depth / drop path), on row-major `[rows, cols]` tensors:
//!
//! ```text
//! y  = residual + rowscale[row] * keep(seed, call, i) * (x + bias[col]) / (1 - p)
//! dx = rowscale[row] * keep(seed, call, i) * dy / (1 - p)
//! dbias[col] = sum over rows of dx[row, col]        dresidual = dy (no copy: reuse dy)
//! ```
//!
//! `i = row * cols + col` is the flat 64-bit element index; `keep` is [`philox::mask_word`]
//! compared with the [`DropRate`] threshold, so the mask is a pure function of `(seed, call, i)`:
//! independent of the tensor length, the launch configuration, the vector width, the alignment
//! and the GPU. x, bias, residual and y share one dtype (`f32`, `f16`, `bf16`); `rowscale` is f32.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! With `scale = DropRate::scale()` (0 for p = 1) and `rs` the row scale:
//!
//! * `t = x + b` (one f32 add; `t = x` without bias),
//! * `rowm = scale * rs` (one f32 multiply per row; `rowm = scale` without a row scale),
//!   `m = keep ? rowm : 0`,
//! * `y = m != 0 ? T(fma(t, m, r)) : r` — a dropped element returns the residual's own bits, so
//!   it contributes exactly nothing even when x is inf or NaN. With p = 0 and no row scale this is
//!   `T(fma(t, 1, r)) = T(t + r)`: exactly `x + bias + residual`, rounded once.
//! * `dx = m != 0 ? T(dy * m) : 0` (one f32 multiply, rounded once);
//!   `dbias[col] = T(sum over slabs s of (sum over the rows of s, in increasing order, of the
//!   unrounded f32 dx))`, every sum a sequential f32 sum starting from `+0.0`. The slabs are
//!   [`slab_rows`] rows each, a function of `(rows, cols, dtype)` only, so dbias is identical
//!   from run to run, GPU to GPU and launch configuration to launch configuration, and the CPU
//!   reference reproduces it.
//!
//! p = 0 and p = 1 do no generator work; p = 1 drops every element and divides by nothing.
//! Every f32 operation is a single IEEE operation (the kernels are built with `--fmad=false`).
//!
//! # Drop path (stochastic depth, row mode)
//!
//! The row scale is either supplied by the caller (a device f32 buffer, `len == rows`, any
//! values) or generated on the device from its own Philox stream ([`DropPath`]):
//! `rowscale[row] = keeps(mask_word(seed, path_call, row / rows_per_sample)) ? 1 / (1 - p_path) : 0`.
//! It composes with dropout in the same kernel; rows whose scale is 0 read no `x` (in place they
//! are not touched at all). The forward can write the generated scale out (`rowscale_out`); the
//! backward regenerates it from the same [`Config`] (or takes the caller's buffer).
//!
//! # The 1-bit mask
//!
//! Optionally the forward writes the dropout keep mask (not including the row scale) as `u32`
//! words: bit `b` of word `w` is element `32 w + b` (flat index), `ceil(n / 32)` words, the bits
//! past `n` zero ([`Config::mask_words`]). The backward can read it instead of regenerating the
//! mask (then seed and call id are not used for the dropout mask; the drop path is still
//! regenerated from them unless the caller supplies the row scale).
//!
//! # In place
//!
//! The common case updates the residual stream in place: use [`forward_inplace`] (GPU) or
//! [`cpu::forward_inplace`], where `residual` is the `&mut` output.
//!
//! # Example (CPU reference; the GPU functions take the same [`Config`])
//!
//! ```
//! use fusedreg::dropout_residual::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let (rows, cols) = (4, 8);
//! let cfg = Config::new(rows, cols, 0.1, /* seed */ 42, /* call */ 7)?;
//! let x = vec![1.0f32; rows * cols];
//! let bias = vec![0.5f32; cols];
//! let mut stream = vec![2.0f32; rows * cols]; // the residual stream, updated in place
//! let opts = cpu::ForwardOptions { bias: Some(&bias), ..Default::default() };
//! cpu::forward_inplace(&cfg, &x, &mut stream, opts)?;
//! // Every element is either dropped (2.0) or kept: 2 + 1.5 / 0.9.
//! assert!(stream.iter().all(|&v| v == 2.0 || v == 1.5f32.mul_add(1.0 / 0.9, 2.0)));
//! # Ok(()) }
//! ```
//!
//! [`philox::mask_word`]: crate::philox::mask_word
//! [`DropRate`]: crate::dropping::DropRate

use crate::dtype::DtypeKind;

// The shared dropout pieces this op's API has always named (see crate::dropping).
pub use crate::dropping::{
    slab_count, slab_rows, BackwardOptions, Config, DropPath, ForwardOptions, LaunchTuning,
    Workspace,
};

pub mod cpu;
mod gpu;
pub mod unfused;

pub use gpu::{backward, forward, forward_inplace};

/// The name used in errors.
pub(crate) const OP: &str = "dropout_residual";

/// Minimal device-memory bytes of the fused forward on `n` elements: read x and the residual,
/// write y (`3 s` per element), plus the 1-bit mask when written. Bias and row-scale traffic is
/// negligible and not counted. bf16: 6 B per element (6.125 with the mask); f32: 12 (12.125).
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// ```
/// use fusedreg::dropout_residual::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false), 6 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, true), 6 * 1024 + 128);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, 1 << 62, true), u64::MAX); // saturates
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    let mask = if bitmask { 4 * n.div_ceil(32) } else { 0 };
    (3 * dtype.size() as u64)
        .saturating_mul(n)
        .saturating_add(mask)
}

/// Minimal bytes of the fused backward: read dy, write dx (`2 s`: 4 B bf16, 8 B f32), plus the
/// 1-bit mask when it is read instead of regenerated. The dbias partials (one f32 per slab and
/// column, written and read once) are not counted.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::fused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_backward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, 1024, true), 8 * 1024 + 128);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, u64::MAX, false), u64::MAX); // saturates
/// ```
pub fn fused_backward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    let mask = if bitmask { 4 * n.div_ceil(32) } else { 0 };
    (2 * dtype.size() as u64)
        .saturating_mul(n)
        .saturating_add(mask)
}

/// Minimal bytes of the unfused forward ([`unfused`]): bias add (read x, write t: `2 s`), dropout
/// (read t, write d and a 1-byte mask: `2 s + 1`), residual add (read r and d, write y: `3 s`):
/// `7 s + 1` = 15 B bf16, 29 B f32. Without bias the first kernel is skipped: `5 s + 1`.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true), 15 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024, true), 29 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, false), 11 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1 << 61, true), u64::MAX); // saturates
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if bias { 7 * s + 1 } else { 5 * s + 1 })
}

/// Minimal bytes of the unfused backward: masked scale (read dy and the byte mask, write dx:
/// `2 s + 1`), then the bias-gradient column sum (read dx: `s`): `3 s + 1` = 7 B bf16, 13 B
/// f32. Without dbias only the first kernel runs: `2 s + 1`.
///
/// Saturates at `u64::MAX` when the byte count does not fit in 64 bits (from about 2^60
/// elements): no real tensor comes near, and a saturated count never wraps to a small one.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout_residual::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, true), 7 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1024, true), 13 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, false), 5 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1 << 61, true), u64::MAX); // saturates
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64, dbias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if dbias { 3 * s + 1 } else { 2 * s + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// REFERENCE.md §2: bytes per element.
    #[test]
    fn bytes_per_element_match_the_reference_table() {
        let n = 1u64 << 20;
        let per = |b: u64| b as f64 / n as f64;
        use DtypeKind::{Bf16, F32};
        assert_eq!(per(unfused_forward_bytes(Bf16, n, true)), 15.0);
        assert_eq!(per(unfused_forward_bytes(F32, n, true)), 29.0);
        assert_eq!(per(fused_forward_bytes(Bf16, n, true)), 6.125);
        assert_eq!(per(fused_forward_bytes(F32, n, true)), 12.125);
        assert_eq!(per(fused_forward_bytes(Bf16, n, false)), 6.0);
        assert_eq!(per(fused_forward_bytes(F32, n, false)), 12.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, true)), 7.0);
        assert_eq!(per(unfused_backward_bytes(F32, n, true)), 13.0);
        assert_eq!(per(fused_backward_bytes(Bf16, n, false)), 4.0);
        assert_eq!(per(fused_backward_bytes(F32, n, false)), 8.0);
        // The mask of a length that is not a multiple of 32 is padded to whole words.
        assert_eq!(fused_forward_bytes(Bf16, 33, true), 6 * 33 + 8);
    }
}
