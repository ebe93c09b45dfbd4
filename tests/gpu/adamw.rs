//! Fused AdamW on the GPU against the CPU reference, bit for bit: every dtype pair, odd and
//! chunk-crossing sizes, zero-size tensors, device-side lr / clip / flag, skip flags, stochastic
//! rounding, save/restore/resume, misaligned views, 10,000 tiny tensors, launch counts, and the
//! unfused baseline.

use cudarc::driver::{CudaSlice, DevicePtr};
use fusedreg::adamw::{cpu, unfused, AdamW, AdamWConfig, MomentDtype, Rounding, StateOptions};
use fusedreg::global_norm::{cpu as ncpu, GlobalNorm, NormValues};
use fusedreg::multi_tensor::{RawTensor, TensorSet, CHUNK};
use fusedreg::{Dtype, DtypeKind, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::{
    adamw_tensors as cpu_tensors, adamw_tensors_with, all_state_options, new_grads,
};
use crate::global_norm::{tiny_sizes, values_eq, SIZES};
use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    let mut v = trials_of(
        "adamw",
        &[
            ("f32_seven_steps_bit_exact_vs_cpu", f32_seven_steps),
            ("master_weight_paths_bit_exact_vs_cpu", master_paths),
            ("f32_params_with_16bit_grads", f32_params_16bit_grads),
            (
                "stochastic_rounding_matches_cpu_per_seed",
                stochastic_rounding,
            ),
            ("clip_and_step_below_and_above_max_norm", clip_and_step),
            (
                "clip_and_step_captured_in_a_cuda_graph",
                clip_and_step_in_a_graph,
            ),
            (
                "nonfinite_gradient_changes_nothing",
                nonfinite_changes_nothing,
            ),
            ("loss_scale_divides_out", loss_scale),
            ("save_restore_resume_bit_identical", save_restore_resume),
            ("restore_mismatch_is_an_error", restore_mismatch),
            ("skip_flags_leave_tensors_untouched", skip_flags),
            ("step_count_saturates_at_u32_max", step_count_saturates),
            ("lean_state_layouts_bit_exact_vs_cpu", lean_state_layouts),
            ("lean_state_layouts_misaligned_views", lean_misaligned),
            (
                "skipped_tensors_are_left_out_of_the_norm",
                skipped_tensors_out_of_norm,
            ),
            ("misaligned_views_take_the_scalar_path", misaligned_views),
            ("ten_thousand_tiny_tensors_one_launch", ten_thousand_tiny),
            ("set_grads_raw_repoints_gradients", set_grads_raw_repoints),
            ("validation_errors", validation_errors),
            ("unfused_baseline_matches_cpu", unfused_baseline),
        ],
    );
    let big = std::env::var("FUSEDREG_BIG_TESTS").is_ok_and(|v| v == "1");
    v.push(
        gpu_trial(
            "adamw::single_tensor_over_2_31_elements_needs_FUSEDREG_BIG_TESTS",
            big_tensor,
        )
        .with_ignored_flag(!big),
    );
    v
}

/// A set owning copies of the CPU tensors' parameters and gradients.
fn build<P: Dtype, G: Dtype>(h: &Handle, ts: &[cpu::CpuTensor<P, G>]) -> TestResult<TensorSet> {
    let mut b = TensorSet::builder(h);
    for t in ts {
        if t.is_empty() {
            b.push_empty::<P, G>()?;
        } else {
            b.push(to_device(h, &t.param)?, to_device(h, &t.grad)?)?;
        }
    }
    Ok(b.build()?)
}

fn write_grads<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &mut TensorSet,
    ts: &[cpu::CpuTensor<P, G>],
) -> TestResult {
    for (i, t) in ts.iter().enumerate() {
        if !t.is_empty() {
            let mut g = set.grad_mut::<G>(i)?;
            h.stream().memcpy_htod(&t.grad, &mut g)?;
        }
    }
    Ok(())
}

/// New gradients for the CPU tensors (`new_grads` with `seed`), copied into the set.
fn next_grads<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &mut TensorSet,
    ts: &mut [cpu::CpuTensor<P, G>],
    seed: u64,
) -> TestResult {
    new_grads(ts, seed);
    write_grads(h, set, ts)
}

/// One plain step (no clipping) with new gradients ([`next_grads`]), on the device and on the
/// CPU reference, with the optimizer's configuration.
fn step_both<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &mut TensorSet,
    opt: &AdamW,
    ts: &mut [cpu::CpuTensor<P, G>],
    seed: u64,
) -> TestResult {
    next_grads(h, set, ts, seed)?;
    opt.step(set, None)?;
    let cfg = opt.config();
    cpu::step(ts, cfg, &cpu::StepInputs::new(cfg.lr), &[])?;
    Ok(())
}

/// The CPU tensors' weight decays: what the optimizer takes per tensor.
fn wds<P: Dtype, G: Dtype>(ts: &[cpu::CpuTensor<P, G>]) -> Vec<f32> {
    ts.iter().map(|t| t.weight_decay).collect()
}

/// Moments, master weights and step counts against the CPU tensors, bit for bit.
fn compare_state<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &AdamW,
    ts: &[cpu::CpuTensor<P, G>],
    what: &str,
) -> TestResult {
    let steps = set.step_counts()?;
    let want_steps: Vec<u32> = ts.iter().map(|t| t.step).collect();
    bits_eq(&format!("{what}: step counts"), &steps, &want_steps)?;
    for (i, t) in ts.iter().enumerate() {
        bits_eq(
            &format!("{what}: tensor {i} m"),
            &to_host(h, &set.exp_avg(i)?)?,
            &t.m,
        )?;
        bits_eq(
            &format!("{what}: tensor {i} v"),
            &to_host(h, &set.exp_avg_sq(i)?)?,
            &t.v,
        )?;
        if let Some(m) = &t.master {
            bits_eq(
                &format!("{what}: tensor {i} master"),
                &to_host(h, &set.master(i)?)?,
                m,
            )?;
        }
    }
    Ok(())
}

/// Parameters (of a set owning them) and state against the CPU tensors, bit for bit.
fn compare<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &TensorSet,
    opt: &AdamW,
    ts: &[cpu::CpuTensor<P, G>],
    what: &str,
) -> TestResult {
    for (i, t) in ts.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        bits_eq(
            &format!("{what}: tensor {i} ({} elements) param", t.len()),
            &to_host(h, &set.param::<P>(i)?)?,
            &t.param,
        )?;
    }
    compare_state(h, opt, ts, what)
}

