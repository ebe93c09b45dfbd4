//! Plain dropout, optionally with a bias added before it, forward and backward, with an optional
//! per-row scale (drop path), on row-major `[rows, cols]` tensors:
//!
//! ```text
//! y  = rowscale[row] * keep(seed, call, i) * (x + bias[col]) / (1 - p)
//! dx = rowscale[row] * keep(seed, call, i) * dy / (1 - p)
//! dbias[col] = sum over rows of dx[row, col]
//! ```
//!
//! The embedding, LoRA-input and attention-probability sites of a transformer (for attention
//! implementations that materialise the probabilities). Same keying contract as
//! [`crate::dropout_residual`] and every dropping op ([`crate::dropping`]): `i = row * cols +
//! col` is the flat 64-bit index and an element is dropped when
//! [`philox::mask_word`]`(seed, call, i)` is below the [`DropRate`] threshold, so the mask is a
//! pure function of `(seed, call, i)`: independent of the tensor length, the launch
//! configuration, the vector width, the alignment and the GPU. The probability applied is
//! [`Config::effective_p`] = `threshold / 2^32`, within `2^-33` of `p` (`2^-17` under 16-bit
//! keying, below); p = 0 and p = 1 are exact and do no generator work. x, bias and y share one dtype (`f32`, `f16`, `bf16`);
//! `rowscale` is f32.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit on finite inputs)
//!
//! With `scale = DropRate::scale()` (0 for p = 1) and `rs` the row scale:
//!
//! * `t = x + b` (one f32 add; `t = x` without bias),
//! * `rowm = scale * rs` (one f32 multiply per row; `rowm = scale` without a row scale),
//!   `m = keep ? rowm : 0`,
//! * `y = m != 0 ? T(t * m) : +0` — a dropped element is exactly `+0`, even when x is inf or NaN.
//!   With p = 0, no bias and no row scale, `y = T(x * 1) = x` (NaN payloads aside).
//! * The backward is the one [`crate::dropout_residual`] has (the shared backward):
//!   `dx = m != 0 ? T(dy * m) : 0`, `dbias[col]` the slab-ordered f32 sums of the unrounded dx
//!   ([`slab_rows`]): identical across runs, GPUs and launch configurations, and reproduced by
//!   [`cpu::backward`].
//!
//! NaN outputs are NaN on both sides, but the GPU returns the canonical NaN where the CPU may
//! keep an input's payload.
//!
//! # Mask resolution
//!
//! [`Config::with_resolution`] selects the keying: [`MaskResolution::Bits32`] (the default, the
//! contract above, `p` quantised to `2^-32`) or [`MaskResolution::Bits16`] (element `i` takes
//! halfword `i % 8` of Philox block `i / 8`, dropped below `round(p * 2^16)`: one Philox
//! evaluation keys 8 elements, half the generator work, `p` quantised to `2^-16`). The
//! probability applied is [`Config::effective_p`] either way; the kept elements are scaled by
//! `1 / (1 - p)` of the nominal `p`. The backward regenerates at the config's resolution; the
//! 1-bit mask layout is the same. The unfused baseline keys at `Bits32` only.
//!
//! # Options
//!
//! Row scale: the caller's f32 buffer, or a generated [`DropPath`] in the [`Config`] (its
//! generated scale can be written out with `rowscale_out`). The 1-bit mask (`mask_out` forward,
//! `mask` backward; bit `b` of word `w` is element `32 w + b`, [`Config::mask_words`] words,
//! padding bits zero) lets the backward read 1 bit per element instead of regenerating.
//!
//! # Bytes per element (see [`fused_forward_bytes`] and friends)
//!
//! Fused forward `2 s` (+ 1/8 with the mask), backward `2 s` (+ 1/8 reading the mask); the
//! unfused baseline ([`unfused`]) forward `4 s + 1` with bias (`2 s + 1` without), backward
//! `3 s + 1` with dbias (`2 s + 1` without). bf16: 4 vs 9 forward with bias.
//!
//! # Example (CPU reference; the GPU functions take the same [`Config`])
//!
//! ```
//! use fusedreg::dropout::{cpu, Config};
//! # fn main() -> fusedreg::Result<()> {
//! let (rows, cols) = (4, 8);
//! let cfg = Config::new(rows, cols, 0.1, /* seed */ 42, /* call */ 7)?;
//! let x = vec![1.0f32; rows * cols];
//! let bias = vec![0.5f32; cols];
//! let mut y = vec![0.0f32; rows * cols];
//! let opts = cpu::ForwardOptions { bias: Some(&bias), ..Default::default() };
//! cpu::forward(&cfg, &x, &mut y, opts)?;
//! // Every element is either dropped (0) or kept: 1.5 / 0.9.
//! let kept = 1.5f32 * cfg.rate().scale();
//! assert!(y.iter().enumerate().all(|(i, &v)| v == if cfg.keeps(i as u64) { kept } else { 0.0 }));
//! # Ok(()) }
//! ```
//!
//! [`philox::mask_word`]: crate::philox::mask_word
//! [`DropRate`]: crate::dropping::DropRate

