//! CPU tests of the AdamW reference: against a plain f64 AdamW, validation, skip flags, the
//! non-finite flag, zero-size tensors, the state format, resuming, and stochastic rounding.

mod common;

use common::{bits_eq, check, close, rng};
use fusedreg::adamw::{self, cpu, state, AdamWConfig, Rounding};
use fusedreg::{Dtype, DtypeKind};
use half::{bf16, f16};
use rand::Rng;

type T32 = cpu::CpuTensor<f32, f32>;

use common::{adamw_tensors as tensors, new_grads};

/// PyTorch's AdamW formula, plainly, in f64.
struct F64Tensor {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    wd: f64,
}

fn f64_step(x: &mut F64Tensor, g: &[f64], cfg: &AdamWConfig, lr: f64, gscale: f64) {
    let (b1, b2, eps) = (
        f64::from(cfg.beta1),
        f64::from(cfg.beta2),
        f64::from(cfg.eps),
    );
    x.t += 1;
    let bc1 = 1.0 - b1.powi(x.t);
    let bc2 = 1.0 - b2.powi(x.t);
    for i in 0..x.p.len() {
        let g = g[i] * gscale;
        x.p[i] -= lr * x.wd * x.p[i];
        x.m[i] = b1 * x.m[i] + (1.0 - b1) * g;
        x.v[i] = b2 * x.v[i] + (1.0 - b2) * g * g;
        x.p[i] -= lr / bc1 * x.m[i] / (x.v[i].sqrt() / bc2.sqrt() + eps);
    }
}

fn widen<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn matches_f64<P: Dtype, G: Dtype>(seed: u64) {
    let sizes = [0, 1, 7, 1000, 4099, 0];
    let mut ts = tensors::<P, G>(seed, &sizes);
    let mut refs: Vec<F64Tensor> = ts
        .iter()
        .map(|t| F64Tensor {
            p: match &t.master {
                Some(m) => m.iter().map(|&x| f64::from(x)).collect(),
                None => widen(&t.param),
            },
            m: vec![0.0; t.len()],
            v: vec![0.0; t.len()],
            t: 0,
            wd: f64::from(t.weight_decay),
        })
        .collect();
    let cfg = AdamWConfig {
        lr: 3e-3,
        ..Default::default()
    };
    let gscale = 0.75f32;
    for s in 0..7 {
        new_grads(&mut ts, seed * 100 + s);
        let inputs = cpu::StepInputs {
            lr: cfg.lr,
            grad_scale: gscale,
            nonfinite: false,
        };
        cpu::step(&mut ts, &cfg, &inputs, &[]).unwrap();
        for (t, x) in ts.iter().zip(refs.iter_mut()) {
            if !t.is_empty() {
                f64_step(
                    x,
                    &widen(&t.grad),
                    &cfg,
                    f64::from(cfg.lr),
                    f64::from(gscale),
                );
            }
        }
    }
    for (i, (t, x)) in ts.iter().zip(&refs).enumerate() {
        let p = match &t.master {
            Some(m) => m.iter().map(|&v| f64::from(v)).collect(),
            None => widen(&t.param),
        };
        check(close(&format!("tensor {i} p"), &p, &x.p, 2e-6, 2e-6));
        let m: Vec<f64> = t.m.iter().map(|&v| f64::from(v)).collect();
        check(close(&format!("tensor {i} m"), &m, &x.m, 1e-7, 1e-5));
        let v: Vec<f64> = t.v.iter().map(|&v| f64::from(v)).collect();
        check(close(&format!("tensor {i} v"), &v, &x.v, 1e-9, 1e-5));
        assert_eq!(i64::from(t.step), i64::from(x.t));
        if let Some(m) = &t.master {
            // 16-bit params are the master rounded to nearest even.
            let want: Vec<P> = m.iter().map(|&v| P::from_f32_rn(v)).collect();
            check(bits_eq(&format!("tensor {i} param"), &t.param, &want));
        }
    }
}

#[test]
fn reference_matches_f64_adamw_f32() {
    matches_f64::<f32, f32>(1);
}

#[test]
fn reference_matches_f64_adamw_bf16_master() {
    matches_f64::<bf16, bf16>(2);
    matches_f64::<bf16, f32>(3);
}

#[test]
fn reference_matches_f64_adamw_f16_master() {
    matches_f64::<f16, f16>(4);
    matches_f64::<f16, bf16>(5);
}

#[test]
fn bias_corrections_by_squaring() {
    for t in [1u32, 2, 3, 7, 100, 1000, 12345, u32::MAX] {
        let got = cpu::pow_by_squaring(0.999, t);
        let want = 0.999f64.powf(f64::from(t));
        assert!(
            (got - want).abs() <= 1e-12 * want + 1e-300,
            "t {t}: {got} vs {want}"
        );
    }
    let (bc1, bc2s) = cpu::bias_corrections(0.9, 0.999, 1);
    assert_eq!(bc1, (1.0 - f64::from(0.9f32)) as f32);
    assert_eq!(bc2s, (1.0 - f64::from(0.999f32)).sqrt() as f32);
    // beta2 = 0.999 stays distinct from 1 in f32 (candle's bf16 scalars lose it).
    assert!(bc2s > 0.03);
}

