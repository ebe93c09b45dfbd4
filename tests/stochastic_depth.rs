//! Stochastic depth schedules and plans (CPU only: plans are computed on the host).

mod common;

use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
use fusedreg::Error;

#[test]
fn linear_schedule_follows_huang() {
    let p = Schedule::linear(0.5).probabilities(24).unwrap();
    assert_eq!(p.len(), 24);
    assert_eq!(p[23], 0.5);
    assert!((p[0] - 0.5 / 24.0).abs() < 1e-15);
    // Expected fraction of running blocks: 1 - mean(p) = 1 - 0.5 * 25 / 48 (about 3/4).
    let mean: f64 = p.iter().sum::<f64>() / 24.0;
    assert!((mean - 0.5 * 25.0 / 48.0).abs() < 1e-12);
}

#[test]
fn linspace_schedule_follows_timm() {
    let p = Schedule::Linspace { rate: 0.2 }.probabilities(5).unwrap();
    let want = [0.0, 0.05, 0.1, 0.15, 0.2];
    for (a, b) in p.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{p:?}");
    }
    assert_eq!(
        Schedule::Linspace { rate: 0.2 }.probabilities(1).unwrap(),
        vec![0.2]
    );
}

#[test]
fn constant_and_custom_schedules() {
    assert_eq!(
        Schedule::Constant(0.25).probabilities(3).unwrap(),
        vec![0.25; 3]
    );
    let custom = Schedule::Custom(vec![0.0, 0.9, 0.3]);
    assert_eq!(custom.probabilities(3).unwrap(), vec![0.0, 0.9, 0.3]);
    assert!(matches!(
        custom.probabilities(4),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn invalid_probabilities_are_errors() {
    for bad in [1.0, -0.1, f64::NAN, f64::INFINITY] {
        let e = Schedule::Constant(bad).probabilities(2).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "p = {bad}: {e}");
        assert!(StochasticDepth::new(Schedule::Custom(vec![0.1, bad]), 2, 0, Mode::Batch).is_err());
    }
    assert!(Schedule::linear(1.0).probabilities(3).is_err());
    assert!(Schedule::linear(0.5).probabilities(0).is_err());
}

#[test]
fn plans_are_deterministic_and_vary_with_step_and_seed() {
    let sd = StochasticDepth::new(Schedule::Constant(0.5), 64, 99, Mode::Batch).unwrap();
    assert_eq!(sd.plan(5), sd.plan(5));
    assert_ne!(sd.plan(5), sd.plan(6));
    let other = StochasticDepth::new(Schedule::Constant(0.5), 64, 100, Mode::Batch).unwrap();
    assert_ne!(sd.plan(5), other.plan(5));
}

#[test]
fn batch_mode_drop_rates_match_the_schedule() {
    let blocks = 24;
    let sd = StochasticDepth::new(Schedule::linear(0.5), blocks, 2024, Mode::Batch).unwrap();
    let probs = Schedule::linear(0.5).probabilities(blocks).unwrap();
    let steps = 20_000u64;
    let mut dropped = vec![0u64; blocks];
    for step in 0..steps {
        let plan = sd.plan(step);
        for (l, d) in dropped.iter_mut().enumerate() {
            if !plan.runs(l) {
                *d += 1;
                assert_eq!(plan.residual_scale(l), 0.0);
            } else {
                assert_eq!(plan.residual_scale(l), (1.0 / (1.0 - probs[l])) as f32);
            }
        }
    }
    for (l, (&d, &p)) in dropped.iter().zip(&probs).enumerate() {
        let n = steps as f64;
        let sigma = (n * p * (1.0 - p)).sqrt();
        assert!(
            (d as f64 - n * p).abs() <= 5.0 * sigma + 1.0,
            "block {l}: dropped {d} of {steps}, expected {:.0} +- {:.0}",
            n * p,
            5.0 * sigma
        );
    }
}

#[test]
fn row_mode_runs_every_block_with_distinct_draws() {
    let sd = StochasticDepth::new(Schedule::Linspace { rate: 0.3 }, 8, 5, Mode::Row).unwrap();
    let a = sd.plan(10);
    let b = sd.plan(11);
    assert_eq!(a.running(), 8);
    // Block 0 has p = 0: no row drop at all.
    assert!(a.block(0).unwrap().row_drop.is_none());
    let mut calls = Vec::new();
    for plan in [&a, &b] {
        for l in 1..8 {
            let rd = plan
                .block(l)
                .unwrap()
                .row_drop
                .expect("p > 0 blocks drop rows");
            assert_eq!(plan.residual_scale(l), 1.0);
            assert!((rd.p - 0.3 * l as f64 / 7.0).abs() < 1e-12);
            calls.push(rd.call);
        }
    }
    let n = calls.len();
    calls.sort_unstable();
    calls.dedup();
    assert_eq!(
        calls.len(),
        n,
        "row-drop call ids repeat across blocks or steps"
    );
}

#[test]
fn eval_plan_runs_everything_unscaled_and_skip_flags_follow_the_plan() {
    let sd = StochasticDepth::new(Schedule::Constant(0.5), 16, 1, Mode::Batch).unwrap();
    let eval = sd.eval_plan();
    assert!((0..16).all(|l| eval.runs(l) && eval.residual_scale(l) == 1.0));
    let plan = sd.plan(42);
    assert!(
        plan.running() < 16,
        "p = 0.5 over 16 blocks dropped nothing (probability 2^-16)"
    );
    let owners: Vec<Option<usize>> = (0..40)
        .map(|i| if i < 32 { Some(i / 2) } else { None })
        .collect();
    let flags = plan.skip_flags(&owners);
    for (i, f) in flags.iter().enumerate() {
        assert_eq!(*f, i < 32 && !plan.runs(i / 2));
    }
    assert!(!plan.runs(16), "out-of-range blocks do not run");
}

// ------------------------------------------------------------------------------------------
// Bad input (issue 17): bad schedules and probabilities, out-of-range blocks (moved from
// tests/bad_input.rs, which keeps what is not one op's).
// ------------------------------------------------------------------------------------------

mod bad_input {
    use crate::common::{refused, BAD_P};
    use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};

    /// Issue 17 item 2: a probability that passes `p < 1` but rounds to the threshold 2^32 would
    /// drop its block at every step (residual scale 0). Refused; the largest accepted p keeps the
    /// block able to run.
    #[test]
    fn stochastic_depth_refuses_p_that_rounds_to_always_dropped() {
        for p in [
            1.0 - 2f64.powi(-34),
            1.0 - 2f64.powi(-33),
            1.0 - f64::EPSILON,
        ] {
            refused(
                &format!("Constant({p})"),
                StochasticDepth::new(Schedule::Constant(p), 3, 0, Mode::Batch),
            );
            refused(
                &format!("Row Constant({p})"),
                StochasticDepth::new(Schedule::Constant(p), 3, 0, Mode::Row),
            );
            refused(
                "Linear",
                StochasticDepth::new(Schedule::linear(p), 1, 0, Mode::Batch),
            );
            refused(
                "Custom",
                StochasticDepth::new(Schedule::Custom(vec![0.0, p]), 2, 0, Mode::Batch),
            );
        }
        // The largest p below 1 - 2^-33: threshold 2^32 - 1, so some draw keeps the block.
        let p = f64::from_bits((1.0 - 2f64.powi(-33)).to_bits() - 1);
        let sd = StochasticDepth::new(Schedule::Constant(p), 2, 0, Mode::Batch).unwrap();
        let rate = sd.rates()[0];
        assert!(rate.threshold() < 1 << 32 && rate.keeps(u32::MAX) && !rate.drops_all());
        assert!(rate.scale().is_finite() && rate.scale() > 0.0);
    }

    #[test]
    fn stochastic_depth_refuses_bad_schedules() {
        for p in BAD_P {
            refused(
                "Constant",
                StochasticDepth::new(Schedule::Constant(p), 4, 0, Mode::Batch),
            );
            refused(
                "Linear",
                StochasticDepth::new(Schedule::linear(p), 4, 0, Mode::Batch),
            );
            refused(
                "Linspace",
                StochasticDepth::new(Schedule::Linspace { rate: p }, 4, 0, Mode::Row),
            );
            refused(
                "Custom",
                StochasticDepth::new(Schedule::Custom(vec![0.1, p]), 2, 0, Mode::Batch),
            );
        }
        refused(
            "p = 1",
            StochasticDepth::new(Schedule::Constant(1.0), 4, 0, Mode::Batch),
        );
        for len in [0, 3, 5] {
            refused(
                "custom length",
                StochasticDepth::new(Schedule::Custom(vec![0.1; len]), 4, 0, Mode::Batch),
            );
        }
        refused(
            "no blocks",
            StochasticDepth::new(Schedule::Constant(0.1), 0, 0, Mode::Batch),
        );
        refused(
            "2^20 + 1 blocks",
            StochasticDepth::new(Schedule::Constant(0.1), (1 << 20) + 1, 0, Mode::Batch),
        );
        refused(
            "usize::MAX blocks",
            Schedule::Constant(0.1).probabilities(usize::MAX),
        );
    }

    /// Out-of-range block indices: documented results (a block past the last does not run, has
    /// scale 0 and no plan; a tensor naming one is skipped), never a panic.
    #[test]
    fn stochastic_depth_out_of_range_blocks() {
        let sd = StochasticDepth::new(Schedule::Constant(0.0), 4, 0, Mode::Batch).unwrap();
        for plan in [sd.plan(u64::MAX), sd.eval_plan()] {
            assert_eq!(plan.running(), 4);
            for l in [4, usize::MAX] {
                assert!(!plan.runs(l));
                assert_eq!(plan.residual_scale(l), 0.0);
                assert!(plan.block(l).is_none());
            }
            assert_eq!(
                plan.skip_flags(&[None, Some(3), Some(4), Some(usize::MAX)]),
                vec![false, false, true, true]
            );
            assert!(plan.skip_flags(&[]).is_empty());
        }
    }
}
