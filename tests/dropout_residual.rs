//! CPU tests of the dropout + residual reference (always run): semantics, drop rates, mask
//! keying, drop path, forward/backward consistency, errors, dbias, and the unfused mirror.
// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{bits_eq, check, close, rng, uniform};
use fusedreg::dropout_residual::{
    cpu::{self, BackwardOptions, ForwardOptions},
    slab_count, unfused, Config, DropPath,
};
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

fn fwd<T: Dtype>(cfg: &Config, x: &[T], r: &[T], bias: Option<&[T]>) -> (Vec<T>, Vec<u32>) {
    let mut y = vec![T::from_f32_rn(f32::NAN); cfg.len()];
    let mut mask = vec![0xDEAD_BEEF; cfg.mask_words()];
    let opts = ForwardOptions {
        bias,
        mask_out: Some(&mut mask),
        ..Default::default()
    };
    cpu::forward(cfg, x, r, &mut y, opts).unwrap();
    (y, mask)
}

fn bit(mask: &[u32], i: usize) -> bool {
    mask[i / 32] >> (i % 32) & 1 == 1
}

#[test]
fn p0_gives_x_plus_bias_plus_residual_exactly() {
    fn go<T: Dtype>() {
        let mut g = rng(1);
        let (rows, cols) = (37, 1003);
        let cfg = Config::new(rows, cols, 0.0, 9, 1).unwrap();
        let x = uniform::<T>(&mut g, rows * cols, -4.0, 4.0);
        let r = uniform::<T>(&mut g, rows * cols, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (y, mask) = fwd(&cfg, &x, &r, Some(&b));
        let want: Vec<T> = (0..rows * cols)
            .map(|i| T::from_f32_rn((x[i].to_f32() + b[i % cols].to_f32()) + r[i].to_f32()))
            .collect();
        check(bits_eq("p = 0 with bias", &y, &want));
        assert!(
            (0..rows * cols).all(|i| bit(&mask, i)),
            "p = 0 dropped something"
        );
        let (y, _) = fwd(&cfg, &x, &r, None);
        let want: Vec<T> = (0..rows * cols)
            .map(|i| T::from_f32_rn(x[i].to_f32() + r[i].to_f32()))
            .collect();
        check(bits_eq("p = 0 without bias", &y, &want));
    }
    for_each_dtype!(go);
}

#[test]
fn p1_gives_the_residual_exactly_even_for_inf_and_nan_x() {
    fn go<T: Dtype>() {
        let mut g = rng(2);
        let n = 4099;
        let cfg = Config::flat(n, 1.0, 9, 1).unwrap();
        let mut x = uniform::<T>(&mut g, n, -4.0, 4.0);
        x[0] = T::from_f32_rn(f32::INFINITY);
        x[1] = T::from_f32_rn(f32::NAN);
        let r = uniform::<T>(&mut g, n, -4.0, 4.0);
        let (y, mask) = fwd(&cfg, &x, &r, None);
        check(bits_eq("p = 1", &y, &r));
        assert!(mask.iter().all(|&w| w == 0), "p = 1 kept something");
        let mut dx = vec![T::from_f32_rn(f32::NAN); n];
        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        cpu::backward(&cfg, &dy, &mut dx, BackwardOptions::default()).unwrap();
        assert!(
            dx.iter().all(|v| v.to_f32().to_bits() == 0),
            "p = 1: dx not +0"
        );
    }
    for_each_dtype!(go);
}

#[test]
fn dropped_elements_return_the_residual_bits_even_for_nan_x() {
    let mut g = rng(3);
    let n = 10_000;
    let cfg = Config::flat(n, 0.5, 77, 3).unwrap();
    let x = vec![bf16::NAN; n];
    let r = uniform::<bf16>(&mut g, n, -4.0, 4.0);
    let (y, mask) = fwd(&cfg, &x, &r, None);
    let mut dropped = 0;
    for i in 0..n {
        if bit(&mask, i) {
            assert!(y[i].is_nan(), "kept NaN x must give NaN at {i}");
        } else {
            dropped += 1;
            assert_eq!(
                y[i].to_bits(),
                r[i].to_bits(),
                "dropped element {i} is not r"
            );
        }
    }
    assert!(dropped > 4000);
}

/// The applied drop probability is within 5 sigma of `threshold / 2^32` on 2^20 elements.
#[test]
fn drop_rate_is_within_a_binomial_bound() {
    let n = 1 << 20;
    let x = vec![1.0f32; n];
    let r = vec![0.0f32; n];
    for (k, p) in [1.0 / 256.0, 0.1, 0.5].into_iter().enumerate() {
        let cfg = Config::flat(n, p, 0x5eed, 100 + k as u64).unwrap();
        let (_, mask) = fwd(&cfg, &x, &r, None);
        let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
        let dropped = (n as u64 - kept) as f64;
        let pe = cfg.rate().effective_p();
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
    let mut g = rng(4);
    let (long, short) = (100_003usize, 4_097usize);
    let x = uniform::<f32>(&mut g, long, -1.0, 1.0);
    let r = uniform::<f32>(&mut g, long, -1.0, 1.0);
    let (y_long, m_long) = fwd(&Config::flat(long, 0.3, 5, 6).unwrap(), &x, &r, None);
    let cfg_short = Config::flat(short, 0.3, 5, 6).unwrap();
    let (y_short, m_short) = fwd(&cfg_short, &x[..short], &r[..short], None);
    check(bits_eq("y prefix", &y_short, &y_long[..short]));
    for i in 0..short {
        assert_eq!(bit(&m_short, i), bit(&m_long, i), "mask bit {i}");
    }
    // Padding bits of the short mask are zero.
    assert_eq!(m_short[short / 32] >> (short % 32), 0);
    // The same elements as a [7, 14286] tensor without bias: identical.
    let (rows, cols) = (7, 14_286);
    let cfg2 = Config::new(rows, cols, 0.3, 5, 6).unwrap();
    let (y2, m2) = fwd(&cfg2, &x[..rows * cols], &r[..rows * cols], None);
    check(bits_eq("2D vs flat", &y2, &y_long[..rows * cols]));
    check(bits_eq(
        "2D vs flat mask",
        &m2[..(rows * cols) / 32],
        &m_long[..(rows * cols) / 32],
    ));
}

#[test]
fn different_call_ids_and_seeds_give_different_masks() {
    let n = 1 << 16;
    let x = vec![1.0f32; n];
    let r = vec![0.0f32; n];
    let (_, a) = fwd(&Config::flat(n, 0.5, 1, 10).unwrap(), &x, &r, None);
    let (_, b) = fwd(&Config::flat(n, 0.5, 1, 11).unwrap(), &x, &r, None);
    let (_, c) = fwd(&Config::flat(n, 0.5, 2, 10).unwrap(), &x, &r, None);
    for (name, other) in [("call", &b), ("seed", &c)] {
        let differ: u32 = a.iter().zip(other).map(|(p, q)| (p ^ q).count_ones()).sum();
        // Independent masks at p = 0.5 differ in about half of the bits.
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
    let cfg = Config::new(rows, cols, 0.0, 11, 1)
        .unwrap()
        .with_drop_path(DropPath::new(p_path, 2).unwrap());
    let x = uniform::<f32>(&mut g, rows * cols, 1.0, 2.0);
    let r = uniform::<f32>(&mut g, rows * cols, -1.0, 1.0);
    let mut y = vec![f32::NAN; rows * cols];
    let mut rs = vec![f32::NAN; rows];
    let opts = ForwardOptions {
        rowscale_out: Some(&mut rs),
        ..Default::default()
    };
    cpu::forward(&cfg, &x, &r, &mut y, opts).unwrap();
    let scale = (1.0 / (1.0 - p_path)) as f32;
    let mut kept_rows = 0;
    for row in 0..rows {
        let same = (0..cols)
            .filter(|&c| y[row * cols + c] == r[row * cols + c])
            .count();
        match rs[row] {
            0.0 => assert_eq!(same, cols, "dropped row {row} changed"),
            s if s == scale => {
                kept_rows += 1;
                assert_eq!(same, 0, "kept row {row} has unchanged elements");
                for c in 0..cols {
                    let i = row * cols + c;
                    assert_eq!(y[i], x[i].mul_add(scale, r[i]), "row {row} col {c}");
                }
            }
            s => panic!("row scale {s} is neither 0 nor {scale}"),
        }
    }
    let (n, pk) = (rows as f64, 1.0 - p_path);
    let sigma = (n * pk * (1.0 - pk)).sqrt();
    assert!(
        (f64::from(kept_rows) - n * pk).abs() <= 5.0 * sigma,
        "kept {kept_rows} of {rows} rows"
    );
    // The drop path and dropout compose: rows dropped by the path stay dropped, kept rows are
    // dropped element-wise with the dropout mask.
    let cfg2 = Config::new(rows, cols, 0.5, 11, 1)
        .unwrap()
        .with_drop_path(DropPath::new(p_path, 2).unwrap());
    let (y2, mask2) = fwd(&cfg2, &x, &r, None);
    for row in 0..rows {
        for c in 0..cols {
            let i = row * cols + c;
            let m = if bit(&mask2, i) { 2.0 * rs[row] } else { 0.0 };
            let want = if m != 0.0 {
                x[i].mul_add(m, r[i])
            } else {
                r[i]
            };
            assert_eq!(y2[i].to_bits(), want.to_bits(), "composed at {row}, {c}");
        }
    }
}

#[test]
fn per_sample_drop_path_shares_one_draw_per_sample() {
    let path = DropPath::new(0.5, 3).unwrap().per_sample(8).unwrap();
    let (rows, seed) = (8 * 500, 21);
    let mut kept = 0;
    for s in 0..rows / 8 {
        let v = path.row_scale(seed, (8 * s) as u64);
        for k in 1..8 {
            assert_eq!(path.row_scale(seed, (8 * s + k) as u64), v, "sample {s}");
        }
        kept += usize::from(v != 0.0);
        // The draw of sample s is the per-row draw of row s.
        assert_eq!(v, DropPath::new(0.5, 3).unwrap().row_scale(seed, s as u64));
    }
    assert!((200..300).contains(&kept), "{kept} of 500 samples kept");
    assert!(DropPath::new(0.5, 3).unwrap().per_sample(0).is_err());
}

#[test]
fn forward_and_backward_use_the_same_mask() {
    fn go<T: Dtype>() {
        let mut g = rng(6);
        let (rows, cols) = (33, 130);
        let cfg = Config::new(rows, cols, 0.3, 123, 45).unwrap();
        let x = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let r = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let mut rowscale = uniform::<f32>(&mut g, rows, 0.5, 2.0);
        rowscale[3] = 0.0;
        let mut y = vec![T::from_f32_rn(f32::NAN); rows * cols];
        let mut mask = vec![0u32; cfg.mask_words()];
        let opts = ForwardOptions {
            bias: Some(&b),
            rowscale: Some(&rowscale),
            mask_out: Some(&mut mask),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &r, &mut y, opts).unwrap();
        let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        let (mut dx1, mut dx2) = (
            vec![T::default(); rows * cols],
            vec![T::default(); rows * cols],
        );
        let (mut db1, mut db2) = (vec![T::default(); cols], vec![T::default(); cols]);
        let opts = BackwardOptions {
            rowscale: Some(&rowscale),
            dbias: Some(&mut db1),
            ..Default::default()
        };
        cpu::backward(&cfg, &dy, &mut dx1, opts).unwrap();
        let opts = BackwardOptions {
            rowscale: Some(&rowscale),
            mask: Some(&mask),
            dbias: Some(&mut db2),
        };
        cpu::backward(&cfg, &dy, &mut dx2, opts).unwrap();
        check(bits_eq("dx regenerated vs from mask", &dx1, &dx2));
        check(bits_eq("dbias regenerated vs from mask", &db1, &db2));
        let scale = cfg.rate().scale();
        for row in 0..rows {
            let rowm = scale * rowscale[row];
            for c in 0..cols {
                let i = row * cols + c;
                let m = if bit(&mask, i) { rowm } else { 0.0 };
                assert_eq!(cfg.keeps(i as u64), bit(&mask, i), "mask bit {i}");
                if m == 0.0 {
                    assert_eq!(y[i].to_f32().to_bits(), r[i].to_f32().to_bits(), "y at {i}");
                    assert_eq!(dx1[i].to_f32().to_bits(), 0, "dx at dropped {i}");
                } else {
                    let t = x[i].to_f32() + b[c].to_f32();
                    assert_eq!(
                        y[i],
                        T::from_f32_rn(t.mul_add(m, r[i].to_f32())),
                        "y at {i}"
                    );
                    assert_eq!(dx1[i], T::from_f32_rn(dy[i].to_f32() * m), "dx at {i}");
                }
            }
        }
        // Row 3 has scale 0: dropped entirely.
        assert!((0..cols).all(|c| dx1[3 * cols + c].to_f32() == 0.0));
    }
    for_each_dtype!(go);
}

#[test]
fn inplace_equals_out_of_place() {
    let mut g = rng(7);
    let (rows, cols) = (19, 77);
    let cfg = Config::new(rows, cols, 0.2, 3, 4)
        .unwrap()
        .with_drop_path(DropPath::new(0.25, 5).unwrap());
    let x = uniform::<bf16>(&mut g, rows * cols, -2.0, 2.0);
    let r = uniform::<bf16>(&mut g, rows * cols, -2.0, 2.0);
    let b = uniform::<bf16>(&mut g, cols, -1.0, 1.0);
    let (y, _) = fwd(&cfg, &x, &r, Some(&b));
    let mut stream = r.clone();
    let opts = ForwardOptions {
        bias: Some(&b),
        ..Default::default()
    };
    cpu::forward_inplace(&cfg, &x, &mut stream, opts).unwrap();
    check(bits_eq("in place", &stream, &y));
}

/// The reference's dbias against an f64 column sum of the same dx (sanity of the reference).
#[test]
fn dbias_reference_is_close_to_an_f64_column_sum() {
    fn go<T: Dtype>() {
        let mut g = rng(8);
        let (rows, cols) = (1000, 67);
        let cfg = Config::new(rows, cols, 0.1, 1, 2).unwrap();
        assert!(
            slab_count(rows, cols, T::KIND) > 1,
            "test the two-stage sum"
        );
        let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        let mut dx = vec![T::default(); rows * cols];
        let mut db = vec![T::default(); cols];
        let opts = BackwardOptions {
            dbias: Some(&mut db),
            ..Default::default()
        };
        cpu::backward(&cfg, &dy, &mut dx, opts).unwrap();
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
        // f32 summation error plus one rounding to T.
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
    cpu::forward::<f32>(&cfg, &[], &[], &mut [], ForwardOptions::default()).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    let is_shape = |r: fusedreg::Result<()>| matches!(r, Err(Error::ShapeMismatch { .. }));
    let is_invalid = |r: fusedreg::Result<()>| matches!(r, Err(Error::InvalidArgument { .. }));
    let (rows, cols) = (4, 8);
    let cfg = Config::new(rows, cols, 0.1, 1, 1).unwrap();
    let n = rows * cols;
    let (x, r) = (vec![1.0f32; n], vec![1.0f32; n]);
    let mut y = vec![0.0f32; n];
    let d = ForwardOptions::<f32>::default;
    assert!(is_shape(cpu::forward(&cfg, &x[1..], &r, &mut y, d())));
    assert!(is_shape(cpu::forward(&cfg, &x, &r[1..], &mut y, d())));
    assert!(is_shape(cpu::forward(&cfg, &x, &r, &mut y[1..], d())));
    let short_bias = vec![0.0f32; cols - 1];
    let o = ForwardOptions {
        bias: Some(&short_bias),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &r, &mut y, o)));
    let short_rs = vec![1.0f32; rows + 1];
    let o = ForwardOptions {
        rowscale: Some(&short_rs),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &r, &mut y, o)));
    let mut short_mask = vec![0u32; cfg.mask_words() + 1];
    let o = ForwardOptions {
        mask_out: Some(&mut short_mask),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &r, &mut y, o)));
    // rowscale_out without a drop path; rowscale together with one.
    let mut rs_out = vec![0.0f32; rows];
    let o = ForwardOptions {
        rowscale_out: Some(&mut rs_out),
        ..d()
    };
    assert!(is_invalid(cpu::forward(&cfg, &x, &r, &mut y, o)));
    let path_cfg = cfg.with_drop_path(DropPath::new(0.2, 9).unwrap());
    let rs = vec![1.0f32; rows];
    let o = ForwardOptions {
        rowscale: Some(&rs),
        ..d()
    };
    assert!(is_invalid(cpu::forward(&path_cfg, &x, &r, &mut y, o)));
    // Backward lengths.
    let mut dx = vec![0.0f32; n];
    let mut short_db = vec![0.0f32; cols + 1];
    let o = BackwardOptions {
        dbias: Some(&mut short_db),
        ..Default::default()
    };
    assert!(is_shape(cpu::backward(&cfg, &x, &mut dx, o)));
    assert!(is_shape(cpu::backward(
        &cfg,
        &x[1..],
        &mut dx,
        BackwardOptions::default()
    )));
    // Config: overflow, p and p_path invalid.
    assert!(matches!(
        Config::new(usize::MAX / 2 + 1, 2, 0.1, 0, 0),
        Err(Error::ShapeMismatch { .. })
    ));
    for p in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            Config::flat(8, p, 0, 0),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            DropPath::new(p, 0),
            Err(Error::InvalidArgument { .. })
        ));
    }
    // The unfused mirror refuses a drop path.
    let mut m8 = vec![0u8; n];
    assert!(is_invalid(unfused::forward_cpu(
        &path_cfg, &x, None, &r, &mut y, &mut m8
    )));
}

