//! Stochastic depth for candle modules (`fusedreg::candle::{StochasticDepth, DepthPlan}`) on
//! candle's CPU device (`cargo test -p fusedreg --features candle --test
//! candle_stochastic_depth`): the plan is fusedreg's, keyed by the StepKeys' seed and step; a
//! dropped block is never called (forward nor backward) and its Vars skip the optimizer step with
//! every bit kept; a kept block's branch is scaled by 1 / (1 - p).
#![cfg(feature = "candle")]

use candle_core::{Device, Tensor, Var};
use candle_nn::optim::Optimizer;
use fusedreg::candle::{AdamW, AdamWParams, StepKeys, StochasticDepth};
use fusedreg::stochastic_depth::{self as sd, Mode, Schedule};

type R = candle_core::Result<()>;

#[test]
fn the_plan_is_fusedregs_keyed_by_seed_and_step() -> R {
    let depth = StochasticDepth::new(Schedule::linear(0.5), 12)?;
    let direct = sd::StochasticDepth::new(Schedule::linear(0.5), 12, 99, Mode::Batch).unwrap();
    let mut keys = StepKeys::new(99, 0);
    let mut differs = false;
    for step in 0..50 {
        let plan = depth.plan(&keys)?;
        assert_eq!(plan.plan(), &direct.plan(step));
        assert_eq!(plan, depth.plan(&keys)?);
        for b in 0..12 {
            let p = depth.probabilities()[b];
            let scale = plan.residual_scale(b);
            if plan.runs(b) {
                assert!(
                    (f64::from(scale) - 1.0 / (1.0 - p)).abs() < 1e-6,
                    "block {b}"
                );
            } else {
                assert_eq!(scale, 0.0);
            }
        }
        differs |= plan != depth.plan(&StepKeys::new(100, step))?;
        keys = keys.next_step()?;
    }
    assert!(differs, "another seed gives other plans");
    Ok(())
}

#[test]
fn blocks_drop_at_their_scheduled_rate() -> R {
    let depth = StochasticDepth::new(Schedule::linear(0.6), 3)?; // 0.2, 0.4, 0.6
    let steps = 4000;
    let mut dropped = [0usize; 3];
    for step in 0..steps {
        let plan = depth.plan(&StepKeys::new(5, step))?;
        for (b, d) in dropped.iter_mut().enumerate() {
            *d += usize::from(!plan.runs(b));
        }
    }
    for (b, &d) in dropped.iter().enumerate() {
        let rate = d as f64 / steps as f64;
        let p = depth.probabilities()[b];
        // 5 standard deviations of a binomial over 4000 draws.
        let tol = 5.0 * (p * (1.0 - p) / steps as f64).sqrt();
        assert!(
            (rate - p).abs() < tol,
            "block {b}: dropped {rate}, scheduled {p}"
        );
    }
    Ok(())
}

#[test]
fn eval_plan_runs_every_block_unscaled() -> R {
    let depth = StochasticDepth::new(Schedule::Constant(0.9), 4)?;
    let plan = depth.eval_plan();
    assert_eq!(plan.running(), 4);
    let x = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    let y = plan.residual(2, &x, |h| h.affine(3.0, 1.0))?;
    assert_eq!(y.to_vec1::<f32>()?, vec![5.0, -7.0, 13.0]);
    Ok(())
}

/// A residual stack of `blocks` linear branches `h -> tanh(h W_b + c_b)` over a [4, 6] input,
/// run under `plan`; returns the loss and how many branches were evaluated.
fn stack(
    plan: &fusedreg::candle::DepthPlan,
    x: &Tensor,
    vars: &[Var],
) -> candle_core::Result<(Tensor, usize)> {
    let mut calls = 0;
    let mut h = x.clone();
    for b in 0..vars.len() / 2 {
        let (w, c) = (&vars[2 * b], &vars[2 * b + 1]);
        h = plan.residual(b, &h, |h| {
            calls += 1;
            h.matmul(w)?.broadcast_add(c)?.tanh()
        })?;
    }
    Ok((h.sqr()?.sum_all()?, calls))
}

#[test]
fn dropped_blocks_are_never_run_and_their_vars_keep_every_bit() -> R {
    let dev = Device::Cpu;
    let blocks = 6;
    let mut vars = Vec::new();
    for _ in 0..blocks {
        vars.push(Var::randn(0f32, 0.3, (6, 6), &dev)?);
        vars.push(Var::randn(0f32, 0.3, 6, &dev)?);
    }
    let block_of_var: Vec<Option<usize>> = (0..2 * blocks).map(|i| Some(i / 2)).collect();
    let depth = StochasticDepth::new(Schedule::Constant(0.5), blocks)?;
    let mut opt = AdamW::grouped(vars.clone(), AdamWParams::default())?;
    let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
    let mut keys = StepKeys::new(21, 0);
    let mut saw_drop = false;
    for _ in 0..8 {
        let plan = depth.plan(&keys)?;
        let before: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| v.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        let (loss, calls) = stack(&plan, &x, &vars)?;
        assert_eq!(calls, plan.running(), "only running blocks are evaluated");
        let grads = loss.backward()?;
        let skip = plan.skip_flags(&block_of_var)?;
        for (i, v) in vars.iter().enumerate() {
            // No backward through a dropped block: its Vars have no gradient at all.
            assert_eq!(grads.get(v).is_none(), skip[i], "Var {i}");
        }
        opt.set_skip(&skip)?;
        opt.step(&grads)?;
        for (i, v) in vars.iter().enumerate() {
            let after = v.flatten_all()?.to_vec1::<f32>()?;
            let same = after
                .iter()
                .zip(&before[i])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert_eq!(same, skip[i], "Var {i}");
        }
        saw_drop |= skip.iter().any(|&s| s);
        keys = keys.next_step()?;
    }
    assert!(saw_drop, "some block was dropped in 8 steps at p = 0.5");
    Ok(())
}

#[test]
fn a_kept_block_matches_the_same_computation_in_candle_ops() -> R {
    let dev = Device::Cpu;
    let depth = StochasticDepth::new(Schedule::Constant(0.25), 1)?;
    // Find a step where the block runs.
    let mut step = 0;
    let plan = loop {
        let p = depth.plan(&StepKeys::new(3, step))?;
        if p.runs(0) {
            break p;
        }
        step += 1;
    };
    let w = Var::randn(0f32, 0.5, (5, 5), &dev)?;
    let x = Var::randn(0f32, 1.0, (3, 5), &dev)?;
    let y = plan.residual(0, &x, |h| h.matmul(&w)?.tanh())?;
    let manual = (x.as_tensor() + (x.matmul(&w)?.tanh()? * (1.0 / 0.75))?)?;
    let (gy, gm) = (
        y.sqr()?.sum_all()?.backward()?,
        manual.sqr()?.sum_all()?.backward()?,
    );
    let close = |a: &Tensor, b: &Tensor| -> candle_core::Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    };
    assert!(close(&y, &manual)? < 1e-6);
    assert!(close(gy.get(&w).unwrap(), gm.get(&w).unwrap())? < 1e-5);
    assert!(close(gy.get(&x).unwrap(), gm.get(&x).unwrap())? < 1e-5);
    Ok(())
}

#[test]
fn bad_schedules_are_errors() {
    assert!(StochasticDepth::new(Schedule::linear(1.0), 4).is_err());
    assert!(StochasticDepth::new(Schedule::linear(0.1), 0).is_err());
    assert!(StochasticDepth::new(Schedule::Custom(vec![0.1, 0.2]), 3).is_err());
    assert!(StochasticDepth::new(Schedule::Constant(-0.1), 3).is_err());
}
