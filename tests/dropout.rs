//! CPU tests of the plain dropout reference (always run): semantics at p = 0 and p = 1, the
//! pinned formula on random data and odd sizes, drop rates, mask keying, drop path,
//! forward/backward consistency, views, dbias, errors, and the unfused mirror.
// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{bits_eq, check, close, rng, uniform};
use fusedreg::dropout::{
    cpu::{self, BackwardOptions, ForwardOptions},
    slab_count, unfused, Config, DropPath,
};
use fusedreg::dropping::{mask_bit, Keying};
use fusedreg::{Dtype, Error};
use half::{bf16, f16};

/// Runs `f::<T>()` for every dtype.
macro_rules! for_each_dtype {
    ($f:ident) => {
        $f::<f32>();
        $f::<f16>();
        $f::<bf16>();
    };
}

fn fwd<T: Dtype>(cfg: &Config, x: &[T], bias: Option<&[T]>) -> (Vec<T>, Vec<u32>) {
    let mut y = vec![T::from_f32_rn(f32::NAN); cfg.len()];
    let mut mask = vec![0xDEAD_BEEF; cfg.mask_words()];
    let opts = ForwardOptions {
        bias,
        mask_out: Some(&mut mask),
        ..Default::default()
    };
    cpu::forward(cfg, x, &mut y, opts).unwrap();
    (y, mask)
}

fn bwd<T: Dtype>(cfg: &Config, dy: &[T], mask: Option<&[u32]>, dbias: bool) -> (Vec<T>, Vec<T>) {
    let mut dx = vec![T::from_f32_rn(f32::NAN); cfg.len()];
    let mut db = vec![T::from_f32_rn(f32::NAN); cfg.cols()];
    let opts = BackwardOptions {
        mask,
        dbias: dbias.then_some(&mut db[..]),
        ..Default::default()
    };
    cpu::backward(cfg, dy, &mut dx, opts).unwrap();
    (dx, db)
}

