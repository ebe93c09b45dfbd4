//! `fusedreg::candle::Dropout` on candle's CUDA device against candle's CPU device, with offset
//! (misaligned) and transposed views and in evaluation.

use candle_core::DType;
use fusedreg::candle::Dropout;

use super::{every_case_matches_cpu, x_bias_op_on_candles_stream, x_bias_op_refuses_mixed_devices};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::dropout",
        &[
            ("matches_cpu_f32", |h| matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| matches_cpu(h, DType::BF16)),
            ("launches_on_candles_stream", |h| {
                let site = Dropout::new(0.1, 0)?;
                x_bias_op_on_candles_stream(h, "Dropout", &|x, b, k| site.forward(x, b, k))
            }),
            ("mixed_devices_are_an_error", |h| {
                let site = Dropout::new(0.1, 0)?;
                x_bias_op_refuses_mixed_devices(h, "Dropout", &|x, b, k| site.forward(x, b, k))
            }),
        ],
    )
}

fn matches_cpu(h: &Handle, dtype: DType) -> TestResult {
    every_case_matches_cpu(
        h,
        dtype,
        "Dropout",
        |case, k| {
            let site = Dropout::new(case.1, k)?;
            match case.3 {
                Some((pp, rps)) => site.with_drop_path(pp, rps),
                None => Ok(site),
            }
        },
        |site, x, b, keys| site.forward(x, b, keys),
    )
}
