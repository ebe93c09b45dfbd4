//! Rows for the optimizer ops: the global norm, the AdamW step and the clip + AdamW step, each
//! fused against the unfused PyTorch-foreach / DeepSpeed way, on real parameter lists.

use fusedreg::adamw::{
    self, cpu, unfused, AdamW, AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions,
};
use fusedreg::global_norm::{self, cpu as norm_cpu, GlobalNorm};
use fusedreg::multi_tensor::TensorSet;
use fusedreg::{Dtype, Handle, Result};
use fusedreg_tools::report::models::{self, ParamShape};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::random;
use half::bf16;

use crate::Ctx;

super::case!(run);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    match ctx.handle.clone() {
        Some(h) => {
            let mut list = vec![("gpt2-124m", models::gpt2_124m())];
            if !ctx.quick {
                list.push(("llama-1b", models::llama_1b()));
            }
            for (name, shapes) in &list {
                gpu_model::<f32>(ctx, &h, name, "f32", shapes)?;
                gpu_model::<bf16>(ctx, &h, name, "bf16+master", shapes)?;
            }
            // The lean layouts next to the default: bf16 moments with and without f32 master.
            let gpt2 = &list[0].1;
            let m16 = MomentDtype::Bf16;
            for (label, master) in [
                ("bf16 m,v bf16+master", MasterWeights::F32),
                ("bf16 m,v bf16 no master", MasterWeights::None),
            ] {
                let state = StateOptions {
                    moments: m16,
                    master,
                };
                gpu_lean(ctx, &h, &format!("gpt2-124m {label}"), gpt2, state)?;
            }
            // Host time per step does not grow with the tensor count: one launch either way.
            let tiny: Vec<ParamShape> = (0..10_000)
                .map(|i| ParamShape {
                    name: format!("t{i}"),
                    elements: 1 + (i * 37) % 500,
                    weight_decay: 0.01,
                })
                .collect();
            gpu_model::<f32>(ctx, &h, "10k tiny tensors", "f32", &tiny)?;
        }
        None => cpu_model(ctx, "gpt2-tiny", &models::gpt2_tiny())?,
    }
    Ok(())
}

fn gpu_set<T: Dtype>(h: &Handle, shapes: &[ParamShape]) -> Result<TensorSet> {
    let mut b = TensorSet::builder(h);
    for (i, s) in shapes.iter().enumerate() {
        // Random parameters and gradients (seeded per tensor), so stochastic rounding and every
        // data-dependent branch see real data; a constant fill would send every lane one way.
        let seed = 0xad00_0000 + 2 * i as u64;
        b.push(
            random::<T>(h, s.elements, seed, -0.1, 0.1)?,
            random::<T>(h, s.elements, seed + 1, -0.01, 0.01)?,
        )?;
    }
    b.build()
}

fn gpu_model<T: Dtype>(
    ctx: &mut Ctx,
    h: &Handle,
    model: &str,
    label: &str,
    shapes: &[ParamShape],
) -> Result<()> {
    let case = format!("{model} {label}");
    if !["global_norm", "adamw", "clip+adamw"]
        .iter()
        .any(|op| ctx.wants(op, &case))
    {
        return Ok(());
    }
    ctx.progress("optimizer", &case);
    let params: u64 = shapes.iter().map(|s| s.elements as u64).sum();
    let kind = T::KIND;
    let mut set = gpu_set::<T>(h, shapes)?;
    let wds: Vec<f32> = shapes.iter().map(|s| s.weight_decay).collect();
    let opt = AdamW::new(&set, AdamWConfig::default(), &wds)?;
    // A threshold below the norm: every step clips, so the unfused scale pass always writes.
    let mut norm = GlobalNorm::new(&set, Some(1e-7))?;
    let plan = ctx.plan;
    let note = format!("{} tensors", shapes.len());

    if ctx.wants("global_norm", &case) {
        let bytes = global_norm::norm_min_bytes(params, kind) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || norm.compute(&set))?;
        let base = Measurement::gpu(h, plan, bytes, || {
            unfused::global_norm(&set, &norm).map(|_| ())
        })?;
        ctx.push(
            Row::new("global_norm", &case, params, fused)
                .with_unfused(base)
                .note(format!("{note}; unfused: per-tensor + host read")),
        );
    }
    if ctx.wants("adamw", &case) {
        let bytes = adamw::min_bytes(params, kind, kind) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || opt.step(&mut set, None))?;
        let base = Measurement::gpu(h, plan, bytes, || unfused::step(&opt, &mut set).map(|_| ()))?;
        ctx.push(
            Row::new("adamw", &case, params, fused)
                .with_unfused(base)
                .note(format!("{note}; unfused: one launch per tensor")),
        );
    }
    if ctx.wants("clip+adamw", &case) {
        let bytes = adamw::clip_step_min_bytes(params, kind, kind) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || opt.clip_and_step(&mut set, &mut norm))?;
        let base = Measurement::gpu(h, plan, bytes, || {
            unfused::clip_and_step(&opt, &mut set, &mut norm).map(|_| ())
        })?;
        ctx.push(
            Row::new("clip+adamw", &case, params, fused)
                .with_unfused(base)
                .note(format!(
                    "{note}; unfused: norm, host sync, scale pass, per-tensor AdamW"
                )),
        );
    }
    Ok(())
}

