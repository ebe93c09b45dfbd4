//! CPU tests of the bias + activation + dropout reference (always run): semantics per activation,
//! p = 0 and p = 1 exactly, drop rates, mask keying, the saved-h backward, dbias order, gradients
//! against finite differences in f64, the unfused mirror, and bad input.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{bits_eq, check, rng, uniform};
use fusedreg::bias_act_dropout::{
    cpu, fused_backward_bytes, fused_forward_bytes, unfused, unfused_backward_bytes,
    unfused_forward_bytes, Activation, Config, Preact,
};
use fusedreg::dropping::{slab_rows, MaskResolution};
use fusedreg::{Dtype, DtypeKind, Error};
use half::{bf16, f16};

macro_rules! for_each_dtype {
    ($f:ident) => {
        $f::<f32>();
        $f::<f16>();
        $f::<bf16>();
    };
}

/// f64 versions of the activations and their derivatives (the formulas, not our code).
fn act64(act: Activation, h: f64) -> f64 {
    let erf = |x: f64| {
        // erf via its all-positive series (see tests/fmath.rs), enough for |x| < 6.
        let a = x.abs();
        if a == 0.0 {
            return 0.0;
        }
        let (mut term, mut sum, mut n) = (a, a, 0.0f64);
        loop {
            n += 1.0;
            term *= 2.0 * a * a / (2.0 * n + 1.0);
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
        }
        (std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum).copysign(x)
    };
    match act {
        Activation::GeluErf => 0.5 * h * (1.0 + erf(h / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * h * (1.0 + (k * (h + 0.044715 * h * h * h)).tanh())
        }
        Activation::Silu => h / (1.0 + (-h).exp()),
        Activation::Relu => h.max(0.0),
    }
}

#[test]
fn forward_is_act_of_x_plus_bias_scaled_or_zero() {
    fn go<T: Dtype>() {
        let mut g = rng(11);
        for act in Activation::ALL {
            let (rows, cols) = (37, 203);
            let cfg = Config::new(rows, cols, act, 0.3, 9, 4).unwrap();
            let x = uniform::<T>(&mut g, rows * cols, -5.0, 5.0);
            let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
            let mut y = vec![T::from_f32_rn(f32::NAN); rows * cols];
            let mut h = vec![T::from_f32_rn(f32::NAN); rows * cols];
            cpu::forward(&cfg, &x, Some(&b), &mut y, Some(&mut h)).unwrap();
            let scale = cfg.keying(T::KIND).scale();
            let mut kept = 0;
            for i in 0..rows * cols {
                let hh = x[i].to_f32() + b[i % cols].to_f32();
                assert_eq!(
                    h[i].to_f32().to_bits(),
                    T::from_f32_rn(hh).to_f32().to_bits()
                );
                let want = if cfg.keeps(T::KIND, i as u64) {
                    kept += 1;
                    T::from_f32_rn(act.forward(hh) * scale)
                } else {
                    T::from_f32_rn(0.0)
                };
                assert_eq!(
                    y[i].to_f32().to_bits(),
                    want.to_f32().to_bits(),
                    "{act:?} at {i}"
                );
                // And close to the f64 formula (f32 math, then the rounding to T).
                if cfg.keeps(T::KIND, i as u64) {
                    let r = act64(act, f64::from(hh)) * f64::from(scale);
                    let rel = if T::KIND == DtypeKind::F32 {
                        1e-6
                    } else {
                        1e-2
                    };
                    let tol = rel * (1.0 + r.abs());
                    assert!(
                        (f64::from(y[i].to_f32()) - r).abs() <= tol,
                        "{act:?} {i}: {} vs {r}",
                        y[i].to_f32()
                    );
                }
            }
            let n = (rows * cols) as f64;
            assert!(
                (kept as f64 - 0.7 * n).abs() < 5.0 * (n * 0.21).sqrt(),
                "kept {kept} of {n}"
            );
        }
    }
    for_each_dtype!(go);
}

#[test]
fn p0_and_p1_are_exact() {
    fn go<T: Dtype>() {
        let mut g = rng(12);
        for act in Activation::ALL {
            let (rows, cols) = (9, 131);
            let x = uniform::<T>(&mut g, rows * cols, -3.0, 3.0);
            let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
            let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
            let cfg0 = Config::new(rows, cols, act, 0.0, 1, 2).unwrap();
            let mut y = vec![T::from_f32_rn(0.0); rows * cols];
            cpu::forward(&cfg0, &x, Some(&b), &mut y, None).unwrap();
            let want: Vec<T> = (0..rows * cols)
                .map(|i| T::from_f32_rn(act.forward(x[i].to_f32() + b[i % cols].to_f32())))
                .collect();
            check(bits_eq("p = 0 forward", &y, &want));
            let mut dx = vec![T::from_f32_rn(0.0); rows * cols];
            let pre = Preact::X {
                x: &x[..],
                bias: Some(&b[..]),
            };
            cpu::backward(&cfg0, &dy, pre, &mut dx, None).unwrap();
            let want: Vec<T> = (0..rows * cols)
                .map(|i| {
                    T::from_f32_rn(dy[i].to_f32() * act.grad(x[i].to_f32() + b[i % cols].to_f32()))
                })
                .collect();
            check(bits_eq("p = 0 backward", &dx, &want));

            let cfg1 = Config::new(rows, cols, act, 1.0, 1, 2).unwrap();
            cpu::forward(&cfg1, &x, Some(&b), &mut y, None).unwrap();
            assert!(y.iter().all(|v| v.to_f32().to_bits() == 0), "p = 1 forward");
            let mut db = vec![T::from_f32_rn(f32::NAN); cols];
            cpu::backward(&cfg1, &dy, pre, &mut dx, Some(&mut db)).unwrap();
            assert!(
                dx.iter().all(|v| v.to_f32().to_bits() == 0),
                "p = 1 backward"
            );
            assert!(db.iter().all(|v| v.to_f32().to_bits() == 0), "p = 1 dbias");
        }
    }
    for_each_dtype!(go);
}

#[test]
fn drop_rate_within_binomial_bound() {
    // At every mask resolution: the dropped share is the effective p's, and the kept elements
    // are scaled by 1 / (1 - effective p) (the keying's scale: no bias from quantising p).
    for res in [
        MaskResolution::Bits32,
        MaskResolution::Bits16,
        MaskResolution::Bits8,
    ] {
        for p in [1.0 / 256.0, 0.1, 0.5, 0.9] {
            let (rows, cols) = (257, 1001);
            let cfg = Config::new(rows, cols, Activation::Relu, p, 77, 3)
                .unwrap()
                .with_resolution(res);
            let x = vec![1.0f32; rows * cols];
            let mut y = vec![0.0f32; rows * cols];
            cpu::forward(&cfg, &x, None, &mut y, None).unwrap();
            let n = (rows * cols) as f64;
            let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64;
            let pe = cfg.effective_p(fusedreg::DtypeKind::F32);
            assert_eq!(pe, cfg.rate().effective_p_at(res));
            let sd = (n * pe * (1.0 - pe)).sqrt();
            assert!(
                (dropped - n * pe).abs() < 5.0 * sd,
                "{res:?} p = {p}: dropped {dropped} of {n}"
            );
            let scale = (1.0 / (1.0 - pe)) as f32;
            assert_eq!(
                cfg.keying(fusedreg::DtypeKind::F32).scale(),
                scale,
                "{res:?} p = {p}"
            );
            assert!(y.iter().all(|&v| v == 0.0 || v == scale), "{res:?} p = {p}");
        }
    }
}

#[test]
fn mask_is_keyed_by_flat_index_only() {
    // The same (seed, call) and flat index give the same keep bit for any shape: [6, 10] and
    // [3, 20] and [60] drop the same elements.
    let x: Vec<f32> = (0..60).map(|i| 1.0 + i as f32).collect();
    let run = |rows, cols| {
        let cfg = Config::new(rows, cols, Activation::Relu, 0.5, 5, 6).unwrap();
        let mut y = vec![0.0f32; 60];
        cpu::forward(&cfg, &x, None, &mut y, None).unwrap();
        y
    };
    let a = run(6, 10);
    assert_eq!(a, run(3, 20));
    assert_eq!(a, run(1, 60));
    // And a longer tensor's prefix has the same mask.
    let cfg = Config::new(1, 61, Activation::Relu, 0.5, 5, 6).unwrap();
    let mut x2 = x.clone();
    x2.push(1.0);
    let mut y2 = vec![0.0f32; 61];
    cpu::forward(&cfg, &x2, None, &mut y2, None).unwrap();
    assert_eq!(a[..], y2[..60]);
    // Other seeds or calls change it.
    let cfg = Config::new(6, 10, Activation::Relu, 0.5, 5, 7).unwrap();
    let mut y3 = vec![0.0f32; 60];
    cpu::forward(&cfg, &x, None, &mut y3, None).unwrap();
    assert_ne!(a, y3);
}

#[test]
fn view_at_element_1_matches_the_whole() {
    // A tensor starting at element 1 of a larger buffer (a misaligned view) gives the same
    // results as the same values in their own buffer.
    fn go<T: Dtype>() {
        let mut g = rng(13);
        let (rows, cols) = (5, 24);
        let buf = uniform::<T>(&mut g, rows * cols + 1, -2.0, 2.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let cfg = Config::new(rows, cols, Activation::GeluErf, 0.2, 3, 4).unwrap();
        let own = buf[1..].to_vec();
        let mut y1 = vec![T::from_f32_rn(0.0); rows * cols];
        let mut y2 = vec![T::from_f32_rn(0.0); rows * cols];
        cpu::forward(&cfg, &buf[1..], Some(&b), &mut y1, None).unwrap();
        cpu::forward(&cfg, &own, Some(&b), &mut y2, None).unwrap();
        check(bits_eq("view at 1", &y1, &y2));
    }
    for_each_dtype!(go);
}

#[test]
fn saved_h_backward_equals_recompute_for_f32() {
    let mut g = rng(14);
    for act in Activation::ALL {
        let (rows, cols) = (33, 77);
        let cfg = Config::new(rows, cols, act, 0.25, 8, 9).unwrap();
        let x = uniform::<f32>(&mut g, rows * cols, -4.0, 4.0);
        let b = uniform::<f32>(&mut g, cols, -1.0, 1.0);
        let dy = uniform::<f32>(&mut g, rows * cols, -1.0, 1.0);
        let (mut y, mut h) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
        cpu::forward(&cfg, &x, Some(&b), &mut y, Some(&mut h)).unwrap();
        let (mut dx1, mut dx2) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
        let (mut db1, mut db2) = (vec![0.0f32; cols], vec![0.0f32; cols]);
        let pre = Preact::X {
            x: &x[..],
            bias: Some(&b[..]),
        };
        cpu::backward(&cfg, &dy, pre, &mut dx1, Some(&mut db1)).unwrap();
        cpu::backward(&cfg, &dy, Preact::H(&h[..]), &mut dx2, Some(&mut db2)).unwrap();
        check(bits_eq("dx from h", &dx2, &dx1));
        check(bits_eq("dbias from h", &db2, &db1));
    }
}

#[test]
fn dbias_follows_the_slab_lane_order() {
    // dbias is the fixed-order sum of the module docs, written out here independently.
    fn go<T: Dtype>() {
        let mut g = rng(15);
        for (rows, cols) in [(1, 5), (3, 7), (67, 33), (1000, 9)] {
            let cfg = Config::new(rows, cols, Activation::Silu, 0.1, 1, 1).unwrap();
            let x = uniform::<T>(&mut g, rows * cols, -3.0, 3.0);
            let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
            let mut dx = vec![T::from_f32_rn(0.0); rows * cols];
            let mut db = vec![T::from_f32_rn(0.0); cols];
            let pre = Preact::X {
                x: &x[..],
                bias: None,
            };
            cpu::backward(&cfg, &dy, pre, &mut dx, Some(&mut db)).unwrap();
            let slab = slab_rows(rows, cols, T::KIND);
            let scale = cfg.keying(T::KIND).scale();
            for c in 0..cols {
                let d = |r: usize| {
                    let i = r * cols + c;
                    if cfg.keeps(T::KIND, i as u64) {
                        (dy[i].to_f32() * scale) * Activation::Silu.grad(x[i].to_f32())
                    } else {
                        0.0
                    }
                };
                let mut total = 0.0f32;
                for s0 in (0..rows).step_by(slab) {
                    let s1 = (s0 + slab).min(rows);
                    let mut lanes = [0.0f32; 4];
                    for r in s0..s1 {
                        lanes[(r - s0) % 4] += d(r);
                    }
                    total += ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3];
                }
                assert_eq!(
                    db[c].to_f32().to_bits(),
                    T::from_f32_rn(total).to_f32().to_bits(),
                    "[{rows}, {cols}] col {c}"
                );
            }
        }
    }
    for_each_dtype!(go);
}

#[test]
fn gradient_matches_finite_differences_in_f64() {
    // The loss L = sum(w * y) for fixed weights w; dL/dx from the reference vs central
    // differences of the f64 formula, for each activation, on kept elements. The reference is
    // f32 math, so the tolerance is relative 1e-4 plus a floor.
    let mut g = rng(16);
    for act in Activation::ALL {
        let (rows, cols) = (7, 13);
        let cfg = Config::new(rows, cols, act, 0.2, 4, 4).unwrap();
        let x = uniform::<f32>(&mut g, rows * cols, -3.0, 3.0);
        let b = uniform::<f32>(&mut g, cols, -0.5, 0.5);
        let w = uniform::<f32>(&mut g, rows * cols, -1.0, 1.0);
        let mut dx = vec![0.0f32; rows * cols];
        let mut db = vec![0.0f32; cols];
        let pre = Preact::X {
            x: &x[..],
            bias: Some(&b[..]),
        };
        cpu::backward(&cfg, &w, pre, &mut dx, Some(&mut db)).unwrap();
        let scale = f64::from(cfg.rate().scale());
        for i in 0..rows * cols {
            let h = f64::from(x[i] + b[i % cols]);
            if act == Activation::Relu && h.abs() < 1e-3 {
                continue; // the kink
            }
            let eps = 1e-5;
            let fd = if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) {
                f64::from(w[i]) * scale * (act64(act, h + eps) - act64(act, h - eps)) / (2.0 * eps)
            } else {
                0.0
            };
            let got = f64::from(dx[i]);
            assert!(
                (got - fd).abs() <= 1e-4 * fd.abs() + 2e-6,
                "{act:?} [{i}] h = {h}: dx {got} vs finite difference {fd}"
            );
        }
        for c in 0..cols {
            let want: f64 = (0..rows).map(|r| f64::from(dx[r * cols + c])).sum();
            assert!(
                (f64::from(db[c]) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{act:?} dbias[{c}]"
            );
        }
    }
}

#[test]
fn activation_edges() {
    let inf = f32::INFINITY;
    for act in [
        Activation::GeluErf,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Relu,
    ] {
        assert_eq!(act.forward(inf), inf, "{act:?}");
        assert_eq!(act.forward(-inf), 0.0, "{act:?}");
        assert_eq!(act.grad(inf), 1.0, "{act:?}");
        assert_eq!(act.grad(-inf), 0.0, "{act:?}");
        assert!(act.forward(f32::NAN).is_nan(), "{act:?}");
        assert!(act.grad(f32::NAN).is_nan(), "{act:?}");
        assert_eq!(act.forward(0.0), 0.0, "{act:?}");
        assert_eq!(act.forward(1e30), 1e30, "{act:?}");
        assert!(
            !act.grad(-1e30).is_nan() && !act.grad(1e30).is_nan(),
            "{act:?}"
        );
    }
    assert_eq!(Activation::GeluErf.grad(0.0), 0.5);
    assert_eq!(Activation::GeluTanh.grad(0.0), 0.5);
    assert_eq!(Activation::Silu.grad(0.0), 0.5);
    assert_eq!(Activation::Relu.grad(0.0), 0.0);
}

#[test]
fn empty_inputs() {
    let cfg = Config::new(0, 5, Activation::GeluErf, 0.1, 1, 2).unwrap();
    let mut y: Vec<f32> = vec![];
    cpu::forward(&cfg, &[], None, &mut y, None).unwrap();
    let mut db = [f32::NAN; 5];
    cpu::backward(
        &cfg,
        &[],
        Preact::X {
            x: &[][..],
            bias: None,
        },
        &mut [],
        Some(&mut db),
    )
    .unwrap();
    assert_eq!(db, [0.0; 5]);
}

#[test]
fn bad_input_is_an_error() {
    let cfg = Config::new(2, 3, Activation::Relu, 0.1, 1, 2).unwrap();
    let x = [0.0f32; 6];
    let mut y = [0.0f32; 6];
    let shape = |r: fusedreg::Result<()>| matches!(r, Err(Error::ShapeMismatch { .. }));
    assert!(shape(cpu::forward(&cfg, &x[..5], None, &mut y, None)));
    assert!(shape(cpu::forward(&cfg, &x, Some(&[0.0; 2]), &mut y, None)));
    assert!(shape(cpu::forward(&cfg, &x, None, &mut y[..5], None)));
    assert!(shape(cpu::forward(
        &cfg,
        &x,
        None,
        &mut y,
        Some(&mut [0.0; 7])
    )));
    let mut dx = [0.0f32; 6];
    assert!(shape(cpu::backward(
        &cfg,
        &x[..4],
        Preact::H(&x[..]),
        &mut dx,
        None
    )));
    assert!(shape(cpu::backward(
        &cfg,
        &x,
        Preact::H(&x[..5]),
        &mut dx,
        None
    )));
    assert!(shape(cpu::backward(
        &cfg,
        &x,
        Preact::X {
            x: &x[..],
            bias: Some(&x[..4])
        },
        &mut dx,
        None
    )));
    assert!(shape(cpu::backward(
        &cfg,
        &x,
        Preact::H(&x[..]),
        &mut dx,
        Some(&mut [0.0; 4])
    )));
    assert!(shape(unfused::forward_cpu(
        &cfg,
        &x,
        &[0.0; 3],
        &mut y,
        &mut [0u8; 5],
        &mut [0.0; 6]
    )));
    assert!(matches!(
        Config::new(2, 3, Activation::Relu, -0.1, 1, 2),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(2, 3, Activation::Relu, f64::NAN, 1, 2),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(usize::MAX, 3, Activation::Relu, 0.1, 1, 2),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn unfused_mirror_matches_the_fused_reference() {
    // f32: the unfused path rounds nothing extra, so it equals the fused op bit for bit (the
    // dbias order differs: plain row order, so compare it with a tolerance). 16-bit types: the
    // extra roundings of h, a and g stay within a few ulp of T.
    fn go<T: Dtype>() {
        let mut g = rng(17);
        for act in Activation::ALL {
            let (rows, cols) = (31, 45);
            // The unfused baseline keys at 32 bits: compare with the fused op at 32 bits.
            let cfg = Config::new(rows, cols, act, 0.15, 2, 3)
                .unwrap()
                .with_resolution(MaskResolution::Bits32);
            let x = uniform::<T>(&mut g, rows * cols, -3.0, 3.0);
            let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
            let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
            let z = T::from_f32_rn(0.0);
            let (mut y, mut m, mut h) = (
                vec![z; rows * cols],
                vec![0u8; rows * cols],
                vec![z; rows * cols],
            );
            unfused::forward_cpu(&cfg, &x, &b, &mut y, &mut m, &mut h).unwrap();
            let mut yf = vec![z; rows * cols];
            cpu::forward(&cfg, &x, Some(&b), &mut yf, None).unwrap();
            assert!((0..rows * cols).all(|i| (m[i] == 1) == cfg.keeps(T::KIND, i as u64)));
            let (mut dx, mut db) = (vec![z; rows * cols], vec![z; cols]);
            unfused::backward_cpu(&cfg, &dy, &m, &h, &mut dx, Some(&mut db)).unwrap();
            let (mut dxf, mut dbf) = (vec![z; rows * cols], vec![z; cols]);
            let pre = Preact::X {
                x: &x[..],
                bias: Some(&b[..]),
            };
            cpu::backward(&cfg, &dy, pre, &mut dxf, Some(&mut dbf)).unwrap();
            if T::KIND == DtypeKind::F32 {
                check(bits_eq("unfused forward (f32)", &y, &yf));
            }
            let tol = if T::KIND == DtypeKind::F32 {
                1e-5
            } else {
                0.05
            };
            for i in 0..rows * cols {
                let (a, bb) = (y[i].to_f32(), yf[i].to_f32());
                assert!(
                    (a - bb).abs() <= tol * (1.0 + bb.abs()),
                    "{act:?} y[{i}] {a} vs {bb}"
                );
                let (a, bb) = (dx[i].to_f32(), dxf[i].to_f32());
                assert!(
                    (a - bb).abs() <= tol * (1.0 + bb.abs()),
                    "{act:?} dx[{i}] {a} vs {bb}"
                );
            }
            for c in 0..cols {
                let (a, bb) = (db[c].to_f32(), dbf[c].to_f32());
                assert!(
                    (a - bb).abs() <= 4.0 * tol * (1.0 + bb.abs()),
                    "{act:?} db[{c}] {a} vs {bb}"
                );
            }
        }
    }
    for_each_dtype!(go);
}

#[test]
fn byte_counts() {
    assert_eq!(fused_forward_bytes(DtypeKind::Bf16, 10, false), 40);
    assert_eq!(fused_backward_bytes(DtypeKind::F32, 10), 120);
    assert_eq!(unfused_forward_bytes(DtypeKind::Bf16, 10, true), 130);
    assert_eq!(unfused_backward_bytes(DtypeKind::F32, 10, true), 250);
    assert_eq!(fused_backward_bytes(DtypeKind::F32, u64::MAX / 2), u64::MAX);
    assert!(
        unfused_forward_bytes(DtypeKind::Bf16, 1 << 20, true)
            > fused_forward_bytes(DtypeKind::Bf16, 1 << 20, false)
    );
}
