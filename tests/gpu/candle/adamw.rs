//! fusedreg's candle AdamW on candle's CUDA device (feature `candle-cuda`): the Vars updated in
//! place (their device addresses never change) by the multi-tensor kernels on candle's stream,
//! bit for bit equal to the same optimizer on candle's CPU device (fusedreg's CPU reference; the
//! AdamW and norm kernels are bit-exact with it) — with clipping, decay groups, a learning-rate
//! schedule, a missing gradient, skip flags, lean state layouts and save/load across devices.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Storage, Tensor, Var};
use candle_nn::optim::Optimizer;
use fusedreg::adamw::{AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions};
use fusedreg::candle::{AdamW, AdamWParams};
use fusedreg::cudarc::driver::DevicePtr;
use fusedreg::Handle;
use libtest_mimic::Trial;

use super::{bits, candle_handle, cuda, host};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "candle::adamw",
        &[
            ("matches_cpu_f32", |h| {
                matches_cpu(
                    h,
                    DType::F32,
                    StateOptions::default(),
                    Rounding::NearestEven,
                )
            }),
            ("matches_cpu_bf16", |h| {
                matches_cpu(
                    h,
                    DType::BF16,
                    StateOptions::default(),
                    Rounding::NearestEven,
                )
            }),
            ("matches_cpu_bf16_lean", |h| {
                let lean = StateOptions {
                    moments: MomentDtype::Bf16,
                    master: MasterWeights::None,
                };
                matches_cpu(h, DType::BF16, lean, Rounding::Stochastic { seed: 5 })
            }),
            ("matches_cpu_f16_bf16_moments", |h| {
                let s = StateOptions {
                    moments: MomentDtype::Bf16,
                    master: MasterWeights::F32,
                };
                matches_cpu(h, DType::F16, s, Rounding::NearestEven)
            }),
            (
                "updates_in_place_on_candles_stream",
                updates_in_place_on_candles_stream,
            ),
            ("mixed_devices_are_an_error", mixed_devices_are_an_error),
        ],
    )
}

/// Shapes: several chunks, odd sizes, an empty Var, a 1-d bias.
const SHAPES: &[&[usize]] = &[&[37, 19], &[19], &[70_001], &[0], &[3, 1, 5], &[200_000]];

/// Vars on `dev` from fixed host data; the first element of every buffer is skipped (offset
/// views are copied by Var::from_tensor, so the Var itself is contiguous from its start).
fn vars_on(dev: &Device, dtype: DType) -> candle_core::Result<Vec<Var>> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let t = Tensor::from_vec(host(k, n, 1000.0), *s, dev)?.to_dtype(dtype)?;
            Var::from_tensor(&t)
        })
        .collect()
}

/// Step `step`'s gradients for `vars` (Var 1 has none at odd steps); the same values on every
/// device. Gradients are offset views of a bigger buffer at even steps (misaligned addresses).
fn grads_on(vars: &[Var], step: usize, dtype: DType) -> candle_core::Result<GradStore> {
    let mut g = GradStore::default();
    for (k, v) in vars.iter().enumerate() {
        if k == 1 && step % 2 == 1 {
            continue;
        }
        let n = v.elem_count();
        let scale = if step % 3 == 0 { 20.0 } else { 0.05 };
        let data: Vec<f32> = host(100 * step + k + 7, n + 1, 1000.0)
            .iter()
            .map(|v| v * scale)
            .collect();
        let t = Tensor::from_vec(data, n + 1, v.device())?.to_dtype(dtype)?;
        let t = if step % 2 == 0 {
            t.narrow(0, 1, n)?
        } else {
            t.narrow(0, 0, n)?
        };
        g.insert(v.as_tensor(), t.reshape(v.shape())?);
    }
    Ok(g)
}

fn run(
    dev: &Device,
    dtype: DType,
    config: AdamWConfig,
    steps: usize,
) -> candle_core::Result<(Vec<Var>, AdamW)> {
    let vars = vars_on(dev, dtype)?;
    let params = AdamWParams {
        config,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
    };
    let mut opt = AdamW::grouped(vars.clone(), params)?;
    for step in 0..steps {
        opt.set_learning_rate(1e-2 / (1.0 + step as f64));
        let mut skip = vec![false; vars.len()];
        skip[4] = step % 4 == 2;
        opt.set_skip(&skip)?;
        if step == 5 {
            opt.set_max_grad_norm(Some(0.5))?;
        }
        opt.step(&grads_on(&vars, step, dtype)?)?;
    }
    Ok((vars, opt))
}