fn f32_seven_steps(h: &Handle) -> TestResult {
    let mut ts = cpu_tensors::<f32, f32>(1, SIZES);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(&set, cfg, &wds(&ts))?;
    for s in 0..7u64 {
        next_grads(h, &mut set, &mut ts, 100 + s)?;
        // A device-side learning-rate schedule: a 4-byte async copy per step.
        let lr = 1e-3 * (1.0 + s as f32 * 0.5);
        opt.set_lr(lr)?;
        let before = h.launch_count();
        opt.step(&mut set, None)?;
        launches(h, before, 1, "one AdamW step")?;
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(lr), &[])?;
        if s == 0 || s == 6 {
            compare(h, &set, &opt, &ts, &format!("f32 step {}", s + 1))?;
        }
    }
    Ok(())
}

fn master_paths(h: &Handle) -> TestResult {
    fn one<P: Dtype, G: Dtype>(h: &Handle, seed: u64) -> TestResult {
        let sizes = [0, 65_537, 1001, 3, 0, 278_011, 5];
        let mut ts = cpu_tensors::<P, G>(seed, &sizes);
        let mut set = build(h, &ts)?;
        let cfg = AdamWConfig {
            lr: 2e-3,
            ..Default::default()
        };
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        // Freshly created: the master weights are the widened parameters.
        compare(h, &set, &opt, &ts, "after AdamW::new")?;
        for s in 0..7 {
            step_both(h, &mut set, &opt, &mut ts, seed * 10 + s)?;
        }
        compare(
            h,
            &set,
            &opt,
            &ts,
            &format!("p{} g{}", P::KIND.name(), G::KIND.name()),
        )
    }
    one::<bf16, bf16>(h, 2)?;
    one::<bf16, f16>(h, 3)?;
    one::<bf16, f32>(h, 4)?;
    one::<f16, f16>(h, 5)?;
    one::<f16, bf16>(h, 6)?;
    one::<f16, f32>(h, 7)
}

fn f32_params_16bit_grads(h: &Handle) -> TestResult {
    fn one<G: Dtype>(h: &Handle, seed: u64) -> TestResult {
        let mut ts = cpu_tensors::<f32, G>(seed, &[65_536, 7, 0, 130_001]);
        let mut set = build(h, &ts)?;
        let cfg = AdamWConfig::default();
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        for s in 0..3 {
            step_both(h, &mut set, &opt, &mut ts, seed * 10 + s)?;
        }
        compare(h, &set, &opt, &ts, &format!("pf32 g{}", G::KIND.name()))
    }
    one::<bf16>(h, 8)?;
    one::<f16>(h, 9)
}

fn stochastic_rounding(h: &Handle) -> TestResult {
    fn run<P: Dtype, G: Dtype>(h: &Handle, seed: u64) -> TestResult<Vec<Vec<P>>> {
        let mut ts = cpu_tensors::<P, G>(20, &[65_537, 0, 999, 131_075]);
        let mut set = build(h, &ts)?;
        let cfg = AdamWConfig {
            rounding: Rounding::Stochastic { seed },
            ..Default::default()
        };
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        for s in 0..4 {
            step_both(h, &mut set, &opt, &mut ts, 200 + s)?;
        }
        compare(
            h,
            &set,
            &opt,
            &ts,
            &format!("stochastic p{}", P::KIND.name()),
        )?;
        (0..ts.len())
            .filter(|&i| !ts[i].is_empty())
            .map(|i| to_host(h, &set.param::<P>(i)?))
            .collect()
    }
    let a = run::<bf16, bf16>(h, 1234)?;
    let a2 = run::<bf16, bf16>(h, 1234)?;
    let b = run::<bf16, bf16>(h, 4321)?;
    if a != a2 {
        return Err("same seed, different parameters".into());
    }
    if a == b {
        return Err("different seeds gave identical parameters".into());
    }
    run::<f16, f32>(h, 99)?;
    Ok(())
}

/// After one device `clip_and_step` through `norm` on `ts`' gradients: the norm the device
/// computed equals the CPU's, and stepping the CPU reference with that norm gives the device's
/// parameters and state. Returns the norm's values.
fn clipped_step_matches<P: Dtype, G: Dtype>(
    h: &Handle,
    set: &TensorSet,
    (opt, norm): (&AdamW, &GlobalNorm),
    ts: &mut [cpu::CpuTensor<P, G>],
    what: &str,
) -> TestResult<NormValues> {
    let grads: Vec<&[G]> = ts.iter().map(|t| &t.grad[..]).collect();
    let want = ncpu::global_norm(&grads, norm.max_norm(), 1.0)?;
    let got = norm.read()?;
    values_eq(&format!("{what}: norm"), &got, &want)?;
    let cfg = opt.config();
    cpu::step(ts, cfg, &cpu::StepInputs::from_norm(cfg.lr, &want), &[])?;
    compare(h, set, opt, ts, what)?;
    Ok(got)
}

fn clip_and_step(h: &Handle) -> TestResult {
    let mut ts = cpu_tensors::<bf16, bf16>(30, &[0, 278_011, 65_536, 17, 0]);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let grads: Vec<&[bf16]> = ts.iter().map(|t| &t.grad[..]).collect();
    let n = ncpu::norm_f64(&grads) as f32;
    // First steps clipped (max_norm below the norm), then unclipped.
    for (s, max_norm) in [n * 0.25, n * 0.5, n * 4.0, n * 8.0]
        .into_iter()
        .enumerate()
    {
        next_grads(h, &mut set, &mut ts, 300 + s as u64)?;
        let mut norm = GlobalNorm::new(&set, Some(max_norm))?;
        let before = h.launch_count();
        opt.clip_and_step(&mut set, &mut norm)?;
        launches(h, before, 3, "clip_and_step")?;
        let got = clipped_step_matches(h, &set, (&opt, &norm), &mut ts, &format!("clip step {s}"))?;
        if (s < 2) != (got.coef < 1.0) {
            return Err(format!("step {s}: coef {} with max_norm {max_norm}", got.coef).into());
        }
    }
    Ok(())
}

