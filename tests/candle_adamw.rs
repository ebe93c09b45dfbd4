//! fusedreg's candle AdamW (`fusedreg::candle::AdamW`) on candle's CPU device
//! (`cargo test -p fusedreg --features candle --test candle_adamw`):
//!
//! * against `candle_nn::optim::AdamW` on the same Vars and the same gradients, 20 steps in f32,
//!   to 1e-5 relative. The formulas match with candle's `ParamsAdamW` set field for field to
//!   ours (`lr`, `beta1`, `beta2`, `eps`, `weight_decay`; its defaults equal PyTorch's and ours):
//!   both are PyTorch's AdamW — decoupled decay `p *= 1 - lr*wd` on the old `p`, bias corrections
//!   `1 - b^t`, `eps` added outside the square root of the corrected second moment. (candle keeps
//!   one step counter for all Vars, ours is per Var: they agree while every Var gets a gradient
//!   every step, as here.) They differ only in rounding (candle: f64 scalars, separate f32 ops;
//!   fusedreg: f32 scalars and fused multiply-adds);
//! * per-Var weight decay against one candle optimizer per group; clipping against
//!   `clip_grad_norm_` written in candle ops;
//! * bit for bit against fusedreg's CPU reference (`fusedreg::adamw::cpu` and
//!   `fusedreg::global_norm::cpu`), also in bf16 with the lean state layouts;
//! * skip flags and missing gradients change no bit of the Var or its state; save -> load ->
//!   continue equals an uninterrupted run; bad input is an error.
#![cfg(feature = "candle")]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{Optimizer, ParamsAdamW};
use fusedreg::adamw::{cpu, AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions};
use fusedreg::candle::{AdamW, AdamWParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type R = candle_core::Result<()>;

/// Shapes of a small model, with one Var of more than one 65,536-element chunk and an empty one.
const SHAPES: &[&[usize]] = &[&[7, 13], &[13], &[3, 5, 4], &[70_001], &[0], &[2, 1]];
/// The same without the empty Var: candle_nn's AdamW fails on one ("cannot set a variable to a
/// tensor that is derived from its value": candle's ops return a 0-element input itself).
const CANDLE_SHAPES: &[&[usize]] = &[&[7, 13], &[13], &[3, 5, 4], &[70_001], &[2, 1]];

fn randn(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    // Sum of uniforms: random, never zero in bulk, cheap.
    (0..n)
        .map(|_| (rng.random::<f32>() + rng.random::<f32>() - 1.0) * scale)
        .collect()
}

fn tensor(rng: &mut StdRng, shape: &[usize], scale: f32) -> candle_core::Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(randn(rng, n, scale), shape, &Device::Cpu)
}

/// Two independent sets of Vars with the same random values.
fn twin_vars(seed: u64, dtype: DType) -> candle_core::Result<(Vec<Var>, Vec<Var>)> {
    twin_vars_of(SHAPES, seed, dtype)
}

fn twin_vars_of(
    shapes: &[&[usize]],
    seed: u64,
    dtype: DType,
) -> candle_core::Result<(Vec<Var>, Vec<Var>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for s in shapes {
        let t = tensor(&mut rng, s, 1.0)?.to_dtype(dtype)?;
        a.push(Var::from_tensor(&t.copy()?)?);
        b.push(Var::from_tensor(&t.copy()?)?);
    }
    Ok((a, b))
}

/// One GradStore per list in `vars`, with the same random gradient for the `i`-th Var of every
/// list.
fn grads_for(
    rng: &mut StdRng,
    vars: &[&[Var]],
    scale: f32,
    dtype: DType,
) -> candle_core::Result<Vec<GradStore>> {
    let mut stores: Vec<GradStore> = vars.iter().map(|_| GradStore::default()).collect();
    for i in 0..vars[0].len() {
        let g = tensor(rng, vars[0][i].dims(), scale)?.to_dtype(dtype)?;
        for (store, vs) in stores.iter_mut().zip(vars) {
            store.insert(vs[i].as_tensor(), g.copy()?);
        }
    }
    Ok(stores)
}

