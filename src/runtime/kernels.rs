//! Every kernel symbol the Rust side can launch, in one list.
//!
//! Each op adds one block here: the module (the stem of its `kernels/<stem>.cu`) and its entry
//! points, one line per symbol family as the `.cu` generates them with one macro per dtype family:
//!
//! ```text
//! [_ Single] = "symbol",                              // one symbol, no dtype
//! [f32 A, f16 B, bf16 C] = "prefix_" [, "_suffix"],    // prefix_f32_suffix, prefix_f16_suffix, ...
//! ```
//!
//! The symbols are compile-time strings (`concat!`), never assembled at run time, and a unit
//! test checks every one of them against the entry points build.rs found in the compiled modules,
//! so a typo fails CI instead of a user's first launch.

use crate::dtype::PerDtype;

/// The list's grammar (see the module docs): a family line expands to one entry per dtype.
macro_rules! kernels {
    ($( $module:literal => {
        $( [$($dt:tt $id:ident),+ $(,)?] = $prefix:literal $(, $suffix:literal)?, )*
    } )*) => {
        /// A launchable kernel. Its discriminant indexes [`Kernel::TABLE`] and the per-context
        /// function cache.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub(crate) enum Kernel { $( $( $( $id, )+ )* )* }

        impl Kernel {
            /// `(module, symbol)` of every kernel, in discriminant order (the loader's
            /// [`KernelTable`](super::modules::KernelTable) list).
            pub(crate) const TABLE: &'static [(&'static str, &'static str)] =
                &[ $( $( $( (Kernel::$id.module(), Kernel::$id.symbol()), )+ )* )* ];

            /// The `extern "C"` symbol in the module.
            const fn symbol(self) -> &'static str {
                match self {
                    $( $( $( Kernel::$id )|+ => family_symbol!(self; $($dt $id),+; $prefix $(, $suffix)?), )* )*
                }
            }

            /// The module (kernel file stem) that defines it.
            const fn module(self) -> &'static str {
                match self { $( $( $( Kernel::$id => $module, )+ )* )* }
            }
        }
    };
}