/// The whole clipped step needs no host sync: it captures into a CUDA graph, and each replay
/// (with new gradients copied in between) is one more step, bit-exact with the CPU reference.
fn clip_and_step_in_a_graph(h: &Handle) -> TestResult {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let mut ts = cpu_tensors::<f32, f32>(40, &[0, 278_011, 65_537, 0, 33]);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
    let max_norm = ncpu::norm_f64(&grads) as f32 * 0.5;
    let mut norm = GlobalNorm::new(&set, Some(max_norm))?;
    let s = h.stream();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = opt.clip_and_step(&mut set, &mut norm);
    let graph = s.end_capture(CUgraphInstantiate_flags(0))?;
    captured.map_err(|x| format!("clip_and_step during capture: {x}"))?;
    let graph = graph.ok_or("the capture recorded nothing")?;
    for step in 0..3 {
        next_grads(h, &mut set, &mut ts, 700 + step)?;
        graph.launch()?;
        let what = format!("graph replay {step}");
        clipped_step_matches(h, &set, (&opt, &norm), &mut ts, &what)?;
    }
    Ok(())
}

fn nonfinite_changes_nothing(h: &Handle) -> TestResult {
    for bad in [f32::NAN, f32::INFINITY] {
        let mut ts = cpu_tensors::<bf16, f32>(40, &[3, 70_000, 0, 65_537]);
        let mut set = build(h, &ts)?;
        let cfg = AdamWConfig {
            rounding: Rounding::Stochastic { seed: 5 },
            ..Default::default()
        };
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        let mut norm = GlobalNorm::new(&set, Some(1.0))?;
        // Two good steps, so the state is non-trivial.
        for s in 0..2 {
            next_grads(h, &mut set, &mut ts, 400 + s)?;
            opt.clip_and_step(&mut set, &mut norm)?;
            let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
            let v = ncpu::global_norm(&grads, Some(1.0), 1.0)?;
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
        }
        let saved = opt.save_state()?;
        ts[1].grad[66_000] = bad;
        write_grads(h, &mut set, &ts)?;
        opt.clip_and_step(&mut set, &mut norm)?;
        if norm.read()?.nonfinite != 1 {
            return Err(format!("gradient {bad}: flag not set").into());
        }
        // Bit-identical parameters, moments, master weights and step counts.
        compare(h, &set, &opt, &ts, &format!("after a {bad} gradient"))?;
        if opt.save_state()? != saved {
            return Err("the state bytes changed".into());
        }
    }
    Ok(())
}

fn loss_scale(h: &Handle) -> TestResult {
    let mut ts = cpu_tensors::<f32, f32>(50, &[100_003, 9]);
    for t in &mut ts {
        for g in &mut t.grad {
            *g *= 1024.0;
        }
    }
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let mut norm = GlobalNorm::new(&set, Some(0.5))?;
    norm.set_loss_scale(1024.0)?;
    opt.clip_and_step(&mut set, &mut norm)?;
    let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
    let want = ncpu::global_norm(&grads, Some(0.5), 1024.0)?;
    values_eq("loss-scaled norm", &norm.read()?, &want)?;
    let mut unscaled = ts.clone();
    cpu::step(
        &mut ts,
        &cfg,
        &cpu::StepInputs::from_norm(cfg.lr, &want),
        &[],
    )?;
    compare(h, &set, &opt, &ts, "loss-scaled step")?;
    // (g * 2^10) * (coef * 2^-10) == g * coef: the same update as unscaled gradients.
    for t in &mut unscaled {
        for g in &mut t.grad {
            *g /= 1024.0;
        }
    }
    let inputs = cpu::StepInputs {
        lr: cfg.lr,
        grad_scale: want.coef,
        nonfinite: false,
    };
    cpu::step(&mut unscaled, &cfg, &inputs, &[])?;
    bits_eq("scaled vs unscaled", &unscaled[0].param, &ts[0].param)?;
    Ok(())
}

fn save_restore_resume(h: &Handle) -> TestResult {
    fn one<P: Dtype, G: Dtype>(h: &Handle, rounding: Rounding) -> TestResult {
        let sizes = [5, 0, 65_537, 100_000];
        let init = cpu_tensors::<P, G>(60, &sizes);
        let cfg = AdamWConfig {
            rounding,
            ..Default::default()
        };
        let grads_of = |s: u64| {
            let mut t = init.clone();
            new_grads(&mut t, 600 + s);
            t
        };
        // Seven steps straight.
        let mut straight = build(h, &init)?;
        let opt = AdamW::new(&straight, cfg, &wds(&init))?;
        for s in 0..7 {
            write_grads(h, &mut straight, &grads_of(s))?;
            opt.step(&mut straight, None)?;
        }
        // Three steps, save, and a fresh set with the parameters at that point.
        let mut first = build(h, &init)?;
        let opt1 = AdamW::new(&first, cfg, &wds(&init))?;
        let mut ts = init.clone();
        for s in 0..3 {
            let grads = grads_of(s);
            write_grads(h, &mut first, &grads)?;
            opt1.step(&mut first, None)?;
            for (t, g) in ts.iter_mut().zip(grads) {
                t.grad = g.grad;
            }
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[])?;
        }
        let bytes = opt1.save_state()?;
        // The GPU's bytes are the CPU reference's bytes.
        bits_eq(
            "saved state vs cpu::save_state",
            &bytes,
            &cpu::save_state(&ts)?,
        )?;
        let mut fresh_init = init.clone();
        for (i, t) in fresh_init
            .iter_mut()
            .enumerate()
            .filter(|(_, t)| !t.is_empty())
        {
            t.param = to_host(h, &first.param::<P>(i)?)?;
        }
        let mut fresh = build(h, &fresh_init)?;
        let mut opt2 = AdamW::new(&fresh, cfg, &wds(&init))?;
        opt2.restore_state(&bytes)?;
        for s in 3..7 {
            write_grads(h, &mut fresh, &grads_of(s))?;
            opt2.step(&mut fresh, None)?;
        }
        bits_eq(
            "resumed vs straight state",
            &opt2.save_state()?,
            &opt.save_state()?,
        )?;
        for i in (0..sizes.len()).filter(|&i| sizes[i] > 0) {
            bits_eq(
                &format!("resumed vs straight param {i}"),
                &to_host(h, &fresh.param::<P>(i)?)?,
                &to_host(h, &straight.param::<P>(i)?)?,
            )?;
        }
        Ok(())
    }
    one::<f32, f32>(h, Rounding::NearestEven)?;
    one::<bf16, bf16>(h, Rounding::Stochastic { seed: 77 })?;
    one::<f16, f32>(h, Rounding::NearestEven)
}