fn values(v: &Var) -> candle_core::Result<Vec<f32>> {
    v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn bits(v: &Var) -> candle_core::Result<Vec<u32>> {
    Ok(values(v)?.iter().map(|x| x.to_bits()).collect())
}

/// `|a - b| <= 1e-5 * max(|b|, 1e-2)` elementwise: relative to the value, and to 1e-2 for
/// values near 0 (where a relative bound says nothing about an optimizer).
fn assert_close(what: &str, a: &Var, b: &Var) -> R {
    let (x, y) = (values(a)?, values(b)?);
    assert_eq!(x.len(), y.len(), "{what}");
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        let err = (p - q).abs() / q.abs().max(1e-2);
        assert!(
            err <= 1e-5,
            "{what}: element {i}: fusedreg {p} vs candle {q} (relative error {err})"
        );
    }
    Ok(())
}

fn candle_params(lr: f64, wd: f64) -> ParamsAdamW {
    ParamsAdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
    }
}

fn our_params(lr: f32, wd: f32, max_norm: Option<f32>) -> AdamWParams {
    AdamWParams {
        config: AdamWConfig {
            lr,
            ..Default::default()
        },
        weight_decay: wd,
        max_grad_norm: max_norm,
    }
}

/// A cosine learning-rate schedule, so set_learning_rate is exercised every step.
fn lr_at(step: usize) -> f64 {
    1e-3 + 0.5 * 9e-3 * (1.0 + (step as f64 * std::f64::consts::PI / 20.0).cos())
}

#[test]
fn matches_candle_nn_adamw_for_20_steps_f32() -> R {
    let (ours, theirs) = twin_vars_of(CANDLE_SHAPES, 1, DType::F32)?;
    let start: Vec<Vec<f32>> = ours
        .iter()
        .map(values)
        .collect::<candle_core::Result<_>>()?;
    let mut a = AdamW::new(ours.clone(), our_params(1e-2, 0.1, None))?;
    let mut b = candle_nn::optim::AdamW::new(theirs.clone(), candle_params(1e-2, 0.1))?;
    let mut rng = StdRng::seed_from_u64(2);
    for step in 0..20 {
        a.set_learning_rate(lr_at(step));
        b.set_learning_rate(lr_at(step));
        let g = grads_for(&mut rng, &[&ours[..], &theirs[..]], 1.0, DType::F32)?;
        a.step(&g[0])?;
        b.step(&g[1])?;
    }
    assert_eq!(a.learning_rate(), lr_at(19));
    for (i, (x, y)) in ours.iter().zip(&theirs).enumerate() {
        assert_close(&format!("Var {i}"), x, y)?;
        if x.elem_count() > 0 {
            assert_ne!(values(x)?, start[i], "Var {i} did not move");
        }
    }
    Ok(())
}

#[test]
fn decay_groups_match_one_candle_optimizer_per_group() -> R {
    let (ours, theirs) = twin_vars_of(CANDLE_SHAPES, 3, DType::F32)?;
    let mut a = AdamW::grouped(ours.clone(), our_params(1e-2, 0.3, None))?;
    let expect: Vec<f32> = CANDLE_SHAPES
        .iter()
        .map(|s| if s.len() >= 2 { 0.3 } else { 0.0 })
        .collect();
    assert_eq!(a.weight_decay(), &expect[..]);
    let (mats, vecs): (Vec<Var>, Vec<Var>) = theirs.iter().cloned().partition(|v| v.rank() >= 2);
    let mut decayed = candle_nn::optim::AdamW::new(mats, candle_params(1e-2, 0.3))?;
    let mut plain = candle_nn::optim::AdamW::new(vecs, candle_params(1e-2, 0.0))?;
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..20 {
        let g = grads_for(&mut rng, &[&ours[..], &theirs[..]], 1.0, DType::F32)?;
        a.step(&g[0])?;
        decayed.step(&g[1])?;
        plain.step(&g[1])?;
    }
    for (i, (x, y)) in ours.iter().zip(&theirs).enumerate() {
        assert_close(&format!("Var {i}"), x, y)?;
    }
    // And a custom rule: decay by position.
    let (vars, _) = twin_vars(5, DType::F32)?;
    let c = AdamW::with_weight_decay(vars, AdamWParams::default(), |i, _| i as f32 * 0.01)?;
    assert_eq!(c.weight_decay()[3], 0.03);
    Ok(())
}