use crate::dtype::DtypeKind;

pub use crate::dropping::{
    slab_count, slab_rows, BackwardOptions, Config, DropPath, ForwardOptions, LaunchTuning,
    MaskResolution, Workspace,
};

pub mod cpu;
mod gpu;
pub mod unfused;

pub use gpu::{backward, forward};

/// The name used in errors.
pub(crate) const OP: &str = "dropout";

/// Bytes of the 1-bit mask of `n` elements (whole u32 words), saturating.
fn mask_bytes(n: u64) -> u64 {
    n.div_ceil(32).saturating_mul(4)
}

/// Minimal device-memory bytes of the fused forward on `n` elements: read x, write y (`2 s` per
/// element), plus the 1-bit mask when written. Bias and row-scale traffic is negligible and not
/// counted. bf16: 4 B per element (4.125 with the mask); f32: 8 (8.125). Saturates at `u64::MAX`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, true), 4 * 1024 + 128);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, u64::MAX, true), u64::MAX);
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    let data = (2 * dtype.size() as u64).saturating_mul(n);
    data.saturating_add(if bitmask { mask_bytes(n) } else { 0 })
}

/// Minimal bytes of the fused backward: read dy, write dx (`2 s`), plus the 1-bit mask when it
/// is read instead of regenerated. The dbias partials (one f32 per slab and column) are not
/// counted. Saturates at `u64::MAX`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::fused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_backward_bytes(DtypeKind::Bf16, 1024, false), 4 * 1024);
/// assert_eq!(fused_backward_bytes(DtypeKind::F32, 1024, true), 8 * 1024 + 128);
/// ```
pub fn fused_backward_bytes(dtype: DtypeKind, n: u64, bitmask: bool) -> u64 {
    fused_forward_bytes(dtype, n, bitmask)
}

/// Minimal bytes of the unfused forward ([`unfused`], PyTorch eager): bias add (read x, write t:
/// `2 s`), dropout (read t, write y and a 1-byte mask: `2 s + 1`): `4 s + 1` = 9 B bf16, 17 B
/// f32. Without bias only the dropout runs: `2 s + 1`. Saturates at `u64::MAX`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true), 9 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024, true), 17 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, false), 5 * 1024);
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if bias { 4 * s + 1 } else { 2 * s + 1 })
}

/// Minimal bytes of the unfused backward: masked scale (read dy and the byte mask, write dx:
/// `2 s + 1`), then the bias-gradient column sum (read dx: `s`): `3 s + 1` = 7 B bf16, 13 B f32.
/// Without dbias only the first kernel runs: `2 s + 1`. Saturates at `u64::MAX`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::unfused_backward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_backward_bytes(DtypeKind::Bf16, 1024, true), 7 * 1024);
/// assert_eq!(unfused_backward_bytes(DtypeKind::F32, 1024, false), 9 * 1024);
/// ```
pub fn unfused_backward_bytes(dtype: DtypeKind, n: u64, dbias: bool) -> u64 {
    let s = dtype.size() as u64;
    n.saturating_mul(if dbias { 3 * s + 1 } else { 2 * s + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_element() {
        let n = 1u64 << 20;
        let per = |b: u64| b as f64 / n as f64;
        use DtypeKind::{Bf16, F16, F32};
        assert_eq!(per(fused_forward_bytes(Bf16, n, false)), 4.0);
        assert_eq!(per(fused_forward_bytes(F16, n, true)), 4.125);
        assert_eq!(per(fused_forward_bytes(F32, n, true)), 8.125);
        assert_eq!(per(fused_backward_bytes(F32, n, false)), 8.0);
        assert_eq!(per(unfused_forward_bytes(Bf16, n, true)), 9.0);
        assert_eq!(per(unfused_forward_bytes(F32, n, false)), 9.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, true)), 7.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, false)), 5.0);
        // Padded to whole words; saturating at the top.
        assert_eq!(fused_forward_bytes(Bf16, 33, true), 4 * 33 + 8);
        assert_eq!(unfused_forward_bytes(F32, u64::MAX / 2, true), u64::MAX);
        assert_eq!(fused_backward_bytes(Bf16, u64::MAX, false), u64::MAX);
    }
}