#[test]
fn p0_gives_x_plus_bias_exactly() {
    fn go<T: Dtype>() {
        let mut g = rng(1);
        let (rows, cols) = (37, 1003);
        let cfg = Config::new(rows, cols, 0.0, 9, 1).unwrap();
        assert_eq!(cfg.rate().effective_p(), 0.0);
        let x = uniform::<T>(&mut g, rows * cols, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (y, mask) = fwd(&cfg, &x, Some(&b));
        let want: Vec<T> = (0..rows * cols)
            .map(|i| T::from_f32_rn(x[i].to_f32() + b[i % cols].to_f32()))
            .collect();
        check(bits_eq("p = 0 with bias", &y, &want));
        assert!(
            (0..rows * cols).all(|i| mask_bit(&mask, i) == Some(true)),
            "p = 0 dropped something"
        );
        let (y, _) = fwd(&cfg, &x, None);
        check(bits_eq("p = 0 without bias is the identity", &y, &x));
    }
    for_each_dtype!(go);
}

#[test]
fn p1_gives_plus_zero_exactly_even_for_inf_and_nan_x() {
    fn go<T: Dtype>() {
        let mut g = rng(2);
        let n = 4099;
        let cfg = Config::flat(n, 1.0, 9, 1).unwrap();
        assert_eq!(cfg.rate().effective_p(), 1.0);
        let mut x = uniform::<T>(&mut g, n, -4.0, 4.0);
        x[0] = T::from_f32_rn(f32::INFINITY);
        x[1] = T::from_f32_rn(f32::NAN);
        let (y, mask) = fwd(&cfg, &x, None);
        assert!(
            y.iter().all(|v| v.to_f32().to_bits() == 0),
            "p = 1: y not +0"
        );
        assert!(mask.iter().all(|&w| w == 0), "p = 1 kept something");
        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        let (dx, _) = bwd(&cfg, &dy, None, false);
        assert!(
            dx.iter().all(|v| v.to_f32().to_bits() == 0),
            "p = 1: dx not +0"
        );
    }
    for_each_dtype!(go);
}

#[test]
fn dropped_elements_are_plus_zero_even_for_nan_x() {
    let n = 10_000;
    let cfg = Config::flat(n, 0.5, 77, 3).unwrap();
    let mut x = vec![bf16::NAN; n];
    x.iter_mut()
        .step_by(3)
        .for_each(|v| *v = bf16::NEG_INFINITY);
    let (y, mask) = fwd(&cfg, &x, None);
    let mut dropped = 0;
    for i in 0..n {
        if mask_bit(&mask, i) == Some(true) {
            assert_eq!(y[i].is_nan(), x[i].is_nan(), "kept element {i}");
        } else {
            dropped += 1;
            assert_eq!(y[i].to_bits(), 0, "dropped element {i} is not +0");
        }
    }
    assert!(dropped > 4000);
}

/// Random data, odd sizes, every option: y against the pinned formula element by element.
#[test]
fn forward_follows_the_pinned_formula() {
    fn go<T: Dtype>() {
        for (k, &(rows, cols)) in [(1usize, 1usize), (3, 7), (37, 1003), (129, 24), (2, 4105)]
            .iter()
            .enumerate()
        {
            let mut g = rng(10 + k as u64);
            let n = rows * cols;
            let cfg = Config::new(rows, cols, 0.3, 5 + k as u64, 1 << 40).unwrap();
            let x = uniform::<T>(&mut g, n, -4.0, 4.0);
            let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
            let mut rs = uniform::<f32>(&mut g, rows, 0.5, 2.0);
            rs.iter_mut().step_by(5).for_each(|v| *v = 0.0);
            let mut y = vec![T::from_f32_rn(f32::NAN); n];
            let mut mask = vec![0u32; cfg.mask_words()];
            let opts = ForwardOptions {
                bias: Some(&b),
                rowscale: Some(&rs),
                mask_out: Some(&mut mask),
                ..Default::default()
            };
            cpu::forward(&cfg, &x, &mut y, opts).unwrap();
            let keying = Keying::with_rate(cfg.rate(), cfg.seed(), cfg.call());
            let want: Vec<T> = (0..n)
                .map(|i| {
                    let rowm = cfg.rate().scale() * rs[i / cols];
                    if keying.keeps(i as u64) && rowm != 0.0 {
                        T::from_f32_rn((x[i].to_f32() + b[i % cols].to_f32()) * rowm)
                    } else {
                        T::from_f32_rn(0.0)
                    }
                })
                .collect();
            check(bits_eq(&format!("{rows}x{cols}"), &y, &want));
            for i in 0..n {
                assert_eq!(
                    mask_bit(&mask, i),
                    Some(keying.keeps(i as u64)),
                    "mask bit {i}"
                );
            }
            // Padding bits of the last word are zero.
            if n % 32 != 0 {
                assert_eq!(mask[n / 32] >> (n % 32), 0, "padding of {rows}x{cols}");
            }
        }
    }
    for_each_dtype!(go);
}

/// The applied drop probability is within 5 sigma of `threshold / 2^32` on 2^20 elements.
#[test]
fn drop_rate_is_within_a_binomial_bound() {
    let n = 1 << 20;
    let x = vec![1.0f32; n];
    for (k, p) in [1.0 / 256.0, 0.1, 0.5, 0.9].into_iter().enumerate() {
        let cfg = Config::flat(n, p, 0x5eed, 200 + k as u64).unwrap();
        let (y, mask) = fwd(&cfg, &x, None);
        let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            kept,
            y.iter().filter(|&&v| v != 0.0).count() as u64,
            "mask and y agree"
        );
        let dropped = (n as u64 - kept) as f64;
        let pe = cfg.rate().effective_p();
        assert!((pe - p).abs() <= 2f64.powi(-33), "applied p {pe} vs {p}");
        let mean = n as f64 * pe;
        let sigma = (n as f64 * pe * (1.0 - pe)).sqrt();
        assert!(
            (dropped - mean).abs() <= 5.0 * sigma,
            "p = {p}: dropped {dropped}, expected {mean} +- {sigma}"
        );
    }
}

