//! The end-to-end residual MLP on the CPU reference ops (the CPU run of the `train_mlp`
//! example), and the training loop's handling of stochastic-depth plans.

use fusedreg::adamw;
use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
use fusedreg::Result;
use fusedreg_tools::mlp::{train_step, Backend, DroppedParams, MlpConfig, Trainer};

#[test]
fn cpu_training_reduces_the_loss() {
    let mut t = Trainer::cpu(MlpConfig::cpu()).unwrap();
    let (first, last) = t.first_and_last_loss(60).unwrap();
    assert!(first.is_finite() && last.is_finite());
    assert!(last < 0.6 * first, "loss {first} -> {last}: did not fall");
}

/// The CPU model of `blocks` blocks, each dropped with probability 0.5, whose dropped blocks'
/// parameters are `dropped`.
fn half_dropped(blocks: usize, dropped: DroppedParams) -> MlpConfig {
    MlpConfig {
        blocks,
        depth: Some(Schedule::Constant(0.5)),
        dropped,
        ..MlpConfig::cpu()
    }
}

/// Records what the loop asked of the model.
#[derive(Default)]
struct Recorder {
    forward: Vec<usize>,
    backward: Vec<usize>,
    zeroed: Vec<usize>,
    skip: Vec<bool>,
    inputs: Vec<(usize, usize)>,
}

impl Backend for Recorder {
    fn begin(&mut self, _batch: usize) -> Result<()> {
        Ok(())
    }
    fn forward_block(&mut self, l: usize, input: usize, _call: u64, _scale: bool) -> Result<()> {
        self.forward.push(l);
        self.inputs.push((l, input));
        Ok(())
    }
    fn loss(&mut self, _output: usize, _batch: usize, _want: bool) -> Result<f64> {
        Ok(0.0)
    }
    fn backward_block(&mut self, l: usize, input: usize, _call: u64, _scale: bool) -> Result<()> {
        self.backward.push(l);
        assert!(
            self.inputs.contains(&(l, input)),
            "backward of block {l} with another input"
        );
        Ok(())
    }
    fn zero_grads(&mut self, l: usize) -> Result<()> {
        self.zeroed.push(l);
        Ok(())
    }
    fn optimizer_step(&mut self, skip: &[bool]) -> Result<()> {
        self.skip = skip.to_vec();
        Ok(())
    }
}

#[test]
fn dropped_blocks_get_no_work_forward_or_backward() {
    let blocks = 12;
    let sd = StochasticDepth::new(Schedule::Constant(0.5), blocks, 3, Mode::Batch).unwrap();
    let plan = sd.plan(4);
    let kept: Vec<usize> = (0..blocks).filter(|&l| plan.runs(l)).collect();
    assert!(
        !kept.is_empty() && kept.len() < blocks,
        "pick a plan with both kinds of block"
    );
    for dropped in [DroppedParams::Skip, DroppedParams::ZeroGrad] {
        let cfg = half_dropped(blocks, dropped);
        let mut r = Recorder::default();
        train_step(&mut r, &cfg, &plan, 4, false).unwrap();
        assert_eq!(r.forward, kept);
        let mut back = kept.clone();
        back.reverse();
        assert_eq!(r.backward, back);
        // A block's input is the output of the last block before it that ran.
        for &(l, input) in &r.inputs {
            let want = (0..l).rev().find(|&j| plan.runs(j)).map_or(0, |j| j + 1);
            assert_eq!(input, want, "block {l}");
        }
        let dropped_blocks: Vec<usize> = (0..blocks).rev().filter(|&l| !plan.runs(l)).collect();
        match dropped {
            DroppedParams::Skip => {
                assert!(r.zeroed.is_empty());
                for (i, &s) in r.skip.iter().enumerate() {
                    assert_eq!(s, !plan.runs(i / 4), "tensor {i}");
                }
            }
            DroppedParams::ZeroGrad => {
                assert_eq!(r.zeroed, dropped_blocks);
                assert!(r.skip.iter().all(|&s| !s));
            }
        }
    }
}

