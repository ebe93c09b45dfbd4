//! `fusedreg::candle::Dropout` and `fusedreg::candle::DropoutResidual` (one adapter on the one
//! dropout op) on candle's CUDA device against candle's CPU device: `Dropout` through the cases
//! of the ops on `(x, bias)` (offset and transposed views, evaluation), `DropoutResidual`
//! through its own cases with a residual (offset views).

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::{Dropout, DropoutResidual, StepKeys};

use super::{
    candle_handle, cuda, every_case_matches_cpu, input, launches, outputs_match_cpu,
    refused_naming, some_dropped, x_bias_op_on_candles_stream, x_bias_op_refuses_mixed_devices,
};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    let mut v = trials_of(
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
    );
    v.extend(trials_of(
        "candle::dropout_residual",
        &[
            ("matches_cpu_f32", |h| residual_matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| residual_matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| residual_matches_cpu(h, DType::BF16)),
            (
                "launches_on_candles_stream",
                residual_launches_on_candles_stream,
            ),
            (
                "mixed_devices_are_an_error",
                residual_mixed_devices_are_an_error,
            ),
        ],
    ));
    v
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

/// The cases of `DropoutResidual`: (dims, p, bias, drop path).
type ResidualCase = (&'static [usize], f64, bool, Option<(f64, usize)>);
const RESIDUAL_CASES: &[ResidualCase] = &[
    (&[37, 19], 0.1, true, None),
    (&[3, 11, 33], 0.25, true, Some((0.5, 11))),
    (&[1000, 64], 0.1, true, Some((0.2, 1))),
    (&[4097], 0.5, false, None),
    (&[0, 8], 0.1, true, None),
    (&[5, 1], 1.0, true, None),
];

/// Runs one case on `dev` from the same host data; returns y and the gradients of x, residual and
/// bias (outputs 0 to 3). Inputs are offset views (misaligned).
fn run_residual(
    dev: &Device,
    dtype: DType,
    case: &ResidualCase,
    k: usize,
) -> TestResult<Vec<Tensor>> {
    let (dims, p, with_bias, path) = *case;
    let cols = *dims.last().unwrap();
    let x = Var::from_tensor(&input(dev, dtype, 1, dims)?)?;
    let r = Var::from_tensor(&input(dev, dtype, 2, dims)?)?;
    let b = Var::from_tensor(&input(dev, dtype, 3, &[cols])?)?;
    let dy = input(dev, dtype, 4, dims)?;
    let mut site = DropoutResidual::new(p, k as u32)?;
    if let Some((pp, rps)) = path {
        site = site.with_drop_path(pp, rps)?;
    }
    let keys = StepKeys::new(2024, 5);
    let y = site.forward(&x, &r, with_bias.then_some(b.as_tensor()), Some(&keys))?;
    let grads = (&y * &dy)?.sum_all()?.backward()?;
    let mut out = vec![y];
    out.push(grads.get(&x).ok_or("no dx")?.clone());
    out.push(grads.get(&r).ok_or("no dresidual")?.clone());
    if with_bias {
        out.push(grads.get(&b).ok_or("no dbias")?.clone());
    }
    Ok(out)
}

fn residual_matches_cpu(h: &Handle, dtype: DType) -> TestResult {
    let run = |dev: &Device, k, c: &ResidualCase| run_residual(dev, dtype, c, k);
    outputs_match_cpu(h, dtype, RESIDUAL_CASES, |c| c.0, run)
}

fn residual_launches_on_candles_stream(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let fh = candle_handle(&dev)?;
    let x = Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev)?)?;
    let r = Tensor::zeros((64, 256), DType::BF16, &dev)?;
    let site = DropoutResidual::new(0.1, 0)?;
    let keys = StepKeys::new(1, 0);
    let y = launches(&fh, "forward", || site.forward(&x, &r, None, Some(&keys)))?;
    let grads = launches(&fh, "backward", || y.sum_all()?.backward())?;
    some_dropped("dx", grads.get(&x).ok_or("no dx")?)
}

fn residual_mixed_devices_are_an_error(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let r = Tensor::zeros((4, 8), DType::F32, &Device::Cpu)?;
    let site = DropoutResidual::new(0.1, 0)?;
    let res = site.forward(&x, &r, None, Some(&StepKeys::new(1, 0)));
    refused_naming("a CPU residual with a CUDA x", res, "residual")
}