#[test]
fn validation_errors() {
    let ok = AdamWConfig::default();
    let cases: [(AdamWConfig, &str); 9] = [
        (AdamWConfig { lr: f32::NAN, ..ok }, "lr"),
        (AdamWConfig { lr: -1e-3, ..ok }, "lr"),
        (
            AdamWConfig {
                lr: f32::INFINITY,
                ..ok
            },
            "lr",
        ),
        (AdamWConfig { eps: -1.0, ..ok }, "eps"),
        (
            AdamWConfig {
                eps: f32::NAN,
                ..ok
            },
            "eps",
        ),
        (AdamWConfig { beta1: 1.0, ..ok }, "beta1"),
        (AdamWConfig { beta1: -0.1, ..ok }, "beta1"),
        (AdamWConfig { beta2: 1.5, ..ok }, "beta2"),
        (
            AdamWConfig {
                beta2: f32::NAN,
                ..ok
            },
            "beta2",
        ),
    ];
    for (cfg, field) in cases {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{cfg:?}: {e}");
        let mut ts = tensors::<f32, f32>(1, &[3]);
        assert!(cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(1e-3), &[]).is_err());
    }
    assert!(AdamWConfig {
        beta1: 0.0,
        beta2: 0.0,
        eps: 0.0,
        lr: 0.0,
        ..ok
    }
    .validate()
    .is_ok());
    for wd in [-0.1, f32::NAN, f32::INFINITY] {
        let e = T32::new(vec![1.0], vec![1.0], wd).unwrap_err().to_string();
        assert!(e.contains("weight_decay"), "{e}");
    }
    let e = T32::new(vec![1.0; 3], vec![1.0; 2], 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("grad"), "{e}");
    let mut empty: Vec<T32> = Vec::new();
    let e = cpu::step(&mut empty, &ok, &cpu::StepInputs::new(1e-3), &[]).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let mut ts = tensors::<f32, f32>(1, &[3, 4]);
    assert!(cpu::step(&mut ts, &ok, &cpu::StepInputs::new(1e-3), &[true]).is_err());
    assert!(cpu::step(&mut ts, &ok, &cpu::StepInputs::new(-1.0), &[]).is_err());
    ts[1].m.pop();
    assert!(cpu::step(&mut ts, &ok, &cpu::StepInputs::new(1e-3), &[]).is_err());
}

#[test]
fn nonfinite_flag_changes_nothing() {
    let mut ts = tensors::<bf16, bf16>(6, &[5, 70_000]);
    let cfg = AdamWConfig::default();
    cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    let before = ts.clone();
    let inputs = cpu::StepInputs {
        lr: cfg.lr,
        grad_scale: f32::NAN,
        nonfinite: true,
    };
    cpu::step(&mut ts, &cfg, &inputs, &[]).unwrap();
    assert!(ts == before, "the tensors changed");
}

#[test]
fn skip_flags_and_zero_size_tensors() {
    let mut ts = tensors::<f32, f32>(7, &[0, 10, 20, 0]);
    let cfg = AdamWConfig::default();
    let before = ts.clone();
    cpu::step(
        &mut ts,
        &cfg,
        &cpu::StepInputs::new(cfg.lr),
        &[false, true, false, false],
    )
    .unwrap();
    assert_eq!(ts[1], before[1], "a skipped tensor changed");
    assert_ne!(ts[2].param, before[2].param);
    let steps: Vec<u32> = ts.iter().map(|t| t.step).collect();
    assert_eq!(steps, vec![0, 0, 1, 0]);
    cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    let steps: Vec<u32> = ts.iter().map(|t| t.step).collect();
    assert_eq!(steps, vec![0, 1, 2, 0]);
}

