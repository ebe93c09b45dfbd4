//! Dropout at every site of a transformer, forward and backward: an optional bias before it, an
//! optional residual after it (out of place or in place), an optional per-row scale (drop path /
//! stochastic depth), on row-major `[rows, cols]` tensors:
//!
//! ```text
//! y  = rowscale[row] * keep(seed, call, i) * (x + bias[col]) / (1 - p)              no residual
//! y  = residual + rowscale[row] * keep(seed, call, i) * (x + bias[col]) / (1 - p)   residual
//! dx = rowscale[row] * keep(seed, call, i) * dy / (1 - p)
//! dbias[col] = sum over rows of dx[row, col]        dresidual = dy (no copy: reuse dy)
//! ```
//!
//! Without a residual: the embedding, LoRA-input and attention-probability sites (for attention
//! implementations that materialise the probabilities). With one: the exit of every residual
//! sub-block, `stream += dropout(sublayer(x) + bias)`, usually in place ([`forward_inplace`],
//! [`cpu::forward_inplace`]). One op, one kernel family (`kernels/dropout.cu`), one CPU reference
//! ([`cpu`]), one unfused baseline ([`unfused`]); the residual is an option
//! ([`ForwardOptions::residual`], [`cpu::ForwardOptions::residual`]).
//!
//! `i = row * cols + col` is the flat 64-bit element index; `keep` is the shared keying of every
//! dropping op ([`crate::dropping`]): an element is dropped when [`philox::mask_word`]`(seed,
//! call, i)` is below the [`DropRate`] threshold, so the mask is a pure function of `(seed, call,
//! i)`: independent of the tensor length, the launch configuration, the vector width, the
//! alignment, the residual and the GPU. The probability applied is [`Config::effective_p`] =
//! `threshold / 2^32`, within `2^-33` of `p` (`2^-17` under 16-bit keying, below); p = 0 and p = 1
//! are exact and do no generator work. x, bias, residual and y share one dtype (`f32`, `f16`,
//! `bf16`); `rowscale` is f32.
//!
//! # Pinned arithmetic (CPU and GPU agree bit for bit)
//!
//! With `scale` = [`Config::scale`] = `1 / (1 - effective p)` (0 for p = 1) and `rs` the row
//! scale:
//!
//! * `t = x + b` (one f32 add; `t = x` without bias),
//! * `rowm = scale * rs` (one f32 multiply per row; `rowm = scale` without a row scale),
//!   `m = keep ? rowm : 0`,
//! * no residual: `y = m != 0 ? T(t * m) : +0` — a dropped element is exactly `+0`, even when x
//!   is inf or NaN. With p = 0, no bias and no row scale, `y = T(x * 1) = x` (NaN payloads aside).
//! * residual: `y = m != 0 ? T(fma(t, m, r)) : r` — a dropped element returns the residual's own
//!   bits, so it contributes exactly nothing even when x is inf or NaN. With p = 0 and no row
//!   scale this is `T(fma(t, 1, r)) = T(t + r)`: exactly `x + bias + residual`, rounded once.
//! * `dx = m != 0 ? T(dy * m) : 0` (one f32 multiply, rounded once, the shared backward of
//!   [`crate::dropping`]); `dbias[col] = T(sum over slabs s of (sum over the rows of s of the
//!   unrounded f32 dx))`, every sum a sequential f32 sum from `+0.0` (each slab's rows in
//!   [`crate::dropping`]'s four row lanes, folded in lane order). The slabs are [`slab_rows`] rows
//!   each, a function of `(rows, cols, dtype)` only, so dbias is identical from run to run, GPU
//!   to GPU and launch configuration to launch configuration, and [`cpu::backward`] reproduces
//!   it.
//!
//! Every f32 operation is a single IEEE operation (the kernels are built with `--fmad=false`).
//! NaN outputs are NaN on both sides, but the GPU returns the canonical NaN where the CPU may
//! keep an input's payload.
//!
//! # Mask resolution
//!
//! [`Config::with_resolution`] selects the keying, with or without a residual:
//! [`MaskResolution::Bits32`] (the default, the contract above, `p` quantised to `2^-32`),
//! [`MaskResolution::Bits16`] (element `i` takes halfword `i % 8` of Philox block `i / 8`,
//! dropped below `round(p * 2^16)`: one Philox evaluation keys 8 elements, half the generator
//! work, `p` quantised to `2^-16`) or [`MaskResolution::Bits8`] (element `i` takes byte `i % 16`
//! of Philox block `i / 16`, dropped below `round(p * 2^8)`: `p` quantised to `2^-8`,
//! FlashAttention's resolution). Under `Bits8` a thread of the vector path owns one 16-byte
//! vector (8 elements of a 16-bit type, 4 of f32), so it uses half of a Philox block (a quarter
//! for f32) and the neighbouring thread computes the same block: per element the generator work
//! is that of `Bits16`, and the static count is lower only by the cheaper compares (see the
//! README's instruction counts). The probability applied is [`Config::effective_p`] at every
//! resolution, and the kept elements are scaled by one over its complement ([`Config::scale`]),
//! so the output is unbiased at each. The backward regenerates at the config's resolution; the
//! 1-bit mask layout is the same. The unfused baseline keys at `Bits32` only.
//!
//! # Drop path (stochastic depth, row mode)
//!
//! The row scale is either supplied by the caller (an f32 buffer, `len == rows`, any values) or
//! generated from its own Philox stream ([`DropPath`] in the [`Config`]):
//! `rowscale[row] = keeps(mask_word(seed, path_call, row / rows_per_sample)) ? 1 / (1 - p_path) : 0`.
//! It composes with dropout in the same kernel; rows whose scale is 0 read no `x` (in place they
//! are not touched at all). The forward can write the generated scale out (`rowscale_out`); the
//! backward regenerates it from the same [`Config`] (or takes the caller's buffer).
//!
//! # The 1-bit mask
//!
//! Optionally the forward writes the dropout keep mask (not including the row scale) as `u32`
//! words: bit `b` of word `w` is element `32 w + b` (flat index), [`Config::mask_words`] words, the
//! bits past `n` zero (`mask_out`). The backward can read it instead of regenerating (`mask`;
//! then seed and call id are not used for the dropout mask, but the drop path is still
//! regenerated from them unless the caller supplies the row scale).
//!
//! # Redundancy statistics (optional, with a residual)
//!
//! With a meter site in the forward's options ([`ForwardOptions::redundancy`],
//! [`cpu::ForwardOptions::redundancy`]; see [`crate::redundancy`]), the residual forward also
//! measures the Block Influence of the sub-block whose output `x` it adds: per row `dot = r·y`,
//! `rr = |r|²`, `ss = |y|²` with `r` the residual before the add and `y` the stored result, both
//! as f32, summed in `dropout_add_norm`'s pinned order
//! ([`crate::dropout_add_norm::cpu::stat_sums`]: groups of 8 elements, [`row_partials`]`(cols)`
//! partials, its tree), then [`crate::redundancy::row_cos`] decides the row's fate (zero rows
//! excluded, non-finite rows make the site's BI NaN). The accuracy bound is
//! [`crate::redundancy`]'s with [`crate::dropout_add_norm::cpu::stats_chain`]. Every output bit
//! is the same with or without the meter. A site needs a residual (out of place or in place) and
//! does not go with `mask_out` (measure in evaluation): both are [`crate::Error::InvalidArgument`].
//!
//! On the device the statistics run in their own entries (one row per block visit,
//! `row_partials(cols)` threads, at most 2048 blocks): `dropout_fwd_res_stats_vec_*` when
//! `cols % 8 == 0` and every view is 16-byte aligned (each group of 8 elements one 16-byte
//! vector, two for f32), `dropout_fwd_res_stats_*` otherwise (element by element); the same
//! bits. The default entries compile to the same instructions as without them. The static
//! count of the bf16 vector entry is inside the instruction budget of its 6 bytes per element
//! (`scripts/sass-budget`: a prediction of near-copy speed, not a measurement).
//!
//! [`row_partials`]: crate::dropout_add_norm::row_partials
//!
//! # Bytes per element (see [`fused_forward_bytes`] and friends)
//!
//! Fused forward `2 s` (`3 s` with a residual; + 1/8 with the mask), backward `2 s` (+ 1/8
//! reading the mask); the unfused baseline ([`unfused`]) forward `4 s + 1` with bias (`2 s + 1`
//! without; `+ 3 s` for its residual add), backward `3 s + 1` with dbias (`2 s + 1` without).
//! bf16 with bias: 4 vs 9 B forward, 6 vs 15 B with a residual.
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
//! let kept = 1.5f32 * cfg.scale(fusedreg::DtypeKind::F32);
//! assert!(y.iter().enumerate().all(|(i, &v)| v == if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) { kept } else { 0.0 }));
//!
//! // The residual stream, updated in place: the same mask.
//! let mut stream = vec![2.0f32; rows * cols];
//! let opts = cpu::ForwardOptions { bias: Some(&bias), ..Default::default() };
//! cpu::forward_inplace(&cfg, &x, &mut stream, opts)?;
//! // Every element is either dropped (2.0) or kept: 2 + 1.5 / 0.9.
//! let kept = 1.5f32.mul_add(cfg.scale(fusedreg::DtypeKind::F32), 2.0);
//! assert!(stream.iter().enumerate().all(|(i, &v)| v == if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) { kept } else { 2.0 }));
//! # Ok(()) }
//! ```
//!
//! [`philox::mask_word`]: crate::philox::mask_word
//! [`DropRate`]: crate::dropping::DropRate

