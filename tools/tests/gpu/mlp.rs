//! The MLP example's kernels and cuBLAS layers against their CPU references.

use fusedreg::adamw::cpu::{self as adamw_cpu, CpuTensor};
use fusedreg::stochastic_depth::{Mode, Plan, Schedule, StochasticDepth};
use fusedreg::Handle;
use fusedreg_tools::mlp::{
    cpu, gpu, train_step, CpuMlp, DroppedParams, GpuMlp, MlpConfig, Trainer,
};
use libtest_mimic::Trial;

use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "mlp",
        &[
            ("bias_gelu_matches_cpu", bias_gelu_matches_cpu),
            ("colsum_and_mse_bit_exact", colsum_and_mse_bit_exact),
            ("linear_layers_match_cpu", linear_layers_match_cpu),
            (
                "training_step_launches_only_kept_blocks",
                training_step_launches_only_kept_blocks,
            ),
            ("gpu_model_matches_cpu_model", gpu_model_matches_cpu_model),
            (
                "gpu_training_reduces_the_loss",
                gpu_training_reduces_the_loss,
            ),
            (
                "dropped_block_parameters_skip_or_zero_grad",
                dropped_block_parameters_skip_or_zero_grad,
            ),
        ],
    )
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn bias_gelu_matches_cpu(h: &Handle) -> TestResult {
    let (rows, cols) = (37, 129);
    let mut r = rng(11);
    let x: Vec<f32> = uniform(&mut r, rows * cols, -4.0, 4.0);
    let b: Vec<f32> = uniform(&mut r, cols, -1.0, 1.0);
    let da: Vec<f32> = uniform(&mut r, rows * cols, -1.0, 1.0);
    let s = h.stream();
    let (dx, db, dda) = (s.clone_htod(&x)?, s.clone_htod(&b)?, s.clone_htod(&da)?);
    let mut out = s.clone_htod(&vec![f32::NAN; rows * cols])?;
    gpu::bias_gelu_fwd(h, &dx, &db, &mut out)?;
    let got = s.clone_dtoh(&out)?;
    let mut want = vec![0.0; rows * cols];
    cpu::bias_gelu_fwd(&x, &b, &mut want)?;
    // CUDA's tanhf and libm's tanh differ in the last ulps.
    close("bias_gelu fwd", &f64s(&got), &f64s(&want), 1e-6, 1e-5)?;
    gpu::bias_gelu_bwd(h, &dx, &db, &dda, &mut out)?;
    let got = s.clone_dtoh(&out)?;
    cpu::bias_gelu_bwd(&x, &b, &da, &mut want)?;
    close("bias_gelu bwd", &f64s(&got), &f64s(&want), 1e-6, 1e-5)?;
    Ok(())
}

fn colsum_and_mse_bit_exact(h: &Handle) -> TestResult {
    let s = h.stream();
    let mut r = rng(12);
    for (rows, cols) in [(1, 5), (4096, 96), (70_001, 3)] {
        let x: Vec<f32> = uniform(&mut r, rows * cols, -1.0, 1.0);
        let dx = s.clone_htod(&x)?;
        let mut scratch = s.alloc_zeros::<f32>(gpu::colsum_scratch_len(rows, cols))?;
        let mut out = s.clone_htod(&vec![f32::NAN; cols])?;
        gpu::colsum(h, &dx, rows, &mut scratch, &mut out)?;
        bits_eq(
            &format!("colsum [{rows}, {cols}]"),
            &s.clone_dtoh(&out)?,
            &cpu::colsum(&x, rows, cols)?,
        )?;
    }
    for n in [1usize, 4095, 4097, 300_007] {
        let y: Vec<f32> = uniform(&mut r, n, -2.0, 2.0);
        let t: Vec<f32> = uniform(&mut r, n, -2.0, 2.0);
        let (dy_, dt) = (s.clone_htod(&y)?, s.clone_htod(&t)?);
        let mut ddy = s.clone_htod(&vec![f32::NAN; n])?;
        let mut part = s.alloc_zeros::<f32>(gpu::mse_scratch_len(n))?;
        gpu::mse_grad(h, &dy_, &dt, &mut ddy, &mut part)?;
        let loss = gpu::mse_from_partials(h, &part, n)?;
        let mut want = vec![0.0; n];
        let want_loss = cpu::mse_grad(&y, &t, &mut want)?;
        bits_eq(&format!("mse dy n={n}"), &s.clone_dtoh(&ddy)?, &want)?;
        if loss.to_bits() != want_loss.to_bits() {
            return Err(format!("mse loss n={n}: gpu {loss} cpu {want_loss}").into());
        }
    }
    Ok(())
}

