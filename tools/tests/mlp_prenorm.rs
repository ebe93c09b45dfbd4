//! The pre-norm variant of the residual MLP on the CPU reference ops: its loss against an
//! independent f64 recomputation of the model (stochastic depth, dropout keying, LayerNorm
//! Scaling, no final norm), its gradients against central differences of that recomputation,
//! training, LayerNorm Scaling on vs off, and bad configurations.

use fusedreg::dropout_add_norm::Norm;
use fusedreg::dropping::{DropRate, Keying};
use fusedreg::stochastic_depth::{Mode, Plan, Schedule, StochasticDepth};
use fusedreg_tools::mlp::{
    forward_backward, train_step, Backend, CpuMlp, DroppedParams, MlpConfig, PreNorm, Trainer,
};

const NORMS: [Norm; 2] = [Norm::LayerNorm, Norm::RmsNorm];

fn tiny(norm: Norm, scaling: bool) -> MlpConfig {
    MlpConfig {
        blocks: 4,
        hidden: 10, // not a multiple of 8: the op's scalar path
        tokens: 5,
        batches: 1,
        dropout: 0.25,
        depth: Some(Schedule::Constant(0.5)),
        prenorm: Some(PreNorm::new(norm, scaling)),
        ..MlpConfig::cpu()
    }
}

/// A plan of the tiny model that drops block 0 and block 2 and runs 1 and 3: the first entry
/// that runs has no earlier output to add, and a dropped block sits between two that run.
fn gappy_plan() -> (u64, Plan) {
    let sd = StochasticDepth::new(Schedule::Constant(0.5), 4, 3, Mode::Batch).unwrap();
    (0..10_000)
        .map(|s| (s, sd.plan(s)))
        .find(|(_, p)| (0..4).map(|l| p.runs(l)).eq([false, true, false, true]))
        .unwrap()
}

fn every_block(blocks: usize) -> Plan {
    StochasticDepth::new(Schedule::Constant(0.0), blocks, 0, Mode::Batch)
        .unwrap()
        .plan(0)
}

fn gelu(u: f64) -> f64 {
    0.5 * u * (1.0 + (0.797_884_560_802_865_4 * (u + 0.044_715 * u * u * u)).tanh())
}

/// The model's loss recomputed in f64 from its definition (module docs of `PreNorm`), with
/// parameters `p` (6 tensors per block). The dropout call of the add of a block's output is the
/// trainer's id of the block whose entry adds it, `(step << 16) | l`, or `(step << 16) | blocks`
/// for the exit.
fn reference_loss(
    cfg: &MlpConfig,
    x: &[f32],
    y: &[f32],
    p: &[Vec<f64>],
    plan: &Plan,
    step: u64,
) -> f64 {
    let (hd, pn) = (cfg.hidden, cfg.prenorm.unwrap());
    let rows = x.len() / hd;
    let rates = StochasticDepth::new(cfg.depth.clone().unwrap(), cfg.blocks, 0, Mode::Batch)
        .unwrap()
        .rates()
        .to_vec();
    // The f32 scales the model uses (of the quantised rates), so only the arithmetic differs.
    let keep_scale = f64::from(DropRate::new(cfg.dropout).unwrap().scale());
    let add = |s: &mut [f64], o: &[f64], j: usize, call: u64| {
        let k = Keying::new("reference", cfg.dropout, cfg.seed, call).unwrap();
        let rs = f64::from(rates[j].scale());
        for (i, si) in s.iter_mut().enumerate() {
            if k.keeps(i as u64) {
                *si += (o[i] + p[6 * j + 3][i % hd]) * keep_scale * rs;
            }
        }
    };
    let linear = |v: &[f64], w: &[f64]| -> Vec<f64> {
        (0..rows * hd)
            .map(|i| {
                (0..hd)
                    .map(|c| v[i / hd * hd + c] * w[i % hd * hd + c])
                    .sum()
            })
            .collect()
    };
    let mut s: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut pending: Option<(Vec<f64>, usize)> = None;
    for l in (0..cfg.blocks).filter(|&l| plan.runs(l)) {
        if let Some((o, j)) = pending.take() {
            add(&mut s, &o, j, (step << 16) | l as u64);
        }
        let lns = if pn.layer_norm_scaling {
            1.0 / ((l + 1) as f64).sqrt()
        } else {
            1.0
        };
        let mut n = vec![0.0; s.len()];
        for r in 0..rows {
            let row = &s[r * hd..(r + 1) * hd];
            let mean = match pn.norm {
                Norm::LayerNorm => row.iter().sum::<f64>() / hd as f64,
                Norm::RmsNorm => 0.0,
            };
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / hd as f64;
            let rstd = 1.0 / (var + f64::from(pn.eps)).sqrt();
            for c in 0..hd {
                let xhat = (row[c] - mean) * rstd;
                n[r * hd + c] = (xhat * p[6 * l + 4][c] + p[6 * l + 5][c]) * lns;
            }
        }
        let mut a = linear(&n, &p[6 * l]);
        for (i, v) in a.iter_mut().enumerate() {
            *v = gelu(*v + p[6 * l + 1][i % hd]);
        }
        pending = Some((linear(&a, &p[6 * l + 2]), l));
    }
    if let Some((o, j)) = pending {
        add(&mut s, &o, j, (step << 16) | cfg.blocks as u64);
    }
    s.iter()
        .zip(y)
        .map(|(a, &b)| (a - f64::from(b)).powi(2))
        .sum::<f64>()
        / s.len() as f64
}