#[test]
fn mask_of_an_element_does_not_depend_on_the_tensor_length_or_shape() {
    let (long, short) = (100_003usize, 4_097usize);
    let x = vec![1.0f32; long];
    let (_, a) = fwd(&Config::flat(long, 0.5, 3, 4).unwrap(), &x, None);
    let (_, b) = fwd(&Config::flat(short, 0.5, 3, 4).unwrap(), &x[..short], None);
    let (_, c) = fwd(
        &Config::new(4, long / 4, 0.5, 3, 4).unwrap(),
        &x[..long / 4 * 4],
        None,
    );
    for i in 0..short {
        assert_eq!(
            mask_bit(&a, i),
            mask_bit(&b, i),
            "short tensor, element {i}"
        );
    }
    for i in 0..long / 4 * 4 {
        assert_eq!(mask_bit(&a, i), mask_bit(&c, i), "as [4, n/4], element {i}");
    }
    // The same mask as dropout_residual's under the same keys: one keying for every op.
    let cfg = Config::flat(short, 0.5, 3, 4).unwrap();
    let mut yr = vec![0.0f32; short];
    let mut mr = vec![0u32; cfg.mask_words()];
    let opts = fusedreg::dropout_residual::cpu::ForwardOptions {
        mask_out: Some(&mut mr),
        ..Default::default()
    };
    fusedreg::dropout_residual::cpu::forward(&cfg, &x[..short], &x[..short], &mut yr, opts)
        .unwrap();
    assert_eq!(mr, b, "dropout and dropout_residual masks differ");
}

#[test]
fn different_call_ids_and_seeds_give_different_masks() {
    let n = 1 << 16;
    let x = vec![1.0f32; n];
    let (_, a) = fwd(&Config::flat(n, 0.5, 1, 10).unwrap(), &x, None);
    let (_, b) = fwd(&Config::flat(n, 0.5, 1, 11).unwrap(), &x, None);
    let (_, c) = fwd(&Config::flat(n, 0.5, 2, 10).unwrap(), &x, None);
    for (name, other) in [("call", &b), ("seed", &c)] {
        let differ: u32 = a.iter().zip(other).map(|(p, q)| (p ^ q).count_ones()).sum();
        let frac = f64::from(differ) / n as f64;
        assert!(
            (0.48..0.52).contains(&frac),
            "{name}: {frac} of bits differ"
        );
    }
}

#[test]
fn drop_path_keeps_or_drops_whole_rows() {
    let mut g = rng(5);
    let (rows, cols) = (4096, 24);
    let p_path = 0.3;
    for per_sample in [1usize, 16] {
        let path = DropPath::new(p_path, 2)
            .unwrap()
            .per_sample(per_sample)
            .unwrap();
        let cfg = Config::new(rows, cols, 0.0, 11, 1)
            .unwrap()
            .with_drop_path(path);
        let x = uniform::<f32>(&mut g, rows * cols, 1.0, 2.0);
        let mut y = vec![f32::NAN; rows * cols];
        let mut rs = vec![f32::NAN; rows];
        let opts = ForwardOptions {
            rowscale_out: Some(&mut rs),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &mut y, opts).unwrap();
        let scale = (1.0 / (1.0 - p_path)) as f32;
        let mut dropped_rows = 0;
        for row in 0..rows {
            assert_eq!(rs[row], path.row_scale(11, row as u64), "row {row}");
            assert_eq!(
                rs[row],
                rs[row / per_sample * per_sample],
                "sample of row {row}"
            );
            for c in 0..cols {
                let i = row * cols + c;
                let want = if rs[row] == 0.0 { 0.0 } else { x[i] * scale };
                assert_eq!(y[i].to_bits(), want.to_bits(), "row {row} col {c}");
            }
            dropped_rows += usize::from(rs[row] == 0.0);
        }
        let frac = dropped_rows as f64 / rows as f64;
        assert!((0.25..0.35).contains(&frac), "{frac} of rows dropped");
        // The backward regenerates the same row scale.
        let (dx, _) = bwd(&cfg, &x, None, false);
        check(bits_eq("backward with drop path", &dx, &y));
    }
}