fn restore_mismatch(h: &Handle) -> TestResult {
    // An optimizer over CPU tensors `ts` of a new set.
    fn opt_for<P: Dtype, G: Dtype>(
        h: &Handle,
        ts: &[cpu::CpuTensor<P, G>],
    ) -> TestResult<(TensorSet, AdamW)> {
        let set = build(h, ts)?;
        let opt = AdamW::new(&set, AdamWConfig::default(), &wds(ts))?;
        Ok((set, opt))
    }
    let (_set, opt) = opt_for(h, &cpu_tensors::<f32, f32>(70, &[10, 20]))?;
    let bytes = opt.save_state()?;
    let (_o, mut other) = opt_for(h, &cpu_tensors::<f32, f32>(70, &[10, 21]))?;
    let before = other.save_state()?;
    match other.restore_state(&bytes) {
        Err(err) if err.to_string().contains("tensor 1") => {}
        r => return Err(format!("restore into other lengths: {r:?}").into()),
    }
    bits_eq(
        "state after a failed restore",
        &other.save_state()?,
        &before,
    )?;
    let (_b, mut bf) = opt_for(h, &cpu_tensors::<bf16, f32>(70, &[10, 20]))?;
    if bf.restore_state(&bytes).is_ok() {
        return Err("restored an f32 state into bf16 params".into());
    }
    let (_f, mut fewer) = opt_for(h, &cpu_tensors::<f32, f32>(70, &[10]))?;
    if fewer.restore_state(&bytes).is_ok() {
        return Err("restored 2 tensors into 1".into());
    }
    Ok(())
}

fn skip_flags(h: &Handle) -> TestResult {
    let mut ts = cpu_tensors::<bf16, bf16>(80, &[65_537, 0, 1000, 7, 300_000]);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let plan = [
        [false, false, false, false, false],
        [true, false, false, true, false],
        [true, true, true, true, true],
        [false, false, false, true, true],
    ];
    for (s, skip) in plan.iter().enumerate() {
        next_grads(h, &mut set, &mut ts, 800 + s as u64)?;
        opt.set_skip(skip)?;
        let before = h.launch_count();
        opt.step(&mut set, None)?;
        launches(h, before, 1, "a step with skip flags")?;
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), skip)?;
        compare(h, &set, &opt, &ts, &format!("skip plan {s}"))?;
    }
    let steps = opt.step_counts()?;
    if steps != vec![2, 0, 3, 1, 2] {
        return Err(format!("step counts {steps:?}").into());
    }
    if opt.set_skip(&[true]).is_ok() {
        return Err("a skip list of the wrong length was accepted".into());
    }
    Ok(())
}

/// A skipped tensor (a block stochastic depth dropped) has no gradient this step: its stale
/// gradient buffer is not read by the norm, which equals the CPU norm with that gradient zeroed;
/// the clipped step then matches the CPU step with the same flags.
fn skipped_tensors_out_of_norm(h: &Handle) -> TestResult {
    let sizes = [65_537, 0, 1000, 7, 300_000];
    let mut ts = cpu_tensors::<f32, f32>(81, &sizes);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let mut opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    for (s, skip) in [
        [false, false, true, false, true],
        [true, false, false, true, false],
    ]
    .iter()
    .enumerate()
    {
        next_grads(h, &mut set, &mut ts, 820 + s as u64)?;
        opt.set_skip(skip)?;
        opt.clip_and_step(&mut set, &mut norm)?;
        let zeroed: Vec<Vec<f32>> = ts
            .iter()
            .zip(skip)
            .map(|(t, &k)| {
                if k {
                    vec![0.0; t.len()]
                } else {
                    t.grad.clone()
                }
            })
            .collect();
        let grads: Vec<&[f32]> = zeroed.iter().map(|g| &g[..]).collect();
        let v = ncpu::global_norm(&grads, Some(1.0), 1.0)?;
        values_eq(&format!("norm with skip plan {s}"), &norm.read()?, &v)?;
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), skip)?;
        compare(
            h,
            &set,
            &opt,
            &ts,
            &format!("clipped step with skip plan {s}"),
        )?;
    }
    Ok(())
}

type Backing<P, G> = Vec<(CudaSlice<P>, CudaSlice<G>)>;

/// Registers CPU tensors by raw address, each param and grad a view starting `offset`
/// elements into its own larger buffer. Returns the set and the backing buffers.
fn raw_set<P: Dtype, G: Dtype>(
    h: &Handle,
    ts: &[cpu::CpuTensor<P, G>],
    p_offset: usize,
    g_offset: usize,
) -> TestResult<(TensorSet, Backing<P, G>)> {
    let mut b = TensorSet::builder(h);
    let mut backing = Vec::new();
    for t in ts {
        let mut hp = vec![P::from_f32_rn(9.0); t.len() + p_offset + 1];
        hp[p_offset..p_offset + t.len()].copy_from_slice(&t.param);
        let mut hg = vec![G::from_f32_rn(9.0); t.len() + g_offset + 1];
        hg[g_offset..g_offset + t.len()].copy_from_slice(&t.grad);
        let bp = h.stream().clone_htod(&hp)?;
        let bg = h.stream().clone_htod(&hg)?;
        let (pp, _g1) = bp.device_ptr(h.stream());
        let (gp, _g2) = bg.device_ptr(h.stream());
        let raw = RawTensor {
            param: pp + (p_offset * P::KIND.size()) as u64,
            grad: gp + (g_offset * G::KIND.size()) as u64,
            len: t.len() as u64,
            param_dtype: P::KIND,
            grad_dtype: G::KIND,
        };
        // SAFETY: both views lie inside buffers kept alive in `backing` as long as the set.
        unsafe { b.push_raw(raw) }?;
        drop((_g1, _g2));
        backing.push((bp, bg));
    }
    Ok((b.build()?, backing))
}