/// On the CPU reference: skipped blocks keep every parameter bit; zero-gradient blocks move
/// (momentum from earlier steps) exactly as AdamW with g = 0.
#[test]
fn skip_and_zero_grad_on_the_cpu_reference() {
    let blocks = 4;
    for dropped in [DroppedParams::Skip, DroppedParams::ZeroGrad] {
        let cfg = half_dropped(blocks, dropped);
        let mut t = Trainer::cpu(cfg.clone()).unwrap();
        // A few steps with everything running build up momentum.
        let all = StochasticDepth::new(Schedule::Constant(0.0), blocks, 0, Mode::Batch)
            .unwrap()
            .plan(0);
        for s in 0..3 {
            train_step(&mut t.model, &cfg, &all, s, false).unwrap();
        }
        let sd = StochasticDepth::new(Schedule::Constant(0.5), blocks, 11, Mode::Batch).unwrap();
        let plan = (3..100)
            .map(|s| sd.plan(s))
            .find(|p| p.running() > 0 && p.running() < blocks)
            .unwrap();
        let before: Vec<Vec<f32>> = (0..4 * blocks).map(|i| t.model.param(i).to_vec()).collect();
        let states = t.model.tensors().to_vec();
        train_step(&mut t.model, &cfg, &plan, 3, false).unwrap();
        for i in 0..4 * blocks {
            let same = t.model.param(i) == before[i].as_slice();
            let runs = plan.runs(i / 4);
            match (dropped, runs) {
                (_, true) => assert!(
                    !same,
                    "{dropped:?}: tensor {i} of a kept block did not move"
                ),
                (DroppedParams::Skip, false) => assert!(same, "skipped tensor {i} moved"),
                (DroppedParams::ZeroGrad, false) => {
                    // Exactly one AdamW step with a zero gradient, from the state before.
                    let mut want = vec![states[i].clone()];
                    want[0].grad.fill(0.0);
                    adamw::cpu::step(
                        &mut want,
                        &cfg.adamw,
                        &adamw::cpu::StepInputs::new(cfg.adamw.lr),
                        &[],
                    )
                    .unwrap();
                    assert!(!same, "zero-grad tensor {i} did not move");
                    assert_eq!(t.model.param(i), want[0].param.as_slice(), "tensor {i}");
                    assert_eq!(t.model.tensors()[i].m, want[0].m, "tensor {i} m");
                }
            }
        }
    }
}

/// The configuration the GPU test trains (tests/gpu/mlp.rs), on the CPU: the loss falls enough.
#[test]
fn gpu_test_configuration_learns_on_the_cpu() {
    let cfg = MlpConfig {
        blocks: 6,
        hidden: 64,
        tokens: 128,
        depth: Some(Schedule::linear(0.5)),
        ..MlpConfig::cpu()
    };
    let (first, last) = Trainer::cpu(cfg).unwrap().first_and_last_loss(60).unwrap();
    assert!(last < 0.6 * first, "loss {first} -> {last}");
}

/// Bad shapes and indices are errors, not panics.
#[test]
fn bad_shapes_and_indices_are_errors() {
    use fusedreg_tools::mlp::cpu;
    let mut out = vec![0.0; 6];
    assert!(cpu::bias_gelu_fwd(&[1.0; 6], &[], &mut out).is_err());
    assert!(cpu::bias_gelu_fwd(&[1.0; 6], &[0.0; 4], &mut out).is_err());
    assert!(cpu::linear_fwd(&[1.0; 6], &[1.0; 6], &mut out, 0, 3).is_err());
    assert!(cpu::linear_fwd(&[1.0; 6], &[1.0; 5], &mut out, 3, 2).is_err());
    assert!(cpu::linear_bwd_input(&[1.0; 6], &[1.0; 6], &mut out, 3, 0, false).is_err());
    assert!(cpu::linear_bwd_weight(&[1.0; 6], &[1.0; 5], &mut out, 3, 2).is_err());
    assert!(cpu::colsum(&[1.0; 5], 2, 3).is_err());
    assert!(cpu::colsum(&[1.0; 5], usize::MAX, 2).is_err());
    assert!(cpu::mse_grad(&[1.0; 3], &[1.0; 2], &mut out).is_err());
    let mut t = Trainer::cpu(MlpConfig {
        blocks: 2,
        ..MlpConfig::cpu()
    })
    .unwrap();
    assert!(t.model.begin(99).is_err());
    assert!(t.model.forward_block(5, 0, 0, false).is_err());
    assert!(t.model.forward_block(1, 2, 0, false).is_err());
    assert!(t.model.zero_grads(2).is_err());
    let mut no_depth = Trainer::cpu(MlpConfig {
        blocks: 2,
        depth: None,
        ..MlpConfig::cpu()
    })
    .unwrap();
    assert!(
        no_depth.model.forward_block(0, 0, 0, true).is_err(),
        "a scale without stochastic depth"
    );
    let huge = MlpConfig {
        tokens: 1 << 20,
        hidden: 1 << 12,
        ..MlpConfig::cpu()
    };
    assert!(
        Trainer::cpu(huge).is_err(),
        "tokens x hidden beyond cuBLAS's 32-bit sizes"
    );
}