/// The unfused mirror: its byte mask equals the fused bitmask, and its outputs are within the
/// extra roundings of the fused reference: t and d are rounded to T before the final add (two
/// extra roundings of magnitude |t| and |d| respectively), and the backward's dbias sums rounded dx.
#[test]
fn unfused_mirror_is_close_to_the_fused_reference() {
    fn go<T: Dtype>() {
        let mut g = rng(9);
        let (rows, cols) = (70, 96);
        let n = rows * cols;
        let cfg = Config::new(rows, cols, 0.25, 31, 32).unwrap();
        let x = uniform::<T>(&mut g, n, -2.0, 2.0);
        let r = uniform::<T>(&mut g, n, -2.0, 2.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (y, mask) = fwd(&cfg, &x, &r, Some(&b));
        let mut yu = vec![T::default(); n];
        let mut m8 = vec![7u8; n];
        unfused::forward_cpu(&cfg, &x, Some(&b), &r, &mut yu, &mut m8).unwrap();
        for i in 0..n {
            assert_eq!(m8[i] == 1, bit(&mask, i), "byte mask vs bitmask at {i}");
            assert!(m8[i] <= 1);
        }
        let eps = match T::KIND {
            fusedreg::DtypeKind::F32 => 2f64.powi(-24),
            fusedreg::DtypeKind::F16 => 2f64.powi(-11),
            fusedreg::DtypeKind::Bf16 => 2f64.powi(-8),
        };
        let scale = f64::from(cfg.rate().scale());
        for i in 0..n {
            let t = f64::from(x[i].to_f32()) + f64::from(b[i % cols].to_f32());
            let d = if m8[i] == 1 { t * scale } else { 0.0 };
            let bound = 2.0 * eps * (f64::from(r[i].to_f32()).abs() + 2.0 * d.abs()) + 1e-30;
            let diff = (f64::from(yu[i].to_f32()) - f64::from(y[i].to_f32())).abs();
            assert!(
                diff <= bound,
                "y[{i}]: unfused {:?} fused {:?}",
                yu[i],
                y[i]
            );
        }
        // Backward: dx identical (one rounding of dy * scale either way); dbias within the
        // rounding of each dx.
        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        let (mut dx, mut dxu) = (vec![T::default(); n], vec![T::default(); n]);
        let (mut db, mut dbu) = (vec![T::default(); cols], vec![T::default(); cols]);
        let opts = BackwardOptions {
            mask: Some(&mask),
            dbias: Some(&mut db),
            ..Default::default()
        };
        cpu::backward(&cfg, &dy, &mut dx, opts).unwrap();
        unfused::backward_cpu(&cfg, &dy, &m8, &mut dxu, Some(&mut dbu)).unwrap();
        check(bits_eq("unfused dx", &dxu, &dx));
        for c in 0..cols {
            let abs: f64 = (0..rows)
                .map(|row| f64::from(dx[row * cols + c].to_f32()).abs())
                .sum();
            let tol = 3.0 * eps * abs + 2.0 * rows as f64 * 2f64.powi(-24) * abs + 1e-30;
            let (a, b) = (f64::from(dbu[c].to_f32()), f64::from(db[c].to_f32()));
            assert!((a - b).abs() <= tol, "dbias[{c}]: unfused {a} fused {b}");
        }
    }
    for_each_dtype!(go);
}
