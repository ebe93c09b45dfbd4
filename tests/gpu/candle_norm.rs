//! `fusedreg::candle::{DropoutAddNorm, CrossEntropy}` on candle's CUDA device (feature
//! `candle-cuda`): forward and every gradient bit for bit equal to the same calls on candle's
//! CPU device (fusedreg's CPU reference), in every dtype, with offset (misaligned) views; the
//! launches go to candle's stream; an out-of-range target is an error on the GPU too.

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::{cuda_handle, CrossEntropy, DropoutAddNorm, StepKeys};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::harness::trials_of;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle_norm",
        &[
            ("dropout_add_norm_matches_cpu_f32", |h| {
                norm_matches_cpu(h, DType::F32)
            }),
            ("dropout_add_norm_matches_cpu_f16", |h| {
                norm_matches_cpu(h, DType::F16)
            }),
            ("dropout_add_norm_matches_cpu_bf16", |h| {
                norm_matches_cpu(h, DType::BF16)
            }),
            ("cross_entropy_matches_cpu_f32", |h| {
                ce_matches_cpu(h, DType::F32)
            }),
            ("cross_entropy_matches_cpu_f16", |h| {
                ce_matches_cpu(h, DType::F16)
            }),
            ("cross_entropy_matches_cpu_bf16", |h| {
                ce_matches_cpu(h, DType::BF16)
            }),
            ("both_launch_on_candles_stream", launch_on_candles_stream),
            (
                "cross_entropy_bad_target_is_an_error",
                cross_entropy_bad_target_is_an_error,
            ),
            (
                "cross_entropy_unchecked_bad_target_counts_as_ignored",
                cross_entropy_unchecked_bad_target_counts_as_ignored,
            ),
        ],
    )
}

type R<T> = Result<T, String>;

fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn cuda(h: &Handle) -> R<Device> {
    Device::new_cuda(h.context().ordinal()).map_err(e2s)
}

fn bits(t: &Tensor) -> R<Vec<u32>> {
    let v = t
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(e2s)?;
    Ok(v.iter().map(|x| x.to_bits()).collect())
}

fn same(what: &str, gpu: &Tensor, cpu: &Tensor) -> R<()> {
    let (g, c) = (bits(gpu)?, bits(cpu)?);
    if g.len() != c.len() {
        return Err(format!("{what}: {} elements vs {}", g.len(), c.len()));
    }
    let bad: Vec<usize> = (0..g.len()).filter(|&i| g[i] != c[i]).collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => Err(format!(
            "{what}: {} mismatches, first at {i}: gpu {} vs cpu {}",
            bad.len(),
            f32::from_bits(g[i]),
            f32::from_bits(c[i])
        )),
    }
}

/// Deterministic host data of `len` values (never all zeros).
fn host(salt: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) / 317.0)
        .collect()
}

/// An offset view (element 1 of a longer buffer) of `v` in `dtype` on `dev`: misaligned.
fn view(dev: &Device, dtype: DType, v: &[f32], shape: &[usize]) -> candle_core::Result<Tensor> {
    let mut w = vec![0.5f32];
    w.extend_from_slice(v);
    let len = w.len();
    Tensor::from_vec(w, len, dev)?
        .to_dtype(dtype)?
        .narrow(0, 1, len - 1)?
        .reshape(shape)
}

/// (dims, LayerNorm?, p, residual, bias, beta, drop path, layer)
type NormCase = (
    &'static [usize],
    bool,
    f64,
    bool,
    bool,
    bool,
    Option<(f64, usize)>,
    Option<usize>,
);
const NORM_CASES: &[NormCase] = &[
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
fn norm_run(dev: &Device, dtype: DType, c: &NormCase, k: usize) -> R<Vec<Tensor>> {
    let &(dims, layer_norm, p, residual, bias, beta, path, layer) = c;
    let n: usize = dims.iter().product();
    let cols = *dims.last().unwrap();
    let inner = || -> candle_core::Result<Vec<Tensor>> {
        let x = Var::from_tensor(&view(dev, dtype, &host(1, n), dims)?)?;
        let r = Var::from_tensor(&view(dev, dtype, &host(2, n), dims)?)?;
        let b = Var::from_tensor(&view(dev, dtype, &host(3, cols), &[cols])?)?;
        let gv: Vec<f32> = host(4, cols).iter().map(|v| 1.0 + v / 8.0).collect();
        let gamma = Var::from_tensor(&view(dev, dtype, &gv, &[cols])?)?;
        let be = Var::from_tensor(&view(dev, dtype, &host(5, cols), &[cols])?)?;
        let w_out = view(dev, dtype, &host(6, n), dims)?;
        let w_s = view(dev, dtype, &host(7, n), dims)?;
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
                res.push(grads.get(v).unwrap().clone());
            }
        }
        Ok(res)
    };
    inner().map_err(e2s)
}

fn norm_matches_cpu(h: &Handle, dtype: DType) -> R<()> {
    let dev = cuda(h)?;
    // Poison the allocator's pool: freed NaN buffers are what uninitialised outputs would show.
    drop(Tensor::full(f32::NAN, 1 << 22, &dev).map_err(e2s)?);
    for (k, c) in NORM_CASES.iter().enumerate() {
        let g = norm_run(&dev, dtype, c, k)?;
        let cpu = norm_run(&Device::Cpu, dtype, c, k)?;
        if g.len() != cpu.len() {
            return Err(format!("case {k}: {} outputs vs {}", g.len(), cpu.len()));
        }
        for (i, (a, b)) in g.iter().zip(&cpu).enumerate() {
            same(&format!("{dtype:?} case {k} {:?}: output {i}", c.0), a, b)?;
        }
    }
    Ok(())
}