use crate::dtype::DtypeKind;
use crate::error::{Error, Result};

pub use crate::dropping::{
    slab_count, slab_rows, BackwardOptions, Config, DropPath, ForwardOptions, LaunchTuning,
    MaskResolution, Workspace,
};

pub mod cpu;
pub(crate) mod gpu;
pub mod unfused;

pub use gpu::{backward, forward, forward_inplace};

/// The name used in errors.
pub(crate) const OP: &str = "dropout";

/// Checks a forward's meter site: the statistics need a residual (`cos(r, y)` of the stream
/// before and after the add) and do not write the 1-bit mask (measure in evaluation).
pub(crate) fn check_redundancy(site: bool, residual: bool, mask_out: bool) -> Result<()> {
    if site && !residual {
        return Err(Error::invalid(
            OP,
            "a redundancy site needs a residual (opts.residual, or forward_inplace): the \
             statistic is cos(residual, y) of the stream before and after the add",
        ));
    }
    if site && mask_out {
        return Err(Error::invalid(
            OP,
            "the statistics forward does not write the 1-bit mask: measure redundancy in \
             evaluation (no mask_out), or run the forward twice",
        ));
    }
    Ok(())
}

/// Bytes of the 1-bit mask of `n` elements (whole u32 words), saturating.
fn mask_bytes(n: u64) -> u64 {
    n.div_ceil(32).saturating_mul(4)
}