fn misaligned_views(h: &Handle) -> TestResult {
    fn one<P: Dtype, G: Dtype>(h: &Handle, po: usize, go: usize) -> TestResult {
        let sizes = [65_537, 1003, 0, 5];
        let mut ts = cpu_tensors::<P, G>(90, &sizes);
        let (mut set, backing) = raw_set(h, &ts, po, go)?;
        if set.is_vector_aligned(0) {
            return Err(format!("offsets {po}/{go} reported vector alignment").into());
        }
        let cfg = AdamWConfig::default();
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        let mut norm = GlobalNorm::new(&set, Some(1.0))?;
        for _ in 0..2 {
            opt.clip_and_step(&mut set, &mut norm)?;
            let grads: Vec<&[G]> = ts.iter().map(|t| &t.grad[..]).collect();
            let v = ncpu::global_norm(&grads, Some(1.0), 1.0)?;
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
        }
        compare_state(h, &opt, &ts, "misaligned")?;
        for (i, (bp, _)) in backing.iter().enumerate() {
            let all = to_host(h, bp)?;
            bits_eq(
                &format!("misaligned param {i}"),
                &all[po..po + ts[i].len()],
                &ts[i].param,
            )?;
            // The elements around the view are untouched.
            let guard = P::from_f32_rn(9.0);
            if all[..po]
                .iter()
                .chain(&all[po + ts[i].len()..])
                .any(|&x| x != guard)
            {
                return Err(format!("tensor {i}: an element outside the view was written").into());
            }
        }
        Ok(())
    }
    one::<f32, f32>(h, 1, 0)?;
    one::<f32, f32>(h, 0, 1)?;
    one::<f32, f32>(h, 2, 2)?; // 8-byte aligned: not enough for 16-byte f32 groups
    one::<bf16, bf16>(h, 1, 1)?;
    one::<f16, f32>(h, 3, 1)
}

fn ten_thousand_tiny(h: &Handle) -> TestResult {
    let sizes = tiny_sizes(10_000);
    let mut ts = cpu_tensors::<f32, f32>(95, &sizes);
    // Views into two flat buffers: most tensors start misaligned for 16-byte groups.
    let flat_p: Vec<f32> = ts.iter().flat_map(|t| t.param.iter().copied()).collect();
    let flat_g: Vec<f32> = ts.iter().flat_map(|t| t.grad.iter().copied()).collect();
    let bp = h.stream().clone_htod(&flat_p)?;
    let bg = h.stream().clone_htod(&flat_g)?;
    let (pp, _g1) = bp.device_ptr(h.stream());
    let (gp, _g2) = bg.device_ptr(h.stream());
    let mut b = TensorSet::builder(h);
    let mut at = 0u64;
    for t in &ts {
        let raw = RawTensor {
            param: pp + 4 * at,
            grad: gp + 4 * at,
            len: t.len() as u64,
            param_dtype: DtypeKind::F32,
            grad_dtype: DtypeKind::F32,
        };
        // SAFETY: each view lies inside `bp` / `bg`, which outlive the set.
        unsafe { b.push_raw(raw) }?;
        at += t.len() as u64;
    }
    let mut set = b.build()?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let mut norm = GlobalNorm::new(&set, Some(0.1))?;
    let before = h.launch_count();
    opt.step(&mut set, None)?;
    launches(h, before, 1, "AdamW over 10,000 tensors")?;
    cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[])?;
    let before = h.launch_count();
    opt.clip_and_step(&mut set, &mut norm)?;
    launches(h, before, 3, "clip_and_step over 10,000 tensors")?;
    let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
    let v = ncpu::global_norm(&grads, Some(0.1), 1.0)?;
    values_eq("10k norm", &norm.read()?, &v)?;
    cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
    let got = to_host(h, &bp)?;
    let want: Vec<f32> = ts.iter().flat_map(|t| t.param.iter().copied()).collect();
    bits_eq("10k params", &got, &want)?;
    compare_state(h, &opt, &ts, "10k tensors")
}

/// Fresh gradient buffers every step (a framework's backward): `TensorSet::set_grads_raw`
/// points the set at them, misaligned ones included, and the steps stay bit-exact with the CPU.
fn set_grads_raw_repoints(h: &Handle) -> TestResult {
    let sizes = [CHUNK as usize + 7, 33, 0, 1000];
    let mut ts = cpu_tensors::<f32, f32>(98, &sizes);
    let flat_p: Vec<f32> = ts.iter().flat_map(|t| t.param.iter().copied()).collect();
    let bp = h.stream().clone_htod(&flat_p)?;
    let (pp, _g1) = bp.device_ptr(h.stream());
    let starts: Vec<u64> = sizes
        .iter()
        .scan(0u64, |at, &n| {
            let s = *at;
            *at += n as u64;
            Some(s)
        })
        .collect();
    // A first gradient buffer: the registration's.
    let flat_g: Vec<f32> = ts.iter().flat_map(|t| t.grad.iter().copied()).collect();
    let g0 = h.stream().clone_htod(&flat_g)?;
    let (g0p, _g2) = g0.device_ptr(h.stream());
    let mut b = TensorSet::builder(h);
    for (t, &at) in ts.iter().zip(&starts) {
        let raw = RawTensor {
            param: pp + 4 * at,
            grad: g0p + 4 * at,
            len: t.len() as u64,
            param_dtype: DtypeKind::F32,
            grad_dtype: DtypeKind::F32,
        };
        // SAFETY: the views lie inside `bp` / `g0`, which outlive the set.
        unsafe { b.push_raw(raw) }?;
    }
    let mut set = b.build()?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let mut norm = GlobalNorm::new(&set, Some(0.5))?;
    let mut keep = Vec::new();
    for step in 0..3u64 {
        new_grads(&mut ts, 500 + step);
        // A new buffer, one element further in each step: alignments change.
        let mut flat: Vec<f32> = vec![0.0; step as usize];
        flat.extend(ts.iter().flat_map(|t| t.grad.iter().copied()));
        let g = h.stream().clone_htod(&flat)?;
        let (gp, guard) = g.device_ptr(h.stream());
        let addrs: Vec<u64> = starts.iter().map(|&at| gp + 4 * (step + at)).collect();
        // SAFETY: every view lies inside `g`, kept alive in `keep` until the end.
        unsafe { set.set_grads_raw(&addrs) }?;
        drop(guard);
        keep.push(g);
        opt.clip_and_step(&mut set, &mut norm)?;
        let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
        let v = ncpu::global_norm(&grads, Some(0.5), 1.0)?;
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
    }
    let got = to_host(h, &bp)?;
    let want: Vec<f32> = ts.iter().flat_map(|t| t.param.iter().copied()).collect();
    bits_eq("set_grads_raw params", &got, &want)?;
    compare_state(h, &opt, &ts, "set_grads_raw")?;
    // Errors, and nothing changes on an error: a list of the wrong length, an address not
    // aligned to the element size, a null address, a new address for an owned gradient.
    let ok: Vec<u64> = starts.iter().map(|&at| g0p + 4 * at).collect();
    let mut bad = ok.clone();
    bad[1] += 1;
    let mut null = ok.clone();
    null[0] = 0;
    for (what, list) in [
        ("length", &ok[..2]),
        ("misaligned", &bad[..]),
        ("null", &null[..]),
    ] {
        // SAFETY: rejected before any use.
        if unsafe { set.set_grads_raw(list) }.is_ok() {
            return Err(format!("set_grads_raw accepted a bad list ({what})").into());
        }
    }
    let mut owned = build(h, &ts[..2])?;
    // SAFETY: rejected (the set owns these gradients).
    if unsafe { owned.set_grads_raw(&ok[..2]) }.is_ok() {
        return Err("set_grads_raw replaced a gradient the set owns".into());
    }
    Ok(())
}