#[test]
fn state_round_trip_and_resume() {
    let sizes = [3, 0, 65_537, 11];
    let cfg = AdamWConfig {
        rounding: Rounding::Stochastic { seed: 99 },
        ..Default::default()
    };
    let mut straight = tensors::<bf16, f32>(8, &sizes);
    let mut resumed = straight.clone();
    for s in 0..3 {
        new_grads(&mut straight, s);
        cpu::step(&mut straight, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    }
    for s in 0..3 {
        new_grads(&mut resumed, s);
        cpu::step(&mut resumed, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    }
    let bytes = cpu::save_state(&resumed).unwrap();
    assert_eq!(
        bytes.len() as u64,
        state::peek(&bytes).unwrap().encoded_len()
    );
    // A fresh set of tensors with the model's parameters, then the optimizer state.
    let mut fresh: Vec<cpu::CpuTensor<bf16, f32>> = resumed
        .iter()
        .map(|t| cpu::CpuTensor::new(t.param.clone(), t.grad.clone(), t.weight_decay).unwrap())
        .collect();
    cpu::restore_state(&mut fresh, &bytes).unwrap();
    assert_eq!(fresh, resumed);
    assert_eq!(cpu::save_state(&fresh).unwrap(), bytes);
    for s in 3..7 {
        new_grads(&mut straight, s);
        cpu::step(&mut straight, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        new_grads(&mut fresh, s);
        cpu::step(&mut fresh, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    }
    assert_eq!(fresh, straight);
}

#[test]
fn state_mismatches_are_errors() {
    let ts = tensors::<f32, f32>(9, &[4, 5]);
    let bytes = cpu::save_state(&ts).unwrap();
    let restore =
        |ts: &mut Vec<T32>, b: &[u8]| cpu::restore_state(ts, b).map_err(|e| e.to_string());

    let mut other_len = tensors::<f32, f32>(9, &[4, 6]);
    let e = restore(&mut other_len, &bytes).unwrap_err();
    assert!(e.contains("tensor 1 has 5 elements"), "{e}");
    let mut other_count = tensors::<f32, f32>(9, &[4]);
    let e = restore(&mut other_count, &bytes).unwrap_err();
    assert!(e.contains("2 tensors"), "{e}");
    let mut bf = tensors::<bf16, f32>(9, &[4, 5]);
    let before = bf.clone();
    let e = cpu::restore_state(&mut bf, &bytes).unwrap_err().to_string();
    assert!(e.contains("f32 parameters"), "{e}");
    assert_eq!(bf, before, "a failed restore changed the tensors");

    let mut ts2 = ts.clone();
    let e = restore(&mut ts2, &bytes[..bytes.len() - 1]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
    let e = restore(&mut ts2, &bytes[..10]).unwrap_err();
    assert!(e.contains("too short"), "{e}");
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert!(restore(&mut ts2, &bad).unwrap_err().contains("magic"));
    let mut bad = bytes.clone();
    bad[8] = 3; // a version this crate does not know (it writes 2 and reads 1 and 2)
    assert!(restore(&mut ts2, &bad).unwrap_err().contains("version 3"));
    let mut bad = bytes.clone();
    bad[12] = 7;
    assert!(restore(&mut ts2, &bad).unwrap_err().contains("dtype code"));
    let mut bad = bytes.clone();
    bad[16] = 200; // claims 200 tensors
    assert!(restore(&mut ts2, &bad).is_err());
    assert_eq!(ts2, ts);
    restore(&mut ts2, &bytes).unwrap();
}

#[test]
fn stochastic_rounding_is_unbiased() {
    // A quarter of the way between two representable values: round up one time in four, and
    // the mean equals x, where nearest-even is always 1 (a bias of -x's fraction).
    for (kind, x, lo, hi) in [
        (
            DtypeKind::Bf16,
            1.0 + 2f32.powi(-9),
            1.0,
            1.0 + 2f32.powi(-7),
        ),
        (
            DtypeKind::F16,
            1.0 + 2f32.powi(-12),
            1.0,
            1.0 + 2f32.powi(-10),
        ),
        (
            DtypeKind::Bf16,
            -(1.0 + 2f32.powi(-9)),
            -1.0,
            -(1.0 + 2f32.powi(-7)),
        ),
    ] {
        let n = 200_000u64;
        let mut up = 0u64;
        let mut sum = 0f64;
        for i in 0..n {
            let w = cpu::rounding_random(3, 11, i);
            let y = match kind {
                DtypeKind::Bf16 => cpu::round_stochastic::<bf16>(x, w).to_f32(),
                _ => cpu::round_stochastic::<f16>(x, w).to_f32(),
            };
            assert!(y == lo || y == hi, "{y} is not a neighbour of {x}");
            up += u64::from(y == hi);
            sum += f64::from(y);
        }
        let frac = up as f64 / n as f64;
        assert!(
            (frac - 0.25).abs() < 0.005,
            "{kind:?} {x}: rounded up {frac}"
        );
        let mean = sum / n as f64;
        let ulp = f64::from(hi - lo).abs();
        assert!(
            (mean - f64::from(x)).abs() < 0.01 * ulp,
            "{kind:?}: mean {mean} vs {x}"
        );
    }

    // Random values: mean rounding error ~ 0 (nearest-even of a skewed set is biased).
    let mut r = rng(10);
    let n = 400_000;
    let mut err_sr = 0f64;
    for i in 0..n {
        let x: f32 = r.random_range(1.0..1.0078125); // within one bf16 ulp above 1
        let y = cpu::round_stochastic::<bf16>(x, cpu::rounding_random(4, 5, i as u64)).to_f32();
        err_sr += f64::from(y) - f64::from(x);
    }
    let mean_err = err_sr / n as f64;
    assert!(
        mean_err.abs() < 2e-5,
        "mean stochastic rounding error {mean_err}"
    );

    // Many small updates accumulate under stochastic rounding, vanish under nearest-even.
    let (mut sr, mut rn) = (bf16::from_f32(1.0), bf16::from_f32(1.0));
    for i in 0..1000u64 {
        sr = cpu::round_stochastic(sr.to_f32() + 1e-4, cpu::rounding_random(1, 2, i));
        rn = bf16::from_f32(rn.to_f32() + 1e-4);
    }
    assert_eq!(rn.to_f32(), 1.0);
    assert!((sr.to_f32() - 1.1).abs() < 0.03, "{}", sr.to_f32());
}

/// A random `x` of magnitude `10^e`, `e` drawn from `exponents`, of either sign, and the f64 sum
/// of `x` rounded stochastically to `T` under every one of the 65536 randoms.
fn sum_over_every_random<T: Dtype>(
    r: &mut rand::rngs::StdRng,
    exponents: std::ops::Range<f32>,
) -> (f32, f64) {
    let mag: f32 = 10f32.powf(r.random_range(exponents));
    let x = if r.random::<bool>() { mag } else { -mag };
    let sum = (0..=u16::MAX)
        .map(|w| f64::from(cpu::round_stochastic::<T>(x, w).to_f32()))
        .sum();
    (x, sum)
}

/// Over the 2^16 values of the 16-bit random, the mean of the rounded values is `x` exactly for
/// bf16 (every finite value below the top binade piece) and for normal f16; f16 subnormals are
/// within 2^-16 of an ulp (the fraction has more than 16 bits there). Random `x` across the whole
/// range, both signs.
#[test]
fn stochastic_rounding_is_exactly_unbiased_over_every_random() {
    let mut r = rng(12);
    for _ in 0..300 {
        let (x, sum) = sum_over_every_random::<bf16>(&mut r, -40.0..38.0);
        if x.abs() < 3.38e38 {
            assert_eq!(sum, f64::from(x) * 65536.0, "bf16 {x:e}");
        }
    }
    for _ in 0..300 {
        let (x, sum) = sum_over_every_random::<f16>(&mut r, -9.0..4.8);
        let mean = sum / 65536.0;
        if x.abs() >= 2f32.powi(-14) {
            assert_eq!(mean, f64::from(x), "f16 {x:e}");
        } else {
            // Subnormal f16: ulp 2^-24, the probability quantised to 2^-16.
            let tol = 2f64.powi(-24) * 2f64.powi(-16);
            assert!(
                (mean - f64::from(x)).abs() <= tol,
                "f16 {x:e}: mean {mean:e}"
            );
        }
    }
}

#[test]
fn stochastic_rounding_edge_cases() {
    for x in [0.0f32, -0.0, 1.5, -3.0, 65504.0] {
        for w in [0, 1 << 15, u16::MAX] {
            assert_eq!(cpu::round_stochastic::<f16>(x, w).to_f32(), x);
        }
    }
    for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 70000.0, -1e6] {
        for w in [0, u16::MAX] {
            let got = cpu::round_stochastic::<f16>(x, w);
            let want = f16::from_f32(x);
            assert!(got == want || (got.is_nan() && want.is_nan()), "{x}");
        }
    }
    assert_eq!(cpu::round_stochastic::<bf16>(3e38, 0), bf16::from_f32(3e38));
    // Toward zero with the largest word, away from zero with word 0; f16 subnormals and bf16
    // tiny values included.
    let mut r = rng(11);
    for _ in 0..20_000 {
        let mag: f32 = 10f32.powf(r.random_range(-9.0..4.5));
        let x = if r.random::<bool>() { mag } else { -mag };
        for kind in [DtypeKind::F16, DtypeKind::Bf16] {
            let (lo, hi, exact) = match kind {
                DtypeKind::F16 => (
                    cpu::round_stochastic::<f16>(x, u16::MAX).to_f32(),
                    cpu::round_stochastic::<f16>(x, 0).to_f32(),
                    f16::from_f32(x).to_f32() == x,
                ),
                _ => (
                    cpu::round_stochastic::<bf16>(x, u16::MAX).to_f32(),
                    cpu::round_stochastic::<bf16>(x, 0).to_f32(),
                    bf16::from_f32(x).to_f32() == x,
                ),
            };
            assert!(lo.abs() <= x.abs(), "{kind:?} {x}: lo {lo}");
            if exact {
                assert_eq!((lo, hi), (x, x));
            } else {
                assert!(hi.abs() > x.abs(), "{kind:?} {x}: hi {hi}");
                let rn = match kind {
                    DtypeKind::F16 => f16::from_f32(x).to_f32(),
                    _ => bf16::from_f32(x).to_f32(),
                };
                assert!(rn == lo || rn == hi, "{kind:?} {x}: {lo} {hi} {rn}");
            }
        }
    }
}

#[test]
fn stochastic_rounding_is_deterministic_per_seed() {
    let run = |seed: u64| {
        let mut ts = tensors::<bf16, bf16>(12, &[1000, 333]);
        let cfg = AdamWConfig {
            rounding: Rounding::Stochastic { seed },
            ..Default::default()
        };
        for s in 0..3 {
            new_grads(&mut ts, 50 + s);
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        }
        ts
    };
    let a = run(5);
    assert_eq!(a, run(5));
    let b = run(6);
    assert_eq!(
        a[0].master, b[0].master,
        "the master weights do not depend on the seed"
    );
    assert_ne!(a[0].param, b[0].param);
    // Keyed by (seed, (step << 32) | tensor, element).
    assert_eq!(cpu::rounding_call(3, 2), (3u64 << 32) | 2);
}

#[test]
fn bytes_formulas() {
    use DtypeKind::*;
    assert_eq!(adamw::min_bytes(10, F32, F32), 280);
    assert_eq!(adamw::min_bytes(10, Bf16, Bf16), 280);
    assert_eq!(adamw::min_bytes(10, F16, F16), 280);
    assert_eq!(adamw::clip_step_min_bytes(10, Bf16, Bf16), 300);
    assert_eq!(adamw::unfused_clip_step_min_bytes(10, F32, F32), 400);
}

/// Inconsistent public fields and impossible layouts are errors, not panics.
#[test]
fn inconsistent_state_and_huge_layouts_are_errors() {
    let mut t = cpu::CpuTensor::<f32, f32>::new(vec![1.0; 8], vec![0.5; 8], 0.0).unwrap();
    t.m.truncate(3);
    assert!(cpu::save_state(&[t]).is_err());
    let mut b = cpu::CpuTensor::<half::bf16, half::bf16>::new(
        vec![half::bf16::ONE; 4],
        vec![half::bf16::ONE; 4],
        0.0,
    )
    .unwrap();
    b.master = None;
    assert!(cpu::save_state(&[b]).is_err());
    assert!(fusedreg::multi_tensor::Layout::new(&[u64::MAX; 65_536]).is_err());
}

/// Issue 17, item 1: a step count of u32::MAX saturates instead of wrapping to t = 0 (where
/// 1 - b^0 = 0 made every parameter NaN); the step runs with t = u32::MAX, whose bias
/// corrections are exactly 1, like any count past a few thousand. Reached through the public
/// field and through a restored state.
#[test]
fn step_count_saturates_at_u32_max() {
    let cfg = AdamWConfig::default();
    for start in [u32::MAX - 1, u32::MAX] {
        let mut ts = tensors::<f32, f32>(17, &[33, 5]);
        for t in &mut ts {
            t.step = start;
        }
        // The same tensors at a large but ordinary count: the same update bits.
        let mut late = ts.clone();
        for t in &mut late {
            t.step = 1_000_000;
        }
        for s in 0..3 {
            new_grads(&mut ts, 1700 + s);
            new_grads(&mut late, 1700 + s);
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
            cpu::step(&mut late, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        }
        for (t, l) in ts.iter().zip(&late) {
            assert_eq!(
                t.step,
                u32::MAX,
                "the count wrapped or stopped below the maximum"
            );
            assert!(t.param.iter().all(|p| p.is_finite()), "NaN parameters");
            check(bits_eq("saturated vs late params", &t.param, &l.param));
            check(bits_eq("saturated vs late m", &t.m, &l.m));
        }
        assert_eq!(
            cpu::bias_corrections(cfg.beta1, cfg.beta2, u32::MAX),
            (1.0, 1.0)
        );
    }
    // Through restore_state: a saved count of u32::MAX is accepted and stays there.
    let mut ts = tensors::<bf16, bf16>(18, &[9]);
    ts[0].step = u32::MAX;
    let bytes = cpu::save_state(&ts).unwrap();
    let mut back = tensors::<bf16, bf16>(18, &[9]);
    cpu::restore_state(&mut back, &bytes).unwrap();
    assert_eq!(back[0].step, u32::MAX);
    cpu::step(&mut back, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
    assert_eq!(back[0].step, u32::MAX);
    assert!(back[0]
        .master
        .as_ref()
        .unwrap()
        .iter()
        .all(|p| p.is_finite()));
}

/// Issue 17, item 3: a NaN or infinite grad_scale is refused (and changes nothing) unless the
/// non-finite flag says the step is skipped anyway.
#[test]
fn nonfinite_grad_scale_is_refused() {
    let cfg = AdamWConfig::default();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut ts = tensors::<f32, f32>(19, &[7, 3]);
        let before = ts.clone();
        let inputs = cpu::StepInputs {
            grad_scale: bad,
            ..cpu::StepInputs::new(cfg.lr)
        };
        let e = cpu::step(&mut ts, &cfg, &inputs, &[]).unwrap_err();
        assert!(e.to_string().contains("grad_scale"), "{e}");
        assert!(ts == before, "a refused step changed the tensors");
        // With the flag set the step is skipped: accepted, nothing changes.
        let skipped = cpu::StepInputs {
            nonfinite: true,
            ..inputs
        };
        cpu::step(&mut ts, &cfg, &skipped, &[]).unwrap();
        assert!(ts == before, "the tensors changed");
    }
}

/// Issue 17, item 4: CpuTensor's fields are public; `step` re-checks what `new` checks, so a
/// weight decay set to NaN or -1e30 afterwards is an error, not NaN or huge parameters.
#[test]
fn weight_decay_set_after_new_is_checked() {
    let cfg = AdamWConfig::default();
    for bad in [f32::NAN, -1e30, f32::INFINITY, -0.5] {
        let mut ts = tensors::<f32, f32>(20, &[5, 6]);
        ts[1].weight_decay = bad;
        let before = ts.clone();
        let e = cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap_err();
        assert!(e.to_string().contains("tensor 1"), "{e}");
        assert!(e.to_string().contains("weight_decay"), "{e}");
        assert_eq!(ts.len(), before.len());
        for (a, b) in ts.iter().zip(&before) {
            check(bits_eq("params after a refused step", &a.param, &b.param));
        }
    }
}

/// Issue 17, item 9: the byte-count helpers saturate at u64::MAX for element counts near
/// 2^60..2^64 instead of overflowing (this test profile has overflow checks on).
#[test]
fn byte_counts_saturate() {
    use fusedreg::global_norm::{norm_min_bytes, scale_min_bytes};
    use DtypeKind::*;
    for n in [
        1u64 << 59,
        1 << 60,
        1 << 62,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ] {
        for (p, g) in [(F32, F32), (Bf16, Bf16), (F16, F32), (Bf16, F16)] {
            let m = adamw::min_bytes(n, p, g);
            let c = adamw::clip_step_min_bytes(n, p, g);
            let u = adamw::unfused_clip_step_min_bytes(n, p, g);
            // Monotone in the pass count, and exact where it fits.
            assert!(m <= c && c <= u, "{n} {p:?} {g:?}: {m} {c} {u}");
            if let Some(exact) = n.checked_mul(adamw::min_bytes(1, p, g)) {
                assert_eq!(m, exact);
            } else {
                assert_eq!(m, u64::MAX);
            }
        }
        for g in [F32, F16, Bf16] {
            let want = u64::try_from(u128::from(n) * g.size() as u128).unwrap_or(u64::MAX);
            assert_eq!(norm_min_bytes(n, g), want);
            let want = u64::try_from(u128::from(n) * 2 * g.size() as u128).unwrap_or(u64::MAX);
            assert_eq!(scale_min_bytes(n, g), want);
        }
    }
    assert_eq!(adamw::min_bytes(u64::MAX, F32, F32), u64::MAX);
    assert_eq!(
        adamw::unfused_clip_step_min_bytes(u64::MAX, Bf16, Bf16),
        u64::MAX
    );
}

/// The lean state layouts, pinned one step at a time against the default layout (the
/// f64-checked reference above): with bf16 moments, a step is the f32-moment step from the same
/// (bf16-valued) moments with only the stored m and v rounded to bf16 afterwards; without
/// master weights, a 16-bit parameter's step is the master-weight step from the widened
/// parameter, rounded the same way (same Philox word for stochastic rounding). Every dtype
/// pair of interest, both roundings, several steps, odd sizes and a zero-size tensor.
fn lean_matches_default_step_by_step<P: Dtype, G: Dtype>(seed: u64) {
    use adamw::{MasterWeights, MomentDtype};
    let sizes = [37, 0, 1000, 5];
    for options in common::all_state_options() {
        for rounding in [
            Rounding::NearestEven,
            Rounding::Stochastic { seed: seed ^ 9 },
        ] {
            let cfg = AdamWConfig {
                state: options,
                rounding,
                ..Default::default()
            };
            let dflt = AdamWConfig {
                state: adamw::StateOptions::default(),
                ..cfg
            };
            let mut lean = common::adamw_tensors_with::<P, G>(seed, &sizes, options);
            for s in 0..4 {
                new_grads(&mut lean, seed * 10 + s);
                // The same state in the default layout.
                let mut want: Vec<cpu::CpuTensor<P, G>> = lean
                    .iter()
                    .map(|t| {
                        let mut d =
                            cpu::CpuTensor::new(t.param.clone(), t.grad.clone(), t.weight_decay)
                                .unwrap();
                        d.m = t.m.clone();
                        d.v = t.v.clone();
                        d.step = t.step;
                        if let Some(m) = &t.master {
                            d.master = Some(m.clone());
                        }
                        d
                    })
                    .collect();
                cpu::step(&mut lean, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
                cpu::step(&mut want, &dflt, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
                for (i, (l, w)) in lean.iter().zip(&want).enumerate() {
                    let what = format!("{options:?} {rounding:?} step {s} tensor {i}");
                    let (mut wm, mut wv) = (w.m.clone(), w.v.clone());
                    if options.moments == MomentDtype::Bf16 {
                        for x in wm.iter_mut().chain(wv.iter_mut()) {
                            *x = bf16::from_f32(*x).to_f32();
                        }
                    }
                    check(bits_eq(&format!("{what} m"), &l.m, &wm));
                    check(bits_eq(&format!("{what} v"), &l.v, &wv));
                    check(bits_eq(&format!("{what} param"), &l.param, &w.param));
                    assert_eq!(l.step, w.step, "{what}");
                    let has_master =
                        P::KIND != DtypeKind::F32 && options.master == MasterWeights::F32;
                    assert_eq!(l.master.is_some(), has_master, "{what}");
                    if let Some(m) = &l.master {
                        check(bits_eq(
                            &format!("{what} master"),
                            m,
                            w.master.as_ref().unwrap(),
                        ));
                    }
                }
            }
            // The state moves and stays finite.
            assert!(lean
                .iter()
                .all(|t| t.param.iter().all(|p| p.to_f32().is_finite())));
        }
    }
}

#[test]
fn lean_state_layouts_match_the_default_step_by_step() {
    lean_matches_default_step_by_step::<f32, f32>(31);
    lean_matches_default_step_by_step::<f32, bf16>(32);
    lean_matches_default_step_by_step::<bf16, bf16>(33);
    lean_matches_default_step_by_step::<bf16, f32>(34);
    lean_matches_default_step_by_step::<f16, f16>(35);
    lean_matches_default_step_by_step::<f16, bf16>(36);
}

/// Without master weights and with stochastic rounding, updates far below half a bf16 ulp
/// still move the parameters on average; with nearest-even rounding they are lost.
#[test]
fn no_master_with_stochastic_rounding_keeps_small_updates() {
    use adamw::{MasterWeights, MomentDtype, StateOptions};
    let options = StateOptions {
        moments: MomentDtype::Bf16,
        master: MasterWeights::None,
    };
    let n = 4096;
    let run = |rounding| {
        let mut ts = vec![cpu::CpuTensor::<bf16, bf16>::with_state(
            vec![bf16::from_f32(1.0); n],
            vec![bf16::from_f32(1.0); n],
            0.0,
            options,
        )
        .unwrap()];
        // lr 1e-4: each step moves p by about 1e-4, well below half a bf16 ulp at 1 (2^-8).
        let cfg = AdamWConfig {
            lr: 1e-4,
            rounding,
            state: options,
            ..Default::default()
        };
        for _ in 0..20 {
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        }
        ts[0]
            .param
            .iter()
            .map(|p| f64::from(p.to_f32()))
            .sum::<f64>()
            / n as f64
    };
    let nearest = run(Rounding::NearestEven);
    let stochastic = run(Rounding::Stochastic { seed: 5 });
    assert_eq!(
        nearest, 1.0,
        "nearest-even should lose every sub-half-ulp update"
    );
    // 20 steps of about 1e-4 each: the mean moves by about 2e-3.
    assert!((1.0 - stochastic - 2e-3).abs() < 5e-4, "mean {stochastic}");
}

/// Bytes per parameter and step of every layout (the docs' table), and the resident state.
#[test]
fn lean_byte_counts() {
    use adamw::{min_bytes_with, state_bytes_per_param, MasterWeights, MomentDtype, StateOptions};
    use DtypeKind::*;
    let o = |moments, master| StateOptions { moments, master };
    let (f, b) = (MomentDtype::F32, MomentDtype::Bf16);
    let (mf, mn) = (MasterWeights::F32, MasterWeights::None);
    assert_eq!(min_bytes_with(1, Bf16, Bf16, o(b, mn)), 14);
    assert_eq!(min_bytes_with(1, Bf16, Bf16, o(f, mn)), 22);
    assert_eq!(min_bytes_with(1, Bf16, Bf16, o(b, mf)), 20);
    assert_eq!(min_bytes_with(1, Bf16, Bf16, o(f, mf)), 28);
    assert_eq!(min_bytes_with(1, Bf16, F32, o(b, mn)), 16);
    assert_eq!(min_bytes_with(1, F32, F32, o(b, mn)), 20);
    assert_eq!(min_bytes_with(1, F32, F32, o(f, mn)), 28);
    for p in [F32, F16, Bf16] {
        for g in [F32, F16, Bf16] {
            assert_eq!(
                min_bytes_with(7, p, g, StateOptions::default()),
                adamw::min_bytes(7, p, g)
            );
        }
    }
    assert_eq!(state_bytes_per_param(Bf16, o(b, mn)), 4);
    assert_eq!(state_bytes_per_param(Bf16, o(f, mf)), 12);
    assert_eq!(state_bytes_per_param(F32, o(b, mf)), 4);
    assert_eq!(min_bytes_with(u64::MAX, Bf16, Bf16, o(b, mn)), u64::MAX);
}

/// A configuration whose layout differs from the tensors' is refused before anything changes.
#[test]
fn lean_layout_mismatch_is_an_error() {
    use adamw::{MasterWeights, MomentDtype, StateOptions};
    let lean = StateOptions {
        moments: MomentDtype::Bf16,
        master: MasterWeights::None,
    };
    let mut ts = tensors::<bf16, bf16>(40, &[8]);
    let before = ts.clone();
    let cfg = AdamWConfig {
        state: lean,
        ..Default::default()
    };
    let e = cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap_err();
    assert!(e.to_string().contains("StateOptions"), "{e}");
    assert!(ts == before, "the tensors changed");
    // A master vector on a tensor whose layout has none.
    let mut l = common::adamw_tensors_with::<bf16, bf16>(40, &[8], lean);
    l[0].master = Some(vec![0.0; 8]);
    assert!(cpu::step(&mut l, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).is_err());
}

/// State format version 2 round-trips every layout; the moments are stored as bf16 bits when
/// bf16 (2 bytes each) and master weights only when the layout has them; a state saved with one
/// layout does not restore into another.
#[test]
fn state_v2_round_trips_every_layout() {
    use adamw::MomentDtype;
    let cfg0 = AdamWConfig::default();
    for options in common::all_state_options() {
        let cfg = AdamWConfig {
            state: options,
            rounding: Rounding::Stochastic { seed: 3 },
            ..cfg0
        };
        let mut ts = common::adamw_tensors_with::<bf16, bf16>(50, &[5, 0, 300], options);
        for s in 0..3 {
            new_grads(&mut ts, 500 + s);
            cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        }
        let bytes = cpu::save_state(&ts).unwrap();
        assert_eq!(bytes[8..12], 2u32.to_le_bytes());
        assert_eq!(
            bytes[14],
            if options.moments == MomentDtype::Bf16 {
                2
            } else {
                0
            }
        );
        let h = state::peek(&bytes).unwrap();
        assert_eq!(h.options, options);
        assert_eq!(bytes.len() as u64, h.encoded_len());
        let per = 2 * options.moments.size()
            + if options.has_master(DtypeKind::Bf16) {
                4
            } else {
                0
            };
        assert_eq!(bytes.len(), 24 + 12 * 3 + per * 305);
        // Restore into fresh tensors of the same layout: the same state, and the same next step.
        let mut back = common::adamw_tensors_with::<bf16, bf16>(50, &[5, 0, 300], options);
        for (b, t) in back.iter_mut().zip(&ts) {
            (b.param, b.grad) = (t.param.clone(), t.grad.clone());
        }
        cpu::restore_state(&mut back, &bytes).unwrap();
        assert!(back == ts, "{options:?}: restored state differs");
        new_grads(&mut ts, 599);
        new_grads(&mut back, 599);
        cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        cpu::step(&mut back, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
        assert!(back == ts, "{options:?}: resumed step differs");
        // Any other layout refuses it, unchanged.
        for other in common::all_state_options()
            .into_iter()
            .filter(|o| *o != options)
        {
            let mut x = common::adamw_tensors_with::<bf16, bf16>(50, &[5, 0, 300], other);
            let before = x.clone();
            let e = cpu::restore_state(&mut x, &bytes).unwrap_err();
            assert!(
                e.to_string().contains("StateOptions"),
                "{options:?} into {other:?}: {e}"
            );
            assert!(x == before, "a refused restore changed the tensors");
        }
    }
}

/// A state written by version 1 (before the lean layouts), spelled out byte by byte here from
/// the version-1 format, restores into tensors of the default layout.
#[test]
fn state_v1_bytes_still_restore() {
    // bf16 params, two tensors of 2 and 1 elements, steps 3 and 4.
    let mut v1: Vec<u8> = Vec::new();
    v1.extend_from_slice(b"FRADAMW\0");
    v1.extend_from_slice(&1u32.to_le_bytes()); // version 1
    v1.extend_from_slice(&[2, 1, 0, 0]); // bf16 params, master weights, reserved
    v1.extend_from_slice(&2u64.to_le_bytes());
    v1.extend_from_slice(&2u64.to_le_bytes());
    v1.extend_from_slice(&1u64.to_le_bytes());
    v1.extend_from_slice(&3u32.to_le_bytes());
    v1.extend_from_slice(&4u32.to_le_bytes());
    let (m, v, master) = (
        [0.25f32, -0.5, 0.125],
        [1e-3f32, 2e-3, 3e-3],
        [1.5f32, -2.0, 0.75],
    );
    for x in m.iter().chain(&v).chain(&master) {
        v1.extend_from_slice(&x.to_le_bytes());
    }
    assert_eq!(v1.len(), 24 + 2 * 12 + 3 * 4 * 3);
    let mut ts = tensors::<bf16, bf16>(60, &[2, 1]);
    cpu::restore_state(&mut ts, &v1).unwrap();
    assert_eq!((ts[0].step, ts[1].step), (3, 4));
    assert_eq!(
        (ts[0].m.clone(), ts[1].m.clone()),
        (vec![0.25, -0.5], vec![0.125])
    );
    assert_eq!(
        (ts[0].v.clone(), ts[1].v.clone()),
        (vec![1e-3, 2e-3], vec![3e-3])
    );
    assert_eq!(ts[0].master, Some(vec![1.5, -2.0]));
    assert_eq!(ts[1].master, Some(vec![0.75]));
    // Re-saved, it is the version-2 encoding of the same state: identical but for the version.
    let v2 = cpu::save_state(&ts).unwrap();
    assert_eq!(v2[8..12], 2u32.to_le_bytes());
    assert_eq!(v2[..8], v1[..8]);
    assert_eq!(v2[12..], v1[12..]);
    // A version-1 file knows only the default layout: a lean optimizer refuses it.
    let lean = adamw::StateOptions {
        moments: adamw::MomentDtype::Bf16,
        master: adamw::MasterWeights::None,
    };
    let mut l = common::adamw_tensors_with::<bf16, bf16>(60, &[2, 1], lean);
    assert!(cpu::restore_state(&mut l, &v1).is_err());
    // Version 1 with a non-zero moment byte is corrupt (only version 2 has that field).
    let mut bad = v1.clone();
    bad[14] = 2;
    assert!(cpu::restore_state(&mut ts, &bad).is_err());
}

// ------------------------------------------------------------------------------------------
// Bad input (issue 17): the CPU reference, state save/restore, the byte counts of adamw and
// global_norm (moved from tests/bad_input.rs, which keeps what is not one op's). The cases of
// issue 17 items 1, 3, 4, 9 for adamw/global_norm are regression tests of the engine's fixes.
// ------------------------------------------------------------------------------------------

mod bad_input {
    use crate::common::refused;
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

    /// A hyperparameter of `AdamWConfig`: its name and a setter.
    type Field = (&'static str, fn(&mut AdamWConfig, f32));
    const FIELDS: [Field; 4] = [
        ("lr", |c, v| c.lr = v),
        ("beta1", |c, v| c.beta1 = v),
        ("beta2", |c, v| c.beta2 = v),
        ("eps", |c, v| c.eps = v),
    ];

    /// The default config with `field` set to `v`.
    fn config_with((_, set): Field, v: f32) -> AdamWConfig {
        let mut cfg = AdamWConfig::default();
        set(&mut cfg, v);
        cfg
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
            for field in FIELDS {
                refused(field.0, config_with(field, bad).validate());
            }
            refused(
                "weight decay",
                CpuTensor::<f32, f32>::new(vec![1.0], vec![1.0], bad),
            );
        }
        // beta1 and beta2 of 1 or more.
        for beta in [1.0, 1.5] {
            for field in &FIELDS[1..3] {
                refused(field.0, config_with(*field, beta).validate());
            }
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