/// PyTorch's `clip_grad_norm_` in candle ops: every gradient times
/// `min(1, max_norm / (norm + 1e-6))`.
fn clip_in_candle_ops(
    grads: &GradStore,
    vars: &[Var],
    max_norm: f64,
) -> candle_core::Result<GradStore> {
    let mut sumsq = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for v in vars {
        sumsq = (sumsq + grads.get(v).unwrap().sqr()?.sum_all()?)?;
    }
    let norm = f64::from(sumsq.sqrt()?.to_scalar::<f32>()?);
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    let mut out = GradStore::default();
    for v in vars {
        out.insert(v.as_tensor(), (grads.get(v).unwrap() * coef)?);
    }
    Ok(out)
}

#[test]
fn clipping_matches_clip_grad_norm_in_candle_ops() -> R {
    let (ours, theirs) = twin_vars_of(CANDLE_SHAPES, 6, DType::F32)?;
    let mut a = AdamW::new(ours.clone(), our_params(1e-2, 0.1, None))?.with_max_grad_norm(1.0)?;
    let mut b = candle_nn::optim::AdamW::new(theirs.clone(), candle_params(1e-2, 0.1))?;
    let mut rng = StdRng::seed_from_u64(7);
    for step in 0..20 {
        // Norms far above 1 (clipped) in most steps, below it in the last few (not clipped).
        let scale = if step < 16 { 10.0 } else { 1e-3 };
        let g = grads_for(&mut rng, &[&ours[..], &theirs[..]], scale, DType::F32)?;
        a.step(&g[0])?;
        b.step(&clip_in_candle_ops(&g[1], &theirs, 1.0)?)?;
    }
    for (i, (x, y)) in ours.iter().zip(&theirs).enumerate() {
        assert_close(&format!("Var {i}"), x, y)?;
    }
    Ok(())
}

/// The CPU reference's tensors for `vars` (values as they are now, zero gradients).
fn reference_tensors<T: fusedreg::Dtype + candle_core::WithDType>(
    vars: &[Var],
    wd: &[f32],
    state: StateOptions,
) -> Vec<cpu::CpuTensor<T, T>> {
    vars.iter()
        .zip(wd)
        .map(|(v, &d)| {
            let p = v.flatten_all().unwrap().to_vec1::<T>().unwrap();
            let g = p.clone();
            cpu::CpuTensor::with_state(p, g, d, state).unwrap()
        })
        .collect()
}

/// 12 steps of the adapter against fusedreg's CPU reference (norm + AdamW), bit for bit.
fn bit_exact_with_reference<T: fusedreg::Dtype + candle_core::WithDType>(
    dtype: DType,
    config: AdamWConfig,
    max_norm: Option<f32>,
) -> R {
    let (vars, _) = twin_vars(8, dtype)?;
    let params = AdamWParams {
        config,
        weight_decay: 0.05,
        max_grad_norm: max_norm,
    };
    let mut opt = AdamW::grouped(vars.clone(), params)?;
    let mut reference = reference_tensors::<T>(&vars, opt.weight_decay(), config.state);
    let mut rng = StdRng::seed_from_u64(9);
    for step in 0..12 {
        let g = grads_for(
            &mut rng,
            &[&vars[..]],
            if step % 2 == 0 { 5.0 } else { 0.1 },
            dtype,
        )?;
        for (t, v) in reference.iter_mut().zip(&vars) {
            t.grad = g[0].get(v).unwrap().flatten_all()?.to_vec1::<T>()?;
        }
        let grads: Vec<&[T]> = reference.iter().map(|t| &t.grad[..]).collect();
        let inputs = match max_norm {
            Some(m) => cpu::StepInputs::from_norm(
                config.lr,
                &fusedreg::global_norm::cpu::global_norm(&grads, Some(m), 1.0).unwrap(),
            ),
            None => cpu::StepInputs::new(config.lr),
        };
        cpu::step(&mut reference, &config, &inputs, &[]).unwrap();
        opt.step(&g[0])?;
        for (i, (t, v)) in reference.iter().zip(&vars).enumerate() {
            let got = v.flatten_all()?.to_vec1::<T>()?;
            let same = got
                .iter()
                .zip(&t.param)
                .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
            assert!(same, "step {step}, Var {i}: not the CPU reference's bits");
        }
    }
    assert_eq!(opt.save_state()?, cpu::save_state(&reference).unwrap());
    Ok(())
}

