//! `fusedreg::candle::Dropout` and `BiasActDropout` on candle's CUDA device (feature
//! `candle-cuda`): forward and every gradient bit for bit equal to the same calls on candle's CPU
//! device (fusedreg's CPU reference), in every dtype and activation, with offset (misaligned)
//! and transposed views and in evaluation; launches go to candle's own stream; mixed devices are
//! errors.

use candle_core::{DType, Device, Tensor, Var};
use fusedreg::bias_act_dropout::Activation;
use fusedreg::candle::{cuda_handle, BiasActDropout, Dropout, StepKeys};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::harness::trials_of;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle_ops",
        &[
            ("dropout_matches_cpu_f32", |h| dropout_cpu(h, DType::F32)),
            ("dropout_matches_cpu_f16", |h| dropout_cpu(h, DType::F16)),
            ("dropout_matches_cpu_bf16", |h| dropout_cpu(h, DType::BF16)),
            ("bias_act_dropout_matches_cpu_f32", |h| {
                bias_act_cpu(h, DType::F32)
            }),
            ("bias_act_dropout_matches_cpu_f16", |h| {
                bias_act_cpu(h, DType::F16)
            }),
            ("bias_act_dropout_matches_cpu_bf16", |h| {
                bias_act_cpu(h, DType::BF16)
            }),
            ("launch_on_candles_stream", launch_on_candles_stream),
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

/// Equal bits, except that in bf16 a gradient that is zero or subnormal on one side may be zero
/// or subnormal on the other: candle adds every gradient onto a zero tensor, and its CPU bf16 add
/// (AVX-512 BF16 `vcvtneps2bf16`) flushes subnormals to zero where its CUDA add may not. That
/// add is candle's, after the adapter's op; everything else must agree bit for bit.
fn same(what: &str, gpu: &Tensor, cpu: &Tensor, grad: bool) -> R<()> {
    let (g, c) = (bits(gpu)?, bits(cpu)?);
    if g.len() != c.len() {
        return Err(format!("{what}: {} elements vs {}", g.len(), c.len()));
    }
    let tiny = |b: u32| f32::from_bits(b).abs() < f32::MIN_POSITIVE;
    let flushed = |i: usize| grad && gpu.dtype() == DType::BF16 && tiny(g[i]) && tiny(c[i]);
    let bad: Vec<usize> = (0..g.len())
        .filter(|&i| g[i] != c[i] && !flushed(i))
        .collect();
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

/// How the inputs are laid out on the device.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Element offset 1 of a bigger buffer: contiguous but misaligned.
    Offset,
    /// A transposed view (copied by the adapter).
    Transposed,
}

/// (dims, p, bias, drop path, layout, training)
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

/// Host data (never all zero) as a tensor of `shape` on `dev`: element offset 1 of a bigger
/// buffer, so contiguous but misaligned.
fn input(dev: &Device, dtype: DType, salt: usize, shape: &[usize]) -> candle_core::Result<Tensor> {
    let len: usize = shape.iter().product();
    let v: Vec<f32> = (0..len + 1)
        .map(|i| (((i * 7919 + salt * 104_729) % 2001) as f32 - 1000.0) / 37.0)
        .collect();
    Tensor::from_vec(v, len + 1, dev)?
        .to_dtype(dtype)?
        .narrow(0, 1, len)?
        .reshape(shape)
}

/// `f(x, bias, keys)` on `dev` for one case; returns y and the gradients of x and bias.
fn run_case<F>(dev: &Device, dtype: DType, case: &Case, f: F) -> R<Vec<Tensor>>
where
    F: Fn(&Tensor, Option<&Tensor>, Option<&StepKeys>) -> candle_core::Result<Tensor>,
{
    let (dims, _, with_bias, _, layout, training) = *case;
    let cols = *dims.last().unwrap();
    let inner = || -> candle_core::Result<Vec<Tensor>> {
        let base = Var::from_tensor(&input(dev, dtype, 1, dims)?)?;
        // The transposed case: x is a strided view of the Var; gradients reach the Var.
        let x = match layout {
            Layout::Offset => base.as_tensor().clone(),
            Layout::Transposed => {
                let (rows, cols) = (dims[0], dims[1]);
                base.reshape((cols, rows))?.t()?
            }
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
        let mut out = vec![y, grads.get(&base).unwrap().clone()];
        if with_bias {
            out.push(grads.get(&b).unwrap().clone());
        }
        Ok(out)
    };
    inner().map_err(e2s)
}

fn compare(what: &str, g: &[Tensor], c: &[Tensor]) -> R<()> {
    if g.len() != c.len() {
        return Err(format!("{what}: {} outputs vs {}", g.len(), c.len()));
    }
    for (i, name) in ["y", "dx", "dbias"].iter().enumerate().take(g.len()) {
        same(&format!("{what}: {name}"), &g[i], &c[i], i > 0)?;
    }
    Ok(())
}

fn poison(dev: &Device) -> R<()> {
    // Freed NaN buffers in the allocator's pool are what uninitialised outputs would show.
    drop(Tensor::full(f32::NAN, 1 << 22, dev).map_err(e2s)?);
    Ok(())
}

fn dropout_cpu(h: &Handle, dtype: DType) -> R<()> {
    let dev = cuda(h)?;
    poison(&dev)?;
    for (k, case) in CASES.iter().enumerate() {
        let mut site = Dropout::new(case.1, k as u32).map_err(e2s)?;
        if let Some((pp, rps)) = case.3 {
            site = site.with_drop_path(pp, rps).map_err(e2s)?;
        }
        let f = |x: &Tensor, b: Option<&Tensor>, keys: Option<&StepKeys>| site.forward(x, b, keys);
        let g = run_case(&dev, dtype, case, f)?;
        let c = run_case(&Device::Cpu, dtype, case, f)?;
        compare(&format!("Dropout {dtype:?} case {k} {:?}", case.0), &g, &c)?;
    }
    Ok(())
}

fn bias_act_cpu(h: &Handle, dtype: DType) -> R<()> {
    let dev = cuda(h)?;
    poison(&dev)?;
    for act in Activation::ALL {
        for (k, case) in CASES.iter().enumerate() {
            let site = BiasActDropout::new(act, case.1, k as u32).map_err(e2s)?;
            let f =
                |x: &Tensor, b: Option<&Tensor>, keys: Option<&StepKeys>| site.forward(x, b, keys);
            let g = run_case(&dev, dtype, case, f)?;
            let c = run_case(&Device::Cpu, dtype, case, f)?;
            let what = format!("BiasActDropout {act:?} {dtype:?} case {k} {:?}", case.0);
            compare(&what, &g, &c)?;
        }
    }
    Ok(())
}

fn launch_on_candles_stream(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let cdev = dev.as_cuda_device().map_err(e2s)?;
    let fh = cuda_handle(cdev).map_err(e2s)?;
    if !std::sync::Arc::ptr_eq(fh.stream(), &cdev.cuda_stream()) {
        return Err("the adapter's handle is not on candle's stream".into());
    }
    let x =
        Var::from_tensor(&Tensor::ones((64, 256), DType::BF16, &dev).map_err(e2s)?).map_err(e2s)?;
    let b = Var::from_tensor(&Tensor::ones(256, DType::BF16, &dev).map_err(e2s)?).map_err(e2s)?;
    let keys = StepKeys::new(1, 0);
    let dropout = Dropout::new(0.1, 0).map_err(e2s)?;
    let ffn = BiasActDropout::new(Activation::GeluTanh, 0.1, 1).map_err(e2s)?;
    type Op<'a> = Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>;
    let ops: [(&str, Op); 2] = [
        (
            "Dropout",
            Box::new(|| dropout.forward(&x, Some(&b), Some(&keys))),
        ),
        (
            "BiasActDropout",
            Box::new(|| ffn.forward(&x, Some(&b), Some(&keys))),
        ),
    ];
    for (name, op) in ops {
        let before = fh.launch_count();
        let y = op().map_err(e2s)?;
        let fwd = fh.launch_count() - before;
        let grads = y.sum_all().and_then(|l| l.backward()).map_err(e2s)?;
        let bwd = fh.launch_count() - before - fwd;
        if fwd == 0 || bwd == 0 {
            return Err(format!(
                "{name}: launches on the adapter's handle: forward {fwd}, backward {bwd}"
            ));
        }
        let dx = bits(grads.get(&x).ok_or("no dx")?)?;
        let kept = dx.iter().filter(|&&b| b != 0).count();
        if kept == 0 || kept == dx.len() {
            return Err(format!("{name}: {kept} of {} kept at p = 0.1", dx.len()));
        }
        if grads.get(&b).is_none() {
            return Err(format!("{name}: no dbias"));
        }
    }
    Ok(())
}

fn mixed_devices_are_an_error(h: &Handle) -> R<()> {
    let dev = cuda(h)?;
    let x = Tensor::zeros((4, 8), DType::F32, &dev).map_err(e2s)?;
    let b = Tensor::zeros(8, DType::F32, &Device::Cpu).map_err(e2s)?;
    let keys = StepKeys::new(1, 0);
    let dropout = Dropout::new(0.1, 0).map_err(e2s)?;
    let ffn = BiasActDropout::new(Activation::Relu, 0.1, 0).map_err(e2s)?;
    for (name, res) in [
        ("Dropout", dropout.forward(&x, Some(&b), Some(&keys))),
        ("BiasActDropout", ffn.forward(&x, Some(&b), Some(&keys))),
    ] {
        match res {
            Err(e) if e.to_string().contains("bias") => {}
            Err(e) => return Err(format!("{name}: error does not name the argument: {e}")),
            Ok(_) => return Err(format!("{name}: a CPU bias with a CUDA x was accepted")),
        }
    }
    Ok(())
}