/// Minimal device-memory bytes of the fused forward on `n` elements: read x (and the residual),
/// write y — `2 s` per element, `3 s` with a residual — plus the 1-bit mask when written. Bias
/// and row-scale traffic is negligible and not counted. bf16: 4 B per element (6 with a
/// residual; + 0.125 with the mask). Saturates at `u64::MAX` (from about 2^60 elements: no real
/// tensor comes near, and a saturated count never wraps to a small one).
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::fused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false, false), 4 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, false, true), 4 * 1024 + 128);
/// assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 1024, true, false), 6 * 1024);
/// assert_eq!(fused_forward_bytes(DtypeKind::F32, u64::MAX, true, true), u64::MAX);
/// ```
pub fn fused_forward_bytes(dtype: DtypeKind, n: u64, residual: bool, bitmask: bool) -> u64 {
    let streams = if residual { 3 } else { 2 };
    let data = (streams * dtype.size() as u64).saturating_mul(n);
    data.saturating_add(if bitmask { mask_bytes(n) } else { 0 })
}

/// Minimal bytes of the fused backward: read dy, write dx (`2 s`: 4 B bf16, 8 B f32), plus the
/// 1-bit mask when it is read instead of regenerated. The dbias partials (one f32 per slab and
/// column) are not counted; `dresidual = dy` moves nothing. Saturates at `u64::MAX`.
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
    fused_forward_bytes(dtype, n, false, bitmask)
}