/// The backward of dy = x (no bias) equals the forward, from the regenerated mask and from the
/// bitmask; the bitmask path matches the regenerated one with dbias.
#[test]
fn forward_and_backward_use_the_same_mask() {
    fn go<T: Dtype>() {
        let mut g = rng(6);
        let (rows, cols) = (97, 203);
        let cfg = Config::new(rows, cols, 0.4, 123, 456).unwrap();
        let x = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let (y, mask) = fwd(&cfg, &x, None);
        let (dx, db) = bwd(&cfg, &x, None, true);
        check(bits_eq("dx(dy = x) vs y", &dx, &y));
        let (dx_m, db_m) = bwd(&cfg, &x, Some(&mask), true);
        check(bits_eq("dx from the bitmask", &dx_m, &dx));
        check(bits_eq("dbias from the bitmask", &db_m, &db));
    }
    for_each_dtype!(go);
}

/// Views starting at element 1 of a larger buffer give the same bits as the aligned copies.
#[test]
fn views_at_element_one_give_the_same_bits() {
    let mut g = rng(7);
    let (rows, cols) = (19, 40);
    let cfg = Config::new(rows, cols, 0.2, 8, 9).unwrap();
    let big = uniform::<bf16>(&mut g, rows * cols + 2, -3.0, 3.0);
    let view = &big[1..1 + rows * cols];
    let copy = view.to_vec();
    let b = uniform::<bf16>(&mut g, cols, -1.0, 1.0);
    let (y1, m1) = fwd(&cfg, view, Some(&b));
    let (y2, m2) = fwd(&cfg, &copy, Some(&b));
    check(bits_eq("y", &y1, &y2));
    assert_eq!(m1, m2);
    let mut out = vec![bf16::NAN; rows * cols + 2];
    cpu::forward(&cfg, view, &mut out[1..1 + rows * cols], Default::default()).unwrap();
    assert!(
        out[0].is_nan() && out[rows * cols + 1].is_nan(),
        "wrote outside the view"
    );
}

/// The reference's dbias against an f64 column sum of the same dx, and equal to
/// dropout_residual's (the backward is shared).
#[test]
fn dbias_is_close_to_an_f64_column_sum_and_shared_with_dropout_residual() {
    fn go<T: Dtype>() {
        let mut g = rng(8);
        let (rows, cols) = (1000, 67);
        let cfg = Config::new(rows, cols, 0.1, 1, 2).unwrap();
        assert!(
            slab_count(rows, cols, T::KIND) > 1,
            "test the two-stage sum"
        );
        let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        let (dx, db) = bwd(&cfg, &dy, None, true);
        let mut dx_r = vec![T::default(); rows * cols];
        let mut db_r = vec![T::default(); cols];
        let opts = fusedreg::dropout_residual::cpu::BackwardOptions {
            dbias: Some(&mut db_r),
            ..Default::default()
        };
        fusedreg::dropout_residual::cpu::backward(&cfg, &dy, &mut dx_r, opts).unwrap();
        check(bits_eq("dx vs dropout_residual", &dx, &dx_r));
        check(bits_eq("dbias vs dropout_residual", &db, &db_r));
        let scale = f64::from(cfg.rate().scale());
        let mut want = vec![0.0f64; cols];
        let mut abs = vec![0.0f64; cols];
        for row in 0..rows {
            for c in 0..cols {
                let i = row * cols + c;
                if cfg.keeps(i as u64) {
                    let d = f64::from(dy[i].to_f32()) * scale;
                    want[c] += d;
                    abs[c] += d.abs();
                }
            }
        }
        let eps_t = match T::KIND {
            fusedreg::DtypeKind::F32 => 2f64.powi(-24),
            fusedreg::DtypeKind::F16 => 2f64.powi(-11),
            fusedreg::DtypeKind::Bf16 => 2f64.powi(-8),
        };
        let got: Vec<f64> = db.iter().map(|v| f64::from(v.to_f32())).collect();
        for c in 0..cols {
            let tol = rows as f64 * 2f64.powi(-24) * abs[c] + eps_t * want[c].abs() + 1e-30;
            check(close(
                &format!("dbias[{c}]"),
                &got[c..=c],
                &want[c..=c],
                tol,
                0.0,
            ));
        }
    }
    for_each_dtype!(go);
}

