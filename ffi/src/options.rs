//! The one options struct every op reads its settings from.

use fusedreg::dropping::{DropPath, MaskResolution};
use fusedreg::Math;

use crate::{FfiError, FfiResult};

/// Activation code of `bias_act_dropout`: GELU with erf.
pub const FR_ACT_GELU_ERF: u32 = 0;
/// GELU, tanh approximation.
pub const FR_ACT_GELU_TANH: u32 = 1;
/// SiLU (swish).
pub const FR_ACT_SILU: u32 = 2;
/// ReLU.
pub const FR_ACT_RELU: u32 = 3;

/// Norm code of `dropout_add_norm`: LayerNorm.
pub const FR_NORM_LAYER: u32 = 0;
/// RMSNorm.
pub const FR_NORM_RMS: u32 = 1;

/// Cross-entropy reduction: one loss per row.
pub const FR_REDUCTION_NONE: u32 = 0;
/// The sum over rows.
pub const FR_REDUCTION_SUM: u32 = 1;
/// The mean over non-ignored rows.
pub const FR_REDUCTION_MEAN: u32 = 2;

/// Math mode: the op's own default (`fusedreg::Math`: Fast where the exact path cannot meet the
/// op's instruction budget, Exact elsewhere: `cross_entropy` and `bias_act_dropout` with GELU or
/// SiLU are Fast, `bias_act_dropout` with ReLU is Exact; ops without transcendental functions
/// are exact in every mode).
pub const FR_MATH_DEFAULT: u32 = 0;
/// Math mode: bit for bit with the CPU reference (`fusedreg::Math::Exact`).
pub const FR_MATH_EXACT: u32 = 1;
/// Math mode: the special-function unit, within the bound the op states in its module docs
/// (`fusedreg::Math::Fast`; `cross_entropy` and `bias_act_dropout` only). The CPU references
/// compute the exact functions in every mode.
pub const FR_MATH_FAST: u32 = 2;

/// Settings of one call. Each op reads the fields it needs and ignores the rest; start from
/// [`fr_options_default`] and set those.
///
/// Masks are keyed by `(seed, call, element index)`: the same three give the same mask on the
/// CPU and on any GPU, so a backward regenerates its forward's mask from them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrOptions {
    /// Rows of the `[rows, cols]` view of the op's main tensor (tokens).
    pub rows: i64,
    /// Columns (hidden size; the vocabulary for cross-entropy).
    pub cols: i64,
    /// Dropout probability in `[0, 1]`.
    pub p: f64,
    /// Seed of the mask.
    pub seed: u64,
    /// Call id of the mask (a different id gives an independent mask).
    pub call: u64,
    /// Keying resolution in bits for the dropping ops (`dropout`, with or without a residual,
    /// `bias_act_dropout`, `dropout_add_norm`): 0 (the default) for the op's default for the
    /// dtype (16 for f16 and bf16, 32 for f32: the library's `MaskResolution::default_for`),
    /// or 32, 16 or 8 explicitly; the op refuses, with its message, a resolution its kernels do
    /// not implement. Ops without a mask take 0 or 32 only.
    pub mask_bits: u32,
    /// `FR_MATH_DEFAULT`, `FR_MATH_EXACT` or `FR_MATH_FAST`.
    pub math: u32,
    /// Drop-path (stochastic depth, per sample) probability; 0 = off.
    pub path_p: f64,
    /// Call id of the drop-path draws.
    pub path_call: u64,
    /// Rows per sample for the drop path (`seq_len` of a `[batch * seq, hidden]` tensor).
    pub rows_per_sample: i64,
    /// `FR_ACT_*` of `bias_act_dropout`.
    pub activation: u32,
    /// `FR_NORM_*` of `dropout_add_norm`.
    pub norm: u32,
    /// Epsilon of the norm.
    pub eps: f32,
    /// Output scale of the norm (LayerNorm Scaling: `1/sqrt(layer)`); 1 = off.
    pub layer_scale: f32,
    /// Cross-entropy label smoothing in `[0, 1]`.
    pub label_smoothing: f64,
    /// Cross-entropy z-loss weight (>= 0).
    pub z_loss: f64,
    /// Cross-entropy target value that is ignored.
    pub ignore_index: i64,
    /// `FR_REDUCTION_*` of cross-entropy.
    pub reduction: u32,
}

/// The defaults: no dropout, the dtype's default keying (`mask_bits` 0), the op's default math, no drop path, GELU (erf), LayerNorm with
/// eps 1e-5 and scale 1, cross-entropy without smoothing or z-loss, `ignore_index` -100, mean.
#[no_mangle]
pub extern "C" fn fr_options_default() -> FrOptions {
    FrOptions {
        rows: 0,
        cols: 0,
        p: 0.0,
        seed: 0,
        call: 0,
        mask_bits: 0,
        math: FR_MATH_DEFAULT,
        path_p: 0.0,
        path_call: 0,
        rows_per_sample: 1,
        activation: FR_ACT_GELU_ERF,
        norm: FR_NORM_LAYER,
        eps: 1e-5,
        layer_scale: 1.0,
        label_smoothing: 0.0,
        z_loss: 0.0,
        ignore_index: -100,
        reduction: FR_REDUCTION_MEAN,
    }
}

impl FrOptions {
    /// The options behind a pointer (null is an error naming the op).
    pub(crate) fn read<'a>(op: &str, p: *const FrOptions) -> FfiResult<&'a FrOptions> {
        // SAFETY: the caller passes a valid struct or null (checked).
        unsafe { p.as_ref() }
            .ok_or_else(|| FfiError::invalid(format!("{op}: options are required (null pointer)")))
    }