fn validation_errors(h: &Handle) -> TestResult {
    let ts = cpu_tensors::<f32, f32>(97, &[10]);
    // Mismatched lengths within a tensor.
    let mut b = TensorSet::builder(h);
    let r = b.push(to_device(h, &[1.0f32; 4])?, to_device(h, &[1.0f32; 5])?);
    if r.is_ok() {
        return Err("param 4 / grad 5 elements accepted".into());
    }
    // Mixed parameter dtypes in one set.
    let mut b = TensorSet::builder(h);
    b.push(to_device(h, &[1.0f32; 4])?, to_device(h, &[1.0f32; 4])?)?;
    match b.push(to_device(h, &[bf16::ONE; 4])?, to_device(h, &[1.0f32; 4])?) {
        Err(err) if err.to_string().contains("dtype") => {}
        r => return Err(format!("mixed dtypes: {r:?}").into()),
    }
    // Params and gradients-only in one set.
    if b.push_grad(to_device(h, &[1.0f32; 4])?).is_ok() {
        return Err("a gradients-only tensor joined a parameter set".into());
    }
    // Negative / NaN weight decay (the optimizer's, per tensor), and a list of the wrong length.
    for wd in [-1.0, f32::NAN] {
        let mut b = TensorSet::builder(h);
        b.push(to_device(h, &[1.0f32])?, to_device(h, &[1.0f32])?)?;
        let set = b.build()?;
        if AdamW::new(&set, AdamWConfig::default(), &[wd]).is_ok() {
            return Err(format!("weight decay {wd} accepted").into());
        }
        if AdamW::new(&set, AdamWConfig::default(), &[0.0, 0.0]).is_ok() {
            return Err("two weight decays for one tensor accepted".into());
        }
    }
    // Empty list.
    match TensorSet::builder(h).build() {
        Err(err) if err.to_string().contains("empty") => {}
        r => return Err(format!("empty set: {r:?}").into()),
    }
    // Raw addresses: null with a length, misaligned to the element size.
    let mut b = TensorSet::builder(h);
    let raw = RawTensor {
        param: 0,
        grad: 0,
        len: 3,
        param_dtype: DtypeKind::F32,
        grad_dtype: DtypeKind::F32,
    };
    // SAFETY: rejected before anything is recorded.
    if unsafe { b.push_raw(raw) }.is_ok() {
        return Err("null raw address accepted".into());
    }
    let buf = to_device(h, &[0f32; 8])?;
    let (p, _g) = buf.device_ptr(h.stream());
    let odd = RawTensor {
        param: p + 1,
        grad: p + 16,
        len: 2,
        ..raw
    };
    // SAFETY: rejected before anything is recorded.
    if unsafe { b.push_raw(odd) }.is_ok() {
        return Err("an address not aligned to its element accepted".into());
    }
    // Hyperparameters, max_norm, lr.
    let set = build(h, &ts)?;
    for cfg in [
        AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        },
        AdamWConfig {
            beta2: -0.5,
            ..Default::default()
        },
        AdamWConfig {
            eps: f32::NAN,
            ..Default::default()
        },
        AdamWConfig {
            lr: -1.0,
            ..Default::default()
        },
    ] {
        if AdamW::new(&set, cfg, &wds(&ts)).is_ok() {
            return Err(format!("{cfg:?} accepted").into());
        }
    }
    let mut opt = AdamW::new(&set, AdamWConfig::default(), &wds(&ts))?;
    if opt.set_lr(f32::INFINITY).is_ok() {
        return Err("lr inf accepted".into());
    }
    for m in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        if GlobalNorm::new(&set, Some(m)).is_ok() {
            return Err(format!("max_norm {m} accepted").into());
        }
    }
    // A gradients-only set has no optimizer; objects of one set refuse another.
    let mut gb = TensorSet::builder(h);
    gb.push_grad(to_device(h, &[1.0f32; 3])?)?;
    let gset = gb.build()?;
    if AdamW::new(&gset, AdamWConfig::default(), &[0.0]).is_ok() {
        return Err("AdamW on a gradients-only set".into());
    }
    let mut other = build(h, &ts)?;
    if opt.step(&mut other, None).is_ok() {
        return Err("an AdamW stepped another set".into());
    }
    let mut norm = GlobalNorm::new(&gset, None)?;
    if norm.compute(&other).is_ok() {
        return Err("a GlobalNorm computed another set".into());
    }
    Ok(())
}

