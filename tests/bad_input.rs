//! Bad input at every public CPU entry point of the library (issue 17). Each case ends in an
//! `Error`, a documented valid result checked against the CPU reference, or a documented result
//! (named in the case) — never an undocumented panic, a NaN, or a silently wrong value. The test
//! profile runs with overflow checks (`[profile.test] overflow-checks = true`), so arithmetic
//! that wraps shows up here as a panic.
//!
//! GPU entry points: `tests/gpu/bad_input.rs` (ignored without a device). The tools (`report`,
//! `timing`, `mlp`): `tools/tests/tools_bad_input.rs` and `tools/tests/gpu/bad_input.rs`.
//!
//! Entry points covered here, by module:
//!
//! * `philox`: `philox4x32_10`, `block`, `mask_word`, `DropRate::{new, p, threshold,
//!   effective_p, keeps, keeps_all, drops_all, scale}`.
//! * `dropout`: `Config::{new, flat, with_drop_path, len, mask_words, keeps}`,
//!   `DropPath::{new, per_sample, row_scale}`, `slab_rows`, `slab_count`,
//!   `fused_forward_bytes`, `fused_backward_bytes`, `unfused_forward_bytes`,
//!   `unfused_backward_bytes`, `cpu::{forward, forward_inplace, backward}` (every option, with a
//!   residual).
//! * `stochastic_depth`: `Schedule::{probabilities, linear}` (every variant),
//!   `StochasticDepth::{new, plan, eval_plan, rates}`, `Plan::{runs, residual_scale, block,
//!   running, skip_flags}`.
//! * `global_norm`: `check_max_norm`, `check_loss_scale`, `cpu::{global_norm, partials, reduce,
//!   norm_f64, scale}`, `norm_min_bytes`, `scale_min_bytes` (engine section). Not covered:
//!   `cpu::finalize`, a building block that does not validate its scalars (the validating entry
//!   point is `cpu::global_norm`); reported to the engine branch.
//! * `adamw` (section `engine`, kept apart: the engine branch changes this API):
//!   `check_lr`, `AdamWConfig::validate`, `cpu::{CpuTensor::new, step, save_state,
//!   restore_state, bias_corrections, pow_by_squaring}`, `state::{peek, decode,
//!   StateHeader::{total, encoded_len}}`, `multi_tensor::Layout::{new, chunks, num_chunks}`,
//!   `min_bytes`, `clip_step_min_bytes`, `unfused_clip_step_min_bytes`.
//! * `Dtype` conversions of non-finite values (`from_f32_rn` keeps NaN and infinities).
//!
//! The ops added with the redesign walk their own entry points with the same classes (bad and
//! non-finite scalars, length mismatches, overflowing shapes, empty inputs, views at element 1)
//! in their own suites, next to their references:
//!
//! * `dropout`, `dropping`: `tests/dropout.rs::bad_input_is_an_error`,
//!   `tests/gpu/dropout.rs::bad_input_is_an_error` (`Config::{new, with_resolution}`,
//!   `DropPath`, `cpu::{forward, backward}`, the GPU `forward`/`backward`, the unfused baseline).
//! * `bias_act_dropout`: `tests/bias_act_dropout.rs::bad_input_is_an_error` and its GPU twin.
//! * `dropout_add_norm`: `tests/dropout_add_norm.rs::bad_input_is_an_error` (shapes, eps <= 0
//!   or non-finite, non-finite layer scale, stream dtype, row scale with drop path) and its GPU
//!   twin.
//! * `cross_entropy`: `tests/cross_entropy.rs::bad_input_is_an_error` (alpha and z-loss out of
//!   range, shape mismatches, upstream with mean, out-of-range targets: nothing written) and its
//!   GPU twin (out-of-range targets raise the device flag).
//! * `candle` (feature `candle`): `tests/candle_dropout_residual.rs::bad_input_is_an_error`.
//! * `fmath`: total over f32 (NaN, infinities, subnormals), `tests/fmath.rs`.

use fusedreg::dropout::{self as dr, cpu, Config, DropPath};
use fusedreg::dropping::DropRate;
use fusedreg::philox::{block, mask_word, philox4x32_10};
use fusedreg::stochastic_depth::{Mode, Schedule, StochasticDepth};
use fusedreg::{DtypeKind, Error, Result};
use half::{bf16, f16};