    pub(crate) fn shape(&self, op: &str) -> FfiResult<(usize, usize)> {
        let conv = |v: i64, what: &str| {
            usize::try_from(v)
                .map_err(|_| FfiError::invalid(format!("{op}: {what} = {v} must be >= 0")))
        };
        Ok((conv(self.rows, "rows")?, conv(self.cols, "cols")?))
    }

    /// The drop path of the options, `None` when `path_p` is 0.
    pub(crate) fn drop_path(&self, op: &str) -> FfiResult<Option<DropPath>> {
        if self.path_p == 0.0 {
            return Ok(None);
        }
        let rps = usize::try_from(self.rows_per_sample)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                FfiError::invalid(format!(
                    "{op}: rows_per_sample = {} must be >= 1",
                    self.rows_per_sample
                ))
            })?;
        Ok(Some(
            DropPath::new(self.path_p, self.path_call)?.per_sample(rps)?,
        ))
    }

    /// The math mode asked for: `None` for the op's default, `Some` for an explicit mode (for
    /// the ops with a `Config::with_math`).
    pub(crate) fn math(&self, op: &str) -> FfiResult<Option<Math>> {
        match self.math {
            FR_MATH_DEFAULT => Ok(None),
            FR_MATH_EXACT => Ok(Some(Math::Exact)),
            FR_MATH_FAST => Ok(Some(Math::Fast)),
            m => Err(FfiError::invalid(format!(
                "{op}: math = {m}; use FR_MATH_DEFAULT (0), FR_MATH_EXACT (1) or FR_MATH_FAST (2)"
            ))),
        }
    }

    /// Refuses `FR_MATH_FAST` for an op without transcendental functions (it is exact in every
    /// mode; ignoring the request would hide a caller's mistake).
    pub(crate) fn exact_only(&self, op: &str) -> FfiResult {
        match self.math(op)? {
            Some(Math::Fast) => Err(FfiError::invalid(format!(
                "{op}: math = FR_MATH_FAST is not offered by this op (it has no transcendental \
                 functions and is exact); use FR_MATH_DEFAULT (0) or FR_MATH_EXACT (1)"
            ))),
            _ => Ok(()),
        }
    }

    /// The keying resolution asked for, among those the op offers (`offered`, in bits, 32
    /// first), or `None` for `mask_bits = 0` (the op's default for the dtype, resolved by the
    /// library at the call). A resolution offered here may still be refused by the op's kernels
    /// (the library's error says which it offers).
    pub(crate) fn resolution(
        &self,
        op: &str,
        offered: &[u32],
    ) -> FfiResult<Option<MaskResolution>> {
        let bits = self.mask_bits;
        if bits == 0 {
            return Ok(None);
        }
        let list = offered
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        if !offered.contains(&bits) {
            return Err(FfiError::invalid(format!(
                "{op}: mask_bits = {bits} is not offered by this op; use {list} (or 0, the dtype's default)"
            )));
        }
        match bits {
            32 => Ok(Some(MaskResolution::Bits32)),
            16 => Ok(Some(MaskResolution::Bits16)),
            8 => Ok(Some(MaskResolution::Bits8)),
            _ => Err(FfiError::invalid(format!(
                "{op}: mask_bits = {bits} is not offered by this build of the library; use {list}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(math: u32, mask_bits: u32) -> FrOptions {
        FrOptions {
            math,
            mask_bits,
            ..fr_options_default()
        }
    }

    #[test]
    fn math_codes_map_to_the_library_modes() {
        assert_eq!(with(FR_MATH_DEFAULT, 32).math("op").unwrap(), None);
        assert_eq!(
            with(FR_MATH_EXACT, 32).math("op").unwrap(),
            Some(Math::Exact)
        );
        assert_eq!(with(FR_MATH_FAST, 32).math("op").unwrap(), Some(Math::Fast));
        let e = with(3, 32).math("op").unwrap_err().message;
        assert!(e.contains("math = 3") && e.contains("FR_MATH_FAST"), "{e}");
        assert!(with(FR_MATH_EXACT, 32).exact_only("op").is_ok());
        let e = with(FR_MATH_FAST, 32).exact_only("op").unwrap_err().message;
        assert!(e.contains("not offered"), "{e}");
    }

    #[test]
    fn resolutions_map_or_say_what_is_offered() {
        let r = |bits, offered: &[u32]| with(FR_MATH_DEFAULT, bits).resolution("op", offered);
        assert_eq!(r(32, &[32, 16]).unwrap(), Some(MaskResolution::Bits32));
        assert_eq!(r(16, &[32, 16]).unwrap(), Some(MaskResolution::Bits16));
        let e = r(16, &[32]).unwrap_err().message;
        assert!(e.contains("mask_bits = 16") && e.contains("use 32"), "{e}");
        assert_eq!(r(8, &[32, 16, 8]).unwrap(), Some(MaskResolution::Bits8));
        let e = r(8, &[32, 16]).unwrap_err().message;
        assert!(
            e.contains("mask_bits = 8") && e.contains("use 32 or 16"),
            "{e}"
        );
        // Named as offered but not mapped (a table out of step with the library): still an error.
        assert!(r(4, &[32, 4]).is_err());
        // 0 is the op's default for the dtype, whatever the op offers; it is the default.
        assert_eq!(r(0, &[32]).unwrap(), None);
        assert_eq!(r(0, &[32, 16, 8]).unwrap(), None);
        assert_eq!(fr_options_default().mask_bits, 0);
    }
}
