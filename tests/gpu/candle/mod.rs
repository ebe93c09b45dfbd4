//! The candle adapter on candle's CUDA device (feature `candle-cuda`), one file per op: forward
//! and every gradient bit for bit equal to the same calls on candle's CPU device (fusedreg's CPU
//! reference), in every dtype, with offset (misaligned) views; launches go to candle's own
//! stream; mixed devices are errors. `adamw`: the optimizer updating the Vars in place.
//!
//! Built only with `--features candle-cuda`, which needs the CUDA toolkit's libraries to link
//! (candle-core links libcuda, cuBLAS, cuRAND and NVRTC). This module holds what the files share:
//! the device, deterministic inputs as offset views, and the CPU-vs-GPU comparison.

mod adamw;
mod bias_act_dropout;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::candle::StepKeys;
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    let mut v = dropout::trials();
    v.extend(bias_act_dropout::trials());
    v.extend(dropout_add_norm::trials());
    v.extend(cross_entropy::trials());
    v.extend(adamw::trials());
    v
}

/// candle's CUDA device for the test's GPU.
fn cuda(h: &Handle) -> TestResult<Device> {
    Ok(Device::new_cuda(h.context().ordinal())?)
}

/// The f32 bits of every element (16-bit values widen exactly).
fn bits(t: &Tensor) -> TestResult<Vec<u32>> {
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(v.iter().map(|x| x.to_bits()).collect())
}

/// `len` deterministic values in about `[-1000, 1000] / div` (never all zero).
fn host(salt: usize, len: usize, div: f32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) / div)
        .collect()
}

/// `v` as a `shape` tensor in `dtype` on `dev`: element offset 1 of a longer buffer, so
/// contiguous but misaligned.
fn view(dev: &Device, dtype: DType, v: &[f32], shape: &[usize]) -> candle_core::Result<Tensor> {
    let mut w = vec![0.5f32];
    w.extend_from_slice(v);
    let len = w.len();
    Tensor::from_vec(w, len, dev)?
        .to_dtype(dtype)?
        .narrow(0, 1, len - 1)?
        .reshape(shape)
}

/// [`host`] data (divisor 37) as a [`view`] of `shape`.
fn input(dev: &Device, dtype: DType, salt: usize, shape: &[usize]) -> candle_core::Result<Tensor> {
    view(dev, dtype, &host(salt, shape.iter().product(), 37.0), shape)
}

/// Fills candle's allocator pool with freed NaN buffers: what an output element the op never
/// writes would then show.
fn poison_pool(dev: &Device) -> TestResult {
    drop(Tensor::full(f32::NAN, 1 << 22, dev)?);
    Ok(())
}

/// The GPU's tensor equals the CPU device's bit for bit; the error names the first mismatch.
fn same(what: &str, gpu: &Tensor, cpu: &Tensor) -> TestResult {
    same_but(what, gpu, cpu, |_, _| false)
}

/// [`same`] for a gradient as candle's store holds it. In bf16 a gradient that is zero or
/// subnormal on one side may be zero or subnormal on the other: candle adds every gradient onto
/// a zero tensor, and its CPU bf16 add (AVX-512 BF16 `vcvtneps2bf16`) flushes subnormals to zero
/// where its CUDA add may not. That add is candle's, after the adapter's op; everything else must
/// agree bit for bit.
fn same_grad(what: &str, gpu: &Tensor, cpu: &Tensor) -> TestResult {
    let tiny = |b: u32| f32::from_bits(b).abs() < f32::MIN_POSITIVE;
    let bf16 = gpu.dtype() == DType::BF16;
    same_but(what, gpu, cpu, |g, c| bf16 && tiny(g) && tiny(c))
}

fn same_but(
    what: &str,
    gpu: &Tensor,
    cpu: &Tensor,
    excused: impl Fn(u32, u32) -> bool,
) -> TestResult {
    let (g, c) = (bits(gpu)?, bits(cpu)?);
    if g.len() != c.len() {
        return Err(format!("{what}: {} elements vs {}", g.len(), c.len()).into());
    }
    let bad: Vec<usize> = (0..g.len())
        .filter(|&i| g[i] != c[i] && !excused(g[i], c[i]))
        .collect();
    match bad.first() {
        None => Ok(()),
        Some(&i) => Err(format!(
            "{what}: {} mismatches, first at {i}: gpu {} vs cpu {}",
            bad.len(),
            f32::from_bits(g[i]),
            f32::from_bits(c[i])
        )
        .into()),
    }
}

