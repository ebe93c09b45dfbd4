//! Bad input at every public CPU entry point of the tools (issue 17): the trainer (`mlp`), the
//! report (`report`) and the CPU side of the timing harness (`timing`). Each case ends in an
//! `Error`, a documented valid result checked against the CPU reference, or a documented result
//! named in the case — never an undocumented panic, a NaN, or a silently wrong value. The test
//! profile runs with overflow checks (the workspace's `[profile.test]`).
//!
//! GPU entry points of the tools (`mlp::gpu`, `timing::{filled, copy_bandwidth, time_gpu,
//! BatchTimer}`): `tests/gpu/bad_input.rs` of this crate (ignored without a device). The
//! library's entry points: `tests/bad_input.rs` at the repository root.
//!
//! Entry points covered here:
//!
//! * `mlp`: `gelu`, `gelu_grad`, `cpu::{bias_gelu_fwd, bias_gelu_bwd, colsum, mse_grad,
//!   linear_fwd, linear_bwd_input, linear_bwd_weight}`, `gpu::{colsum_scratch_len,
//!   mse_scratch_len}`, `Trainer::cpu` with `MlpConfig` (every checked field), `train_step`.
//! * `report`: `Measurement::new`, `Report::{new_cpu, push}`, `commit`.
//! * `timing`: `Samples::{median, min, max}`, `TimingPlan`, `gb_per_s`,
//!   `CopyBandwidth::reference_gbps`.

use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
use fusedreg::{Error, Result};
use fusedreg_tools::mlp::{cpu, gelu, gelu_grad, gpu, train_step, MlpConfig, Trainer};
use fusedreg_tools::timing::{gb_per_s, Samples};