/// Minimal bytes of the unfused forward ([`unfused`], PyTorch eager): bias add (read x, write t:
/// `2 s`, skipped without bias), dropout (read t, write d and a 1-byte mask: `2 s + 1`), residual
/// add (read r and d, write y: `3 s`, only with a residual). bf16: 9 B with bias, 15 B with bias
/// and residual; f32: 17 and 29. Saturates at `u64::MAX`.
///
/// # Examples
///
/// ```
/// use fusedreg::dropout::unfused_forward_bytes;
/// use fusedreg::DtypeKind;
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true, false), 9 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::F32, 1024, true, false), 17 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, false, false), 5 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1024, true, true), 15 * 1024);
/// assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 1 << 61, true, true), u64::MAX);
/// ```
pub fn unfused_forward_bytes(dtype: DtypeKind, n: u64, bias: bool, residual: bool) -> u64 {
    let s = dtype.size() as u64;
    let per = 2 * s + 1 + if bias { 2 * s } else { 0 } + if residual { 3 * s } else { 0 };
    n.saturating_mul(per)
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

    /// REFERENCE.md §2: bytes per element.
    #[test]
    fn bytes_per_element_match_the_reference_table() {
        let n = 1u64 << 20;
        let per = |b: u64| b as f64 / n as f64;
        use DtypeKind::{Bf16, F16, F32};
        assert_eq!(per(fused_forward_bytes(Bf16, n, false, false)), 4.0);
        assert_eq!(per(fused_forward_bytes(F16, n, false, true)), 4.125);
        assert_eq!(per(fused_forward_bytes(F32, n, false, true)), 8.125);
        assert_eq!(per(fused_forward_bytes(Bf16, n, true, true)), 6.125);
        assert_eq!(per(fused_forward_bytes(F32, n, true, true)), 12.125);
        assert_eq!(per(fused_forward_bytes(Bf16, n, true, false)), 6.0);
        assert_eq!(per(fused_forward_bytes(F32, n, true, false)), 12.0);
        assert_eq!(per(fused_backward_bytes(F32, n, false)), 8.0);
        assert_eq!(per(fused_backward_bytes(Bf16, n, false)), 4.0);
        assert_eq!(per(unfused_forward_bytes(Bf16, n, true, false)), 9.0);
        assert_eq!(per(unfused_forward_bytes(F32, n, false, false)), 9.0);
        assert_eq!(per(unfused_forward_bytes(Bf16, n, true, true)), 15.0);
        assert_eq!(per(unfused_forward_bytes(F32, n, true, true)), 29.0);
        assert_eq!(per(unfused_forward_bytes(Bf16, n, false, true)), 11.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, true)), 7.0);
        assert_eq!(per(unfused_backward_bytes(F32, n, true)), 13.0);
        assert_eq!(per(unfused_backward_bytes(Bf16, n, false)), 5.0);
        // Padded to whole words; saturating at the top.
        assert_eq!(fused_forward_bytes(Bf16, 33, false, true), 4 * 33 + 8);
        assert_eq!(fused_forward_bytes(Bf16, 33, true, true), 6 * 33 + 8);
        assert_eq!(
            unfused_forward_bytes(F32, u64::MAX / 2, true, false),
            u64::MAX
        );
        assert_eq!(fused_backward_bytes(Bf16, u64::MAX, false), u64::MAX);
    }
}