/// (logits dims, label smoothing, ignore index, every how many rows is ignored)
type CeCase = (&'static [usize], f64, i64, usize);
const CE_CASES: &[CeCase] = &[
    (&[37, 19], 0.0, -100, 5),
    (&[3, 11, 33], 0.1, -100, 4),
    (&[8, 50_257], 0.1, 0, 3),
    (&[6, 1], 0.3, -1, 2),
    (&[0, 9], 0.1, -100, 2),
];

/// The loss and the logits' gradient, with i64 then u32 targets.
fn ce_run(dev: &Device, dtype: DType, c: &CeCase) -> R<Vec<Tensor>> {
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
    let inner = || -> candle_core::Result<Vec<Tensor>> {
        let logits = Var::from_tensor(&(view(dev, dtype, &host(8, n), dims)? * 3.0)?)?;
        let ce = CrossEntropy::new()
            .with_label_smoothing(alpha)?
            .with_ignore_index(ignore);
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
            res.push(grads.get(&logits).unwrap().clone());
        }
        Ok(res)
    };
    inner().map_err(e2s)
}

fn ce_matches_cpu(h: &Handle, dtype: DType) -> R<()> {
    let dev = cuda(h)?;
    drop(Tensor::full(f32::NAN, 1 << 22, &dev).map_err(e2s)?);
    for (k, c) in CE_CASES.iter().enumerate() {
        let g = ce_run(&dev, dtype, c)?;
        let cpu = ce_run(&Device::Cpu, dtype, c)?;
        for (i, (a, b)) in g.iter().zip(&cpu).enumerate() {
            same(&format!("{dtype:?} case {k} {:?}: output {i}", c.0), a, b)?;
        }
    }
    Ok(())
}

fn launch_on_candles_stream(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let cdev = dev.as_cuda_device().map_err(e2s)?;
    let fh = cuda_handle(cdev).map_err(e2s)?;
    let count = |what: &str, f: &dyn Fn() -> candle_core::Result<()>| -> R<()> {
        let before = fh.launch_count();
        f().map_err(e2s)?;
        if fh.launch_count() == before {
            return Err(format!("{what}: no launch on the adapter's handle"));
        }
        Ok(())
    };
    let x =
        Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev).map_err(e2s)?).map_err(e2s)?;
    let gamma = Tensor::ones(256, DType::BF16, &dev).map_err(e2s)?;
    let site = DropoutAddNorm::rms_norm(1e-6, 0).map_err(e2s)?;
    let keys = StepKeys::new(1, 0);
    let fwd = || site.forward(&x, None, None, &gamma, None, Some(&keys));
    count("norm forward", &|| fwd().map(|_| ()))?;
    let (out, _) = fwd().map_err(e2s)?;
    count("norm backward", &|| out.sum_all()?.backward().map(|_| ()))?;
    let t = Tensor::zeros(64, DType::U32, &dev).map_err(e2s)?;
    let ce = CrossEntropy::new();
    count("cross-entropy forward", &|| ce.forward(&x, &t).map(|_| ()))?;
    let loss = ce.forward(&x, &t).map_err(e2s)?;
    count("cross-entropy backward", &|| loss.backward().map(|_| ()))
}

fn cross_entropy_bad_target_is_an_error(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let logits = Tensor::zeros((4, 8), DType::F32, &dev).map_err(e2s)?;
    let t = Tensor::new(&[0i64, 8, 1, 2], &dev).map_err(e2s)?;
    match CrossEntropy::new().forward(&logits, &t) {
        Err(e) if e.to_string().contains("outside [0, 8)") => Ok(()),
        Err(e) => Err(format!("the error does not say why: {e}")),
        Ok(_) => Err("target 8 of a vocabulary of 8 was accepted".into()),
    }
}

/// Without the target check an out-of-range row is an ignored row, in the loss and in the
/// gradient's mean alike: the GPU's loss and gradient with targets `[0, 8, 1, -1, 5]` equal the
/// CPU device's with those two rows set to the ignore index.
fn cross_entropy_unchecked_bad_target_counts_as_ignored(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let vals = host(7, 5 * 8);
    let run =
        |dev: &Device, targets: &[i64], ce: CrossEntropy| -> candle_core::Result<Vec<Tensor>> {
            let x = Var::from_tensor(&Tensor::from_vec(vals.clone(), (5, 8), dev)?)?;
            let t = Tensor::new(targets, dev)?;
            let loss = ce.forward(&x, &t)?;
            let g = loss.backward()?;
            let dx = g
                .get(&x)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
            Ok(vec![loss, dx])
        };
    let ce = CrossEntropy::new().with_label_smoothing(0.1).map_err(e2s)?;
    let gpu = run(&dev, &[0, 8, 1, -1, 5], ce.without_target_check()).map_err(e2s)?;
    let cpu = run(&Device::Cpu, &[0, -100, 1, -100, 5], ce).map_err(e2s)?;
    same("loss", &gpu[0], &cpu[0])?;
    same("gradient", &gpu[1], &cpu[1])
}