#[test]
fn f32_is_the_cpu_reference_bit_for_bit() -> R {
    bit_exact_with_reference::<f32>(DType::F32, AdamWConfig::default(), Some(1.0))?;
    let lean = AdamWConfig {
        state: StateOptions {
            moments: MomentDtype::Bf16,
            master: MasterWeights::None,
        },
        ..Default::default()
    };
    bit_exact_with_reference::<f32>(DType::F32, lean, None)
}

#[test]
fn bf16_with_lean_state_is_the_cpu_reference_bit_for_bit() -> R {
    use half::bf16;
    // Default: f32 master weights, nearest even.
    bit_exact_with_reference::<bf16>(DType::BF16, AdamWConfig::default(), Some(1.0))?;
    // llm.c's lean layout: bf16 moments, no master, stochastic rounding (keyed by Var index).
    let lean = AdamWConfig {
        state: StateOptions {
            moments: MomentDtype::Bf16,
            master: MasterWeights::None,
        },
        rounding: Rounding::Stochastic { seed: 11 },
        lr: 1e-2,
        ..Default::default()
    };
    bit_exact_with_reference::<bf16>(DType::BF16, lean, Some(1.0))?;
    bit_exact_with_reference::<half::f16>(DType::F16, lean, None)
}

/// Var `i`'s step count, m and v in a state of f32 moments without master weights (the format
/// of `fusedreg::adamw`: 24 header bytes, u64 lens, u32 steps, m, v).
fn var_state(bytes: &[u8], i: usize) -> (u32, Vec<u8>, Vec<u8>) {
    let t = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let lens: Vec<usize> = (0..t)
        .map(|k| u64::from_le_bytes(bytes[24 + 8 * k..32 + 8 * k].try_into().unwrap()) as usize)
        .collect();
    let steps_at = 24 + 8 * t;
    let step = u32::from_le_bytes(
        bytes[steps_at + 4 * i..steps_at + 4 * i + 4]
            .try_into()
            .unwrap(),
    );
    let total: usize = lens.iter().sum();
    let before: usize = lens[..i].iter().sum();
    let m_at = steps_at + 4 * t + 4 * before;
    let v_at = steps_at + 4 * t + 4 * total + 4 * before;
    (
        step,
        bytes[m_at..m_at + 4 * lens[i]].to_vec(),
        bytes[v_at..v_at + 4 * lens[i]].to_vec(),
    )
}

#[test]
fn skip_flags_leave_every_bit_of_a_var_and_its_state() -> R {
    let (vars, _) = twin_vars(10, DType::F32)?;
    let mut opt = AdamW::new(vars.clone(), our_params(1e-2, 0.1, Some(1.0)))?;
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..3 {
        opt.step(&grads_for(&mut rng, &[&vars[..]], 3.0, DType::F32)?[0])?;
    }
    let before = opt.save_state()?;
    let values_before: Vec<Vec<u32>> = vars.iter().map(bits).collect::<candle_core::Result<_>>()?;
    let mut skip = vec![false; vars.len()];
    skip[0] = true;
    skip[3] = true;
    opt.set_skip(&skip)?;
    opt.step(&grads_for(&mut rng, &[&vars[..]], 3.0, DType::F32)?[0])?;
    let after = opt.save_state()?;
    for (i, v) in vars.iter().enumerate() {
        if v.elem_count() == 0 {
            continue;
        }
        let unchanged =
            bits(v)? == values_before[i] && var_state(&after, i) == var_state(&before, i);
        assert_eq!(unchanged, skip[i], "Var {i}");
    }
    assert_eq!(var_state(&after, 0).0, 3);
    assert_eq!(var_state(&after, 1).0, 4);
    // Cleared: the Var steps again, from its saved state.
    opt.set_skip(&vec![false; vars.len()])?;
    opt.step(&grads_for(&mut rng, &[&vars[..]], 3.0, DType::F32)?[0])?;
    assert_eq!(var_state(&opt.save_state()?, 0).0, 4);
    assert_ne!(bits(&vars[0])?, values_before[0]);
    Ok(())
}