fn params_f64(m: &CpuMlp) -> Vec<Vec<f64>> {
    m.tensors()
        .iter()
        .map(|t| t.param.iter().map(|&v| f64::from(v)).collect())
        .collect()
}

/// The model's forward is the model of the docs: its loss matches the f64 recomputation, with
/// every block running and with blocks dropped, LayerNorm Scaling on and off.
#[test]
fn prenorm_loss_matches_an_f64_recomputation() {
    for norm in NORMS {
        for scaling in [true, false] {
            let cfg = tiny(norm, scaling);
            for (step, plan) in [(0, every_block(4)), gappy_plan()] {
                let mut t = Trainer::cpu(cfg.clone()).unwrap();
                let got = forward_backward(&mut t.model, &cfg, &plan, step, true).unwrap();
                let (x, y) = t.model.data(0).unwrap();
                let want = reference_loss(&cfg, x, y, &params_f64(&t.model), &plan, step);
                assert!(
                    (got - want).abs() <= 1e-5 * want,
                    "{norm:?} scaling {scaling} step {step}: {got} vs f64 {want}"
                );
            }
        }
    }
}

/// Every parameter's gradient against a central difference of the f64 recomputation. Bound:
/// `|g - fd| <= 1e-4 * max|fd| + 1e-3 * |fd|` per tensor kind over the model (the model's
/// gradient is f32 through four blocks; the difference is f64 with h = 1e-6). Tensors of
/// dropped blocks have no gradient, and the recomputation confirms they do not touch the loss.
#[test]
fn prenorm_gradients_match_finite_differences() {
    for norm in NORMS {
        for (step, plan) in [(0, every_block(4)), gappy_plan()] {
            let cfg = tiny(norm, true);
            let mut t = Trainer::cpu(cfg.clone()).unwrap();
            // A few steps first: gamma and beta away from 1 and 0, b2 away from its start.
            for s in 0..3 {
                train_step(&mut t.model, &cfg, &every_block(4), 100 + s, false).unwrap();
            }
            forward_backward(&mut t.model, &cfg, &plan, step, false).unwrap();
            let (x, y) = t.model.data(0).unwrap();
            let base = params_f64(&t.model);
            let h = 1e-6;
            let mut worst = 0.0f64;
            let mut fds = Vec::new();
            for (i, tensor) in base.iter().enumerate() {
                let mut fd = vec![0.0; tensor.len()];
                for (e, f) in fd.iter_mut().enumerate() {
                    let mut p = base.clone();
                    p[i][e] += h;
                    let up = reference_loss(&cfg, x, y, &p, &plan, step);
                    p[i][e] -= 2.0 * h;
                    let down = reference_loss(&cfg, x, y, &p, &plan, step);
                    *f = (up - down) / (2.0 * h);
                }
                fds.push(fd);
            }
            let scale = fds.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
            for (i, fd) in fds.iter().enumerate() {
                let block = i / 6;
                let grad = &t.model.tensors()[i].grad;
                if !plan.runs(block) {
                    assert!(
                        fd.iter().all(|&v| v == 0.0),
                        "dropped block {block} moved the loss"
                    );
                    continue;
                }
                for (e, (&g, &f)) in grad.iter().zip(fd).enumerate() {
                    let err = (f64::from(g) - f).abs();
                    worst = worst.max(err / scale);
                    assert!(
                        err <= 1e-4 * scale + 1e-3 * f.abs(),
                        "{norm:?} step {step}: tensor {i} [{e}]: grad {g} vs fd {f} (scale {scale})"
                    );
                }
            }
            assert!(scale > 0.0 && worst.is_finite());
        }
    }
}