/// One `adamw` row with a lean state layout on bf16 parameters and gradients, fused against the
/// per-tensor launches of the same layout.
fn gpu_lean(
    ctx: &mut Ctx,
    h: &Handle,
    case: &str,
    shapes: &[ParamShape],
    state: StateOptions,
) -> Result<()> {
    if !ctx.wants("adamw", case) {
        return Ok(());
    }
    ctx.progress("optimizer", case);
    let params: u64 = shapes.iter().map(|s| s.elements as u64).sum();
    let kind = fusedreg::DtypeKind::Bf16;
    let mut set = gpu_set::<bf16>(h, shapes)?;
    let wds: Vec<f32> = shapes.iter().map(|s| s.weight_decay).collect();
    // Without master weights the parameter update is rounded stochastically (llm.c's scheme,
    // the module's advice): the row includes its Philox work.
    let no_master = state.master == MasterWeights::None;
    let cfg = AdamWConfig {
        state,
        rounding: if no_master {
            Rounding::Stochastic { seed: 42 }
        } else {
            Rounding::NearestEven
        },
        ..AdamWConfig::default()
    };
    let opt = AdamW::new(&set, cfg, &wds)?;
    let bytes = adamw::min_bytes_with(params, kind, kind, state) as f64;
    let plan = ctx.plan;
    let fused = Measurement::gpu(h, plan, bytes, || opt.step(&mut set, None))?;
    let base = Measurement::gpu(h, plan, bytes, || unfused::step(&opt, &mut set).map(|_| ()))?;
    ctx.push(
        Row::new("adamw", case, params, fused)
            .with_unfused(base)
            .note(format!(
                "{} tensors; {} B/param{}; unfused: one launch per tensor",
                shapes.len(),
                bytes / params as f64,
                if no_master {
                    ", stochastic rounding"
                } else {
                    ""
                }
            )),
    );
    Ok(())
}

fn cpu_model(ctx: &mut Ctx, model: &str, shapes: &[ParamShape]) -> Result<()> {
    let case = format!("{model} f32");
    ctx.progress("optimizer (CPU)", &case);
    let params: u64 = shapes.iter().map(|s| s.elements as u64).sum();
    let mut tensors = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = |k: usize| ((i * 7919 + k * 104_729) % 2000) as f32 * 1e-5 - 0.01;
            cpu::CpuTensor::new(
                (0..s.elements).map(v).collect(),
                (0..s.elements).map(|k| v(k + 1)).collect(),
                s.weight_decay,
            )
        })
        .collect::<Result<Vec<cpu::CpuTensor<f32, f32>>>>()?;
    let cfg = AdamWConfig::default();
    let plan = ctx.plan;
    let kind = fusedreg::DtypeKind::F32;

    if ctx.wants("global_norm", &case) {
        let bytes = global_norm::norm_min_bytes(params, kind) as f64;
        let m = Measurement::cpu(plan, bytes, || {
            let grads: Vec<&[f32]> = tensors.iter().map(|t| &t.grad[..]).collect();
            std::hint::black_box(norm_cpu::global_norm(&grads, Some(1.0), 1.0).expect("norm"));
        });
        ctx.push(Row::new("global_norm", &case, params, m).note("CPU reference"));
    }
    if ctx.wants("adamw", &case) {
        let bytes = adamw::min_bytes(params, kind, kind) as f64;
        let m = Measurement::cpu(plan, bytes, || {
            cpu::step(&mut tensors, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).expect("step")
        });
        ctx.push(Row::new("adamw", &case, params, m).note("CPU reference"));
    }
    if ctx.wants("clip+adamw", &case) {
        let bytes = adamw::clip_step_min_bytes(params, kind, kind) as f64;
        let fused = Measurement::cpu(plan, bytes, || {
            let grads: Vec<&[f32]> = tensors.iter().map(|t| &t.grad[..]).collect();
            let v = norm_cpu::global_norm(&grads, Some(1.0), 1.0).expect("norm");
            cpu::step(
                &mut tensors,
                &cfg,
                &cpu::StepInputs::from_norm(cfg.lr, &v),
                &[],
            )
            .expect("step");
        });
        let base = Measurement::cpu(plan, bytes, || {
            let grads: Vec<&[f32]> = tensors.iter().map(|t| &t.grad[..]).collect();
            let v = norm_cpu::global_norm(&grads, Some(1.0), 1.0).expect("norm");
            for t in tensors.iter_mut() {
                norm_cpu::scale(&mut t.grad, v.coef);
            }
            cpu::step(&mut tensors, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).expect("step");
        });
        ctx.push(
            Row::new("clip+adamw", &case, params, fused)
                .with_unfused(base)
                .note("CPU reference; unfused scales the gradients in a separate pass"),
        );
    }
    Ok(())
}
