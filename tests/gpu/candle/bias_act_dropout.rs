//! `fusedreg::candle::BiasActDropout` on candle's CUDA device against candle's CPU device, in
//! every activation, with offset (misaligned) and transposed views and in evaluation.

use candle_core::DType;
use fusedreg::bias_act_dropout::Activation;
use fusedreg::candle::BiasActDropout;

use super::{every_case_matches_cpu, x_bias_op_on_candles_stream, x_bias_op_refuses_mixed_devices};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::bias_act_dropout",
        &[
            ("matches_cpu_f32", |h| matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| matches_cpu(h, DType::BF16)),
            ("launches_on_candles_stream", |h| {
                let site = BiasActDropout::new(Activation::GeluTanh, 0.1, 1)?;
                let what = "BiasActDropout";
                x_bias_op_on_candles_stream(h, what, &|x, b, k| site.forward(x, b, k))
            }),
            ("mixed_devices_are_an_error", |h| {
                let site = BiasActDropout::new(Activation::Relu, 0.1, 0)?;
                let what = "BiasActDropout";
                x_bias_op_refuses_mixed_devices(h, what, &|x, b, k| site.forward(x, b, k))
            }),
        ],
    )
}

fn matches_cpu(h: &Handle, dtype: DType) -> TestResult {
    for act in Activation::ALL {
        every_case_matches_cpu(
            h,
            dtype,
            &format!("BiasActDropout {act:?}"),
            |case, k| BiasActDropout::new(act, case.1, k),
            |site, x, b, keys| site.forward(x, b, keys),
        )?;
    }
    Ok(())
}
