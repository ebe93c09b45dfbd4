//! `fusedreg::candle::DropoutAddNorm` on candle's CUDA device against candle's CPU device: both
//! outputs and every gradient, LayerNorm and RMSNorm, with and without residual, bias, beta, drop
//! path and LayerNorm Scaling.

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::{DropoutAddNorm, StepKeys};

use super::{candle_handle, cuda, host, launches, outputs_match_cpu, view};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::dropout_add_norm",
        &[
            ("matches_cpu_f32", |h| matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| matches_cpu(h, DType::BF16)),
            ("launches_on_candles_stream", launches_on_candles_stream),
        ],
    )
}

/// (dims, LayerNorm?, p, residual, bias, beta, drop path, layer)
type Case = (
    &'static [usize],
    bool,
    f64,
    bool,
    bool,
    bool,
    Option<(f64, usize)>,
    Option<usize>,
);
const CASES: &[Case] = &[
    (&[37, 19], true, 0.1, true, true, true, None, None),
    (
        &[3, 11, 33],
        false,
        0.25,
        true,
        false,
        false,
        Some((0.5, 11)),
        Some(3),
    ),
    (
        &[1000, 64],
        true,
        0.1,
        false,
        true,
        true,
        Some((0.2, 1)),
        None,
    ),
    (&[2, 4097], false, 0.5, true, true, true, None, Some(4)),
    (&[2000, 8], true, 0.2, true, true, true, None, None), // several column slabs
    (&[0, 8], true, 0.1, true, true, true, None, None),
    (&[5, 1], false, 1.0, true, true, false, None, None),
];

/// out, s, then the gradients of x, gamma, residual?, bias?, beta?.
fn run(dev: &Device, dtype: DType, c: &Case, k: usize) -> TestResult<Vec<Tensor>> {
    let &(dims, layer_norm, p, residual, bias, beta, path, layer) = c;
    let n: usize = dims.iter().product();
    let cols = *dims.last().unwrap();
    let data = |salt: usize, len: usize| host(salt, len, 317.0);
    let x = Var::from_tensor(&view(dev, dtype, &data(1, n), dims)?)?;
    let r = Var::from_tensor(&view(dev, dtype, &data(2, n), dims)?)?;
    let b = Var::from_tensor(&view(dev, dtype, &data(3, cols), &[cols])?)?;
    let gv: Vec<f32> = data(4, cols).iter().map(|v| 1.0 + v / 8.0).collect();
    let gamma = Var::from_tensor(&view(dev, dtype, &gv, &[cols])?)?;
    let be = Var::from_tensor(&view(dev, dtype, &data(5, cols), &[cols])?)?;
    let w_out = view(dev, dtype, &data(6, n), dims)?;
    let w_s = view(dev, dtype, &data(7, n), dims)?;
    let mut site = if layer_norm {
        DropoutAddNorm::layer_norm(1e-5, k as u32)?
    } else {
        DropoutAddNorm::rms_norm(1e-6, k as u32)?
    }
    .with_dropout(p)?;
    if let Some((pp, rps)) = path {
        site = site.with_drop_path(pp, rps)?;
    }
    if let Some(l) = layer {
        site = site.with_layer_norm_scaling(l)?;
    }
    let keys = StepKeys::new(2024, 5);
    let (out, s) = site.forward(
        &x,
        residual.then_some(r.as_tensor()),
        bias.then_some(b.as_tensor()),
        &gamma,
        beta.then_some(be.as_tensor()),
        Some(&keys),
    )?;
    let grads = ((&out * &w_out)?.sum_all()? + (&s * &w_s)?.sum_all()?)?.backward()?;
    let mut res = vec![out, s];
    for (on, v) in [
        (true, &x),
        (true, &gamma),
        (residual, &r),
        (bias, &b),
        (beta, &be),
    ] {
        if on {
            res.push(grads.get(v).ok_or("a gradient is missing")?.clone());
        }
    }
    Ok(res)
}

fn matches_cpu(h: &Handle, dtype: DType) -> TestResult {
    outputs_match_cpu(h, dtype, CASES, |c| c.0, |dev, k, c| run(dev, dtype, c, k))
}

fn launches_on_candles_stream(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let fh = candle_handle(&dev)?;
    let x = Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev)?)?;
    let gamma = Tensor::ones(256, DType::BF16, &dev)?;
    let site = DropoutAddNorm::rms_norm(1e-6, 0)?;
    let keys = StepKeys::new(1, 0);
    let (out, _) = launches(&fh, "forward", || {
        site.forward(&x, None, None, &gamma, None, Some(&keys))
    })?;
    launches(&fh, "backward", || out.sum_all()?.backward())?;
    Ok(())
}