/// Every case on the GPU (candle's pool poisoned first) and on the CPU device: `run(device, k,
/// case)` gives as many outputs on both, each equal bit for bit ([`same`]; named by their
/// index). `dims` names a case.
fn outputs_match_cpu<C>(
    h: &Handle,
    dtype: DType,
    cases: &[C],
    dims: impl Fn(&C) -> &'static [usize],
    run: impl Fn(&Device, usize, &C) -> TestResult<Vec<Tensor>>,
) -> TestResult {
    let dev = cuda(h)?;
    poison_pool(&dev)?;
    for (k, c) in cases.iter().enumerate() {
        let g = run(&dev, k, c)?;
        let cpu = run(&Device::Cpu, k, c)?;
        let what = format!("{dtype:?} case {k} {:?}", dims(c));
        if g.len() != cpu.len() {
            return Err(format!("{what}: {} outputs vs {}", g.len(), cpu.len()).into());
        }
        for (i, (a, b)) in g.iter().zip(&cpu).enumerate() {
            same(&format!("{what}: output {i}"), a, b)?;
        }
    }
    Ok(())
}

/// The adapter's handle for candle's device, checked to be on candle's own stream.
fn candle_handle(dev: &Device) -> TestResult<Handle> {
    let cdev = dev.as_cuda_device()?;
    let fh = fusedreg::candle::cuda_handle(cdev)?;
    if !std::sync::Arc::ptr_eq(fh.stream(), &cdev.cuda_stream()) {
        return Err("the adapter's handle is not on candle's stream".into());
    }
    Ok(fh)
}

/// Runs `f` and fails unless it launched at least one kernel on the adapter's handle `fh`.
fn launches<T>(
    fh: &Handle,
    what: &str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> TestResult<T> {
    let before = fh.launch_count();
    let out = f()?;
    if fh.launch_count() == before {
        return Err(format!("{what}: no launch on the adapter's handle").into());
    }
    Ok(out)
}

/// `Ok` when `res` is an error whose message contains `needle` (the argument it names).
fn refused_naming<T>(what: &str, res: candle_core::Result<T>, needle: &str) -> TestResult {
    match res {
        Err(e) if e.to_string().contains(needle) => Ok(()),
        Err(e) => Err(format!("{what}: the error does not name {needle:?}: {e}").into()),
        Ok(_) => Err(format!("{what}: accepted").into()),
    }
}

/// The fraction of nonzero elements is strictly between 0 and 1 (some dropped, some kept).
fn some_dropped(what: &str, t: &Tensor) -> TestResult {
    let b = bits(t)?;
    let kept = b.iter().filter(|&&v| v != 0).count();
    if kept == 0 || kept == b.len() {
        return Err(format!("{what}: {kept} of {} kept at p = 0.1", b.len()).into());
    }
    Ok(())
}

/// How the inputs of a [`Case`] are laid out on the device.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Element offset 1 of a bigger buffer: contiguous but misaligned.
    Offset,
    /// A transposed view (copied by the adapter).
    Transposed,
}

/// A case of the ops on `(x, bias)`: (dims, p, bias, drop path, layout, training).
type Case = (
    &'static [usize],
    f64,
    bool,
    Option<(f64, usize)>,
    Layout,
    bool,
);
const CASES: &[Case] = &[
    (&[3, 7, 33], 0.1, true, None, Layout::Offset, true),
    (
        &[3, 11, 33],
        0.25,
        true,
        Some((0.5, 11)),
        Layout::Offset,
        true,
    ),
    (&[1000, 64], 0.1, true, Some((0.2, 1)), Layout::Offset, true),
    (&[4097], 0.5, false, None, Layout::Offset, true),
    (&[0, 8], 0.1, true, None, Layout::Offset, true),
    (&[5, 1], 1.0, true, None, Layout::Offset, true),
    (&[64, 48], 0.3, true, None, Layout::Transposed, true),
    (&[17, 40], 0.3, true, None, Layout::Offset, false),
];

