//! `fusedreg::candle::CrossEntropy` on candle's CUDA device against candle's CPU device: loss
//! and gradient with label smoothing, ignore indices, i64 and u32 targets and an upstream
//! gradient other than 1; an out-of-range target is an error on the GPU too. `Math::Exact` bit
//! for bit; `Math::Fast` (the default) within the op's stated bound of the CPU reference.

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::CrossEntropy;
use fusedreg::cross_entropy::Reduction;
use fusedreg::Math;

use crate::common::{xent_within_fast_bound, XentOut};

use super::{candle_handle, cuda, host, launches, outputs_match_cpu, refused_naming, same, view};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::cross_entropy",
        &[
            ("matches_cpu_f32", |h| matches_cpu(h, DType::F32)),
            ("matches_cpu_f16", |h| matches_cpu(h, DType::F16)),
            ("matches_cpu_bf16", |h| matches_cpu(h, DType::BF16)),
            ("fast_within_bound", fast_within_bound),
            ("launches_on_candles_stream", launches_on_candles_stream),
            ("bad_target_is_an_error", bad_target_is_an_error),
            (
                "unchecked_bad_target_counts_as_ignored",
                unchecked_bad_target_counts_as_ignored,
            ),
        ],
    )
}

/// (logits dims, label smoothing, ignore index, every how many rows is ignored)
type Case = (&'static [usize], f64, i64, usize);
const CASES: &[Case] = &[
    (&[37, 19], 0.0, -100, 5),
    (&[3, 11, 33], 0.1, -100, 4),
    (&[8, 50_257], 0.1, 0, 3),
    (&[6, 1], 0.3, -1, 2),
    (&[0, 9], 0.1, -100, 2),
];

/// The loss and the logits' gradient, with i64 then u32 targets.
fn run(dev: &Device, dtype: DType, c: &Case) -> TestResult<Vec<Tensor>> {
    let &(dims, alpha, ignore, every) = c;
    let vocab = *dims.last().unwrap();
    let n: usize = dims.iter().product();
    let rows = n / vocab;
    let lead = &dims[..dims.len() - 1];
    let tv: Vec<i64> = (0..rows)
        .map(|r| {
            if r % every == 1 {
                ignore
            } else {
                ((r * 7919) % vocab) as i64
            }
        })
        .collect();
    let logits = Var::from_tensor(&(view(dev, dtype, &host(8, n, 317.0), dims)? * 3.0)?)?;
    let ce = CrossEntropy::new()
        .with_label_smoothing(alpha)?
        .with_ignore_index(ignore)
        .with_math(Math::Exact);
    let mut res = Vec::new();
    let mut targets = vec![Tensor::from_slice(&tv, lead, dev)?];
    if ignore >= 0 {
        let t32: Vec<u32> = tv.iter().map(|&t| t as u32).collect();
        targets.push(Tensor::from_slice(&t32, lead, dev)?);
    }
    for t in targets {
        // An upstream gradient other than 1: the scale folded into the fused pass.
        let loss = (ce.forward(&logits, &t)? * 0.75)?;
        let grads = loss.backward()?;
        res.push(loss);
        res.push(grads.get(&logits).ok_or("no gradient")?.clone());
    }
    Ok(res)
}

fn matches_cpu(h: &Handle, dtype: DType) -> TestResult {
    outputs_match_cpu(h, dtype, CASES, |c| c.0, |dev, _, c| run(dev, dtype, c))
}

fn launches_on_candles_stream(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let fh = candle_handle(&dev)?;
    let x = Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev)?)?;
    let t = Tensor::zeros(64, DType::U32, &dev)?;
    let loss = launches(&fh, "forward", || CrossEntropy::new().forward(&x, &t))?;
    launches(&fh, "backward", || loss.backward())?;
    Ok(())
}

fn bad_target_is_an_error(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let logits = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let t = Tensor::new(&[0i64, 8, 1, 2], &dev)?;
    let res = CrossEntropy::new().forward(&logits, &t);
    refused_naming("target 8 of a vocabulary of 8", res, "outside [0, 8)")
}

/// Without the target check an out-of-range row is an ignored row, in the loss and in the
/// gradient's mean alike: the GPU's loss and gradient with targets `[0, 8, 1, -1, 5]` equal the
/// CPU device's with those two rows set to the ignore index.
fn unchecked_bad_target_counts_as_ignored(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let vals = host(7, 5 * 8, 317.0);
    let run = |dev: &Device, targets: &[i64], ce: CrossEntropy| -> TestResult<Vec<Tensor>> {
        let x = Var::from_tensor(&Tensor::from_vec(vals.clone(), (5, 8), dev)?)?;
        let t = Tensor::new(targets, dev)?;
        let loss = ce.forward(&x, &t)?;
        let g = loss.backward()?;
        let dx = g.get(&x).cloned().ok_or("no gradient")?;
        Ok(vec![loss, dx])
    };
    let ce = CrossEntropy::new()
        .with_label_smoothing(0.1)?
        .with_math(Math::Exact);
    let gpu = run(&dev, &[0, 8, 1, -1, 5], ce.without_target_check())?;
    let cpu = run(&Device::Cpu, &[0, -100, 1, -100, 5], ce)?;
    same("loss", &gpu[0], &cpu[0])?;
    same("gradient", &gpu[1], &cpu[1])
}

/// The default math mode (`Math::Fast`) on the GPU: the mean loss and the gradient within the
/// op's stated bound of the CPU reference (the gradient is the `Reduction::None` pass with the
/// upstream `1 / valid rows` that the adapter's backward uses).
fn fast_within_bound(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let (rows, vocab) = (37, 3001);
    let xv: Vec<f32> = host(5, rows * vocab, 100.0);
    let t: Vec<i64> = (0..rows)
        .map(|r| {
            if r % 5 == 2 {
                -100
            } else {
                ((r * 7919) % vocab) as i64
            }
        })
        .collect();
    let ce = CrossEntropy::new().with_label_smoothing(0.1)?;
    if ce.math() != Math::Fast {
        return Err("the default math mode is not Fast".into());
    }
    let x = Var::from_tensor(&Tensor::from_slice(&xv, (rows, vocab), &dev)?)?;
    let loss = ce.forward(&x, &Tensor::from_slice(&t, rows, &dev)?)?;
    let grads = loss.backward()?;
    let got_loss = loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?;
    let g = grads.get(&x).ok_or("no gradient")?;
    let got_g = g.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
    let mean = ce.config(rows, vocab)?;
    let out = XentOut {
        rows: None,
        reduced: Some(got_loss),
        grad: None,
    };
    xent_within_fast_bound("Math::Fast mean loss", &mean, &xv, &t, None, out)?;
    let valid = t.iter().filter(|&&ti| ti != -100).count();
    let upstream = vec![1.0 / valid as f32; rows];
    let out = XentOut {
        rows: None,
        reduced: None,
        grad: Some(&got_g[..]),
    };
    let none = mean.reduction(Reduction::None);
    xent_within_fast_bound("Math::Fast gradient", &none, &xv, &t, Some(&upstream), out)?;
    Ok(())
}