fn unfused_baseline(h: &Handle) -> TestResult {
    // f32 gradients: bit-identical to the CPU reference (see unfused's docs).
    let sizes = [0, 65_537, 1000, 0, 7, 200_001];
    let nonempty = sizes.iter().filter(|&&n| n > 0).count() as u64;
    let mut ts = cpu_tensors::<f32, f32>(98, &sizes);
    let mut set = build(h, &ts)?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
    let max_norm = (ncpu::norm_f64(&grads) * 0.3) as f32;
    let mut norm = GlobalNorm::new(&set, Some(max_norm))?;
    for s in 0..3 {
        next_grads(h, &mut set, &mut ts, 900 + s)?;
        let out = unfused::clip_and_step(&opt, &mut set, &mut norm)?;
        if out.launches != 3 * nonempty || out.skipped {
            return Err(format!("unfused: {out:?}, expected {} launches", 3 * nonempty).into());
        }
        let grads: Vec<&[f32]> = ts.iter().map(|t| &t.grad[..]).collect();
        let v = ncpu::global_norm(&grads, Some(max_norm), 1.0)?;
        values_eq("unfused norm", &out.norm, &v)?;
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
        compare(h, &set, &opt, &ts, &format!("unfused f32 step {s}"))?;
    }
    // bf16 gradients: the scaled gradients are rounded to bf16 before AdamW reads them.
    let mut ts = cpu_tensors::<bf16, bf16>(99, &sizes);
    let mut set = build(h, &ts)?;
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let grads: Vec<&[bf16]> = ts.iter().map(|t| &t.grad[..]).collect();
    let max_norm = (ncpu::norm_f64(&grads) * 0.3) as f32;
    let mut norm = GlobalNorm::new(&set, Some(max_norm))?;
    write_grads(h, &mut set, &ts)?;
    let out = unfused::clip_and_step(&opt, &mut set, &mut norm)?;
    let v = ncpu::global_norm(&grads, Some(max_norm), 1.0)?;
    values_eq("unfused bf16 norm", &out.norm, &v)?;
    cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
    for (i, t) in ts.iter().enumerate() {
        let got: Vec<f64> = to_host(h, &opt.master(i)?)?
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let want: Vec<f64> = t
            .master
            .as_ref()
            .unwrap()
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        // One step moves p by about lr; a half-ulp bf16 difference in g moves it by a small
        // fraction of that.
        close(&format!("unfused bf16 master {i}"), &got, &want, 2e-5, 1e-6)?;
    }
    // A non-finite gradient: skipped on the host after the sync, nothing else launched.
    let mut ts = cpu_tensors::<f32, f32>(100, &[10, 70_000]);
    ts[1].grad[3] = f32::NAN;
    let mut set = build(h, &ts)?;
    let opt = AdamW::new(&set, cfg, &wds(&ts))?;
    let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    let out = unfused::clip_and_step(&opt, &mut set, &mut norm)?;
    if !out.skipped || out.launches != 2 {
        return Err(format!("unfused with NaN: {out:?}").into());
    }
    compare(h, &set, &opt, &ts, "unfused skipped step")
}