#[test]
fn prenorm_training_reduces_the_loss() {
    for norm in NORMS {
        for scaling in [true, false] {
            let cfg = MlpConfig {
                blocks: 12,
                prenorm: Some(PreNorm::new(norm, scaling)),
                ..MlpConfig::cpu()
            };
            let (first, last) = Trainer::cpu(cfg).unwrap().first_and_last_loss(100).unwrap();
            assert!(
                last.is_finite() && last < 0.3 * first,
                "{norm:?} {scaling}: loss {first} -> {last}"
            );
        }
    }
}

/// With one block the only entry is layer 1, whose scale is exactly 1: on and off agree bit for
/// bit. With four the deeper entries are scaled: the losses differ from the first step.
#[test]
fn layer_norm_scaling_changes_only_deeper_blocks() {
    for norm in NORMS {
        let run = |blocks: usize, scaling: bool| {
            let cfg = MlpConfig {
                blocks,
                ..tiny(norm, scaling)
            };
            let mut t = Trainer::cpu(cfg).unwrap();
            let losses: Vec<u64> = (0..5).map(|_| t.step(true).unwrap().to_bits()).collect();
            (losses, params_f64(&t.model))
        };
        assert_eq!(run(1, true), run(1, false), "{norm:?}: one block");
        let (on, off) = (run(4, true), run(4, false));
        assert_ne!(on.0[0], off.0[0], "{norm:?}: four blocks");
    }
}

/// Dropped blocks' six tensors (gamma and beta too) keep every bit under `Skip`; kept blocks'
/// gamma and beta train. Under `ZeroGrad` the six gradients of a dropped block are zeroed.
#[test]
fn dropped_blocks_keep_gamma_and_beta() {
    let cfg = MlpConfig {
        dropped: DroppedParams::Skip,
        ..tiny(Norm::LayerNorm, true)
    };
    let mut t = Trainer::cpu(cfg.clone()).unwrap();
    let (step, plan) = gappy_plan();
    let before = params_f64(&t.model);
    train_step(&mut t.model, &cfg, &plan, step, false).unwrap();
    let after = params_f64(&t.model);
    for i in 0..6 * cfg.blocks {
        assert_eq!(before[i] == after[i], !plan.runs(i / 6), "tensor {i}");
    }
    // Under ZeroGrad all six gradients of a dropped block are zeroed (after a step that set
    // them), and the kept blocks' are not.
    let cfg = MlpConfig {
        dropped: DroppedParams::ZeroGrad,
        ..cfg
    };
    let mut t = Trainer::cpu(cfg.clone()).unwrap();
    forward_backward(&mut t.model, &cfg, &every_block(4), 0, false).unwrap();
    forward_backward(&mut t.model, &cfg, &plan, step, false).unwrap();
    for (i, tensor) in t.model.tensors().iter().enumerate() {
        let zero = tensor.grad.iter().all(|&g| g == 0.0);
        assert_eq!(zero, !plan.runs(i / 6), "tensor {i}'s gradient");
    }
}

#[test]
fn bad_prenorm_configurations_and_calls_are_errors() {
    for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let p = PreNorm {
            eps,
            ..PreNorm::new(Norm::LayerNorm, true)
        };
        assert!(
            Trainer::cpu(MlpConfig {
                prenorm: Some(p),
                ..tiny(Norm::LayerNorm, true)
            })
            .is_err(),
            "eps {eps}"
        );
    }
    assert!(Trainer::cpu(MlpConfig {
        hidden: 0,
        ..tiny(Norm::RmsNorm, false)
    })
    .is_err());
    let cfg = MlpConfig {
        depth: None,
        ..tiny(Norm::LayerNorm, true)
    };
    let mut t = Trainer::cpu(cfg).unwrap();
    let m = &mut t.model;
    m.begin(0).unwrap();
    assert!(
        m.forward_block(0, 0, 0, true).is_err(),
        "a scale without stochastic depth"
    );
    assert!(m.forward_block(1, 2, 0, false).is_err(), "a later slot");
    assert!(m.forward_block(4, 0, 0, false).is_err(), "no block 4");
    m.forward_block(0, 0, 1, false).unwrap();
    assert!(m.loss(1, 0, true).is_err(), "the loss before the exit");
    assert!(
        m.exit_backward(1, 2, false).is_err(),
        "the exit's backward before its forward"
    );
    assert!(m.exit_forward(5, 2, false).is_err(), "no slot 5");
    m.exit_forward(1, 2, false).unwrap();
    assert!(m.loss(1, 1, true).is_err(), "no batch 1");
    assert!(m.loss(0, 0, true).is_err(), "the exit was from slot 1");
    assert!(m.loss(1, 0, true).unwrap() > 0.0);
    m.begin(0).unwrap();
    assert!(
        m.loss(1, 0, true).is_err(),
        "a new forward: the exit is stale"
    );
}