#[test]
fn a_var_without_gradient_skips_the_step() -> R {
    let (vars, twins) = twin_vars(12, DType::F32)?;
    let mut opt = AdamW::new(vars.clone(), our_params(1e-2, 0.1, Some(1.0)))?;
    // The same run with Var 2 skipped explicitly: a missing gradient is the same as a skip.
    let mut explicit = AdamW::new(twins.clone(), our_params(1e-2, 0.1, Some(1.0)))?;
    let mut rng = StdRng::seed_from_u64(13);
    for step in 0..6 {
        let mut g = grads_for(&mut rng, &[&vars[..], &twins[..]], 3.0, DType::F32)?;
        let before = bits(&vars[2])?;
        let missing = step % 2 == 1;
        if missing {
            g[0].remove(vars[2].as_tensor());
        }
        explicit.set_skip(
            &(0..vars.len())
                .map(|i| missing && i == 2)
                .collect::<Vec<_>>(),
        )?;
        opt.step(&g[0])?;
        explicit.step(&g[1])?;
        assert_eq!(bits(&vars[2])? == before, missing, "step {step}");
    }
    assert_eq!(var_state(&opt.save_state()?, 2).0, 3);
    assert_eq!(opt.save_state()?, explicit.save_state()?);
    for (x, y) in vars.iter().zip(&twins) {
        assert_eq!(bits(x)?, bits(y)?);
    }
    Ok(())
}

fn continue_run(dtype: DType, config: AdamWConfig) -> R {
    let (vars, twins) = twin_vars(14, dtype)?;
    let params = AdamWParams {
        config,
        weight_decay: 0.1,
        max_grad_norm: Some(2.0),
    };
    let mut rng = StdRng::seed_from_u64(15);
    let mut uninterrupted = AdamW::grouped(vars.clone(), params)?;
    let mut first = AdamW::grouped(twins.clone(), params)?;
    for _ in 0..5 {
        let g = grads_for(&mut rng, &[&vars[..], &twins[..]], 1.0, dtype)?;
        uninterrupted.step(&g[0])?;
        first.step(&g[1])?;
    }
    // Save (state to a file, values as tensors), then resume in a new optimizer over new Vars.
    let path = std::env::temp_dir().join(format!(
        "fusedreg-candle-adamw-{}-{dtype:?}-{:?}.state",
        std::process::id(),
        config.state
    ));
    first.save(&path)?;
    let resumed_vars: Vec<Var> = twins
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy()?))
        .collect::<candle_core::Result<_>>()?;
    drop(first);
    let mut resumed = AdamW::grouped(resumed_vars.clone(), params)?;
    resumed.load(&path)?;
    std::fs::remove_file(&path)?;
    for _ in 0..5 {
        let g = grads_for(&mut rng, &[&vars[..], &resumed_vars[..]], 1.0, dtype)?;
        uninterrupted.step(&g[0])?;
        resumed.step(&g[1])?;
    }
    assert_eq!(uninterrupted.save_state()?, resumed.save_state()?);
    for (x, y) in vars.iter().zip(&resumed_vars) {
        assert_eq!(bits(x)?, bits(y)?);
    }
    Ok(())
}

#[test]
fn save_load_continue_equals_uninterrupted() -> R {
    continue_run(DType::F32, AdamWConfig::default())?;
    continue_run(DType::BF16, AdamWConfig::default())?;
    continue_run(
        DType::BF16,
        AdamWConfig {
            state: StateOptions {
                moments: MomentDtype::Bf16,
                master: MasterWeights::None,
            },
            rounding: Rounding::Stochastic { seed: 3 },
            ..Default::default()
        },
    )
}

#[test]
fn loading_a_mismatched_state_is_an_error_and_changes_nothing() -> R {
    let (vars, _) = twin_vars(16, DType::F32)?;
    let mut opt = AdamW::new(vars.clone(), AdamWParams::default())?;
    opt.step(&grads_for(&mut StdRng::seed_from_u64(1), &[&vars[..]], 1.0, DType::F32)?[0])?;
    let before = opt.save_state()?;
    // A state of other lengths.
    let other = vec![Var::zeros(3, DType::F32, &Device::Cpu)?];
    let small = AdamW::new(other, AdamWParams::default())?.save_state()?;
    assert!(opt.load_state(&small).is_err());
    // A truncated state.
    assert!(opt.load_state(&before[..before.len() - 1]).is_err());
    assert_eq!(opt.save_state()?, before);
    Ok(())
}

