//! The candle adapter on candle's CUDA device (feature `candle-cuda`): forward and every gradient
//! bit for bit equal to the same calls on candle's CPU device (fusedreg's CPU reference), in
//! every dtype, with offset views; launches go to candle's own stream; mixed devices are errors.
//!
//! Built only with `--features candle-cuda`, which needs the CUDA toolkit's libraries to link
//! (candle-core links libcuda, cuBLAS, cuRAND and NVRTC).

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::{cuda_handle, DropoutResidual, StepKeys};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::harness::trials_of;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle",
        &[
            ("dropout_residual_matches_cpu_f32", |h| {
                matches_cpu(h, DType::F32)
            }),
            ("dropout_residual_matches_cpu_f16", |h| {
                matches_cpu(h, DType::F16)
            }),
            ("dropout_residual_matches_cpu_bf16", |h| {
                matches_cpu(h, DType::BF16)
            }),
            ("launches_on_candles_stream", launches_on_candles_stream),
            ("mixed_devices_are_an_error", mixed_devices_are_an_error),
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

/// (dims, p, bias, drop path)
type Case = (&'static [usize], f64, bool, Option<(f64, usize)>);
const CASES: &[Case] = &[
    (&[37, 19], 0.1, true, None),
    (&[3, 11, 33], 0.25, true, Some((0.5, 11))),
    (&[1000, 64], 0.1, true, Some((0.2, 1))),
    (&[4097], 0.5, false, None),
    (&[0, 8], 0.1, true, None),
    (&[5, 1], 1.0, true, None),
];

/// Runs one case on `dev` from the same host data; returns y and the gradients of x, residual and
/// bias. Inputs are offset views (element offset 1 of a bigger buffer), so misaligned.
fn run(dev: &Device, dtype: DType, case: &Case, k: usize) -> R<Vec<Tensor>> {
    let (dims, p, with_bias, path) = *case;
    let n: usize = dims.iter().product();
    let cols = *dims.last().unwrap();
    let host = |salt: usize, len: usize| -> Vec<f32> {
        (0..len + 1)
            .map(|i| (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) / 37.0)
            .collect()
    };
    let view = |v: Vec<f32>, shape: &[usize]| -> candle_core::Result<Tensor> {
        let len = v.len();
        Tensor::from_vec(v, len, dev)?
            .to_dtype(dtype)?
            .narrow(0, 1, len - 1)?
            .reshape(shape)
    };
    let inner = || -> candle_core::Result<Vec<Tensor>> {
        let x = Var::from_tensor(&view(host(1, n), dims)?)?;
        let r = Var::from_tensor(&view(host(2, n), dims)?)?;
        let b = Var::from_tensor(&view(host(3, cols), &[cols])?)?;
        let dy = view(host(4, n), dims)?;
        let mut site = DropoutResidual::new(p, k as u32)?;
        if let Some((pp, rps)) = path {
            site = site.with_drop_path(pp, rps)?;
        }
        let keys = StepKeys::new(2024, 5);
        let y = site.forward(&x, &r, with_bias.then_some(b.as_tensor()), Some(&keys))?;
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        let mut out = vec![y];
        out.push(grads.get(&x).unwrap().clone());
        out.push(grads.get(&r).unwrap().clone());
        if with_bias {
            out.push(grads.get(&b).unwrap().clone());
        }
        Ok(out)
    };
    inner().map_err(e2s)
}

fn matches_cpu(h: &Handle, dtype: DType) -> R<()> {
    let dev = cuda(h)?;
    // Poison the allocator's pool: freed NaN buffers are what uninitialised outputs would show.
    drop(Tensor::full(f32::NAN, 1 << 22, &dev).map_err(e2s)?);
    for (k, case) in CASES.iter().enumerate() {
        let g = run(&dev, dtype, case, k)?;
        let c = run(&Device::Cpu, dtype, case, k)?;
        for (i, name) in ["y", "dx", "dresidual", "dbias"]
            .iter()
            .enumerate()
            .take(g.len())
        {
            same(
                &format!("{dtype:?} case {k} {:?}: {name}", case.0),
                &g[i],
                &c[i],
            )?;
        }
    }
    Ok(())
}

fn launches_on_candles_stream(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let cdev = dev.as_cuda_device().map_err(e2s)?;
    let fh = cuda_handle(cdev).map_err(e2s)?;
    if !std::sync::Arc::ptr_eq(fh.stream(), &cdev.cuda_stream()) {
        return Err("the adapter's handle is not on candle's stream".into());
    }
    let x =
        Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev).map_err(e2s)?).map_err(e2s)?;
    let r = Tensor::zeros((64, 256), DType::BF16, &dev).map_err(e2s)?;
    let before = fh.launch_count();
    let site = DropoutResidual::new(0.1, 0).map_err(e2s)?;
    let y = site
        .forward(&x, &r, None, Some(&StepKeys::new(1, 0)))
        .map_err(e2s)?;
    let fwd = fh.launch_count() - before;
    let grads = y.sum_all().and_then(|l| l.backward()).map_err(e2s)?;
    let bwd = fh.launch_count() - before - fwd;
    if fwd == 0 || bwd == 0 {
        return Err(format!(
            "launches on the adapter's handle: forward {fwd}, backward {bwd}"
        ));
    }
    let dx = grads.get(&x).ok_or("no dx")?;
    let back = bits(dx)?;
    let kept = back.iter().filter(|&&b| b != 0).count();
    if kept == 0 || kept == back.len() {
        return Err(format!("{kept} of {} kept at p = 0.1", back.len()));
    }
    Ok(())
}

fn mixed_devices_are_an_error(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let x = Tensor::zeros((4, 8), DType::F32, &dev).map_err(e2s)?;
    let r = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).map_err(e2s)?;
    let site = DropoutResidual::new(0.1, 0).map_err(e2s)?;
    match site.forward(&x, &r, None, Some(&StepKeys::new(1, 0))) {
        Err(e) if e.to_string().contains("residual") => Ok(()),
        Err(e) => Err(format!("error does not name the argument: {e}")),
        Ok(_) => Err("a CPU residual with a CUDA x was accepted".into()),
    }
}