/// The symbol of `$k`, one of a family line's kernels: `prefix + dtype + suffix` (no dtype for
/// `_`).
macro_rules! family_symbol {
    ($k:expr; $($dt:tt $id:ident),+; $prefix:literal) => {
        family_symbol!($k; $($dt $id),+; $prefix, "")
    };
    ($k:expr; $($dt:tt $id:ident),+; $prefix:literal, $suffix:literal) => {
        match $k {
            $( Kernel::$id => concat!($prefix, dtype_tag!($dt), $suffix), )+
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    };
}

macro_rules! dtype_tag {
    (_) => {
        ""
    };
    ($dt:ident) => {
        stringify!($dt)
    };
}

kernels! {
    "philox" => {
        [_ PhiloxFill] = "philox_fill",
        [_ PhiloxMaskWords] = "philox_mask_words",
    }
    "bias_act_dropout" => {
        [f32 BiasActDropoutFwdVecF32, f16 BiasActDropoutFwdVecF16, bf16 BiasActDropoutFwdVecBf16] = "bias_act_dropout_fwd_vec_",
        [f32 BiasActDropoutFwdVecReluF32, f16 BiasActDropoutFwdVecReluF16, bf16 BiasActDropoutFwdVecReluBf16] = "bias_act_dropout_fwd_vec_relu_",
        [f32 BiasActDropoutFwdVecGeluErfFastF32, f16 BiasActDropoutFwdVecGeluErfFastF16, bf16 BiasActDropoutFwdVecGeluErfFastBf16] = "bias_act_dropout_fwd_vec_gelu_erf_fast_",
        [f32 BiasActDropoutFwdVecGeluTanhFastF32, f16 BiasActDropoutFwdVecGeluTanhFastF16, bf16 BiasActDropoutFwdVecGeluTanhFastBf16] = "bias_act_dropout_fwd_vec_gelu_tanh_fast_",
        [f32 BiasActDropoutFwdVecSiluFastF32, f16 BiasActDropoutFwdVecSiluFastF16, bf16 BiasActDropoutFwdVecSiluFastBf16] = "bias_act_dropout_fwd_vec_silu_fast_",
        [f32 BiasActDropoutFwdScalarF32, f16 BiasActDropoutFwdScalarF16, bf16 BiasActDropoutFwdScalarBf16] = "bias_act_dropout_fwd_scalar_",
        [f32 BiasActDropoutFwdScalarFastF32, f16 BiasActDropoutFwdScalarFastF16, bf16 BiasActDropoutFwdScalarFastBf16] = "bias_act_dropout_fwd_scalar_fast_",
        [f32 BiasActDropoutBwdVecF32, f16 BiasActDropoutBwdVecF16, bf16 BiasActDropoutBwdVecBf16] = "bias_act_dropout_bwd_vec_",
        [f32 BiasActDropoutBwdVecReluF32, f16 BiasActDropoutBwdVecReluF16, bf16 BiasActDropoutBwdVecReluBf16] = "bias_act_dropout_bwd_vec_relu_",
        [f32 BiasActDropoutBwdVecReluK16F32, f16 BiasActDropoutBwdVecReluK16F16, bf16 BiasActDropoutBwdVecReluK16Bf16] = "bias_act_dropout_bwd_vec_relu_k16_",
        [f32 BiasActDropoutBwdVecReluK8F32, f16 BiasActDropoutBwdVecReluK8F16, bf16 BiasActDropoutBwdVecReluK8Bf16] = "bias_act_dropout_bwd_vec_relu_k8_",
        [f32 BiasActDropoutBwdVecGeluErfFastF32, f16 BiasActDropoutBwdVecGeluErfFastF16, bf16 BiasActDropoutBwdVecGeluErfFastBf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_",
        [f32 BiasActDropoutBwdVecGeluErfFastK16F32, f16 BiasActDropoutBwdVecGeluErfFastK16F16, bf16 BiasActDropoutBwdVecGeluErfFastK16Bf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_k16_",
        [f32 BiasActDropoutBwdVecGeluErfFastK8F32, f16 BiasActDropoutBwdVecGeluErfFastK8F16, bf16 BiasActDropoutBwdVecGeluErfFastK8Bf16] = "bias_act_dropout_bwd_vec_gelu_erf_fast_k8_",
        [f32 BiasActDropoutBwdVecGeluTanhFastF32, f16 BiasActDropoutBwdVecGeluTanhFastF16, bf16 BiasActDropoutBwdVecGeluTanhFastBf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_",
        [f32 BiasActDropoutBwdVecGeluTanhFastK16F32, f16 BiasActDropoutBwdVecGeluTanhFastK16F16, bf16 BiasActDropoutBwdVecGeluTanhFastK16Bf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_k16_",
        [f32 BiasActDropoutBwdVecGeluTanhFastK8F32, f16 BiasActDropoutBwdVecGeluTanhFastK8F16, bf16 BiasActDropoutBwdVecGeluTanhFastK8Bf16] = "bias_act_dropout_bwd_vec_gelu_tanh_fast_k8_",
        [f32 BiasActDropoutBwdVecSiluFastF32, f16 BiasActDropoutBwdVecSiluFastF16, bf16 BiasActDropoutBwdVecSiluFastBf16] = "bias_act_dropout_bwd_vec_silu_fast_",
        [f32 BiasActDropoutBwdVecSiluFastK16F32, f16 BiasActDropoutBwdVecSiluFastK16F16, bf16 BiasActDropoutBwdVecSiluFastK16Bf16] = "bias_act_dropout_bwd_vec_silu_fast_k16_",
        [f32 BiasActDropoutBwdVecSiluFastK8F32, f16 BiasActDropoutBwdVecSiluFastK8F16, bf16 BiasActDropoutBwdVecSiluFastK8Bf16] = "bias_act_dropout_bwd_vec_silu_fast_k8_",
        [f32 BiasActDropoutBwdScalarF32, f16 BiasActDropoutBwdScalarF16, bf16 BiasActDropoutBwdScalarBf16] = "bias_act_dropout_bwd_scalar_",
        [f32 BiasActDropoutBwdScalarFastF32, f16 BiasActDropoutBwdScalarFastF16, bf16 BiasActDropoutBwdScalarFastBf16] = "bias_act_dropout_bwd_scalar_fast_",
        [f32 BiasActDropoutDbiasF32, f16 BiasActDropoutDbiasF16, bf16 BiasActDropoutDbiasBf16] = "bias_act_dropout_dbias_",
        [f32 BiasActDropoutUnfusedBiasAddF32, f16 BiasActDropoutUnfusedBiasAddF16, bf16 BiasActDropoutUnfusedBiasAddBf16] = "bias_act_dropout_unfused_bias_add_",
        [f32 BiasActDropoutUnfusedActF32, f16 BiasActDropoutUnfusedActF16, bf16 BiasActDropoutUnfusedActBf16] = "bias_act_dropout_unfused_act_",
        [f32 BiasActDropoutUnfusedDropoutF32, f16 BiasActDropoutUnfusedDropoutF16, bf16 BiasActDropoutUnfusedDropoutBf16] = "bias_act_dropout_unfused_dropout_",
        [f32 BiasActDropoutUnfusedMaskedScaleF32, f16 BiasActDropoutUnfusedMaskedScaleF16, bf16 BiasActDropoutUnfusedMaskedScaleBf16] = "bias_act_dropout_unfused_masked_scale_",
        [f32 BiasActDropoutUnfusedActGradF32, f16 BiasActDropoutUnfusedActGradF16, bf16 BiasActDropoutUnfusedActGradBf16] = "bias_act_dropout_unfused_act_grad_",
        [f32 BiasActDropoutUnfusedColSumF32, f16 BiasActDropoutUnfusedColSumF16, bf16 BiasActDropoutUnfusedColSumBf16] = "bias_act_dropout_unfused_col_sum_",
    }
    "fmath" => {
        [_ FmathEval] = "fmath_eval",
    }
    "adamw" => {
        [f32 AdamwPf32Gf32, f16 AdamwPf32Gf16, bf16 AdamwPf32Gbf16] = "adamw_pf32_g",
        [f32 AdamwPf16Gf32, f16 AdamwPf16Gf16, bf16 AdamwPf16Gbf16] = "adamw_pf16_g",
        [f32 AdamwPbf16Gf32, f16 AdamwPbf16Gf16, bf16 AdamwPbf16Gbf16] = "adamw_pbf16_g",
        [f32 AdamwPf32Gf32Mbf16, f16 AdamwPf32Gf16Mbf16, bf16 AdamwPf32Gbf16Mbf16] = "adamw_pf32_g", "_mbf16",
        [f32 AdamwPf16Gf32Mbf16, f16 AdamwPf16Gf16Mbf16, bf16 AdamwPf16Gbf16Mbf16] = "adamw_pf16_g", "_mbf16",
        [f32 AdamwPbf16Gf32Mbf16, f16 AdamwPbf16Gf16Mbf16, bf16 AdamwPbf16Gbf16Mbf16] = "adamw_pbf16_g", "_mbf16",
        [f32 AdamwPf16Gf32Nomaster, f16 AdamwPf16Gf16Nomaster, bf16 AdamwPf16Gbf16Nomaster] = "adamw_pf16_g", "_nomaster",
        [f32 AdamwPbf16Gf32Nomaster, f16 AdamwPbf16Gf16Nomaster, bf16 AdamwPbf16Gbf16Nomaster] = "adamw_pbf16_g", "_nomaster",
        [f32 AdamwPf16Gf32Mbf16Nomaster, f16 AdamwPf16Gf16Mbf16Nomaster, bf16 AdamwPf16Gbf16Mbf16Nomaster] = "adamw_pf16_g", "_mbf16_nomaster",
        [f32 AdamwPbf16Gf32Mbf16Nomaster, f16 AdamwPbf16Gf16Mbf16Nomaster, bf16 AdamwPbf16Gbf16Mbf16Nomaster] = "adamw_pbf16_g", "_mbf16_nomaster",
        [f16 AdamwInitMasterF16, bf16 AdamwInitMasterBf16] = "adamw_init_master_",
    }
    "global_norm" => {
        [f32 GlobalNormPartialsF32, f16 GlobalNormPartialsF16, bf16 GlobalNormPartialsBf16] = "global_norm_partials_",
        [_ GlobalNormReduce] = "global_norm_reduce",
        [_ GlobalNormFinalize] = "global_norm_finalize",
        [_ GlobalNormPerTensor] = "global_norm_per_tensor",
        [f32 GlobalNormScaleF32, f16 GlobalNormScaleF16, bf16 GlobalNormScaleBf16] = "global_norm_scale_",
    }
    "cross_entropy" => {
        [_ CrossEntropyFusedF32Ti32] = "cross_entropy_fused_f32_ti32",
        [_ CrossEntropyFusedF32Ti64] = "cross_entropy_fused_f32_ti64",
        [_ CrossEntropyFusedF16Ti32] = "cross_entropy_fused_f16_ti32",
        [_ CrossEntropyFusedF16Ti64] = "cross_entropy_fused_f16_ti64",
        [_ CrossEntropyFusedBf16Ti32] = "cross_entropy_fused_bf16_ti32",
        [_ CrossEntropyFusedBf16Ti64] = "cross_entropy_fused_bf16_ti64",
        [_ CrossEntropyFusedFastF32Ti32] = "cross_entropy_fused_fast_f32_ti32",
        [_ CrossEntropyFusedFastF32Ti64] = "cross_entropy_fused_fast_f32_ti64",
        [_ CrossEntropyFusedFastF16Ti32] = "cross_entropy_fused_fast_f16_ti32",
        [_ CrossEntropyFusedFastF16Ti64] = "cross_entropy_fused_fast_f16_ti64",
        [_ CrossEntropyFusedFastBf16Ti32] = "cross_entropy_fused_fast_bf16_ti32",
        [_ CrossEntropyFusedFastBf16Ti64] = "cross_entropy_fused_fast_bf16_ti64",
        [_ CrossEntropyUnfusedNllF32Ti32] = "cross_entropy_unfused_nll_f32_ti32",
        [_ CrossEntropyUnfusedNllF32Ti64] = "cross_entropy_unfused_nll_f32_ti64",
        [_ CrossEntropyUnfusedNllF16Ti32] = "cross_entropy_unfused_nll_f16_ti32",
        [_ CrossEntropyUnfusedNllF16Ti64] = "cross_entropy_unfused_nll_f16_ti64",
        [_ CrossEntropyUnfusedNllBf16Ti32] = "cross_entropy_unfused_nll_bf16_ti32",
        [_ CrossEntropyUnfusedNllBf16Ti64] = "cross_entropy_unfused_nll_bf16_ti64",
        [_ CrossEntropyUnfusedBackwardF32Ti32] = "cross_entropy_unfused_backward_f32_ti32",
        [_ CrossEntropyUnfusedBackwardF32Ti64] = "cross_entropy_unfused_backward_f32_ti64",
        [_ CrossEntropyUnfusedBackwardF16Ti32] = "cross_entropy_unfused_backward_f16_ti32",
        [_ CrossEntropyUnfusedBackwardF16Ti64] = "cross_entropy_unfused_backward_f16_ti64",
        [_ CrossEntropyUnfusedBackwardBf16Ti32] = "cross_entropy_unfused_backward_bf16_ti32",
        [_ CrossEntropyUnfusedBackwardBf16Ti64] = "cross_entropy_unfused_backward_bf16_ti64",
        [f32 CrossEntropyUnfusedLogSoftmaxF32, f16 CrossEntropyUnfusedLogSoftmaxF16, bf16 CrossEntropyUnfusedLogSoftmaxBf16] = "cross_entropy_unfused_log_softmax_",
        [_ CrossEntropyCountTi32] = "cross_entropy_count_ti32",
        [_ CrossEntropyCountTi64] = "cross_entropy_count_ti64",
        [_ CrossEntropySum] = "cross_entropy_sum",
    }
    "dropout" => {
        [f32 DropoutFwdVecF32, f16 DropoutFwdVecF16, bf16 DropoutFwdVecBf16] = "dropout_fwd_vec_",
        [f32 DropoutFwdScalarF32, f16 DropoutFwdScalarF16, bf16 DropoutFwdScalarBf16] = "dropout_fwd_scalar_",
        [f32 DropoutFwdResVecF32, f16 DropoutFwdResVecF16, bf16 DropoutFwdResVecBf16] = "dropout_fwd_res_vec_",
        [f32 DropoutFwdResScalarF32, f16 DropoutFwdResScalarF16, bf16 DropoutFwdResScalarBf16] = "dropout_fwd_res_scalar_",
        [f32 DropoutFwdResStatsF32, f16 DropoutFwdResStatsF16, bf16 DropoutFwdResStatsBf16] = "dropout_fwd_res_stats_",
        [f32 DropoutFwdResStatsVecF32, f16 DropoutFwdResStatsVecF16, bf16 DropoutFwdResStatsVecBf16] = "dropout_fwd_res_stats_vec_",
        [f32 DropoutBwdVecF32, f16 DropoutBwdVecF16, bf16 DropoutBwdVecBf16] = "dropout_bwd_vec_",
        [f32 DropoutBwdScalarF32, f16 DropoutBwdScalarF16, bf16 DropoutBwdScalarBf16] = "dropout_bwd_scalar_",
        [f32 DropoutDbiasF32, f16 DropoutDbiasF16, bf16 DropoutDbiasBf16] = "dropout_dbias_",
        [f32 DropoutUnfusedBiasAddF32, f16 DropoutUnfusedBiasAddF16, bf16 DropoutUnfusedBiasAddBf16] = "dropout_unfused_bias_add_",
        [f32 DropoutUnfusedDropoutF32, f16 DropoutUnfusedDropoutF16, bf16 DropoutUnfusedDropoutBf16] = "dropout_unfused_dropout_",
        [f32 DropoutUnfusedMaskedScaleF32, f16 DropoutUnfusedMaskedScaleF16, bf16 DropoutUnfusedMaskedScaleBf16] = "dropout_unfused_masked_scale_",
        [f32 DropoutUnfusedColSumF32, f16 DropoutUnfusedColSumF16, bf16 DropoutUnfusedColSumBf16] = "dropout_unfused_col_sum_",
        [f32 DropoutUnfusedAddF32, f16 DropoutUnfusedAddF16, bf16 DropoutUnfusedAddBf16] = "dropout_unfused_add_",
    }
    "dropout_add_norm" => {
        [f32 DropoutAddNormFwdF32, f16 DropoutAddNormFwdF16, bf16 DropoutAddNormFwdBf16] = "dropout_add_norm_fwd_",
        [f16 DropoutAddNormFwdF16Sf32, bf16 DropoutAddNormFwdBf16Sf32] = "dropout_add_norm_fwd_", "_sf32",
        [f32 DropoutAddNormBwdF32, f16 DropoutAddNormBwdF16, bf16 DropoutAddNormBwdBf16] = "dropout_add_norm_bwd_",
        [f16 DropoutAddNormBwdF16Sf32, bf16 DropoutAddNormBwdBf16Sf32] = "dropout_add_norm_bwd_", "_sf32",
        [_ DropoutAddNormFwdT1F32] = "dropout_add_norm_fwd_t1_f32",
        [_ DropoutAddNormFwdT2F32] = "dropout_add_norm_fwd_t2_f32",
        [_ DropoutAddNormFwdT4F32] = "dropout_add_norm_fwd_t4_f32",
        [_ DropoutAddNormFwdT8F32] = "dropout_add_norm_fwd_t8_f32",
        [_ DropoutAddNormFwdT1F16] = "dropout_add_norm_fwd_t1_f16",
        [_ DropoutAddNormFwdT2F16] = "dropout_add_norm_fwd_t2_f16",
        [_ DropoutAddNormFwdT4F16] = "dropout_add_norm_fwd_t4_f16",
        [_ DropoutAddNormFwdT8F16] = "dropout_add_norm_fwd_t8_f16",
        [_ DropoutAddNormFwdT1Bf16] = "dropout_add_norm_fwd_t1_bf16",
        [_ DropoutAddNormFwdT2Bf16] = "dropout_add_norm_fwd_t2_bf16",
        [_ DropoutAddNormFwdT4Bf16] = "dropout_add_norm_fwd_t4_bf16",
        [_ DropoutAddNormFwdT8Bf16] = "dropout_add_norm_fwd_t8_bf16",
        [_ DropoutAddNormFwdT1F16Sf32] = "dropout_add_norm_fwd_t1_f16_sf32",
        [_ DropoutAddNormFwdT2F16Sf32] = "dropout_add_norm_fwd_t2_f16_sf32",
        [_ DropoutAddNormFwdT4F16Sf32] = "dropout_add_norm_fwd_t4_f16_sf32",
        [_ DropoutAddNormFwdT8F16Sf32] = "dropout_add_norm_fwd_t8_f16_sf32",
        [_ DropoutAddNormFwdT1Bf16Sf32] = "dropout_add_norm_fwd_t1_bf16_sf32",
        [_ DropoutAddNormFwdT2Bf16Sf32] = "dropout_add_norm_fwd_t2_bf16_sf32",
        [_ DropoutAddNormFwdT4Bf16Sf32] = "dropout_add_norm_fwd_t4_bf16_sf32",
        [_ DropoutAddNormFwdT8Bf16Sf32] = "dropout_add_norm_fwd_t8_bf16_sf32",
        [_ DropoutAddNormBwdT1F32] = "dropout_add_norm_bwd_t1_f32",
        [_ DropoutAddNormBwdT2F32] = "dropout_add_norm_bwd_t2_f32",
        [_ DropoutAddNormBwdT4F32] = "dropout_add_norm_bwd_t4_f32",
        [_ DropoutAddNormBwdT8F32] = "dropout_add_norm_bwd_t8_f32",
        [_ DropoutAddNormBwdT1F16] = "dropout_add_norm_bwd_t1_f16",
        [_ DropoutAddNormBwdT2F16] = "dropout_add_norm_bwd_t2_f16",
        [_ DropoutAddNormBwdT4F16] = "dropout_add_norm_bwd_t4_f16",
        [_ DropoutAddNormBwdT8F16] = "dropout_add_norm_bwd_t8_f16",
        [_ DropoutAddNormBwdT1Bf16] = "dropout_add_norm_bwd_t1_bf16",
        [_ DropoutAddNormBwdT2Bf16] = "dropout_add_norm_bwd_t2_bf16",
        [_ DropoutAddNormBwdT4Bf16] = "dropout_add_norm_bwd_t4_bf16",
        [_ DropoutAddNormBwdT8Bf16] = "dropout_add_norm_bwd_t8_bf16",
        [_ DropoutAddNormBwdT1F16Sf32] = "dropout_add_norm_bwd_t1_f16_sf32",
        [_ DropoutAddNormBwdT2F16Sf32] = "dropout_add_norm_bwd_t2_f16_sf32",
        [_ DropoutAddNormBwdT4F16Sf32] = "dropout_add_norm_bwd_t4_f16_sf32",
        [_ DropoutAddNormBwdT8F16Sf32] = "dropout_add_norm_bwd_t8_f16_sf32",
        [_ DropoutAddNormBwdT1Bf16Sf32] = "dropout_add_norm_bwd_t1_bf16_sf32",
        [_ DropoutAddNormBwdT2Bf16Sf32] = "dropout_add_norm_bwd_t2_bf16_sf32",
        [_ DropoutAddNormBwdT4Bf16Sf32] = "dropout_add_norm_bwd_t4_bf16_sf32",
        [_ DropoutAddNormBwdT8Bf16Sf32] = "dropout_add_norm_bwd_t8_bf16_sf32",
        [_ DropoutAddNormFwdStatsF32] = "dropout_add_norm_fwd_stats_f32",
        [_ DropoutAddNormFwdStatsT1F32] = "dropout_add_norm_fwd_stats_t1_f32",
        [_ DropoutAddNormFwdStatsT2F32] = "dropout_add_norm_fwd_stats_t2_f32",
        [_ DropoutAddNormFwdStatsT4F32] = "dropout_add_norm_fwd_stats_t4_f32",
        [_ DropoutAddNormFwdStatsF16] = "dropout_add_norm_fwd_stats_f16",
        [_ DropoutAddNormFwdStatsT1F16] = "dropout_add_norm_fwd_stats_t1_f16",
        [_ DropoutAddNormFwdStatsT2F16] = "dropout_add_norm_fwd_stats_t2_f16",
        [_ DropoutAddNormFwdStatsT4F16] = "dropout_add_norm_fwd_stats_t4_f16",
        [_ DropoutAddNormFwdStatsT8F16] = "dropout_add_norm_fwd_stats_t8_f16",
        [_ DropoutAddNormFwdStatsBf16] = "dropout_add_norm_fwd_stats_bf16",
        [_ DropoutAddNormFwdStatsT1Bf16] = "dropout_add_norm_fwd_stats_t1_bf16",
        [_ DropoutAddNormFwdStatsT2Bf16] = "dropout_add_norm_fwd_stats_t2_bf16",
        [_ DropoutAddNormFwdStatsT4Bf16] = "dropout_add_norm_fwd_stats_t4_bf16",
        [_ DropoutAddNormFwdStatsT8Bf16] = "dropout_add_norm_fwd_stats_t8_bf16",
        [_ DropoutAddNormFwdStatsF16Sf32] = "dropout_add_norm_fwd_stats_f16_sf32",
        [_ DropoutAddNormFwdStatsT1F16Sf32] = "dropout_add_norm_fwd_stats_t1_f16_sf32",
        [_ DropoutAddNormFwdStatsT2F16Sf32] = "dropout_add_norm_fwd_stats_t2_f16_sf32",
        [_ DropoutAddNormFwdStatsT4F16Sf32] = "dropout_add_norm_fwd_stats_t4_f16_sf32",
        [_ DropoutAddNormFwdStatsBf16Sf32] = "dropout_add_norm_fwd_stats_bf16_sf32",
        [_ DropoutAddNormFwdStatsT1Bf16Sf32] = "dropout_add_norm_fwd_stats_t1_bf16_sf32",
        [_ DropoutAddNormFwdStatsT2Bf16Sf32] = "dropout_add_norm_fwd_stats_t2_bf16_sf32",
        [_ DropoutAddNormFwdStatsT4Bf16Sf32] = "dropout_add_norm_fwd_stats_t4_bf16_sf32",
        [f32 DropoutAddNormColsumF32, f16 DropoutAddNormColsumF16, bf16 DropoutAddNormColsumBf16] = "dropout_add_norm_colsum_",
    }
}

/// Builds a [`PerDtype`] of kernels from three variants named `<Base>F32`, `<Base>F16`,
/// `<Base>Bf16`.
#[allow(unused_macros)]
macro_rules! per_dtype {
    ($f32:ident, $f16:ident, $bf16:ident) => {
        $crate::dtype::PerDtype {
            f32: $crate::runtime::kernels::Kernel::$f32,
            f16: $crate::runtime::kernels::Kernel::$f16,
            bf16: $crate::runtime::kernels::Kernel::$bf16,
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_dtype;

#[allow(dead_code)]
pub(crate) type KernelFamily = PerDtype<Kernel>;

#[cfg(test)]
mod tests {
    use crate::runtime::modules::LIBRARY;

    /// Every symbol the Rust side can launch exists in the compiled module (for every arch).
    #[test]
    #[cfg_attr(
        not(fusedreg_kernels_built),
        ignore = "kernels not built: run scripts/install-cuda.sh (CI builds them with FUSEDREG_REQUIRE_KERNELS=1)"
    )]
    fn every_kernel_exists_in_its_module() {
        let missing = LIBRARY.missing_entries();
        assert!(
            missing.is_empty(),
            "kernels the Rust side launches but the modules lack: {missing:#?}"
        );
    }

    #[test]
    fn symbols_are_unique() {
        assert_eq!(
            LIBRARY.repeated_symbols(),
            Vec::<&str>::new(),
            "kernel symbols listed twice"
        );
    }
}