fn linear_layers_match_cpu(h: &Handle) -> TestResult {
    let blas = gpu::Blas::new(h)?;
    let s = h.stream();
    let (t, inp, out) = (33, 48, 20);
    let mut r = rng(13);
    let x: Vec<f32> = uniform(&mut r, t * inp, -1.0, 1.0);
    let w: Vec<f32> = uniform(&mut r, out * inp, -1.0, 1.0);
    let dy: Vec<f32> = uniform(&mut r, t * out, -1.0, 1.0);
    let (dx_, dw_, ddy) = (s.clone_htod(&x)?, s.clone_htod(&w)?, s.clone_htod(&dy)?);
    let mut y = s.clone_htod(&vec![f32::NAN; t * out])?;
    blas.linear_fwd(&dx_, &dw_, &mut y, inp, out)?;
    let mut want = vec![0.0; t * out];
    cpu::linear_fwd(&x, &w, &mut want, inp, out)?;
    close(
        "linear fwd",
        &f64s(&s.clone_dtoh(&y)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )?;
    let init: Vec<f32> = uniform(&mut r, t * inp, -1.0, 1.0);
    let mut gx = s.clone_htod(&init)?;
    blas.linear_bwd_input(&ddy, &dw_, &mut gx, inp, out, true)?;
    let mut want = init.clone();
    cpu::linear_bwd_input(&dy, &w, &mut want, inp, out, true)?;
    close(
        "linear bwd input (accumulate)",
        &f64s(&s.clone_dtoh(&gx)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )?;
    let mut gw = s.clone_htod(&vec![f32::NAN; out * inp])?;
    blas.linear_bwd_weight(&ddy, &dx_, &mut gw, inp, out)?;
    let mut want = vec![0.0; out * inp];
    cpu::linear_bwd_weight(&dy, &x, &mut want, inp, out)?;
    close(
        "linear bwd weight",
        &f64s(&s.clone_dtoh(&gw)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )?;
    Ok(())
}

/// A small model for the GPU training tests.
fn small(blocks: usize, dropped: DroppedParams) -> MlpConfig {
    MlpConfig {
        blocks,
        hidden: 64,
        tokens: 128,
        depth: Some(Schedule::Constant(0.5)),
        dropped,
        ..MlpConfig::cpu()
    }
}

/// A plan with some blocks dropped and some running.
fn mixed_plan(blocks: usize) -> (u64, Plan) {
    let sd = StochasticDepth::new(Schedule::Constant(0.5), blocks, 21, Mode::Batch).unwrap();
    (0..1000)
        .map(|s| (s, sd.plan(s)))
        .find(|(_, p)| p.running() > 1 && p.running() + 1 < blocks)
        .unwrap()
}

/// Forward + backward + optimizer under a plan launch exactly the kept blocks' kernels: per kept
/// block 2 forward (bias-GELU, dropout-residual) and 5 backward (dropout-residual 2, GELU 1,
/// column sum 2) kernels and 6 cuBLAS products; a dropped block none. Plus the loss (1) and the
/// clipped AdamW step (3).
fn training_step_launches_only_kept_blocks(h: &Handle) -> TestResult {
    let blocks = 10;
    let cfg = small(blocks, DroppedParams::Skip);
    check_step_launches(h, &cfg, mixed_plan(blocks), 4)
}

/// One training step of a GPU model of `cfg` under `plan` (at `step`) launches exactly 7
/// kernels and 6 cuBLAS products per block that runs, none for a dropped block, and `fixed`
/// kernels more (the loss, the optimizer, an exit).
pub fn check_step_launches(
    h: &Handle,
    cfg: &MlpConfig,
    (step, plan): (u64, Plan),
    fixed: u64,
) -> TestResult {
    let mut t = Trainer::gpu(h, cfg.clone())?;
    let (kept, blocks) = (plan.running() as u64, cfg.blocks);
    let (l0, g0) = (h.launch_count(), t.model.gemm_count());
    train_step(&mut t.model, cfg, &plan, step, false)?;
    let (launches, gemms) = (h.launch_count() - l0, t.model.gemm_count() - g0);
    if launches != 7 * kept + fixed || gemms != 6 * kept {
        return Err(format!(
            "{kept} of {blocks} blocks ran: {launches} launches and {gemms} GEMMs, expected {} and {}",
            7 * kept + fixed,
            6 * kept
        ).into());
    }
    Ok(())
}

/// The GPU model computes what the CPU model computes: the first loss agrees to float rounding
/// (different summation orders in the products), and after one step the parameters agree except
/// where a gradient is so small that its sign differs (Adam's first step is lr * sign(g)).
fn gpu_model_matches_cpu_model(h: &Handle) -> TestResult {
    let cfg = MlpConfig {
        depth: None,
        ..small(3, DroppedParams::Skip)
    };
    let mut g = Trainer::gpu(h, cfg.clone())?;
    let mut c = Trainer::cpu(cfg.clone())?;
    let (lg, lc) = (g.step(true)?, c.step(true)?);
    if (lg - lc).abs() > 1e-4 * lc.abs() {
        return Err(format!("first loss: gpu {lg} cpu {lc}").into());
    }
    agree_after_one_step(&mut g, &mut c, 4 * cfg.blocks, |len| len / 100, "")
}

/// After one step of each: the first `tensors` parameter tensors of the GPU and the CPU model
/// agree within 1e-5 but for at most `slack(len)` elements of each (where a gradient is so small
/// that its sign differs: Adam's first step is lr * sign(g)), and the second step's losses
/// agree within 1e-3. `what` prefixes the messages.
pub fn agree_after_one_step(
    g: &mut Trainer<GpuMlp>,
    c: &mut Trainer<CpuMlp>,
    tensors: usize,
    slack: fn(usize) -> usize,
    what: &str,
) -> TestResult {
    for i in 0..tensors {
        let gp = g.model.param(i)?;
        let cp = c.model.param(i);
        let off = gp
            .iter()
            .zip(cp)
            .filter(|(a, b)| (**a - **b).abs() > 1e-5)
            .count();
        if off > slack(gp.len()) {
            return Err(format!(
                "{what}tensor {i}: {off} of {} parameters differ after one step",
                gp.len()
            )
            .into());
        }
    }
    let (lg, lc) = (g.step(true)?, c.step(true)?);
    if (lg - lc).abs() > 1e-3 * lc.abs() {
        return Err(format!("{what}second loss: gpu {lg} cpu {lc}").into());
    }
    Ok(())
}

/// The example's schedule (linear to 0.5) at a small size: the loss falls as on the CPU.
fn gpu_training_reduces_the_loss(h: &Handle) -> TestResult {
    let cfg = MlpConfig {
        depth: Some(Schedule::linear(0.5)),
        ..small(6, DroppedParams::Skip)
    };
    let (first, last) = Trainer::gpu(h, cfg)?.first_and_last_loss(60)?;
    if last.is_nan() || last >= 0.6 * first {
        return Err(format!("loss {first} -> {last}: did not fall").into());
    }
    Ok(())
}

/// Dropped blocks' tensors: with Skip every bit of parameters, moments and step counts stays;
/// with ZeroGrad they take exactly the CPU reference's AdamW step with a zero gradient.
fn dropped_block_parameters_skip_or_zero_grad(h: &Handle) -> TestResult {
    let blocks = 6;
    for dropped in [DroppedParams::Skip, DroppedParams::ZeroGrad] {
        let cfg = small(blocks, dropped);
        let mut t = Trainer::gpu(h, cfg.clone())?;
        let all = StochasticDepth::new(Schedule::Constant(0.0), blocks, 0, Mode::Batch)
            .unwrap()
            .plan(0);
        for s in 0..3 {
            train_step(&mut t.model, &cfg, &all, s, false)?;
        }
        let (step, plan) = mixed_plan(blocks);
        let (set, opt) = (t.model.set(), t.model.optimizer());
        let read = |v: cudarc::driver::CudaView<'_, f32>| h.stream().clone_dtoh(&v);
        let mut before = Vec::new();
        for i in 0..4 * blocks {
            let mut ct = CpuTensor::new(
                read(set.param(i)?)?,
                vec![0.0; set.layout().lens()[i] as usize],
                opt.weight_decay(i),
            )?;
            ct.m = read(opt.exp_avg(i)?)?;
            ct.v = read(opt.exp_avg_sq(i)?)?;
            ct.step = 3;
            before.push(ct);
        }
        train_step(&mut t.model, &cfg, &plan, step, false)?;
        let (set, opt) = (t.model.set(), t.model.optimizer());
        for (i, b) in before.iter().enumerate() {
            if plan.runs(i / 4) {
                continue;
            }
            let (p, m) = (read(set.param(i)?)?, read(opt.exp_avg(i)?)?);
            let want = match dropped {
                DroppedParams::Skip => b.clone(),
                DroppedParams::ZeroGrad => {
                    let mut w = vec![b.clone()];
                    adamw_cpu::step(
                        &mut w,
                        &cfg.adamw,
                        &adamw_cpu::StepInputs::new(cfg.adamw.lr),
                        &[],
                    )?;
                    w.pop().unwrap()
                }
            };
            bits_eq(&format!("{dropped:?} tensor {i} param"), &p, &want.param)?;
            bits_eq(&format!("{dropped:?} tensor {i} m"), &m, &want.m)?;
        }
    }
    Ok(())
}
