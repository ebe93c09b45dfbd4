//! Every kernel symbol the Rust side can launch, in one list.
//!
//! Each op adds one block here: the module (the stem of its `kernels/<stem>.cu`) and its entry
//! points. The symbols are compile-time strings, never assembled at run time, and a unit test
//! checks every one of them against the entry points build.rs found in the compiled modules, so a
//! typo fails CI instead of a user's first launch.

use crate::dtype::PerDtype;

macro_rules! kernels {
    ($( $module:literal => { $( $id:ident = $symbol:literal ),* $(,)? } )*) => {
        /// A launchable kernel. Its discriminant indexes the per-context function cache.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub(crate) enum Kernel { $( $( $id, )* )* }

        impl Kernel {
            /// Every kernel, in declaration order.
            pub(crate) const ALL: &'static [Kernel] = &[ $( $( Kernel::$id, )* )* ];

            /// The `extern "C"` symbol in the module.
            pub(crate) const fn symbol(self) -> &'static str {
                match self { $( $( Kernel::$id => $symbol, )* )* }
            }

            /// The module (kernel file stem) that defines it.
            pub(crate) const fn module(self) -> &'static str {
                match self { $( $( Kernel::$id => $module, )* )* }
            }
        }
    };
}

kernels! {
    "philox" => {
        PhiloxFill = "philox_fill",
        PhiloxMaskWords = "philox_mask_words",
    }
    "bias_act_dropout" => {
        BiasActDropoutFwdVecF32 = "bias_act_dropout_fwd_vec_f32",
        BiasActDropoutFwdVecF16 = "bias_act_dropout_fwd_vec_f16",
        BiasActDropoutFwdVecBf16 = "bias_act_dropout_fwd_vec_bf16",
        BiasActDropoutFwdVecReluF32 = "bias_act_dropout_fwd_vec_relu_f32",
        BiasActDropoutFwdVecReluF16 = "bias_act_dropout_fwd_vec_relu_f16",
        BiasActDropoutFwdVecReluBf16 = "bias_act_dropout_fwd_vec_relu_bf16",
        BiasActDropoutFwdVecGeluErfFastF32 = "bias_act_dropout_fwd_vec_gelu_erf_fast_f32",
        BiasActDropoutFwdVecGeluErfFastF16 = "bias_act_dropout_fwd_vec_gelu_erf_fast_f16",
        BiasActDropoutFwdVecGeluErfFastBf16 = "bias_act_dropout_fwd_vec_gelu_erf_fast_bf16",
        BiasActDropoutFwdVecGeluTanhFastF32 = "bias_act_dropout_fwd_vec_gelu_tanh_fast_f32",
        BiasActDropoutFwdVecGeluTanhFastF16 = "bias_act_dropout_fwd_vec_gelu_tanh_fast_f16",
        BiasActDropoutFwdVecGeluTanhFastBf16 = "bias_act_dropout_fwd_vec_gelu_tanh_fast_bf16",
        BiasActDropoutFwdVecSiluFastF32 = "bias_act_dropout_fwd_vec_silu_fast_f32",
        BiasActDropoutFwdVecSiluFastF16 = "bias_act_dropout_fwd_vec_silu_fast_f16",
        BiasActDropoutFwdVecSiluFastBf16 = "bias_act_dropout_fwd_vec_silu_fast_bf16",
        BiasActDropoutFwdScalarF32 = "bias_act_dropout_fwd_scalar_f32",
        BiasActDropoutFwdScalarF16 = "bias_act_dropout_fwd_scalar_f16",
        BiasActDropoutFwdScalarBf16 = "bias_act_dropout_fwd_scalar_bf16",
        BiasActDropoutFwdScalarFastF32 = "bias_act_dropout_fwd_scalar_fast_f32",
        BiasActDropoutFwdScalarFastF16 = "bias_act_dropout_fwd_scalar_fast_f16",
        BiasActDropoutFwdScalarFastBf16 = "bias_act_dropout_fwd_scalar_fast_bf16",
        BiasActDropoutBwdVecF32 = "bias_act_dropout_bwd_vec_f32",
        BiasActDropoutBwdVecF16 = "bias_act_dropout_bwd_vec_f16",
        BiasActDropoutBwdVecBf16 = "bias_act_dropout_bwd_vec_bf16",
        BiasActDropoutBwdVecReluF32 = "bias_act_dropout_bwd_vec_relu_f32",
        BiasActDropoutBwdVecReluF16 = "bias_act_dropout_bwd_vec_relu_f16",
        BiasActDropoutBwdVecReluBf16 = "bias_act_dropout_bwd_vec_relu_bf16",
        BiasActDropoutBwdVecGeluErfFastF32 = "bias_act_dropout_bwd_vec_gelu_erf_fast_f32",
        BiasActDropoutBwdVecGeluErfFastF16 = "bias_act_dropout_bwd_vec_gelu_erf_fast_f16",
        BiasActDropoutBwdVecGeluErfFastBf16 = "bias_act_dropout_bwd_vec_gelu_erf_fast_bf16",
        BiasActDropoutBwdVecGeluTanhFastF32 = "bias_act_dropout_bwd_vec_gelu_tanh_fast_f32",
        BiasActDropoutBwdVecGeluTanhFastF16 = "bias_act_dropout_bwd_vec_gelu_tanh_fast_f16",
        BiasActDropoutBwdVecGeluTanhFastBf16 = "bias_act_dropout_bwd_vec_gelu_tanh_fast_bf16",
        BiasActDropoutBwdVecSiluFastF32 = "bias_act_dropout_bwd_vec_silu_fast_f32",
        BiasActDropoutBwdVecSiluFastF16 = "bias_act_dropout_bwd_vec_silu_fast_f16",
        BiasActDropoutBwdVecSiluFastBf16 = "bias_act_dropout_bwd_vec_silu_fast_bf16",
        BiasActDropoutBwdScalarF32 = "bias_act_dropout_bwd_scalar_f32",
        BiasActDropoutBwdScalarF16 = "bias_act_dropout_bwd_scalar_f16",
        BiasActDropoutBwdScalarBf16 = "bias_act_dropout_bwd_scalar_bf16",
        BiasActDropoutBwdScalarFastF32 = "bias_act_dropout_bwd_scalar_fast_f32",
        BiasActDropoutBwdScalarFastF16 = "bias_act_dropout_bwd_scalar_fast_f16",
        BiasActDropoutBwdScalarFastBf16 = "bias_act_dropout_bwd_scalar_fast_bf16",
        BiasActDropoutDbiasF32 = "bias_act_dropout_dbias_f32",
        BiasActDropoutDbiasF16 = "bias_act_dropout_dbias_f16",
        BiasActDropoutDbiasBf16 = "bias_act_dropout_dbias_bf16",
        BiasActDropoutUnfusedBiasAddF32 = "bias_act_dropout_unfused_bias_add_f32",
        BiasActDropoutUnfusedBiasAddF16 = "bias_act_dropout_unfused_bias_add_f16",
        BiasActDropoutUnfusedBiasAddBf16 = "bias_act_dropout_unfused_bias_add_bf16",
        BiasActDropoutUnfusedActF32 = "bias_act_dropout_unfused_act_f32",
        BiasActDropoutUnfusedActF16 = "bias_act_dropout_unfused_act_f16",
        BiasActDropoutUnfusedActBf16 = "bias_act_dropout_unfused_act_bf16",
        BiasActDropoutUnfusedDropoutF32 = "bias_act_dropout_unfused_dropout_f32",
        BiasActDropoutUnfusedDropoutF16 = "bias_act_dropout_unfused_dropout_f16",
        BiasActDropoutUnfusedDropoutBf16 = "bias_act_dropout_unfused_dropout_bf16",
        BiasActDropoutUnfusedMaskedScaleF32 = "bias_act_dropout_unfused_masked_scale_f32",
        BiasActDropoutUnfusedMaskedScaleF16 = "bias_act_dropout_unfused_masked_scale_f16",
        BiasActDropoutUnfusedMaskedScaleBf16 = "bias_act_dropout_unfused_masked_scale_bf16",
        BiasActDropoutUnfusedActGradF32 = "bias_act_dropout_unfused_act_grad_f32",
        BiasActDropoutUnfusedActGradF16 = "bias_act_dropout_unfused_act_grad_f16",
        BiasActDropoutUnfusedActGradBf16 = "bias_act_dropout_unfused_act_grad_bf16",
        BiasActDropoutUnfusedColSumF32 = "bias_act_dropout_unfused_col_sum_f32",
        BiasActDropoutUnfusedColSumF16 = "bias_act_dropout_unfused_col_sum_f16",
        BiasActDropoutUnfusedColSumBf16 = "bias_act_dropout_unfused_col_sum_bf16",
    }
    "fmath" => {
        FmathEval = "fmath_eval",
    }
    "adamw" => {
        AdamwPf32Gf32 = "adamw_pf32_gf32",
        AdamwPf32Gf16 = "adamw_pf32_gf16",
        AdamwPf32Gbf16 = "adamw_pf32_gbf16",
        AdamwPf16Gf32 = "adamw_pf16_gf32",
        AdamwPf16Gf16 = "adamw_pf16_gf16",
        AdamwPf16Gbf16 = "adamw_pf16_gbf16",
        AdamwPbf16Gf32 = "adamw_pbf16_gf32",
        AdamwPbf16Gf16 = "adamw_pbf16_gf16",
        AdamwPbf16Gbf16 = "adamw_pbf16_gbf16",
        AdamwPf32Gf32Mbf16 = "adamw_pf32_gf32_mbf16",
        AdamwPf32Gf16Mbf16 = "adamw_pf32_gf16_mbf16",
        AdamwPf32Gbf16Mbf16 = "adamw_pf32_gbf16_mbf16",
        AdamwPf16Gf32Mbf16 = "adamw_pf16_gf32_mbf16",
        AdamwPf16Gf16Mbf16 = "adamw_pf16_gf16_mbf16",
        AdamwPf16Gbf16Mbf16 = "adamw_pf16_gbf16_mbf16",
        AdamwPbf16Gf32Mbf16 = "adamw_pbf16_gf32_mbf16",
        AdamwPbf16Gf16Mbf16 = "adamw_pbf16_gf16_mbf16",
        AdamwPbf16Gbf16Mbf16 = "adamw_pbf16_gbf16_mbf16",
        AdamwPf16Gf32Nomaster = "adamw_pf16_gf32_nomaster",
        AdamwPf16Gf16Nomaster = "adamw_pf16_gf16_nomaster",
        AdamwPf16Gbf16Nomaster = "adamw_pf16_gbf16_nomaster",
        AdamwPbf16Gf32Nomaster = "adamw_pbf16_gf32_nomaster",
        AdamwPbf16Gf16Nomaster = "adamw_pbf16_gf16_nomaster",
        AdamwPbf16Gbf16Nomaster = "adamw_pbf16_gbf16_nomaster",
        AdamwPf16Gf32Mbf16Nomaster = "adamw_pf16_gf32_mbf16_nomaster",
        AdamwPf16Gf16Mbf16Nomaster = "adamw_pf16_gf16_mbf16_nomaster",
        AdamwPf16Gbf16Mbf16Nomaster = "adamw_pf16_gbf16_mbf16_nomaster",
        AdamwPbf16Gf32Mbf16Nomaster = "adamw_pbf16_gf32_mbf16_nomaster",
        AdamwPbf16Gf16Mbf16Nomaster = "adamw_pbf16_gf16_mbf16_nomaster",
        AdamwPbf16Gbf16Mbf16Nomaster = "adamw_pbf16_gbf16_mbf16_nomaster",
        AdamwInitMasterF16 = "adamw_init_master_f16",
        AdamwInitMasterBf16 = "adamw_init_master_bf16",
    }
    "global_norm" => {
        GlobalNormPartialsF32 = "global_norm_partials_f32",
        GlobalNormPartialsF16 = "global_norm_partials_f16",
        GlobalNormPartialsBf16 = "global_norm_partials_bf16",
        GlobalNormReduce = "global_norm_reduce",
        GlobalNormFinalize = "global_norm_finalize",
        GlobalNormPerTensor = "global_norm_per_tensor",
        GlobalNormScaleF32 = "global_norm_scale_f32",
        GlobalNormScaleF16 = "global_norm_scale_f16",
        GlobalNormScaleBf16 = "global_norm_scale_bf16",
    }
    "cross_entropy" => {
        CrossEntropyFusedF32Ti32 = "cross_entropy_fused_f32_ti32",
        CrossEntropyFusedF32Ti64 = "cross_entropy_fused_f32_ti64",
        CrossEntropyFusedF16Ti32 = "cross_entropy_fused_f16_ti32",
        CrossEntropyFusedF16Ti64 = "cross_entropy_fused_f16_ti64",
        CrossEntropyFusedBf16Ti32 = "cross_entropy_fused_bf16_ti32",
        CrossEntropyFusedBf16Ti64 = "cross_entropy_fused_bf16_ti64",
        CrossEntropyFusedFastF32Ti32 = "cross_entropy_fused_fast_f32_ti32",
        CrossEntropyFusedFastF32Ti64 = "cross_entropy_fused_fast_f32_ti64",
        CrossEntropyFusedFastF16Ti32 = "cross_entropy_fused_fast_f16_ti32",
        CrossEntropyFusedFastF16Ti64 = "cross_entropy_fused_fast_f16_ti64",
        CrossEntropyFusedFastBf16Ti32 = "cross_entropy_fused_fast_bf16_ti32",
        CrossEntropyFusedFastBf16Ti64 = "cross_entropy_fused_fast_bf16_ti64",
        CrossEntropyUnfusedNllF32Ti32 = "cross_entropy_unfused_nll_f32_ti32",
        CrossEntropyUnfusedNllF32Ti64 = "cross_entropy_unfused_nll_f32_ti64",
        CrossEntropyUnfusedNllF16Ti32 = "cross_entropy_unfused_nll_f16_ti32",
        CrossEntropyUnfusedNllF16Ti64 = "cross_entropy_unfused_nll_f16_ti64",
        CrossEntropyUnfusedNllBf16Ti32 = "cross_entropy_unfused_nll_bf16_ti32",
        CrossEntropyUnfusedNllBf16Ti64 = "cross_entropy_unfused_nll_bf16_ti64",
        CrossEntropyUnfusedBackwardF32Ti32 = "cross_entropy_unfused_backward_f32_ti32",
        CrossEntropyUnfusedBackwardF32Ti64 = "cross_entropy_unfused_backward_f32_ti64",
        CrossEntropyUnfusedBackwardF16Ti32 = "cross_entropy_unfused_backward_f16_ti32",
        CrossEntropyUnfusedBackwardF16Ti64 = "cross_entropy_unfused_backward_f16_ti64",
        CrossEntropyUnfusedBackwardBf16Ti32 = "cross_entropy_unfused_backward_bf16_ti32",
        CrossEntropyUnfusedBackwardBf16Ti64 = "cross_entropy_unfused_backward_bf16_ti64",
        CrossEntropyUnfusedLogSoftmaxF32 = "cross_entropy_unfused_log_softmax_f32",
        CrossEntropyUnfusedLogSoftmaxF16 = "cross_entropy_unfused_log_softmax_f16",
        CrossEntropyUnfusedLogSoftmaxBf16 = "cross_entropy_unfused_log_softmax_bf16",
        CrossEntropyCountTi32 = "cross_entropy_count_ti32",
        CrossEntropyCountTi64 = "cross_entropy_count_ti64",
        CrossEntropySum = "cross_entropy_sum",
    }
    "dropout" => {
        DropoutFwdVecF32 = "dropout_fwd_vec_f32",
        DropoutFwdVecF16 = "dropout_fwd_vec_f16",
        DropoutFwdVecBf16 = "dropout_fwd_vec_bf16",
        DropoutFwdScalarF32 = "dropout_fwd_scalar_f32",
        DropoutFwdScalarF16 = "dropout_fwd_scalar_f16",
        DropoutFwdScalarBf16 = "dropout_fwd_scalar_bf16",
        DropoutFwdResVecF32 = "dropout_fwd_res_vec_f32",
        DropoutFwdResVecF16 = "dropout_fwd_res_vec_f16",
        DropoutFwdResVecBf16 = "dropout_fwd_res_vec_bf16",
        DropoutFwdResScalarF32 = "dropout_fwd_res_scalar_f32",
        DropoutFwdResScalarF16 = "dropout_fwd_res_scalar_f16",
        DropoutFwdResScalarBf16 = "dropout_fwd_res_scalar_bf16",
        DropoutBwdVecF32 = "dropout_bwd_vec_f32",
        DropoutBwdVecF16 = "dropout_bwd_vec_f16",
        DropoutBwdVecBf16 = "dropout_bwd_vec_bf16",
        DropoutBwdScalarF32 = "dropout_bwd_scalar_f32",
        DropoutBwdScalarF16 = "dropout_bwd_scalar_f16",
        DropoutBwdScalarBf16 = "dropout_bwd_scalar_bf16",
        DropoutDbiasF32 = "dropout_dbias_f32",
        DropoutDbiasF16 = "dropout_dbias_f16",
        DropoutDbiasBf16 = "dropout_dbias_bf16",
        DropoutUnfusedBiasAddF32 = "dropout_unfused_bias_add_f32",
        DropoutUnfusedBiasAddF16 = "dropout_unfused_bias_add_f16",
        DropoutUnfusedBiasAddBf16 = "dropout_unfused_bias_add_bf16",
        DropoutUnfusedDropoutF32 = "dropout_unfused_dropout_f32",
        DropoutUnfusedDropoutF16 = "dropout_unfused_dropout_f16",
        DropoutUnfusedDropoutBf16 = "dropout_unfused_dropout_bf16",
        DropoutUnfusedMaskedScaleF32 = "dropout_unfused_masked_scale_f32",
        DropoutUnfusedMaskedScaleF16 = "dropout_unfused_masked_scale_f16",
        DropoutUnfusedMaskedScaleBf16 = "dropout_unfused_masked_scale_bf16",
        DropoutUnfusedColSumF32 = "dropout_unfused_col_sum_f32",
        DropoutUnfusedColSumF16 = "dropout_unfused_col_sum_f16",
        DropoutUnfusedColSumBf16 = "dropout_unfused_col_sum_bf16",
        DropoutUnfusedAddF32 = "dropout_unfused_add_f32",
        DropoutUnfusedAddF16 = "dropout_unfused_add_f16",
        DropoutUnfusedAddBf16 = "dropout_unfused_add_bf16",
    }
    "dropout_add_norm" => {
        DropoutAddNormFwdF32 = "dropout_add_norm_fwd_f32",
        DropoutAddNormFwdF16 = "dropout_add_norm_fwd_f16",
        DropoutAddNormFwdBf16 = "dropout_add_norm_fwd_bf16",
        DropoutAddNormFwdF16Sf32 = "dropout_add_norm_fwd_f16_sf32",
        DropoutAddNormFwdBf16Sf32 = "dropout_add_norm_fwd_bf16_sf32",
        DropoutAddNormBwdF32 = "dropout_add_norm_bwd_f32",
        DropoutAddNormBwdF16 = "dropout_add_norm_bwd_f16",
        DropoutAddNormBwdBf16 = "dropout_add_norm_bwd_bf16",
        DropoutAddNormBwdF16Sf32 = "dropout_add_norm_bwd_f16_sf32",
        DropoutAddNormBwdBf16Sf32 = "dropout_add_norm_bwd_bf16_sf32",
        DropoutAddNormFwdT1F32 = "dropout_add_norm_fwd_t1_f32",
        DropoutAddNormFwdT2F32 = "dropout_add_norm_fwd_t2_f32",
        DropoutAddNormFwdT4F32 = "dropout_add_norm_fwd_t4_f32",
        DropoutAddNormFwdT1F16 = "dropout_add_norm_fwd_t1_f16",
        DropoutAddNormFwdT2F16 = "dropout_add_norm_fwd_t2_f16",
        DropoutAddNormFwdT4F16 = "dropout_add_norm_fwd_t4_f16",
        DropoutAddNormFwdT8F16 = "dropout_add_norm_fwd_t8_f16",
        DropoutAddNormFwdT1Bf16 = "dropout_add_norm_fwd_t1_bf16",
        DropoutAddNormFwdT2Bf16 = "dropout_add_norm_fwd_t2_bf16",
        DropoutAddNormFwdT4Bf16 = "dropout_add_norm_fwd_t4_bf16",
        DropoutAddNormFwdT8Bf16 = "dropout_add_norm_fwd_t8_bf16",
        DropoutAddNormFwdT1F16Sf32 = "dropout_add_norm_fwd_t1_f16_sf32",
        DropoutAddNormFwdT2F16Sf32 = "dropout_add_norm_fwd_t2_f16_sf32",
        DropoutAddNormFwdT4F16Sf32 = "dropout_add_norm_fwd_t4_f16_sf32",
        DropoutAddNormFwdT1Bf16Sf32 = "dropout_add_norm_fwd_t1_bf16_sf32",
        DropoutAddNormFwdT2Bf16Sf32 = "dropout_add_norm_fwd_t2_bf16_sf32",
        DropoutAddNormFwdT4Bf16Sf32 = "dropout_add_norm_fwd_t4_bf16_sf32",
        DropoutAddNormBwdT1F32 = "dropout_add_norm_bwd_t1_f32",
        DropoutAddNormBwdT2F32 = "dropout_add_norm_bwd_t2_f32",
        DropoutAddNormBwdT4F32 = "dropout_add_norm_bwd_t4_f32",
        DropoutAddNormBwdT1F16 = "dropout_add_norm_bwd_t1_f16",
        DropoutAddNormBwdT2F16 = "dropout_add_norm_bwd_t2_f16",
        DropoutAddNormBwdT4F16 = "dropout_add_norm_bwd_t4_f16",
        DropoutAddNormBwdT8F16 = "dropout_add_norm_bwd_t8_f16",
        DropoutAddNormBwdT1Bf16 = "dropout_add_norm_bwd_t1_bf16",
        DropoutAddNormBwdT2Bf16 = "dropout_add_norm_bwd_t2_bf16",
        DropoutAddNormBwdT4Bf16 = "dropout_add_norm_bwd_t4_bf16",
        DropoutAddNormBwdT8Bf16 = "dropout_add_norm_bwd_t8_bf16",
        DropoutAddNormBwdT1F16Sf32 = "dropout_add_norm_bwd_t1_f16_sf32",
        DropoutAddNormBwdT2F16Sf32 = "dropout_add_norm_bwd_t2_f16_sf32",
        DropoutAddNormBwdT4F16Sf32 = "dropout_add_norm_bwd_t4_f16_sf32",
        DropoutAddNormBwdT1Bf16Sf32 = "dropout_add_norm_bwd_t1_bf16_sf32",
        DropoutAddNormBwdT2Bf16Sf32 = "dropout_add_norm_bwd_t2_bf16_sf32",
        DropoutAddNormBwdT4Bf16Sf32 = "dropout_add_norm_bwd_t4_bf16_sf32",
        DropoutAddNormFwdStatsF32 = "dropout_add_norm_fwd_stats_f32",
        DropoutAddNormFwdStatsT1F32 = "dropout_add_norm_fwd_stats_t1_f32",
        DropoutAddNormFwdStatsT2F32 = "dropout_add_norm_fwd_stats_t2_f32",
        DropoutAddNormFwdStatsT4F32 = "dropout_add_norm_fwd_stats_t4_f32",
        DropoutAddNormFwdStatsF16 = "dropout_add_norm_fwd_stats_f16",
        DropoutAddNormFwdStatsT1F16 = "dropout_add_norm_fwd_stats_t1_f16",
        DropoutAddNormFwdStatsT2F16 = "dropout_add_norm_fwd_stats_t2_f16",
        DropoutAddNormFwdStatsT4F16 = "dropout_add_norm_fwd_stats_t4_f16",
        DropoutAddNormFwdStatsT8F16 = "dropout_add_norm_fwd_stats_t8_f16",
        DropoutAddNormFwdStatsBf16 = "dropout_add_norm_fwd_stats_bf16",
        DropoutAddNormFwdStatsT1Bf16 = "dropout_add_norm_fwd_stats_t1_bf16",
        DropoutAddNormFwdStatsT2Bf16 = "dropout_add_norm_fwd_stats_t2_bf16",
        DropoutAddNormFwdStatsT4Bf16 = "dropout_add_norm_fwd_stats_t4_bf16",
        DropoutAddNormFwdStatsT8Bf16 = "dropout_add_norm_fwd_stats_t8_bf16",
        DropoutAddNormFwdStatsF16Sf32 = "dropout_add_norm_fwd_stats_f16_sf32",
        DropoutAddNormFwdStatsT1F16Sf32 = "dropout_add_norm_fwd_stats_t1_f16_sf32",
        DropoutAddNormFwdStatsT2F16Sf32 = "dropout_add_norm_fwd_stats_t2_f16_sf32",
        DropoutAddNormFwdStatsT4F16Sf32 = "dropout_add_norm_fwd_stats_t4_f16_sf32",
        DropoutAddNormFwdStatsBf16Sf32 = "dropout_add_norm_fwd_stats_bf16_sf32",
        DropoutAddNormFwdStatsT1Bf16Sf32 = "dropout_add_norm_fwd_stats_t1_bf16_sf32",
        DropoutAddNormFwdStatsT2Bf16Sf32 = "dropout_add_norm_fwd_stats_t2_bf16_sf32",
        DropoutAddNormFwdStatsT4Bf16Sf32 = "dropout_add_norm_fwd_stats_t4_bf16_sf32",
        DropoutAddNormColsumF32 = "dropout_add_norm_colsum_f32",
        DropoutAddNormColsumF16 = "dropout_add_norm_colsum_f16",
        DropoutAddNormColsumBf16 = "dropout_add_norm_colsum_bf16",
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
    use super::*;
    use crate::runtime::modules::MODULES;

    /// Every symbol the Rust side can launch exists in the compiled module (for every arch).
    #[test]
    #[cfg_attr(
        not(fusedreg_kernels_built),
        ignore = "kernels not built: run scripts/install-cuda.sh (CI builds them with FUSEDREG_REQUIRE_KERNELS=1)"
    )]
    fn every_kernel_exists_in_its_module() {
        let mut missing = Vec::new();
        for k in Kernel::ALL {
            match MODULES.iter().find(|m| m.stem == k.module()) {
                None => missing.push(format!(
                    "{} (module kernels/{}.cu not built)",
                    k.symbol(),
                    k.module()
                )),
                Some(m) if !m.entries.contains(&k.symbol()) => missing.push(format!(
                    "{} (not an entry of kernels/{}.cu)",
                    k.symbol(),
                    k.module()
                )),
                Some(_) => {}
            }
        }
        assert!(
            missing.is_empty(),
            "kernels the Rust side launches but the modules lack: {missing:#?}"
        );
    }

    #[test]
    fn symbols_are_unique() {
        let mut names: Vec<_> = Kernel::ALL.iter().map(|k| k.symbol()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a kernel symbol is listed twice");
    }
}