/// Bad scalars the probe used for probabilities.
const BAD_P: [f64; 7] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -1e-300,
    -0.5,
    1.0 + f64::EPSILON,
    1e300,
];

/// The input was refused with an argument or shape error (not a driver error, not a panic).
#[track_caller]
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T>) {
    match r {
        Err(Error::InvalidArgument { .. } | Error::ShapeMismatch { .. }) => {}
        other => panic!("{what}: expected InvalidArgument or ShapeMismatch, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// philox
// ------------------------------------------------------------------------------------------

#[test]
fn drop_rate_refuses_bad_probabilities() {
    for p in BAD_P {
        refused(&format!("DropRate::new({p})"), DropRate::new(p));
    }
    // -0.0 compares equal to 0: documented valid, p = 0 (threshold 0, keeps everything).
    let z = DropRate::new(-0.0).unwrap();
    assert_eq!((z.threshold(), z.keeps_all(), z.scale()), (0, true, 1.0));
    // A tiny p rounds to threshold 0: keeps everything, scale 1 (applied p = 0, within 2^-33).
    let tiny = DropRate::new(1e-300).unwrap();
    assert_eq!((tiny.threshold(), tiny.scale()), (0, 1.0));
    // Just below 1 rounds to 2^32 for dropout: drops everything (applied p = 1, documented
    // within 2^-33 of p); the scale stays finite and is never applied.
    let near1 = DropRate::new(1.0 - 2f64.powi(-34)).unwrap();
    assert!(near1.drops_all() && near1.effective_p() == 1.0 && near1.scale().is_finite());
}

#[test]
fn philox_takes_every_64_bit_index() {
    for (seed, call, i) in [(0, 0, 0), (u64::MAX, u64::MAX, u64::MAX), (1, 2, 1 << 63)] {
        assert_eq!(
            mask_word(seed, call, i),
            block(seed, call, i >> 2)[(i & 3) as usize]
        );
    }
    let _ = philox4x32_10([u32::MAX; 4], [u32::MAX; 2]);
}

/// `dropout::cpu::forward` with the residual `r` (the case of the former `dropout_residual`).
fn fwd_r<'a, T: fusedreg::Dtype>(
    cfg: &Config,
    x: &[T],
    r: &'a [T],
    y: &mut [T],
    opts: cpu::ForwardOptions<'a, T>,
) -> fusedreg::Result<()> {
    let opts = cpu::ForwardOptions {
        residual: Some(r),
        ..opts
    };
    cpu::forward(cfg, x, y, opts)
}

// ------------------------------------------------------------------------------------------
// dropout (with a residual: the strictest set of buffers)
// ------------------------------------------------------------------------------------------

#[test]
fn dropout_config_refuses_bad_scalars_and_overflowing_shapes() {
    for p in BAD_P {
        refused("Config::new p", Config::new(4, 4, p, 1, 2));
        refused("Config::flat p", Config::flat(16, p, 1, 2));
        refused("DropPath::new p", DropPath::new(p, 3));
    }
    refused("rows*cols overflow", Config::new(usize::MAX, 2, 0.1, 1, 2));
    refused(
        "rows*cols overflow",
        Config::new(1 << 33, 1 << 33, 0.1, 1, 2),
    );
    refused(
        "per_sample(0)",
        DropPath::new(0.1, 3).unwrap().per_sample(0),
    );
    refused(
        "per_sample(2^32)",
        DropPath::new(0.1, 3).unwrap().per_sample(1 << 32),
    );
    // Huge but representable: no overflow in the derived sizes.
    let big = Config::flat(usize::MAX, 0.5, 1, 2).unwrap();
    assert_eq!(big.mask_words(), usize::MAX.div_ceil(32));
    let _ = big.keeps(u64::MAX); // any 64-bit index is keyed, no panic
}

/// A drop path keys any 64-bit row; a per-sample drop path with the largest sample size maps
/// every row of a sample to one draw.
#[test]
fn drop_path_takes_every_row() {
    let path = DropPath::new(0.5, 11)
        .unwrap()
        .per_sample(u32::MAX as usize)
        .unwrap();
    for row in [0, 1, u64::MAX - 1, u64::MAX] {
        let s = path.row_scale(3, row);
        assert!(s == 0.0 || s == 2.0, "row {row}: {s}");
    }
    assert_eq!(
        path.row_scale(3, 0),
        path.row_scale(3, u64::from(u32::MAX) - 1)
    );
    let cfg = Config::new(2, 3, 0.0, 1, 2).unwrap().with_drop_path(path);
    assert_eq!(cfg.drop_path(), Some(path));
}

#[test]
fn slab_sizes_take_extreme_shapes() {
    for dt in [DtypeKind::F32, DtypeKind::F16, DtypeKind::Bf16] {
        for (rows, cols) in [
            (usize::MAX, usize::MAX),
            (usize::MAX, 1),
            (2, usize::MAX),
            (0, 0),
        ] {
            let s = dr::slab_rows(rows, cols, dt);
            assert!(s >= 1, "slab_rows({rows}, {cols}) = 0");
            assert!(dr::slab_count(rows, cols, dt) <= 65_535, "grid.y limit");
        }
    }
}

/// Issue 17 item 9: the byte helpers saturate at `u64::MAX` near 2^60 – 2^64 elements (they
/// overflowed: a panic with overflow checks, a small wrapped count without).
#[test]
fn dropout_byte_helpers_saturate() {
    for dt in [DtypeKind::F32, DtypeKind::F16, DtypeKind::Bf16] {
        for flag in [false, true] {
            for n in [1u64 << 60, 1 << 61, 1 << 62, u64::MAX - 1, u64::MAX] {
                let all = [
                    dr::fused_forward_bytes(dt, n, flag, flag),
                    dr::fused_forward_bytes(dt, n, !flag, flag),
                    dr::fused_backward_bytes(dt, n, flag),
                    dr::unfused_forward_bytes(dt, n, flag, flag),
                    dr::unfused_forward_bytes(dt, n, flag, !flag),
                    dr::unfused_backward_bytes(dt, n, flag),
                ];
                // Either the exact count or saturated: never below the element count.
                for b in all {
                    assert!(b >= n, "{dt:?} n={n}: {b} bytes wrapped");
                }
            }
            assert_eq!(dr::fused_forward_bytes(dt, u64::MAX, flag, flag), u64::MAX);
            assert_eq!(dr::unfused_backward_bytes(dt, u64::MAX, flag), u64::MAX);
        }
    }
    // Below the limit the formulas are unchanged.
    assert_eq!(
        dr::fused_forward_bytes(DtypeKind::F32, 1 << 40, true, true),
        (12 << 40) + (1 << 37)
    );
}

/// Length mismatches of every buffer, off by one either way and zero, are shape errors.
#[test]
fn dropout_cpu_refuses_length_mismatches() {
    let cfg = Config::new(3, 5, 0.25, 7, 8).unwrap();
    let n = cfg.len();
    let ok = vec![1.5f32; n];
    for bad in [n - 1, n + 1, 0] {
        let b = vec![1.0f32; bad];
        let mut yb = vec![0.0f32; bad];
        let mut y = vec![0.0f32; n];
        refused("x", fwd_r(&cfg, &b, &ok, &mut y, Default::default()));
        refused("residual", fwd_r(&cfg, &ok, &b, &mut y, Default::default()));
        refused("y", fwd_r(&cfg, &ok, &ok, &mut yb, Default::default()));
        refused(
            "inplace x",
            cpu::forward_inplace(&cfg, &b, &mut y, Default::default()),
        );
        refused(
            "inplace r",
            cpu::forward_inplace(&cfg, &ok, &mut yb, Default::default()),
        );
        let mut dx = vec![0.0f32; n];
        refused("dy", cpu::backward(&cfg, &b, &mut dx, Default::default()));
        refused("dx", cpu::backward(&cfg, &ok, &mut yb, Default::default()));
    }
    let mut y = vec![0.0f32; n];
    for cols in [4, 6, 0] {
        let bias = vec![0.5f32; cols];
        let opts = cpu::ForwardOptions {
            bias: Some(&bias),
            ..Default::default()
        };
        refused("bias", fwd_r(&cfg, &ok, &ok, &mut y, opts));
        let mut dbias = vec![0.0f32; cols];
        let opts = cpu::BackwardOptions {
            dbias: Some(&mut dbias),
            ..Default::default()
        };
        refused("dbias", cpu::backward(&cfg, &ok, &mut y, opts));
    }
    for rows in [2, 4, 0] {
        let rs = vec![1.0f32; rows];
        let opts = cpu::ForwardOptions {
            rowscale: Some(&rs),
            ..Default::default()
        };
        refused("rowscale", fwd_r(&cfg, &ok, &ok, &mut y, opts));
        let opts = cpu::BackwardOptions {
            rowscale: Some(&rs),
            ..Default::default()
        };
        refused("bwd rowscale", cpu::backward(&cfg, &ok, &mut y, opts));
    }
    for words in [0, cfg.mask_words() + 1] {
        let mut mask = vec![0u32; words];
        let opts = cpu::ForwardOptions {
            mask_out: Some(&mut mask),
            ..Default::default()
        };
        refused("mask_out", fwd_r(&cfg, &ok, &ok, &mut y, opts));
        let opts = cpu::BackwardOptions {
            mask: Some(&mask),
            ..Default::default()
        };
        refused("mask", cpu::backward(&cfg, &ok, &mut y, opts));
    }
    // A generated row scale needs a drop path; a drop path excludes a caller row scale.
    let mut rs_out = vec![0.0f32; 3];
    let opts = cpu::ForwardOptions {
        rowscale_out: Some(&mut rs_out),
        ..Default::default()
    };
    refused(
        "rowscale_out without drop path",
        fwd_r(&cfg, &ok, &ok, &mut y, opts),
    );
    let with_path = cfg.with_drop_path(DropPath::new(0.5, 9).unwrap());
    let rs = [1.0f32; 3];
    let opts = cpu::ForwardOptions {
        rowscale: Some(&rs),
        ..Default::default()
    };
    refused(
        "rowscale and drop path",
        fwd_r(&with_path, &ok, &ok, &mut y, opts),
    );
}

/// Empty and zero-size tensors are valid: nothing to do, and dbias is zero (the CPU reference's
/// documented result for no rows).
#[test]
fn dropout_cpu_empty_tensors() {
    for (rows, cols) in [(0, 5), (5, 0), (0, 0)] {
        let cfg = Config::new(rows, cols, 0.5, 1, 2).unwrap();
        assert!(cfg.is_empty());
        let mut y: Vec<bf16> = Vec::new();
        let bias = vec![bf16::ONE; cols];
        let opts = cpu::ForwardOptions {
            bias: Some(&bias),
            ..Default::default()
        };
        fwd_r(&cfg, &[], &[], &mut y, opts).unwrap();
        let mut dbias = vec![bf16::from_f32(f32::NAN); cols];
        let opts = cpu::BackwardOptions {
            dbias: Some(&mut dbias),
            ..Default::default()
        };
        cpu::backward::<bf16>(&cfg, &[], &mut [], opts).unwrap();
        assert!(
            dbias.iter().all(|d| d.to_f32() == 0.0),
            "dbias over no rows: {dbias:?}"
        );
    }
}

/// p rounding to 1 (and p = 1) returns the residual's own bits: no NaN from the huge scale.
#[test]
fn dropout_p_rounding_to_one_returns_the_residual() {
    for p in [1.0, 1.0 - 2f64.powi(-34)] {
        let cfg = Config::new(4, 33, p, 5, 6).unwrap();
        let x: Vec<f16> = (0..cfg.len())
            .map(|i| f16::from_f32(i as f32 - 60.0))
            .collect();
        let r: Vec<f16> = (0..cfg.len())
            .map(|i| f16::from_f32(0.25 * i as f32))
            .collect();
        let mut y = vec![f16::ZERO; cfg.len()];
        fwd_r(&cfg, &x, &r, &mut y, Default::default()).unwrap();
        assert_eq!(y, r, "p = {p}");
    }
}

// ------------------------------------------------------------------------------------------
// stochastic_depth
// ------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------
// global_norm (CPU)
// ------------------------------------------------------------------------------------------

#[test]
fn global_norm_refuses_bad_scalars() {
    use fusedreg::global_norm::{check_loss_scale, check_max_norm, cpu as gn};
    let g = [3.0f32, 4.0];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1.0, 0.0] {
        refused("max_norm", check_max_norm(Some(bad)));
        refused("max_norm", gn::global_norm(&[&g[..]], Some(bad), 1.0));
        refused("loss_scale", check_loss_scale(bad));
        refused("loss_scale", gn::global_norm(&[&g[..]], None, bad));
    }
    // Non-finite gradients are data, not arguments: the documented result is the flag, and the
    // norm is not a silent finite value.
    for bad in [f32::NAN, f32::INFINITY] {
        let b = [1.0f32, bad];
        let v = gn::global_norm(&[&b[..]], Some(1.0), 1.0).unwrap();
        assert_eq!(v.nonfinite, 1, "{bad}");
        assert!(!v.is_finite());
    }
    // Gradients finite but whose squares overflow the f32 partials: flagged (documented: the
    // flag is set when the norm is not finite), never a wrong finite norm.
    let huge = [f32::MAX; 4];
    let v = gn::global_norm(&[&huge[..]], Some(1.0), 1.0).unwrap();
    assert_eq!(v.nonfinite, 1, "{v:?}");
}

/// No tensors is an error (documented: "no tensors"); zero-size tensors have norm 0 and
/// coefficient 1 (a valid, finite result).
#[test]
fn global_norm_of_nothing_is_zero() {
    use fusedreg::global_norm::cpu as gn;
    refused("no tensors", gn::global_norm::<f32>(&[], Some(1.0), 1.0));
    let empty: Vec<f32> = Vec::new();
    for list in [vec![&empty[..]], vec![&empty[..], &empty[..]]] {
        let v = gn::global_norm::<f32>(&list, Some(1.0), 1.0).unwrap();
        assert_eq!((v.sumsq, v.norm, v.coef, v.nonfinite), (0.0, 0.0, 1.0, 0));
    }
    assert_eq!(gn::reduce(&[]), 0.0);
    refused("partials of no tensors", gn::partials::<f32>(&[]));
    assert_eq!(
        gn::partials::<f32>(&[&empty[..]]).unwrap(),
        Vec::<f32>::new()
    );
    assert_eq!(gn::norm_f64::<f32>(&[]), 0.0);
    let mut none: [bf16; 0] = [];
    gn::scale(&mut none, 0.5);
}

// ------------------------------------------------------------------------------------------
// dtypes
// ------------------------------------------------------------------------------------------

#[test]
fn dtype_conversions_keep_non_finite_values() {
    use fusedreg::Dtype;
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for got in [bf16::from_f32_rn(v).to_f32(), f16::from_f32_rn(v).to_f32()] {
            assert!(
                got.is_nan() == v.is_nan() && (v.is_nan() || got == v),
                "{v} -> {got}"
            );
        }
    }
    // Out of f16's range rounds to infinity (IEEE), documented by the conversion.
    assert_eq!(f16::from_f32_rn(1e6).to_f32(), f32::INFINITY);
}