#[test]
fn empty_inputs_are_valid() {
    let cfg = Config::new(0, 16, 0.5, 1, 1).unwrap();
    let mut db = vec![bf16::NAN; 16];
    let opts = BackwardOptions {
        dbias: Some(&mut db),
        ..Default::default()
    };
    cpu::backward::<bf16>(&cfg, &[], &mut [], opts).unwrap();
    assert!(
        db.iter().all(|v| v.to_f32() == 0.0),
        "dbias of no rows is 0"
    );
    let cfg = Config::flat(0, 0.5, 1, 1).unwrap();
    cpu::forward::<f32>(&cfg, &[], &mut [], ForwardOptions::default()).unwrap();
    unfused::forward_cpu::<f32>(&cfg, &[], None, &mut [], &mut []).unwrap();
    unfused::backward_cpu::<f32>(&cfg, &[], &[], &mut [], None).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    let is_shape = |r: fusedreg::Result<()>| matches!(r, Err(Error::ShapeMismatch { .. }));
    let is_invalid = |r: fusedreg::Result<()>| matches!(r, Err(Error::InvalidArgument { .. }));
    assert!(matches!(
        Config::new(4, 8, 1.5, 1, 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(4, 8, -0.1, 1, 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(4, 8, f64::NAN, 1, 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(usize::MAX, 2, 0.1, 1, 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(DropPath::new(2.0, 1).is_err());
    assert!(DropPath::new(0.1, 1).unwrap().per_sample(0).is_err());

    let cfg = Config::new(4, 8, 0.1, 1, 1).unwrap();
    let x = [1.0f32; 32];
    let mut y = [0.0f32; 32];
    assert!(is_shape(cpu::forward(
        &cfg,
        &x[..31],
        &mut y,
        Default::default()
    )));
    assert!(is_shape(cpu::forward(
        &cfg,
        &x,
        &mut y[..31],
        Default::default()
    )));
    let bias = [0.0f32; 7];
    let opts = ForwardOptions {
        bias: Some(&bias),
        ..Default::default()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, opts)));
    let mut mask = [0u32; 2];
    let opts = ForwardOptions {
        mask_out: Some(&mut mask),
        ..Default::default()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, opts)));
    let rs = [1.0f32; 3];
    let opts = ForwardOptions {
        rowscale: Some(&rs),
        ..Default::default()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, opts)));
    let mut rs_out = [0.0f32; 4];
    let opts = ForwardOptions {
        rowscale_out: Some(&mut rs_out),
        ..Default::default()
    };
    assert!(
        is_invalid(cpu::forward(&cfg, &x, &mut y, opts)),
        "rowscale_out needs a drop path"
    );
    let with_path = cfg.with_drop_path(DropPath::new(0.1, 2).unwrap());
    let rs = [1.0f32; 4];
    let opts = ForwardOptions {
        rowscale: Some(&rs),
        ..Default::default()
    };
    assert!(
        is_invalid(cpu::forward(&with_path, &x, &mut y, opts)),
        "rowscale and drop path"
    );
    assert!(y.iter().all(|&v| v == 0.0), "nothing written on error");

    let mut dx = [0.0f32; 32];
    assert!(is_shape(cpu::backward(
        &cfg,
        &x[..30],
        &mut dx,
        Default::default()
    )));
    let mask = [0u32; 3];
    let opts = BackwardOptions {
        mask: Some(&mask),
        ..Default::default()
    };
    assert!(is_shape(cpu::backward(&cfg, &x, &mut dx, opts)));
    let mut db = [0.0f32; 9];
    let opts = BackwardOptions {
        dbias: Some(&mut db),
        ..Default::default()
    };
    assert!(is_shape(cpu::backward(&cfg, &x, &mut dx, opts)));
    let opts = BackwardOptions {
        rowscale: Some(&rs),
        ..Default::default()
    };
    assert!(is_invalid(cpu::backward(&with_path, &x, &mut dx, opts)));

    let mut bytes = [0u8; 32];
    assert!(is_invalid(unfused::forward_cpu(
        &with_path, &x, None, &mut y, &mut bytes
    )));
    assert!(is_shape(unfused::forward_cpu(
        &cfg,
        &x,
        None,
        &mut y,
        &mut bytes[..31]
    )));
    assert!(is_shape(unfused::backward_cpu(
        &cfg,
        &x,
        &bytes,
        &mut dx[..31],
        None
    )));
}