/// One tensor of 2^31 + 65,537 bf16 elements (about 34 GiB of device memory with its f32
/// master and moments): the 64-bit indexing end to end. Elements are a pure function of their
/// 64-bit index, so the CPU checks chunks without holding the tensor.
fn big_tensor(h: &Handle) -> TestResult {
    let n: u64 = (1 << 31) + CHUNK + 1;
    let param_of = |i: u64| bf16::from_f32(((i % 1999) as f32 - 999.0) * 1e-3);
    let grad_of = |i: u64| bf16::from_f32((((i * 7) % 2003) as f32 - 1001.0) * 1e-3);
    let hp: Vec<bf16> = (0..n).map(param_of).collect();
    let hg: Vec<bf16> = (0..n).map(grad_of).collect();
    let mut b = TensorSet::builder(h);
    b.push(h.stream().clone_htod(&hp)?, h.stream().clone_htod(&hg)?)?;
    drop((hp, hg));
    let mut set = b.build()?;
    let cfg = AdamWConfig::default();
    let opt = AdamW::new(&set, cfg, &[0.01])?;
    let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    opt.clip_and_step(&mut set, &mut norm)?;
    // The norm: every chunk's partial from the element function, then the CPU reductions.
    let layout = set.layout().clone();
    let partials = ncpu::partials_with(&layout, |c| {
        let r = layout.chunk(c);
        let data: Vec<bf16> = (0..r.len as u64).map(|j| grad_of(r.start + j)).collect();
        ncpu::chunk_partial(&data)
    });
    bits_eq("2^31 partials", &norm.read_partials()?, &partials)?;
    let v = ncpu::finalize(ncpu::reduce(&partials), Some(1.0), 1.0);
    values_eq("2^31 norm", &norm.read()?, &v)?;
    // AdamW on the first chunk, the chunks around 2^31 and the last (elementwise, so each
    // range is a tensor of its own for the CPU, with the same step constants).
    for start in [0u64, (1 << 31) - CHUNK, 1 << 31, n - 1] {
        let len = (n - start).min(CHUNK) as usize;
        let idx = start..start + len as u64;
        let mut t = vec![cpu::CpuTensor::<bf16, bf16>::new(
            idx.clone().map(param_of).collect(),
            idx.clone().map(grad_of).collect(),
            0.01,
        )?];
        cpu::step(&mut t, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
        let r = start as usize..start as usize + len;
        bits_eq(
            &format!("2^31 master at {start}"),
            &to_host(h, &opt.master(0)?.slice(r.clone()))?,
            t[0].master.as_ref().unwrap(),
        )?;
        bits_eq(
            &format!("2^31 m at {start}"),
            &to_host(h, &opt.exp_avg(0)?.slice(r.clone()))?,
            &t[0].m,
        )?;
        bits_eq(
            &format!("2^31 param at {start}"),
            &to_host(h, &set.param::<bf16>(0)?.slice(r))?,
            &t[0].param,
        )?;
    }
    if opt.step_counts()? != vec![1] {
        return Err("step count".into());
    }
    Ok(())
}

/// Issue 17, item 1 on the device: a step count of u32::MAX (restored from a saved state)
/// saturates as on the CPU instead of wrapping to t = 0 (NaN parameters); every bit matches the
/// CPU reference over several steps, stochastic rounding included.
fn step_count_saturates(h: &Handle) -> TestResult {
    let cfg = AdamWConfig {
        rounding: Rounding::Stochastic { seed: 17 },
        ..Default::default()
    };
    let mut ts = cpu_tensors::<bf16, bf16>(170, &[65_537, 0, 9]);
    ts[0].step = u32::MAX - 1;
    ts[2].step = u32::MAX;
    let mut set = build(h, &ts)?;
    let mut opt = AdamW::new(&set, cfg, &wds(&ts))?;
    opt.restore_state(&cpu::save_state(&ts)?)?;
    for s in 0..3 {
        step_both(h, &mut set, &opt, &mut ts, 1700 + s)?;
        compare(h, &set, &opt, &ts, &format!("saturated step {s}"))?;
    }
    let steps = opt.step_counts()?;
    if steps != vec![u32::MAX, 0, u32::MAX] {
        return Err(format!("step counts {steps:?}, expected saturation at u32::MAX").into());
    }
    if ts[0].param.iter().any(|p| !p.to_f32().is_finite()) {
        return Err("NaN parameters after saturation".into());
    }
    Ok(())
}

/// Parameters, moments (in the layout's dtype), master weights and step counts against the CPU
/// tensors of the same layout, bit for bit.
fn compare_lean<P: Dtype, G: Dtype>(
    h: &Handle,
    params: &[Vec<P>],
    opt: &AdamW,
    ts: &[cpu::CpuTensor<P, G>],
    what: &str,
) -> TestResult {
    let steps = opt.step_counts()?;
    let want_steps: Vec<u32> = ts.iter().map(|t| t.step).collect();
    bits_eq(&format!("{what}: step counts"), &steps, &want_steps)?;
    for (i, t) in ts.iter().enumerate() {
        bits_eq(&format!("{what}: tensor {i} param"), &params[i], &t.param)?;
        let (m, v): (Vec<f32>, Vec<f32>) = match opt.config().state.moments {
            MomentDtype::F32 => (
                to_host(h, &opt.exp_avg::<f32>(i)?)?,
                to_host(h, &opt.exp_avg_sq::<f32>(i)?)?,
            ),
            MomentDtype::Bf16 => {
                let m: Vec<bf16> = to_host(h, &opt.exp_avg::<bf16>(i)?)?;
                let v: Vec<bf16> = to_host(h, &opt.exp_avg_sq::<bf16>(i)?)?;
                (
                    m.iter().map(|x| x.to_f32()).collect(),
                    v.iter().map(|x| x.to_f32()).collect(),
                )
            }
        };
        bits_eq(&format!("{what}: tensor {i} m"), &m, &t.m)?;
        bits_eq(&format!("{what}: tensor {i} v"), &v, &t.v)?;
        match &t.master {
            Some(want) => bits_eq(
                &format!("{what}: tensor {i} master"),
                &to_host(h, &opt.master(i)?)?,
                want,
            )?,
            None => {
                if opt.master(i).is_ok() {
                    return Err(
                        format!("{what}: tensor {i} has master weights on the GPU only").into(),
                    );
                }
            }
        }
    }
    Ok(())
}

fn params_of<P: Dtype>(h: &Handle, set: &TensorSet, sizes: &[usize]) -> TestResult<Vec<Vec<P>>> {
    (0..sizes.len())
        .map(|i| {
            if sizes[i] == 0 {
                Ok(Vec::new())
            } else {
                to_host(h, &set.param::<P>(i)?)
            }
        })
        .collect()
}

/// Every state layout (moments f32 / bf16, master f32 / none) with several dtype pairs and both
/// roundings, against the CPU reference bit for bit over several steps (plain and clipped),
/// then the saved state against cpu::save_state's bytes and a restore round trip.
fn lean_state_layouts(h: &Handle) -> TestResult {
    fn one<P: Dtype, G: Dtype>(
        h: &Handle,
        seed: u64,
        options: StateOptions,
        rounding: Rounding,
    ) -> TestResult {
        let sizes = [65_537, 0, 1001, 3, 131_072];
        let mut ts = adamw_tensors_with::<P, G>(seed, &sizes, options);
        let mut set = build(h, &ts)?;
        let cfg = AdamWConfig {
            lr: 2e-3,
            state: options,
            rounding,
            ..Default::default()
        };
        let mut opt = AdamW::new(&set, cfg, &wds(&ts))?;
        let mut norm = GlobalNorm::new(&set, Some(1.0))?;
        let what = format!(
            "p{} g{} {options:?} {rounding:?}",
            P::KIND.name(),
            G::KIND.name()
        );
        compare_lean(
            h,
            &params_of(h, &set, &sizes)?,
            &opt,
            &ts,
            &format!("{what} new"),
        )?;
        for s in 0..4 {
            next_grads(h, &mut set, &mut ts, seed * 10 + s)?;
            if s % 2 == 0 {
                opt.step(&mut set, None)?;
                cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[])?;
            } else {
                opt.clip_and_step(&mut set, &mut norm)?;
                let grads: Vec<&[G]> = ts.iter().map(|t| &t.grad[..]).collect();
                let v = ncpu::global_norm(&grads, Some(1.0), 1.0)?;
                cpu::step(&mut ts, &cfg, &cpu::StepInputs::from_norm(cfg.lr, &v), &[])?;
            }
            let params = params_of(h, &set, &sizes)?;
            compare_lean(h, &params, &opt, &ts, &format!("{what} step {s}"))?;
        }
        let bytes = opt.save_state()?;
        bits_eq(
            &format!("{what}: saved state vs cpu::save_state"),
            &bytes,
            &cpu::save_state(&ts)?,
        )?;
        opt.restore_state(&bytes)?;
        bits_eq(
            &format!("{what}: state after a restore"),
            &opt.save_state()?,
            &bytes,
        )?;
        Ok(())
    }
    for (k, options) in all_state_options().into_iter().enumerate() {
        for rounding in [Rounding::NearestEven, Rounding::Stochastic { seed: 4242 }] {
            let seed = 300 + k as u64;
            one::<bf16, bf16>(h, seed, options, rounding)?;
            one::<bf16, f32>(h, seed, options, rounding)?;
            one::<f16, f16>(h, seed, options, rounding)?;
            one::<f16, bf16>(h, seed, options, rounding)?;
            one::<f32, f32>(h, seed, options, rounding)?;
            one::<f32, bf16>(h, seed, options, rounding)?;
        }
    }
    Ok(())
}

/// Every state layout on views starting at element 1 (the scalar path), bf16 and f16 params.
fn lean_misaligned(h: &Handle) -> TestResult {
    fn one<P: Dtype, G: Dtype>(h: &Handle, options: StateOptions) -> TestResult {
        let sizes = [65_537, 1003, 0, 5];
        let mut ts = adamw_tensors_with::<P, G>(91, &sizes, options);
        let (mut set, backing) = raw_set(h, &ts, 1, 1)?;
        let cfg = AdamWConfig {
            state: options,
            rounding: Rounding::Stochastic { seed: 8 },
            ..Default::default()
        };
        let opt = AdamW::new(&set, cfg, &wds(&ts))?;
        for _ in 0..3 {
            opt.step(&mut set, None)?;
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[])?;
        }
        let params: Vec<Vec<P>> = backing
            .iter()
            .zip(&ts)
            .map(|((bp, _), t)| Ok(to_host(h, bp)?[1..1 + t.len()].to_vec()))
            .collect::<TestResult<_>>()?;
        compare_lean(h, &params, &opt, &ts, &format!("misaligned {options:?}"))
    }
    for options in all_state_options() {
        one::<bf16, bf16>(h, options)?;
        one::<f16, f32>(h, options)?;
    }
    Ok(())
}