#[test]
fn non_contiguous_gradients_are_copied() -> R {
    let (vars, twins) = twin_vars(17, DType::F32)?;
    let mut a = AdamW::new(vars.clone(), AdamWParams::default())?;
    let mut b = AdamW::new(twins.clone(), AdamWParams::default())?;
    let mut rng = StdRng::seed_from_u64(18);
    let mut ga = GradStore::default();
    let mut gb = GradStore::default();
    for (x, y) in vars.iter().zip(&twins) {
        let dims = x.dims();
        let g = if dims.len() == 2 {
            // [d0, d1] as the transpose of a [d1, d0] tensor: not contiguous.
            tensor(&mut rng, &[dims[1], dims[0]], 1.0)?.t()?
        } else {
            tensor(&mut rng, dims, 1.0)?
        };
        ga.insert(x.as_tensor(), g.clone());
        gb.insert(y.as_tensor(), g.contiguous()?);
    }
    assert!(!ga.get(&vars[0]).unwrap().is_contiguous());
    a.step(&ga)?;
    b.step(&gb)?;
    for (x, y) in vars.iter().zip(&twins) {
        assert_eq!(bits(x)?, bits(y)?);
    }
    Ok(())
}

#[test]
fn bad_input_is_an_error() -> R {
    let dev = Device::Cpu;
    let f32v = || Var::zeros((2, 3), DType::F32, &dev).unwrap();
    let msg = |r: candle_core::Result<AdamW>| r.unwrap_err().to_string();
    // Mixed dtypes, unsupported dtypes.
    let e = msg(AdamW::new(
        vec![f32v(), Var::zeros(3, DType::BF16, &dev)?],
        AdamWParams::default(),
    ));
    assert!(e.contains("dtype"), "{e}");
    for dt in [DType::U32, DType::F64, DType::I64] {
        let e = msg(AdamW::new(
            vec![Var::zeros(3, dt, &dev)?],
            AdamWParams::default(),
        ));
        assert!(e.contains("dtype"), "{e}");
    }
    // The same Var twice (a clone shares its id): refused, naming both positions.
    let tied = f32v();
    let e = msg(AdamW::new(
        vec![tied.clone(), f32v(), tied],
        AdamWParams::default(),
    ));
    assert!(e.contains("Vars 0 and 2 are the same Var"), "{e}");
    // Bad hyperparameters.
    let bad = |f: &dyn Fn(&mut AdamWParams)| {
        let mut p = AdamWParams::default();
        f(&mut p);
        AdamW::new(vec![f32v()], p).is_err()
    };
    assert!(bad(&|p| p.config.lr = -1e-3));
    assert!(bad(&|p| p.config.lr = f32::NAN));
    assert!(bad(&|p| p.config.beta1 = 1.0));
    assert!(bad(&|p| p.config.beta2 = -0.1));
    assert!(bad(&|p| p.config.beta2 = 1.0));
    assert!(bad(&|p| p.config.eps = -1.0));
    assert!(bad(&|p| p.weight_decay = -0.1));
    assert!(bad(&|p| p.weight_decay = f32::INFINITY));
    assert!(bad(&|p| p.max_grad_norm = Some(0.0)));
    assert!(bad(&|p| p.max_grad_norm = Some(f32::NAN)));
    // A learning rate set through the trait is checked by the next step.
    let v = f32v();
    let mut opt = AdamW::new(vec![v.clone()], AdamWParams::default())?;
    let mut g = GradStore::default();
    g.insert(v.as_tensor(), Tensor::ones((2, 3), DType::F32, &dev)?);
    opt.set_learning_rate(-1.0);
    assert!(opt.step(&g).unwrap_err().to_string().contains("lr"));
    opt.set_learning_rate(f64::NAN);
    assert!(opt.step(&g).is_err());
    opt.set_learning_rate(1e-3);
    opt.step(&g)?;
    // A gradient of the wrong shape or dtype; a skip list of the wrong length.
    for bad_grad in [
        Tensor::ones((3, 2), DType::F32, &dev)?,
        Tensor::ones((2, 3), DType::BF16, &dev)?,
    ] {
        let before = bits(&v)?;
        let mut g = GradStore::default();
        g.insert(v.as_tensor(), bad_grad);
        assert!(opt.step(&g).unwrap_err().to_string().contains("gradient"));
        assert_eq!(bits(&v)?, before);
    }
    assert!(opt.set_skip(&[true, false]).is_err());
    assert!(opt.set_max_grad_norm(Some(-1.0)).is_err());
    // No Vars: a step is a no-op (candle's `Optimizer::empty`).
    let mut empty = AdamW::empty(AdamWParams::default())?;
    empty.step(&GradStore::default())?;
    assert!(empty.save_state().is_err());
    Ok(())
}
