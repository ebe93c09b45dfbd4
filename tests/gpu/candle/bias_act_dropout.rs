//! `fusedreg::candle::BiasActDropout` on candle's CUDA device against candle's CPU device, in
//! every activation, with offset (misaligned) and transposed views and in evaluation:
//! `Math::Exact` bit for bit; `Math::Fast` (the default for GELU and SiLU) within the bound in
//! the op's docs (tests/common/bias_act_fast.rs).

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::bias_act_dropout::Activation;
use fusedreg::candle::{BiasActDropout, StepKeys};
use fusedreg::Math;

use super::{
    cuda, every_case_matches_cpu, host, x_bias_op_on_candles_stream,
    x_bias_op_refuses_mixed_devices,
};
use crate::prelude::*;

// The bounds checker is loaded once, by the op's own GPU tests.
use crate::bias_act_dropout::fastcheck;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::bias_act_dropout",
        &[
            ("matches_cpu_f32", |h| matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| matches_cpu(h, DType::BF16)),
            ("fast_within_bound", fast_within_bound),
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
            |case, k| Ok(BiasActDropout::new(act, case.1, k)?.with_math(Math::Exact)),
            |site, x, b, keys| site.forward(x, b, keys),
        )?;
    }
    Ok(())
}

/// The default math mode (`Math::Fast` for GELU and SiLU) on the GPU: the forward and both
/// gradients within the op's stated bound of the exact values, the dropped elements `+0`.
fn fast_within_bound(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let (rows, cols) = (37, 136);
    let (xv, bv, dyv) = (
        host(1, rows * cols, 150.0),
        host(2, cols, 900.0),
        host(3, rows * cols, 500.0),
    );
    // The pre-activation as the kernel forms it: x + bias in f32.
    let h32: Vec<f32> = (0..rows * cols).map(|i| xv[i] + bv[i % cols]).collect();
    let keys = StepKeys::new(11, 3);
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
        let site = BiasActDropout::new(act, 0.2, 5)?;
        if site.math() != Math::Fast {
            return Err(format!("{act:?}: the default math mode is not Fast").into());
        }
        let x = Var::from_tensor(&Tensor::from_slice(&xv, (rows, cols), &dev)?)?;
        let b = Var::from_tensor(&Tensor::from_slice(&bv, cols, &dev)?)?;
        let dy = Tensor::from_slice(&dyv, (rows, cols), &dev)?;
        let y = site.forward(&x, Some(&b), Some(&keys))?;
        // d(sum(y * dy)) / dy = dy: the backward gets exactly these upstream gradients.
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        let host_vec = |t: &Tensor| -> TestResult<Vec<f32>> {
            Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let dx = host_vec(grads.get(&x).ok_or("no dx")?)?;
        let db = host_vec(grads.get(&b).ok_or("no dbias")?)?;
        let cfg = site.config(rows, cols, Some(&keys))?;
        let mut f = fastcheck::Failures::default();
        fastcheck::check_forward(&cfg, &h32, &host_vec(&y)?, &mut f);
        fastcheck::check_backward(&cfg, &h32, &dyv, &dx, Some(&db), &mut f);
        f.result(&format!("{act:?} Math::Fast"))?;
    }
    Ok(())
}