#[track_caller]
fn refused<T>(what: &str, r: Result<T>) {
    match r {
        Err(Error::InvalidArgument { .. } | Error::ShapeMismatch { .. }) => {}
        Err(other) => panic!("{what}: expected InvalidArgument or ShapeMismatch, got {other:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// Issue 17 item 7: `colsum(&[], 0, usize::MAX)` passed the shape check (0 x anything = 0) and
/// then panicked with "capacity overflow". Now an error; a zero-row sum of a sane width is the
/// documented zeros.
#[test]
fn colsum_of_no_rows_with_impossible_width_is_an_error() {
    refused(
        "colsum(&[], 0, usize::MAX)",
        cpu::colsum(&[], 0, usize::MAX),
    );
    refused(
        "colsum(&[], 0, isize::MAX)",
        cpu::colsum(&[], 0, isize::MAX as usize),
    );
    assert_eq!(cpu::colsum(&[], 0, 7).unwrap(), vec![0.0; 7]);
    assert_eq!(cpu::colsum(&[], 0, 0).unwrap(), Vec::<f32>::new());
    refused("rows*cols overflow", cpu::colsum(&[1.0], usize::MAX, 2));
    for len in [5, 7, 0] {
        refused("colsum length", cpu::colsum(&vec![1.0; len], 2, 3));
    }
}

#[test]
fn scratch_lengths_saturate() {
    assert_eq!(gpu::colsum_scratch_len(2, usize::MAX), usize::MAX);
    assert_eq!(gpu::colsum_scratch_len(usize::MAX, usize::MAX), usize::MAX);
    assert_eq!(gpu::colsum_scratch_len(0, usize::MAX), 0);
    assert_eq!(gpu::mse_scratch_len(usize::MAX), usize::MAX.div_ceil(4096));
}

#[test]
fn mlp_cpu_refuses_length_mismatches() {
    let h = vec![0.5f32; 6];
    let mut out = vec![0.0f32; 6];
    for cols in [0usize, 4, 5] {
        let bias = vec![0.1f32; cols];
        refused(
            "bias_gelu_fwd bias",
            cpu::bias_gelu_fwd(&h, &bias, &mut out),
        );
        refused(
            "bias_gelu_bwd bias",
            cpu::bias_gelu_bwd(&h, &bias, &h, &mut out),
        );
    }
    let bias = vec![0.1f32; 3];
    for n in [5usize, 7, 0] {
        let mut o = vec![0.0f32; n];
        refused("bias_gelu_fwd out", cpu::bias_gelu_fwd(&h, &bias, &mut o));
        refused(
            "bias_gelu_bwd da",
            cpu::bias_gelu_bwd(&h, &bias, &vec![1.0; n], &mut out),
        );
        refused("mse target", cpu::mse_grad(&h, &vec![0.0; n], &mut out));
        refused("mse dy", cpu::mse_grad(&h, &h, &mut o));
    }
    // The MSE of nothing is undefined (not NaN): an error, as on the GPU.
    refused("mse of nothing", cpu::mse_grad(&[], &[], &mut []));
    // Linear layers: x not whole rows, weights of the wrong size, zero widths.
    let w = vec![0.25f32; 3 * 2]; // [out 3, in 2]
    let mut y = vec![0.0f32; 3 * 2];
    refused(
        "linear x rows",
        cpu::linear_fwd(&[1.0; 5], &w, &mut y, 2, 3),
    );
    refused(
        "linear w",
        cpu::linear_fwd(&[1.0; 4], &w[..5], &mut y, 2, 3),
    );
    refused("linear in = 0", cpu::linear_fwd(&[], &[], &mut y, 0, 3));
    refused(
        "linear y",
        cpu::linear_fwd(&[1.0; 4], &w, &mut y[..5], 2, 3),
    );
    let mut dx = vec![0.0f32; 4];
    refused(
        "bwd_input dy rows",
        cpu::linear_bwd_input(&[1.0; 5], &w, &mut dx, 2, 3, false),
    );
    refused(
        "bwd_input dx",
        cpu::linear_bwd_input(&[1.0; 6], &w, &mut dx[..3], 2, 3, true),
    );
    let mut dw = vec![0.0f32; 6];
    refused(
        "bwd_weight x",
        cpu::linear_bwd_weight(&[1.0; 6], &[1.0; 5], &mut dw, 2, 3),
    );
    refused(
        "bwd_weight dw",
        cpu::linear_bwd_weight(&[1.0; 6], &[1.0; 4], &mut dw[..5], 2, 3),
    );
}

/// GELU of non-finite inputs: NaN stays NaN (data, not a scalar argument), infinities go to
/// their limits; finite inputs never give NaN (the tanh form saturates).
#[test]
fn gelu_takes_extreme_inputs() {
    assert!(gelu(f32::NAN).is_nan());
    assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
    for u in [f32::MAX, f32::MIN, 1e20, -1e20, f32::MIN_POSITIVE, -0.0] {
        assert!(!gelu(u).is_nan(), "gelu({u}) is NaN");
    }
    for u in [1e3, -1e3, 30.0, -30.0] {
        assert!(gelu_grad(u).is_finite(), "gelu_grad({u})");
    }
}

#[test]
fn trainer_refuses_bad_configs() {
    let base = MlpConfig::cpu;
    for bad in [f64::NAN, f64::INFINITY, -0.1, 1.5] {
        refused(
            "dropout",
            Trainer::cpu(MlpConfig {
                dropout: bad,
                ..base()
            }),
        );
    }
    for bad in [f32::NAN, f32::INFINITY, -1.0, 0.0] {
        refused(
            "max_norm",
            Trainer::cpu(MlpConfig {
                max_norm: bad,
                ..base()
            }),
        );
    }
    refused(
        "blocks 0",
        Trainer::cpu(MlpConfig {
            blocks: 0,
            ..base()
        }),
    );
    refused(
        "hidden 0",
        Trainer::cpu(MlpConfig {
            hidden: 0,
            ..base()
        }),
    );
    refused(
        "tokens 0",
        Trainer::cpu(MlpConfig {
            tokens: 0,
            ..base()
        }),
    );
    refused(
        "batches 0",
        Trainer::cpu(MlpConfig {
            batches: 0,
            ..base()
        }),
    );
    refused(
        "hidden x tokens",
        Trainer::cpu(MlpConfig {
            hidden: 1 << 20,
            tokens: 1 << 20,
            ..base()
        }),
    );
    refused(
        "hidden x tokens overflow",
        Trainer::cpu(MlpConfig {
            hidden: usize::MAX,
            tokens: usize::MAX,
            ..base()
        }),
    );
    refused(
        "weight decay",
        Trainer::cpu(MlpConfig {
            weight_decay: f32::NAN,
            ..base()
        }),
    );
    let mut adamw = base().adamw;
    adamw.lr = f32::NAN;
    refused("adamw lr", Trainer::cpu(MlpConfig { adamw, ..base() }));
    // A stochastic-depth schedule that rounds to "always dropped" (issue 17 item 2).
    refused(
        "depth",
        Trainer::cpu(MlpConfig {
            depth: Some(Schedule::Constant(1.0 - 2f64.powi(-34))),
            ..base()
        }),
    );
}

/// A plan for another block count would silently run a different network: refused.
#[test]
fn train_step_refuses_a_plan_of_another_size() {
    let cfg = MlpConfig {
        blocks: 2,
        depth: None,
        ..MlpConfig::cpu()
    };
    let mut t = Trainer::cpu(cfg.clone()).unwrap();
    for blocks in [1, 3, 5] {
        let sd = StochasticDepth::new(Schedule::Constant(0.0), blocks, 0, Mode::Batch).unwrap();
        refused(
            &format!("plan of {blocks} blocks"),
            train_step(&mut t.model, &cfg, &sd.plan(0), 0, true),
        );
    }
    // The model's own plan is fine.
    let sd = StochasticDepth::new(Schedule::Constant(0.0), 2, 0, Mode::Batch).unwrap();
    assert!(train_step(&mut t.model, &cfg, &sd.plan(0), 0, true)
        .unwrap()
        .is_finite());
}

/// The timing summaries of no samples are documented: the median is NaN ("NaN when empty"),
/// min and max the fold identities. Bandwidth of a zero time is infinite, not a panic.
#[test]
fn timing_summaries_of_nothing() {
    let empty = Samples::default();
    assert!(empty.median().is_nan());
    assert_eq!(
        (empty.min(), empty.max()),
        (f64::INFINITY, f64::NEG_INFINITY)
    );
    assert_eq!(gb_per_s(1e9, 0.0), f64::INFINITY);
    let one = Samples {
        ms: vec![f64::NAN, 1.0, 2.0],
        batch: 1,
    };
    assert!(one.median().is_finite() || one.median().is_nan());
}

#[test]
fn report_takes_odd_rows() {
    use fusedreg_tools::report::{Measurement, Report, Row};
    let mut r = Report::new_cpu(true);
    r.push(Row::new("op", "", 0, Measurement::new(0.5, 0.0)));
    r.push(Row::new(
        "op",
        "huge",
        u64::MAX,
        Measurement::new(1e-9, u64::MAX as f64),
    ));
    let json = r.to_json();
    assert!(json.contains("\"huge\""), "{json}");
    assert!(r.to_svg().contains("</svg>"));
}
