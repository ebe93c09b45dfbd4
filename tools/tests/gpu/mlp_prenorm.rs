//! The pre-norm variant of the MLP on the GPU: against the CPU model, launches under a
//! stochastic-depth plan, training, and run-to-run determinism.

use fusedreg::dropout_add_norm::Norm;
use fusedreg::stochastic_depth::{Mode, Plan, Schedule, StochasticDepth};
use fusedreg::Handle;
use fusedreg_tools::mlp::{train_step, DroppedParams, MlpConfig, PreNorm, Trainer};
use libtest_mimic::Trial;

use crate::mlp::{agree_after_one_step, check_step_launches};
use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "mlp_prenorm",
        &[
            (
                "gpu_prenorm_model_matches_cpu_model",
                gpu_prenorm_model_matches_cpu_model,
            ),
            (
                "prenorm_step_launches_only_kept_blocks",
                prenorm_step_launches_only_kept_blocks,
            ),
            (
                "gpu_prenorm_training_reduces_the_loss",
                gpu_prenorm_training_reduces_the_loss,
            ),
            (
                "gpu_prenorm_runs_are_bit_identical",
                gpu_prenorm_runs_are_bit_identical,
            ),
        ],
    )
}

/// A small pre-norm model (hidden 64, 128 tokens) with stochastic depth.
fn small(blocks: usize, norm: Norm, scaling: bool) -> MlpConfig {
    MlpConfig {
        blocks,
        hidden: 64,
        tokens: 128,
        depth: Some(Schedule::Constant(0.5)),
        dropped: DroppedParams::Skip,
        prenorm: Some(PreNorm::new(norm, scaling)),
        ..MlpConfig::cpu()
    }
}

/// A plan with some blocks dropped and some running.
fn mixed_plan(blocks: usize) -> (u64, Plan) {
    let sd = StochasticDepth::new(Schedule::Constant(0.5), blocks, 21, Mode::Batch).unwrap();
    (0..1000)
        .map(|s| (s, sd.plan(s)))
        .find(|(_, p)| p.running() > 1 && p.running() + 1 < blocks && !p.runs(0))
        .unwrap()
}

/// The GPU model computes what the CPU model computes, as the residual model's test
/// (`mlp::gpu_model_matches_cpu_model`): the entries and the exit are bit-exact ops, but the
/// products (cuBLAS vs loops) and GELU's tanh differ in rounding, so not bit for bit. The
/// first loss agrees to 1e-4, after one step the parameters agree except where a gradient is so
/// small that its sign differs (Adam's first step is lr * sign(g)), and the second loss to 1e-3.
/// Both norms, LayerNorm Scaling on, stochastic depth with a plan that drops block 0.
fn gpu_prenorm_model_matches_cpu_model(h: &Handle) -> TestResult {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        let cfg = small(4, norm, true);
        let mut g = Trainer::gpu(h, cfg.clone())?;
        let mut c = Trainer::cpu(cfg.clone())?;
        let (step, plan) = mixed_plan(cfg.blocks);
        let lg = train_step(&mut g.model, &cfg, &plan, step, true)?;
        let lc = train_step(&mut c.model, &cfg, &plan, step, true)?;
        if (lg - lc).abs() > 1e-4 * lc.abs() {
            return Err(format!("{norm:?} first loss: gpu {lg} cpu {lc}").into());
        }
        let tensors = PreNorm::TENSORS * cfg.blocks;
        let slack = |len| len / 100 + 1;
        agree_after_one_step(&mut g, &mut c, tensors, slack, &format!("{norm:?} "))?;
    }
    Ok(())
}

/// Under a plan only the kept blocks launch: per kept block 2 forward (entry, bias-GELU) and 5
/// backward (entry 2, GELU 1, column sum 2) kernels and 6 cuBLAS products; a dropped block
/// none. Plus the exit (dropout-residual: 1 forward, 2 backward), the loss (1) and the clipped
/// AdamW step (3). The column gradients' copies into the tensor set are memcpys, not launches.
fn prenorm_step_launches_only_kept_blocks(h: &Handle) -> TestResult {
    let blocks = 10;
    let cfg = small(blocks, Norm::LayerNorm, true);
    check_step_launches(h, &cfg, mixed_plan(blocks), 7)
}

/// The configuration of the CPU test `mlp_prenorm::prenorm_training_reduces_the_loss` (the
/// example's CPU run: 12 blocks, hidden 48, linear schedule to 0.5): the loss falls as there.
fn gpu_prenorm_training_reduces_the_loss(h: &Handle) -> TestResult {
    for scaling in [true, false] {
        let cfg = MlpConfig {
            blocks: 12,
            prenorm: Some(PreNorm::new(Norm::LayerNorm, scaling)),
            ..MlpConfig::cpu()
        };
        let (first, last) = Trainer::gpu(h, cfg)?.first_and_last_loss(100)?;
        if last.is_nan() || last >= 0.3 * first {
            return Err(format!("scaling {scaling}: loss {first} -> {last}: did not fall").into());
        }
    }
    Ok(())
}

/// Deterministic: two runs from the same seed give the same loss and parameter bits (no float
/// atomics anywhere; cuBLAS is run-to-run reproducible on one GPU). And with one block
/// LayerNorm Scaling's only factor is 1: on and off give the same bits.
fn gpu_prenorm_runs_are_bit_identical(h: &Handle) -> TestResult {
    let run = |cfg: MlpConfig| -> TestResult<(Vec<u64>, Vec<Vec<f32>>)> {
        let tensors = PreNorm::TENSORS * cfg.blocks;
        let mut t = Trainer::gpu(h, cfg)?;
        let losses = (0..4)
            .map(|_| t.step(true).map(f64::to_bits))
            .collect::<fusedreg::Result<Vec<_>>>()?;
        let params = (0..tensors)
            .map(|i| t.model.param(i))
            .collect::<fusedreg::Result<Vec<_>>>()?;
        Ok((losses, params))
    };
    let cfg = small(6, Norm::RmsNorm, true);
    if run(cfg.clone())? != run(cfg)? {
        return Err("two runs from the same seed differ".into());
    }
    if run(small(1, Norm::LayerNorm, true))? != run(small(1, Norm::LayerNorm, false))? {
        return Err("one block: LayerNorm Scaling on and off differ".into());
    }
    Ok(())
}