/// The unfused mirror: its byte mask is the fused bitmask; without bias (and in f32 with bias)
/// its output is the fused output bit for bit; with a 16-bit bias the rounding of t to T makes
/// them differ by at most about one ulp of T. Its backward dx is the fused dx bit for bit.
#[test]
fn unfused_mirror_matches_the_fused_reference() {
    fn go<T: Dtype>() {
        let mut g = rng(9);
        let (rows, cols) = (33, 129);
        let n = rows * cols;
        let cfg = Config::new(rows, cols, 0.25, 17, 18).unwrap();
        let x = uniform::<T>(&mut g, n, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (mut yu, mut bytes) = (vec![T::default(); n], vec![7u8; n]);
        unfused::forward_cpu(&cfg, &x, None, &mut yu, &mut bytes).unwrap();
        let (y, mask) = fwd(&cfg, &x, None);
        check(bits_eq("unfused without bias", &yu, &y));
        for i in 0..n {
            assert_eq!(Some(bytes[i] == 1), mask_bit(&mask, i), "byte mask {i}");
        }
        unfused::forward_cpu(&cfg, &x, Some(&b), &mut yu, &mut bytes).unwrap();
        let (y, _) = fwd(&cfg, &x, Some(&b));
        if T::KIND == fusedreg::DtypeKind::F32 {
            check(bits_eq("unfused f32 with bias", &yu, &y));
        } else {
            let eps = if T::KIND == fusedreg::DtypeKind::F16 {
                2f64.powi(-10)
            } else {
                2f64.powi(-7)
            };
            let got: Vec<f64> = yu.iter().map(|v| f64::from(v.to_f32())).collect();
            let want: Vec<f64> = y.iter().map(|v| f64::from(v.to_f32())).collect();
            check(close(
                "unfused 16-bit with bias",
                &got,
                &want,
                1e-6,
                2.0 * eps,
            ));
        }
        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        let (mut dxu, mut dbu) = (vec![T::default(); n], vec![T::default(); cols]);
        unfused::backward_cpu(&cfg, &dy, &bytes, &mut dxu, Some(&mut dbu)).unwrap();
        let (dx, db) = bwd(&cfg, &dy, None, true);
        check(bits_eq("unfused dx", &dxu, &dx));
        // dbias: the unfused path sums the dx rounded to T (each off by up to half an ulp) in
        // another order; bound per column by the absolute sum of dx.
        let eps_t = match T::KIND {
            fusedreg::DtypeKind::F32 => 2f64.powi(-24),
            fusedreg::DtypeKind::F16 => 2f64.powi(-11),
            fusedreg::DtypeKind::Bf16 => 2f64.powi(-8),
        };
        for c in 0..cols {
            let abs: f64 = (0..rows)
                .map(|r| f64::from(dx[r * cols + c].to_f32()).abs())
                .sum();
            let (got, want) = (f64::from(dbu[c].to_f32()), f64::from(db[c].to_f32()));
            let tol = (eps_t + rows as f64 * 2f64.powi(-23)) * abs + 2.0 * eps_t * want.abs();
            check(close(
                &format!("unfused dbias[{c}]"),
                &[got],
                &[want],
                tol + 1e-30,
                0.0,
            ));
        }
    }
    for_each_dtype!(go);
}

/// 16-bit keying: element i takes halfword i % 8 of Philox block i / 8; p = 0 and p = 1 exact;
/// the applied probability is round(p * 2^16) / 2^16 and the drop rate is within a binomial
/// bound of it; forward and backward agree; only the dropout op offers it.
#[test]
fn sixteen_bit_keying() {
    use fusedreg::dropout::MaskResolution::Bits16;
    use fusedreg::philox::block;
    fn go<T: Dtype>() {
        let mut g = rng(11);
        let (rows, cols) = (41, 333);
        let n = rows * cols;
        let cfg = Config::new(rows, cols, 0.3, 0xfeed, 77)
            .unwrap()
            .with_resolution(Bits16);
        assert_eq!(cfg.effective_p(), (0.3f64 * 65536.0).round() / 65536.0);
        let x = uniform::<T>(&mut g, n, -2.0, 2.0);
        let (y, mask) = fwd(&cfg, &x, None);
        let t = (0.3f64 * 65536.0).round() as u32;
        for i in 0..n {
            let w = block(0xfeed, 77, (i / 8) as u64)[(i % 8) / 2];
            let h = if i % 2 == 1 { w >> 16 } else { w & 0xffff };
            assert_eq!(
                mask_bit(&mask, i),
                Some(h >= t),
                "halfword keying of element {i}"
            );
            assert_eq!(cfg.keeps(i as u64), h >= t, "Config::keeps {i}");
            let want = if h >= t {
                T::from_f32_rn(x[i].to_f32() * cfg.rate().scale())
            } else {
                T::from_f32_rn(0.0)
            };
            assert_eq!(y[i].to_f32().to_bits(), want.to_f32().to_bits(), "y[{i}]");
        }
        let (dx, db) = bwd(&cfg, &x, None, true);
        check(bits_eq("16-bit dx(dy = x) vs y", &dx, &y));
        let (dx_m, db_m) = bwd(&cfg, &x, Some(&mask), true);
        check(bits_eq("16-bit dx from the bitmask", &dx_m, &dx));
        check(bits_eq("16-bit dbias from the bitmask", &db_m, &db));
        for p in [0.0, 1.0] {
            let c = Config::flat(4099, p, 1, 2).unwrap().with_resolution(Bits16);
            let (y, mask) = fwd(&c, &x[..4099], None);
            if p == 0.0 {
                check(bits_eq("16-bit p = 0", &y, &x[..4099]));
                assert!(
                    (0..4099).all(|i| mask_bit(&mask, i) == Some(true)),
                    "p = 0 dropped"
                );
            } else {
                assert!(y.iter().all(|v| v.to_f32().to_bits() == 0), "p = 1 kept");
                assert!(mask.iter().all(|&w| w == 0), "p = 1 mask");
            }
        }
    }
    for_each_dtype!(go);

    // Drop rate and length independence.
    let n = 1 << 20;
    let x = vec![1.0f32; n];
    for (k, p) in [1.0 / 256.0, 0.1, 0.5].into_iter().enumerate() {
        let cfg = Config::flat(n, p, 0x5eed, 300 + k as u64)
            .unwrap()
            .with_resolution(Bits16);
        let (_, mask) = fwd(&cfg, &x, None);
        let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
        let dropped = (n as u64 - kept) as f64;
        let pe = cfg.effective_p();
        assert!((pe - p).abs() <= 2f64.powi(-17), "applied p {pe} vs {p}");
        let sigma = (n as f64 * pe * (1.0 - pe)).sqrt();
        assert!(
            (dropped - n as f64 * pe).abs() <= 5.0 * sigma,
            "16-bit p = {p}: dropped {dropped}"
        );
        let short = Config::flat(5003, p, 0x5eed, 300 + k as u64)
            .unwrap()
            .with_resolution(Bits16);
        let (_, ms) = fwd(&short, &x[..5003], None);
        assert!(
            (0..5003).all(|i| mask_bit(&ms, i) == mask_bit(&mask, i)),
            "length changed the mask"
        );
    }

    // The ops without 16-bit kernels refuse it (never a wrong mask).
    let cfg = Config::new(2, 8, 0.5, 1, 2)
        .unwrap()
        .with_resolution(Bits16);
    let v = [1.0f32; 16];
    let mut out = [0.0f32; 16];
    let r = fusedreg::dropout_residual::cpu::forward(&cfg, &v, &v, &mut out, Default::default());
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "dropout_residual: {r:?}"
    );
    let r = fusedreg::dropout_residual::cpu::backward(&cfg, &v, &mut out, Default::default());
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "dropout_residual bwd: {r:?}"
    );
    let mut bytes = [0u8; 16];
    let r = unfused::forward_cpu(&cfg, &v, None, &mut out, &mut bytes);
    assert!(
        matches!(r, Err(Error::InvalidArgument { .. })),
        "unfused: {r:?}"
    );
}