/// An op on `(x, bias, keys)`, as the adapter's `forward`.
type XBiasOp<'a> =
    &'a dyn Fn(&Tensor, Option<&Tensor>, Option<&StepKeys>) -> candle_core::Result<Tensor>;

/// `f(x, bias, keys)` on `dev` for one case; returns y and the gradients of x and bias.
fn run_case(dev: &Device, dtype: DType, case: &Case, f: XBiasOp) -> TestResult<Vec<Tensor>> {
    let (dims, _, with_bias, _, layout, training) = *case;
    let cols = *dims.last().unwrap();
    let base = Var::from_tensor(&input(dev, dtype, 1, dims)?)?;
    // The transposed case: x is a strided view of the Var; gradients reach the Var.
    let x = match layout {
        Layout::Offset => base.as_tensor().clone(),
        Layout::Transposed => base.reshape((dims[1], dims[0]))?.t()?,
    };
    let b = Var::from_tensor(&input(dev, dtype, 3, &[cols])?)?;
    let dy = input(dev, dtype, 4, dims)?;
    let keys = StepKeys::new(2024, 5);
    let y = f(
        &x,
        with_bias.then_some(b.as_tensor()),
        training.then_some(&keys),
    )?;
    let grads = (&y * &dy)?.sum_all()?.backward()?;
    let mut out = vec![y, grads.get(&base).ok_or("no dx")?.clone()];
    if with_bias {
        out.push(grads.get(&b).ok_or("no dbias")?.clone());
    }
    Ok(out)
}

/// Every case of [`CASES`] through `op(case, k)` on the GPU and the CPU device: y, dx and dbias
/// equal.
fn every_case_matches_cpu<S>(
    h: &Handle,
    dtype: DType,
    what: &str,
    site: impl Fn(&Case, u32) -> candle_core::Result<S>,
    forward: impl Fn(&S, &Tensor, Option<&Tensor>, Option<&StepKeys>) -> candle_core::Result<Tensor>,
) -> TestResult {
    let dev = cuda(h)?;
    poison_pool(&dev)?;
    for (k, case) in CASES.iter().enumerate() {
        let s = site(case, k as u32)?;
        let f = |x: &Tensor, b: Option<&Tensor>, keys: Option<&StepKeys>| forward(&s, x, b, keys);
        let g = run_case(&dev, dtype, case, &f)?;
        let c = run_case(&Device::Cpu, dtype, case, &f)?;
        let what = format!("{what} {dtype:?} case {k} {:?}", case.0);
        if g.len() != c.len() {
            return Err(format!("{what}: {} outputs vs {}", g.len(), c.len()).into());
        }
        same(&format!("{what}: y"), &g[0], &c[0])?;
        for (i, name) in ["dx", "dbias"].iter().enumerate().take(g.len() - 1) {
            same_grad(&format!("{what}: {name}"), &g[i + 1], &c[i + 1])?;
        }
    }
    Ok(())
}

/// `forward(x, bias, keys)` of an op on `(x, bias)` launches on candle's stream in the forward
/// and the backward, drops some elements at p = 0.1 and gives a bias gradient.
fn x_bias_op_on_candles_stream(h: &Handle, what: &str, f: XBiasOp) -> TestResult {
    let dev = cuda(h)?;
    let fh = candle_handle(&dev)?;
    let x = Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev)?)?;
    let b = Var::from_tensor(&Tensor::ones(256, DType::BF16, &dev)?)?;
    let keys = StepKeys::new(1, 0);
    let y = launches(&fh, &format!("{what} forward"), || {
        f(&x, Some(&b), Some(&keys))
    })?;
    let grads = launches(&fh, &format!("{what} backward"), || y.sum_all()?.backward())?;
    some_dropped(&format!("{what} dx"), grads.get(&x).ok_or("no dx")?)?;
    grads.get(&b).ok_or_else(|| format!("{what}: no dbias"))?;
    Ok(())
}

/// A CPU bias with a CUDA x is refused with an error naming the bias.
fn x_bias_op_refuses_mixed_devices(h: &Handle, what: &str, f: XBiasOp) -> TestResult {
    let dev = cuda(h)?;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let b = Tensor::zeros(8, DType::F32, &Device::Cpu)?;
    let res = f(&x, Some(&b), Some(&StepKeys::new(1, 0)));
    refused_naming(&format!("{what}: a CPU bias with a CUDA x"), res, "bias")
}