fn matches_cpu(h: &Handle, dtype: DType, state: StateOptions, rounding: Rounding) -> TestResult {
    let dev = cuda(h)?;
    let config = AdamWConfig {
        state,
        rounding,
        ..Default::default()
    };
    let (gv, gopt) = run(&dev, dtype, config, 9)?;
    let (cv, copt) = run(&Device::Cpu, dtype, config, 9)?;
    for (k, (g, c)) in gv.iter().zip(&cv).enumerate() {
        let (gb, cb) = (bits(g)?, bits(c)?);
        if let Some(i) = (0..gb.len()).find(|&i| gb[i] != cb[i]) {
            return Err(format!(
                "{dtype:?} Var {k}: element {i}: gpu {} vs cpu {}",
                f32::from_bits(gb[i]),
                f32::from_bits(cb[i])
            )
            .into());
        }
    }
    let (gs, cs) = (gopt.save_state()?, copt.save_state()?);
    if gs != cs {
        return Err(format!("{dtype:?}: the saved states differ").into());
    }
    // The CPU's state loads on the GPU and both continue identically.
    let mut gopt = gopt;
    let mut copt = copt;
    gopt.load_state(&cs)?;
    for step in 9..12 {
        gopt.step(&grads_on(&gv, step, dtype)?)?;
        copt.step(&grads_on(&cv, step, dtype)?)?;
    }
    for (k, (g, c)) in gv.iter().zip(&cv).enumerate() {
        if bits(g)? != bits(c)? {
            return Err(format!("{dtype:?} Var {k} differs after loading the CPU's state").into());
        }
    }
    Ok(())
}

fn address(v: &Var, h: &Handle) -> TestResult<u64> {
    let (s, _) = v.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => {
            let slice = c.as_cuda_slice::<f32>()?;
            let (p, _g) = slice.device_ptr(h.stream());
            Ok(p)
        }
        _ => Err("not a CUDA Var".into()),
    }
}

fn updates_in_place_on_candles_stream(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let fh = candle_handle(&dev)?;
    let vars = vars_on(&dev, DType::F32)?;
    let before: Vec<u64> = vars
        .iter()
        .filter(|v| v.elem_count() > 0)
        .map(|v| address(v, &fh))
        .collect::<TestResult<_>>()?;
    let mut opt = AdamW::new(vars.clone(), AdamWParams::default())?.with_max_grad_norm(1.0)?;
    let launches = fh.launch_count();
    for step in 0..4 {
        opt.step(&grads_on(&vars, step, DType::F32)?)?;
    }
    let per_step = (fh.launch_count() - launches) / 4;
    // Norm partials, reduce + finalize, AdamW: 3 launches per step for all Vars.
    if per_step != 3 {
        return Err(format!("{per_step} launches per step on candle's stream, expected 3").into());
    }
    let after: Vec<u64> = vars
        .iter()
        .filter(|v| v.elem_count() > 0)
        .map(|v| address(v, &fh))
        .collect::<TestResult<_>>()?;
    if before != after {
        return Err("a Var's storage moved".into());
    }
    // The Vars did change (in place).
    let fresh = vars_on(&dev, DType::F32)?;
    if bits(&vars[0])? == bits(&fresh[0])? {
        return Err("Var 0 was not updated".into());
    }
    Ok(())
}

fn mixed_devices_are_an_error(h: &Handle) -> TestResult {
    let dev = cuda(h)?;
    let a = Var::zeros((4, 8), DType::F32, &dev)?;
    let b = Var::zeros(8, DType::F32, &Device::Cpu)?;
    match AdamW::new(vec![a.clone(), b], AdamWParams::default()) {
        Err(e) if e.to_string().contains("device") || e.to_string().contains("Var 1") => {}
        Err(e) => return Err(format!("error does not say what is wrong: {e}").into()),
        Ok(_) => return Err("Vars on two devices were accepted".into()),
    }
    // A CPU gradient for a CUDA Var.
    let mut opt = AdamW::new(vec![a.clone()], AdamWParams::default())?;
    let mut g = GradStore::default();
    g.insert(
        a.as_tensor(),
        Tensor::ones((4, 8), DType::F32, &Device::Cpu)?,
    );
    match opt.step(&g) {
        Err(e) if e.to_string().contains("gradient") => Ok(()),
        Err(e) => Err(format!("error does not name the gradient: {e}").into()),
        Ok(()) => Err("a CPU gradient for a CUDA Var was accepted".into()),
    }
}