// ------------------------------------------------------------------------------------------
// engine: adamw (CPU reference, state save/restore), byte counts of adamw and global_norm.
// Kept apart: the engine branch is changing this API (AdamW owns m, v, master, steps and weight
// decay). The cases of issue 17 items 1, 3, 4, 9 for adamw/global_norm are regression tests
// of that branch's fixes.
// ------------------------------------------------------------------------------------------

mod engine {
    use super::refused;
    use fusedreg::adamw::cpu::{self as acpu, CpuTensor, StepInputs};
    use fusedreg::adamw::{self, state, AdamWConfig};
    use fusedreg::DtypeKind;

    fn tensors() -> Vec<CpuTensor<f32, f32>> {
        (0..3)
            .map(|i| {
                let n = [5, 0, 70_000][i];
                let p = (0..n).map(|j| (j % 17) as f32 * 0.125 - 1.0).collect();
                let g = (0..n).map(|j| (j % 13) as f32 * 0.0625 - 0.375).collect();
                CpuTensor::new(p, g, 0.01).unwrap()
            })
            .collect()
    }

    #[test]
    fn adamw_refuses_bad_hyperparameters() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-3] {
            refused("check_lr", adamw::check_lr(bad));
            let mut t = tensors();
            refused(
                "step lr",
                acpu::step(&mut t, &AdamWConfig::default(), &StepInputs::new(bad), &[]),
            );
            assert_eq!(t, tensors(), "a refused step changed the tensors");
            for cfg in [
                AdamWConfig {
                    lr: bad,
                    ..Default::default()
                },
                AdamWConfig {
                    beta1: bad,
                    ..Default::default()
                },
                AdamWConfig {
                    beta2: bad,
                    ..Default::default()
                },
                AdamWConfig {
                    eps: bad,
                    ..Default::default()
                },
            ] {
                refused("AdamWConfig", cfg.validate());
            }
            refused(
                "weight decay",
                CpuTensor::<f32, f32>::new(vec![1.0], vec![1.0], bad),
            );
        }
        for beta in [1.0, 1.5] {
            refused(
                "beta1",
                AdamWConfig {
                    beta1: beta,
                    ..Default::default()
                }
                .validate(),
            );
            refused(
                "beta2",
                AdamWConfig {
                    beta2: beta,
                    ..Default::default()
                }
                .validate(),
            );
        }
    }

    #[test]
    fn adamw_refuses_length_mismatches() {
        for bad in [4usize, 6, 0] {
            refused(
                "CpuTensor::new",
                CpuTensor::<f32, f32>::new(vec![1.0; 5], vec![0.5; bad], 0.0),
            );
        }
        let cfg = AdamWConfig::default();
        let inputs = StepInputs::new(1e-3);
        refused(
            "no tensors",
            acpu::step::<f32, f32>(&mut [], &cfg, &inputs, &[]),
        );
        for skip in [vec![false; 2], vec![false; 4]] {
            let mut t = tensors();
            refused("skip length", acpu::step(&mut t, &cfg, &inputs, &skip));
        }
        let mut t = tensors();
        t[0].m.pop();
        refused("m length", acpu::step(&mut t, &cfg, &inputs, &[]));
        let mut t = tensors();
        t[2].grad.push(0.0);
        refused("grad length", acpu::step(&mut t, &cfg, &inputs, &[]));
    }

    /// Every truncation and a flip of every header byte is refused, and a refused restore leaves
    /// the tensors as they were. Lengths that differ by one, zero or huge are refused too.
    #[test]
    fn restore_refuses_truncated_and_corrupted_states() {
        let mut a = tensors();
        acpu::step(&mut a, &AdamWConfig::default(), &StepInputs::new(1e-3), &[]).unwrap();
        let bytes = acpu::save_state(&a).unwrap();
        let header = state::peek(&bytes).unwrap();
        let before = tensors();
        let mut b = before.clone();
        for cut in (0..bytes.len()).step_by(997).chain([bytes.len() - 1, 1, 0]) {
            refused("truncated", acpu::restore_state(&mut b, &bytes[..cut]));
            assert!(
                state::decode(&bytes[..cut], &header).is_err(),
                "decode of {cut} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        refused("trailing byte", acpu::restore_state(&mut b, &longer));
        // Header (magic, version, dtype, flags, count) and lengths: a flip of any byte is
        // refused, the tensors untouched.
        for i in 0..24 + 8 * 3 {
            let mut bad = bytes.clone();
            bad[i] ^= 0x5a;
            refused(
                &format!("header byte {i}"),
                acpu::restore_state(&mut b, &bad),
            );
        }
        assert_eq!(b, before, "a refused restore changed the tensors");
        // Counts and lengths that would need absurd allocations are refused before allocating.
        let mut huge = bytes.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        refused("count u64::MAX", state::peek(&huge));
        refused("count u64::MAX", acpu::restore_state(&mut b, &huge));
        let mut huge = bytes.clone();
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        refused("length u64::MAX", acpu::restore_state(&mut b, &huge));
        assert!(state::decode(&huge, &state::peek(&huge).unwrap()).is_err());
        let absurd = state::StateHeader {
            param_dtype: DtypeKind::Bf16,
            lens: vec![u64::MAX; 3],
            options: Default::default(),
        };
        assert_eq!((absurd.total(), absurd.encoded_len()), (u64::MAX, u64::MAX)); // saturate
        for lens in [[5usize, 0, 69_999], [5, 1, 70_000], [0, 0, 70_000]] {
            let mut c: Vec<CpuTensor<f32, f32>> = lens
                .iter()
                .map(|&n| CpuTensor::new(vec![0.5; n], vec![0.0; n], 0.0).unwrap())
                .collect();
            let saved = c.clone();
            refused("lengths", acpu::restore_state(&mut c, &bytes));
            assert_eq!(c, saved);
        }
        refused("garbage", state::peek(&[0xff; 64]));
        refused("empty", state::peek(&[]));
        // The right dtype matters: f32 state into bf16 parameters is refused.
        let mut h: Vec<CpuTensor<half::bf16, f32>> = [5usize, 0, 70_000]
            .iter()
            .map(|&n| CpuTensor::new(vec![half::bf16::ONE; n], vec![0.0; n], 0.0).unwrap())
            .collect();
        refused("dtype", acpu::restore_state(&mut h, &bytes));
    }

    /// The engine's chunk layout: no tensors, and lengths whose chunk counts overflow, are
    /// refused; zero-size tensors own no chunk (documented).
    #[test]
    fn layout_refuses_empty_and_overflowing_lists() {
        use fusedreg::multi_tensor::Layout;
        refused("no tensors", Layout::new(&[]));
        refused("u64::MAX elements", Layout::new(&[u64::MAX]));
        refused("chunk count overflow", Layout::new(&[u64::MAX, u64::MAX]));
        let l = Layout::new(&[0, 1, 0]).unwrap();
        assert_eq!(
            (l.num_tensors(), l.num_chunks(), l.total_elements()),
            (3, 1, 1)
        );
        assert!(l.chunks(0).is_empty() && l.chunks(2).is_empty());
    }

    /// The bias-correction powers take any step count without overflow.
    #[test]
    fn bias_corrections_take_every_step_count() {
        for t in [1, 2, 1 << 20, u32::MAX] {
            let (bc1, bc2) = acpu::bias_corrections(0.9, 0.999, t);
            assert!(
                bc1.is_finite() && bc2.is_finite() && bc1 > 0.0 && bc2 > 0.0,
                "t = {t}"
            );
        }
        assert_eq!(acpu::pow_by_squaring(0.5, u32::MAX), 0.0);
    }

    /// Issue 17 item 1 (intended behaviour): a step from step count `u32::MAX` either refuses
    /// with an Error leaving the tensor unchanged, or steps with saturated bias corrections;
    /// never t = 0 (bias correction 0, NaN parameters) and never a count that wraps to 0.
    #[test]
    fn step_count_at_the_maximum_does_not_wrap() {
        let mut t = tensors();
        for x in &mut t {
            x.step = u32::MAX;
        }
        let before = t.clone();
        match acpu::step(&mut t, &AdamWConfig::default(), &StepInputs::new(1e-3), &[]) {
            Err(_) => assert_eq!(t, before),
            Ok(()) => {
                for x in &t {
                    assert!(x.param.iter().all(|p| p.is_finite()));
                    assert!(
                        x.is_empty() || x.step == u32::MAX,
                        "count wrapped to {}",
                        x.step
                    );
                }
            }
        }
    }

    /// Issue 17 item 3 (intended behaviour): a non-finite `grad_scale` with the flag clear is
    /// refused and changes nothing.
    #[test]
    fn step_refuses_non_finite_grad_scale() {
        for gs in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut t = tensors();
            let inputs = StepInputs {
                grad_scale: gs,
                ..StepInputs::new(1e-3)
            };
            refused(
                "grad_scale",
                acpu::step(&mut t, &AdamWConfig::default(), &inputs, &[]),
            );
            assert_eq!(t, tensors());
        }
    }

    /// Issue 17 item 4 (intended behaviour): a weight decay set to NaN or a huge negative value
    /// after construction is refused by the step (or cannot be set at all).
    #[test]
    fn step_refuses_bad_weight_decay_set_after_new() {
        for wd in [f32::NAN, -1e30] {
            let mut t = tensors();
            t[0].weight_decay = wd;
            refused(
                "weight_decay",
                acpu::step(&mut t, &AdamWConfig::default(), &StepInputs::new(1e-3), &[]),
            );
        }
    }

    /// Issue 17 item 9 for adamw and global_norm (intended behaviour: saturate like the
    /// dropout helpers).
    #[test]
    fn engine_byte_helpers_saturate() {
        use fusedreg::global_norm::{norm_min_bytes, scale_min_bytes};
        for dt in [DtypeKind::F32, DtypeKind::Bf16] {
            for n in [1u64 << 60, 1 << 62, u64::MAX] {
                assert!(norm_min_bytes(n, dt) >= n);
                assert!(scale_min_bytes(n, dt) >= n);
                assert!(adamw::min_bytes(n, dt, dt) >= n);
                assert!(adamw::clip_step_min_bytes(n, dt, dt) >= n);
                assert!(adamw::unfused_clip_step_min_bytes(n, dt, dt) >= n);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// issue 25: the findings of the second probe (item 1, the cross-entropy NaN logit, is tested in
// tests/cross_entropy.rs; item 4, StepKeys, in tests/candle_dropout_residual.rs)
// ------------------------------------------------------------------------------------------

/// Finding 2: `bias_act_dropout::cpu::backward` with no rows and a huge column count allocated
/// its per-column scratch before looking at the sizes ("capacity overflow" at `usize::MAX`, an
/// abort at 2^40). Empty problems now allocate nothing; without `dbias` no scratch is needed.
#[test]
fn bias_act_dropout_backward_allocates_nothing_when_empty() {
    use fusedreg::bias_act_dropout::{cpu as bad, Activation, Config as BConfig, Preact};
    for cols in [1usize << 40, usize::MAX] {
        let cfg = BConfig::new(0, cols, Activation::GeluErf, 0.1, 1, 2).unwrap();
        let pre = Preact::X {
            x: &[][..],
            bias: None,
        };
        bad::backward::<f32>(&cfg, &[], pre, &mut [], None).unwrap();
        let pre_h = Preact::H(&[][..]);
        bad::backward::<bf16>(&cfg, &[], pre_h, &mut [], None).unwrap();
    }
    // No columns, many rows: nothing to do either.
    let cfg = BConfig::new(1 << 40, 0, Activation::Relu, 0.5, 1, 2).unwrap();
    let mut db: [f32; 0] = [];
    let pre = Preact::X {
        x: &[][..],
        bias: Some(&[][..]),
    };
    bad::backward::<f32>(&cfg, &[], pre, &mut [], Some(&mut db)).unwrap();
    // Zero rows with dbias: the column sums are zero.
    let cfg = BConfig::new(0, 5, Activation::Silu, 0.1, 1, 2).unwrap();
    let mut db = [f16::from_f32(f32::NAN); 5];
    let pre = Preact::X {
        x: &[][..],
        bias: Some(&[f16::ONE; 5][..]),
    };
    bad::backward::<f16>(&cfg, &[], pre, &mut [], Some(&mut db)).unwrap();
    assert!(
        db.iter().all(|d| d.to_bits() == 0),
        "dbias over no rows: {db:?}"
    );
}

/// Finding 3: `mask_bit` / `set_mask_bit` past the mask are `None` / an error (they panicked
/// with an index out of bounds); the mask is not changed.
#[test]
fn mask_bits_past_the_mask_are_refused() {
    use fusedreg::dropping::{mask_bit, mask_words, set_mask_bit};
    for words in [0usize, 1, 3] {
        let mut m = vec![0u32; words];
        for i in [words * 32, words * 32 + 1, usize::MAX] {
            assert_eq!(mask_bit(&m, i), None, "{words} words, bit {i}");
            refused(&format!("set bit {i}"), set_mask_bit(&mut m, i));
        }
        assert!(m.iter().all(|&w| w == 0));
        if words > 0 {
            let last = words * 32 - 1;
            set_mask_bit(&mut m, last).unwrap();
            assert_eq!(mask_bit(&m, last), Some(true));
            assert_eq!(m[words - 1], 1 << 31);
        }
    }
    assert_eq!(mask_words(usize::MAX), usize::MAX.div_ceil(32));
}
