//! CPU tests of the dropout reference (always run), without and with a residual (out of place and
//! in place): semantics at p = 0 and p = 1, the pinned formulas on random data and odd sizes,
//! drop rates, mask keying at every resolution, drop path, forward/backward consistency, views,
//! dbias, errors, and the unfused mirror.
// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{bits_eq, check, close, rng, uniform};
use fusedreg::dropout::{
    cpu::{self, BackwardOptions, ForwardOptions},
    slab_count, unfused, Config, DropPath,
    MaskResolution::{self, Bits16, Bits32, Bits8},
};
use fusedreg::dropping::{mask_bit, Keying};
use fusedreg::{Dtype, DtypeKind, Error};
use half::{bf16, f16};

/// Runs `f::<T>()` for every dtype.
macro_rules! for_each_dtype {
    ($f:ident) => {
        $f::<f32>();
        $f::<f16>();
        $f::<bf16>();
    };
}

/// The forward (y, 1-bit mask), with the residual `r` when given.
fn fwd<T: Dtype>(cfg: &Config, x: &[T], r: Option<&[T]>, bias: Option<&[T]>) -> (Vec<T>, Vec<u32>) {
    let mut y = vec![T::from_f32_rn(f32::NAN); cfg.len()];
    let mut mask = vec![0xDEAD_BEEF; cfg.mask_words()];
    let opts = ForwardOptions {
        bias,
        residual: r,
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

/// Bit `i` of a 1-bit mask the test sized (past the mask is a test bug).
fn bit(mask: &[u32], i: usize) -> bool {
    mask_bit(mask, i).expect("bit inside the mask")
}

/// One ulp of `T` at 1, relative (the rounding of one result to `T` is half of it).
fn eps<T: Dtype>() -> f64 {
    match T::KIND {
        DtypeKind::F32 => 2f64.powi(-24),
        DtypeKind::F16 => 2f64.powi(-11),
        DtypeKind::Bf16 => 2f64.powi(-8),
    }
}

#[test]
fn p0_gives_x_plus_bias_plus_residual_exactly() {
    fn go<T: Dtype>() {
        let mut g = rng(1);
        let (rows, cols) = (37, 1003);
        let n = rows * cols;
        let cfg = Config::new(rows, cols, 0.0, 9, 1).unwrap();
        assert_eq!(cfg.rate().effective_p(), 0.0);
        let x = uniform::<T>(&mut g, n, -4.0, 4.0);
        let r = uniform::<T>(&mut g, n, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (y, mask) = fwd(&cfg, &x, None, Some(&b));
        let want: Vec<T> = (0..n)
            .map(|i| T::from_f32_rn(x[i].to_f32() + b[i % cols].to_f32()))
            .collect();
        check(bits_eq("p = 0 with bias", &y, &want));
        assert!((0..n).all(|i| bit(&mask, i)), "p = 0 dropped something");
        let (y, _) = fwd(&cfg, &x, None, None);
        check(bits_eq("p = 0 without bias is the identity", &y, &x));
        // With a residual: x + bias + r rounded once.
        let (y, mask) = fwd(&cfg, &x, Some(&r), Some(&b));
        let want: Vec<T> = (0..n)
            .map(|i| T::from_f32_rn((x[i].to_f32() + b[i % cols].to_f32()) + r[i].to_f32()))
            .collect();
        check(bits_eq("p = 0 with bias and residual", &y, &want));
        assert!((0..n).all(|i| bit(&mask, i)), "p = 0 dropped something");
        let (y, _) = fwd(&cfg, &x, Some(&r), None);
        let want: Vec<T> = (0..n)
            .map(|i| T::from_f32_rn(x[i].to_f32() + r[i].to_f32()))
            .collect();
        check(bits_eq("p = 0 with residual, without bias", &y, &want));
    }
    for_each_dtype!(go);
}

#[test]
fn p1_gives_plus_zero_or_the_residual_exactly_even_for_inf_and_nan_x() {
    fn go<T: Dtype>() {
        let mut g = rng(2);
        let n = 4099;
        let cfg = Config::flat(n, 1.0, 9, 1).unwrap();
        assert_eq!(cfg.rate().effective_p(), 1.0);
        let mut x = uniform::<T>(&mut g, n, -4.0, 4.0);
        x[0] = T::from_f32_rn(f32::INFINITY);
        x[1] = T::from_f32_rn(f32::NAN);
        let (y, mask) = fwd(&cfg, &x, None, None);
        assert!(
            y.iter().all(|v| v.to_f32().to_bits() == 0),
            "p = 1: y not +0"
        );
        assert!(mask.iter().all(|&w| w == 0), "p = 1 kept something");
        let r = uniform::<T>(&mut g, n, -4.0, 4.0);
        let (y, mask) = fwd(&cfg, &x, Some(&r), None);
        check(bits_eq("p = 1 with residual", &y, &r));
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
fn dropped_elements_are_plus_zero_or_the_residual_bits_even_for_nan_x() {
    let mut g = rng(3);
    let n = 10_000;
    let cfg = Config::flat(n, 0.5, 77, 3).unwrap();
    let mut x = vec![bf16::NAN; n];
    x.iter_mut()
        .step_by(3)
        .for_each(|v| *v = bf16::NEG_INFINITY);
    let r = uniform::<bf16>(&mut g, n, -4.0, 4.0);
    let (y, mask) = fwd(&cfg, &x, None, None);
    let (yr, mask_r) = fwd(&cfg, &x, Some(&r), None);
    assert_eq!(mask, mask_r, "the residual changed the mask");
    let mut dropped = 0;
    for i in 0..n {
        if bit(&mask, i) {
            assert_eq!(y[i].is_nan(), x[i].is_nan(), "kept element {i}");
            assert_eq!(
                yr[i].is_nan(),
                x[i].is_nan(),
                "kept element {i} with residual"
            );
        } else {
            dropped += 1;
            assert_eq!(y[i].to_bits(), 0, "dropped element {i} is not +0");
            assert_eq!(
                yr[i].to_bits(),
                r[i].to_bits(),
                "dropped element {i} is not r"
            );
        }
    }
    assert!(dropped > 4000);
}

/// Random data, odd sizes, every option, both resolutions: y against the pinned formula element
/// by element, without and with a residual.
#[test]
fn forward_follows_the_pinned_formula() {
    fn go<T: Dtype>() {
        for (k, &(rows, cols)) in [(1usize, 1usize), (3, 7), (37, 1003), (129, 24), (2, 4105)]
            .iter()
            .enumerate()
        {
            for res in [Bits32, Bits16, Bits8] {
                let mut g = rng(10 + k as u64);
                let n = rows * cols;
                let cfg = Config::new(rows, cols, 0.3, 5 + k as u64, 1 << 40)
                    .unwrap()
                    .with_resolution(res);
                let x = uniform::<T>(&mut g, n, -4.0, 4.0);
                let r = uniform::<T>(&mut g, n, -4.0, 4.0);
                let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
                let mut rs = uniform::<f32>(&mut g, rows, 0.5, 2.0);
                rs.iter_mut().step_by(5).for_each(|v| *v = 0.0);
                let keying =
                    Keying::with_rate(cfg.rate(), cfg.seed(), cfg.call()).with_resolution(res);
                for residual in [None, Some(&r[..])] {
                    let mut y = vec![T::from_f32_rn(f32::NAN); n];
                    let mut mask = vec![0u32; cfg.mask_words()];
                    let opts = ForwardOptions {
                        bias: Some(&b),
                        residual,
                        rowscale: Some(&rs),
                        mask_out: Some(&mut mask),
                        ..Default::default()
                    };
                    cpu::forward(&cfg, &x, &mut y, opts).unwrap();
                    let want: Vec<T> = (0..n)
                        .map(|i| {
                            let rowm = cfg.scale(T::KIND) * rs[i / cols];
                            let t = x[i].to_f32() + b[i % cols].to_f32();
                            match (keying.keeps(i as u64) && rowm != 0.0, residual) {
                                (true, None) => T::from_f32_rn(t * rowm),
                                (true, Some(r)) => T::from_f32_rn(t.mul_add(rowm, r[i].to_f32())),
                                (false, None) => T::from_f32_rn(0.0),
                                (false, Some(r)) => r[i],
                            }
                        })
                        .collect();
                    let what = format!("{rows}x{cols} {res:?} residual {}", residual.is_some());
                    check(bits_eq(&what, &y, &want));
                    for i in 0..n {
                        assert_eq!(
                            bit(&mask, i),
                            keying.keeps(i as u64),
                            "{what}: mask bit {i}"
                        );
                    }
                    // Padding bits of the last word are zero.
                    if n % 32 != 0 {
                        assert_eq!(mask[n / 32] >> (n % 32), 0, "padding of {what}");
                    }
                }
            }
        }
    }
    for_each_dtype!(go);
}

/// The applied drop probability is within 5 sigma of `threshold / 2^32` on 2^20 elements, with
/// and without a residual (y and the mask agree).
#[test]
fn drop_rate_is_within_a_binomial_bound() {
    let n = 1 << 20;
    let x = vec![1.0f32; n];
    let r = vec![0.5f32; n];
    for (k, p) in [1.0 / 256.0, 0.1, 0.5, 0.9].into_iter().enumerate() {
        let cfg = Config::flat(n, p, 0x5eed, 200 + k as u64).unwrap();
        let (y, mask) = fwd(&cfg, &x, None, None);
        let (yr, mask_r) = fwd(&cfg, &x, Some(&r), None);
        assert_eq!(mask, mask_r, "the residual changed the mask");
        let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            kept,
            y.iter().filter(|&&v| v != 0.0).count() as u64,
            "mask and y agree"
        );
        assert_eq!(
            kept,
            yr.iter().filter(|&&v| v != 0.5).count() as u64,
            "mask and y + r agree"
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
fn mask_of_an_element_does_not_depend_on_the_tensor_length_shape_or_residual() {
    let mut g = rng(4);
    let (long, short) = (100_003usize, 4_097usize);
    let x = uniform::<f32>(&mut g, long, -1.0, 1.0);
    let r = uniform::<f32>(&mut g, long, -1.0, 1.0);
    for residual in [None, Some(&r[..])] {
        let cut = |m: usize| residual.map(|r| &r[..m]);
        let (y_long, a) = fwd(&Config::flat(long, 0.5, 3, 4).unwrap(), &x, residual, None);
        let (y_short, b) = fwd(
            &Config::flat(short, 0.5, 3, 4).unwrap(),
            &x[..short],
            cut(short),
            None,
        );
        check(bits_eq("y prefix", &y_short, &y_long[..short]));
        for i in 0..short {
            assert_eq!(bit(&a, i), bit(&b, i), "short tensor, element {i}");
        }
        // Padding bits of the short mask are zero.
        assert_eq!(b[short / 32] >> (short % 32), 0);
        let m = long / 4 * 4;
        let (y4, c) = fwd(
            &Config::new(4, long / 4, 0.5, 3, 4).unwrap(),
            &x[..m],
            cut(m),
            None,
        );
        check(bits_eq("as [4, n/4]", &y4, &y_long[..m]));
        for i in 0..m {
            assert_eq!(bit(&a, i), bit(&c, i), "as [4, n/4], element {i}");
        }
    }
    // One keying for every variant: the same mask with and without a residual.
    let cfg = Config::flat(short, 0.5, 3, 4).unwrap();
    let (_, plain) = fwd(&cfg, &x[..short], None, None);
    let (_, with_r) = fwd(&cfg, &x[..short], Some(&r[..short]), None);
    assert_eq!(
        plain, with_r,
        "the masks with and without a residual differ"
    );
}

#[test]
fn different_call_ids_and_seeds_give_different_masks() {
    let n = 1 << 16;
    let x = vec![1.0f32; n];
    let (_, a) = fwd(&Config::flat(n, 0.5, 1, 10).unwrap(), &x, None, None);
    let (_, b) = fwd(&Config::flat(n, 0.5, 1, 11).unwrap(), &x, None, None);
    let (_, c) = fwd(&Config::flat(n, 0.5, 2, 10).unwrap(), &x, None, None);
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
    let x = uniform::<f32>(&mut g, rows * cols, 1.0, 2.0);
    let r = uniform::<f32>(&mut g, rows * cols, -1.0, 1.0);
    let scale = (1.0 / (1.0 - p_path)) as f32;
    for per_sample in [1usize, 16] {
        let path = DropPath::new(p_path, 2)
            .unwrap()
            .per_sample(per_sample)
            .unwrap();
        let cfg = Config::new(rows, cols, 0.0, 11, 1)
            .unwrap()
            .with_drop_path(path);
        for residual in [None, Some(&r[..])] {
            let mut y = vec![f32::NAN; rows * cols];
            let mut rs = vec![f32::NAN; rows];
            let opts = ForwardOptions {
                residual,
                rowscale_out: Some(&mut rs),
                ..Default::default()
            };
            cpu::forward(&cfg, &x, &mut y, opts).unwrap();
            let mut dropped_rows = 0;
            for row in 0..rows {
                assert_eq!(rs[row], path.row_scale(11, row as u64), "row {row}");
                assert_eq!(
                    rs[row],
                    rs[row / per_sample * per_sample],
                    "sample of row {row}"
                );
                assert!(rs[row] == 0.0 || rs[row] == scale, "row scale {}", rs[row]);
                for c in 0..cols {
                    let i = row * cols + c;
                    let want = match (rs[row] == 0.0, residual) {
                        (true, None) => 0.0,
                        (true, Some(r)) => r[i],
                        (false, None) => x[i] * scale,
                        (false, Some(r)) => x[i].mul_add(scale, r[i]),
                    };
                    assert_eq!(y[i].to_bits(), want.to_bits(), "row {row} col {c}");
                }
                dropped_rows += usize::from(rs[row] == 0.0);
            }
            let frac = dropped_rows as f64 / rows as f64;
            assert!((0.25..0.35).contains(&frac), "{frac} of rows dropped");
            if residual.is_none() {
                // The backward regenerates the same row scale.
                let (dx, _) = bwd(&cfg, &x, None, false);
                check(bits_eq("backward with drop path", &dx, &y));
            }
        }
    }
    // The drop path and dropout compose: rows dropped by the path stay dropped, kept rows are
    // dropped element-wise with the dropout mask.
    let path = DropPath::new(p_path, 2).unwrap();
    let rs: Vec<f32> = (0..rows as u64)
        .map(|row| path.row_scale(11, row))
        .collect();
    let cfg2 = Config::new(rows, cols, 0.5, 11, 1)
        .unwrap()
        .with_drop_path(path);
    let (y2, mask2) = fwd(&cfg2, &x, Some(&r), None);
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

/// The backward of dy = x (no bias, no residual) equals the forward, from the regenerated mask
/// and from the bitmask; with a residual, bias and row scale the backward regenerated and from
/// the mask agree and follow the formula.
#[test]
fn forward_and_backward_use_the_same_mask() {
    fn go<T: Dtype>() {
        let mut g = rng(6);
        let (rows, cols) = (97, 203);
        let cfg = Config::new(rows, cols, 0.4, 123, 456).unwrap();
        let x = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let (y, mask) = fwd(&cfg, &x, None, None);
        let (dx, db) = bwd(&cfg, &x, None, true);
        check(bits_eq("dx(dy = x) vs y", &dx, &y));
        let (dx_m, db_m) = bwd(&cfg, &x, Some(&mask), true);
        check(bits_eq("dx from the bitmask", &dx_m, &dx));
        check(bits_eq("dbias from the bitmask", &db_m, &db));

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
            residual: Some(&r),
            rowscale: Some(&rowscale),
            mask_out: Some(&mut mask),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &mut y, opts).unwrap();
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
        let scale = cfg.scale(T::KIND);
        for row in 0..rows {
            let rowm = scale * rowscale[row];
            for c in 0..cols {
                let i = row * cols + c;
                let m = if bit(&mask, i) { rowm } else { 0.0 };
                assert_eq!(cfg.keeps(T::KIND, i as u64), bit(&mask, i), "mask bit {i}");
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

/// Views starting at element 1 of a larger buffer give the same bits as the aligned copies.
#[test]
fn views_at_element_one_give_the_same_bits() {
    let mut g = rng(7);
    let (rows, cols) = (19, 40);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, 0.2, 8, 9).unwrap();
    let big = uniform::<bf16>(&mut g, n + 2, -3.0, 3.0);
    let big_r = uniform::<bf16>(&mut g, n + 2, -3.0, 3.0);
    let (view, view_r) = (&big[1..1 + n], &big_r[1..1 + n]);
    let (copy, copy_r) = (view.to_vec(), view_r.to_vec());
    let b = uniform::<bf16>(&mut g, cols, -1.0, 1.0);
    for (residual_view, residual_copy) in [(None, None), (Some(view_r), Some(&copy_r[..]))] {
        let (y1, m1) = fwd(&cfg, view, residual_view, Some(&b));
        let (y2, m2) = fwd(&cfg, &copy, residual_copy, Some(&b));
        check(bits_eq("y", &y1, &y2));
        assert_eq!(m1, m2);
        let mut out = vec![bf16::NAN; n + 2];
        let opts = ForwardOptions {
            residual: residual_view,
            ..Default::default()
        };
        cpu::forward(&cfg, view, &mut out[1..1 + n], opts).unwrap();
        assert!(
            out[0].is_nan() && out[n + 1].is_nan(),
            "wrote outside the view"
        );
    }
}

#[test]
fn inplace_equals_out_of_place() {
    let mut g = rng(7);
    let (rows, cols) = (19, 77);
    for res in [Bits32, Bits16, Bits8] {
        let cfg = Config::new(rows, cols, 0.2, 3, 4)
            .unwrap()
            .with_drop_path(DropPath::new(0.25, 5).unwrap())
            .with_resolution(res);
        let x = uniform::<bf16>(&mut g, rows * cols, -2.0, 2.0);
        let r = uniform::<bf16>(&mut g, rows * cols, -2.0, 2.0);
        let b = uniform::<bf16>(&mut g, cols, -1.0, 1.0);
        let (y, mask) = fwd(&cfg, &x, Some(&r), Some(&b));
        let mut stream = r.clone();
        let mut mask_in_place = vec![0u32; cfg.mask_words()];
        let opts = ForwardOptions {
            bias: Some(&b),
            mask_out: Some(&mut mask_in_place),
            ..Default::default()
        };
        cpu::forward_inplace(&cfg, &x, &mut stream, opts).unwrap();
        check(bits_eq(&format!("in place {res:?}"), &stream, &y));
        assert_eq!(mask, mask_in_place, "in place mask {res:?}");
    }
}

/// The reference's dbias against an f64 column sum of the same dx (sanity of the reference).
#[test]
fn dbias_is_close_to_an_f64_column_sum() {
    fn go<T: Dtype>() {
        let mut g = rng(8);
        let (rows, cols) = (1000, 67);
        let cfg = Config::new(rows, cols, 0.1, 1, 2).unwrap();
        assert!(
            slab_count(rows, cols, T::KIND) > 1,
            "test the two-stage sum"
        );
        let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        let (_, db) = bwd(&cfg, &dy, None, true);
        let scale = f64::from(cfg.scale(T::KIND));
        let mut want = vec![0.0f64; cols];
        let mut abs = vec![0.0f64; cols];
        for row in 0..rows {
            for c in 0..cols {
                let i = row * cols + c;
                if cfg.keeps(T::KIND, i as u64) {
                    let d = f64::from(dy[i].to_f32()) * scale;
                    want[c] += d;
                    abs[c] += d.abs();
                }
            }
        }
        // f32 summation error plus one rounding to T.
        let got: Vec<f64> = db.iter().map(|v| f64::from(v.to_f32())).collect();
        for c in 0..cols {
            let tol = rows as f64 * 2f64.powi(-24) * abs[c] + eps::<T>() * want[c].abs() + 1e-30;
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
    let opts = ForwardOptions {
        residual: Some(&[]),
        ..Default::default()
    };
    cpu::forward::<f32>(&cfg, &[], &mut [], opts).unwrap();
    cpu::forward_inplace::<f32>(&cfg, &[], &mut [], ForwardOptions::default()).unwrap();
    unfused::forward_cpu::<f32>(&cfg, &[], None, None, &mut [], &mut []).unwrap();
    unfused::forward_cpu::<f32>(&cfg, &[], None, Some(&[]), &mut [], &mut []).unwrap();
    unfused::backward_cpu::<f32>(&cfg, &[], &[], &mut [], None).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    let is_shape = |r: fusedreg::Result<()>| matches!(r, Err(Error::ShapeMismatch { .. }));
    let is_invalid = |r: fusedreg::Result<()>| matches!(r, Err(Error::InvalidArgument { .. }));
    // Config: overflow, p and p_path invalid.
    assert!(matches!(
        Config::new(usize::MAX, 2, 0.1, 1, 1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        Config::new(usize::MAX / 2 + 1, 2, 0.1, 0, 0),
        Err(Error::ShapeMismatch { .. })
    ));
    for p in [-0.1, 1.1, 1.5, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            Config::new(4, 8, p, 1, 1),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            Config::flat(8, p, 0, 0),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            DropPath::new(p, 0),
            Err(Error::InvalidArgument { .. })
        ));
    }
    assert!(DropPath::new(0.1, 1).unwrap().per_sample(0).is_err());

    let (rows, cols) = (4, 8);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, 0.1, 1, 1).unwrap();
    let (x, r) = (vec![1.0f32; n], vec![1.0f32; n]);
    let mut y = vec![0.0f32; n];
    let d = ForwardOptions::<f32>::default;
    let with_r = || ForwardOptions {
        residual: Some(&r[..]),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x[..n - 1], &mut y, d())));
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y[..n - 1], d())));
    assert!(is_shape(cpu::forward(&cfg, &x[1..], &mut y, with_r())));
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y[1..], with_r())));
    let o = ForwardOptions {
        residual: Some(&r[1..]),
        ..d()
    };
    assert!(
        is_shape(cpu::forward(&cfg, &x, &mut y, o)),
        "short residual"
    );
    let short_bias = vec![0.0f32; cols - 1];
    let o = ForwardOptions {
        bias: Some(&short_bias),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, o)));
    let short_rs = vec![1.0f32; rows - 1];
    let o = ForwardOptions {
        rowscale: Some(&short_rs),
        ..with_r()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, o)));
    let mut short_mask = vec![0u32; cfg.mask_words() + 1];
    let o = ForwardOptions {
        mask_out: Some(&mut short_mask),
        ..d()
    };
    assert!(is_shape(cpu::forward(&cfg, &x, &mut y, o)));
    // rowscale_out without a drop path; rowscale together with one.
    let mut rs_out = vec![0.0f32; rows];
    let o = ForwardOptions {
        rowscale_out: Some(&mut rs_out),
        ..with_r()
    };
    assert!(
        is_invalid(cpu::forward(&cfg, &x, &mut y, o)),
        "rowscale_out needs a drop path"
    );
    let path_cfg = cfg.with_drop_path(DropPath::new(0.2, 9).unwrap());
    let rs = vec![1.0f32; rows];
    let o = ForwardOptions {
        rowscale: Some(&rs),
        ..d()
    };
    assert!(
        is_invalid(cpu::forward(&path_cfg, &x, &mut y, o)),
        "rowscale and drop path"
    );
    // In place: the residual is the stream; a second residual is refused.
    let mut stream = r.clone();
    assert!(is_shape(cpu::forward_inplace(
        &cfg,
        &x,
        &mut stream[1..],
        d()
    )));
    assert!(is_invalid(cpu::forward_inplace(
        &cfg,
        &x,
        &mut stream,
        with_r()
    )));
    assert!(stream == r, "nothing written on error");
    assert!(y.iter().all(|&v| v == 0.0), "nothing written on error");

    // Backward lengths.
    let mut dx = vec![0.0f32; n];
    assert!(is_shape(cpu::backward(
        &cfg,
        &x[..n - 2],
        &mut dx,
        Default::default()
    )));
    let mask = [0u32; 3];
    let o = BackwardOptions {
        mask: Some(&mask),
        ..Default::default()
    };
    assert!(is_shape(cpu::backward(&cfg, &x, &mut dx, o)));
    let mut short_db = vec![0.0f32; cols + 1];
    let o = BackwardOptions {
        dbias: Some(&mut short_db),
        ..Default::default()
    };
    assert!(is_shape(cpu::backward(&cfg, &x, &mut dx, o)));
    let o = BackwardOptions {
        rowscale: Some(&rs),
        ..Default::default()
    };
    assert!(is_invalid(cpu::backward(&path_cfg, &x, &mut dx, o)));

    // The unfused mirror refuses a drop path and 16-bit keying, and checks its lengths.
    let mut bytes = vec![0u8; n];
    assert!(is_invalid(unfused::forward_cpu(
        &path_cfg, &x, None, None, &mut y, &mut bytes
    )));
    assert!(is_invalid(unfused::forward_cpu(
        &path_cfg,
        &x,
        None,
        Some(&r),
        &mut y,
        &mut bytes
    )));
    assert!(is_shape(unfused::forward_cpu(
        &cfg,
        &x,
        None,
        None,
        &mut y,
        &mut bytes[..n - 1]
    )));
    assert!(is_shape(unfused::forward_cpu(
        &cfg,
        &x,
        None,
        Some(&r[1..]),
        &mut y,
        &mut bytes
    )));
    assert!(is_shape(unfused::backward_cpu(
        &cfg,
        &x,
        &bytes,
        &mut dx[..n - 1],
        None
    )));
    let cfg16 = cfg.with_resolution(Bits16);
    assert!(is_invalid(unfused::forward_cpu(
        &cfg16, &x, None, None, &mut y, &mut bytes
    )));
    assert!(is_invalid(unfused::backward_cpu(
        &cfg16, &x, &bytes, &mut dx, None
    )));
    let cfg8 = cfg.with_resolution(Bits8);
    assert!(is_invalid(unfused::forward_cpu(
        &cfg8, &x, None, None, &mut y, &mut bytes
    )));
}

/// The unfused mirror: its byte mask is the fused bitmask. Without a residual: without bias (and
/// in f32 with bias) its output is the fused output bit for bit; with a 16-bit bias the rounding
/// of t to T makes them differ by at most about one ulp of T. With a residual its outputs are
/// within the extra roundings of the fused reference (t and d rounded to T before the final add).
/// Its backward dx is the fused dx bit for bit; its dbias sums the rounded dx.
#[test]
fn unfused_mirror_matches_the_fused_reference() {
    fn go<T: Dtype>() {
        let mut g = rng(9);
        let (rows, cols) = (33, 129);
        let n = rows * cols;
        // The unfused baseline keys at 32 bits: compare with the fused op at 32 bits.
        let cfg = Config::new(rows, cols, 0.25, 17, 18)
            .unwrap()
            .with_resolution(Bits32);
        let x = uniform::<T>(&mut g, n, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (mut yu, mut bytes) = (vec![T::default(); n], vec![7u8; n]);
        unfused::forward_cpu(&cfg, &x, None, None, &mut yu, &mut bytes).unwrap();
        let (y, mask) = fwd(&cfg, &x, None, None);
        check(bits_eq("unfused without bias", &yu, &y));
        for i in 0..n {
            assert_eq!(bytes[i] == 1, bit(&mask, i), "byte mask {i}");
        }
        unfused::forward_cpu(&cfg, &x, Some(&b), None, &mut yu, &mut bytes).unwrap();
        let (y, _) = fwd(&cfg, &x, None, Some(&b));
        if T::KIND == DtypeKind::F32 {
            check(bits_eq("unfused f32 with bias", &yu, &y));
        } else {
            let got: Vec<f64> = yu.iter().map(|v| f64::from(v.to_f32())).collect();
            let want: Vec<f64> = y.iter().map(|v| f64::from(v.to_f32())).collect();
            check(close(
                "unfused 16-bit with bias",
                &got,
                &want,
                1e-6,
                4.0 * eps::<T>(),
            ));
        }

        // With a residual: y = T(r + T(T(x + b) * scale)) against T(fma(x + b, scale, r)).
        let r = uniform::<T>(&mut g, n, -2.0, 2.0);
        let (y, mask) = fwd(&cfg, &x, Some(&r), Some(&b));
        let mut m8 = vec![7u8; n];
        unfused::forward_cpu(&cfg, &x, Some(&b), Some(&r), &mut yu, &mut m8).unwrap();
        let scale = f64::from(cfg.scale(T::KIND));
        for i in 0..n {
            assert_eq!(m8[i] == 1, bit(&mask, i), "byte mask vs bitmask at {i}");
            let t = f64::from(x[i].to_f32()) + f64::from(b[i % cols].to_f32());
            let d = if m8[i] == 1 { t * scale } else { 0.0 };
            let bound = 2.0 * eps::<T>() * (f64::from(r[i].to_f32()).abs() + 2.0 * d.abs()) + 1e-30;
            let diff = (f64::from(yu[i].to_f32()) - f64::from(y[i].to_f32())).abs();
            assert!(
                diff <= bound,
                "y[{i}]: unfused {:?} fused {:?}",
                yu[i],
                y[i]
            );
        }

        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        let (mut dxu, mut dbu) = (vec![T::default(); n], vec![T::default(); cols]);
        unfused::backward_cpu(&cfg, &dy, &m8, &mut dxu, Some(&mut dbu)).unwrap();
        let (dx, db) = bwd(&cfg, &dy, Some(&mask), true);
        check(bits_eq("unfused dx", &dxu, &dx));
        // dbias: the unfused path sums the dx rounded to T (each off by up to half an ulp) in
        // another order; bound per column by the absolute sum of dx.
        for c in 0..cols {
            let abs: f64 = (0..rows)
                .map(|r| f64::from(dx[r * cols + c].to_f32()).abs())
                .sum();
            let (got, want) = (f64::from(dbu[c].to_f32()), f64::from(db[c].to_f32()));
            let tol =
                (eps::<T>() + rows as f64 * 2f64.powi(-23)) * abs + 2.0 * eps::<T>() * want.abs();
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

/// The default resolution follows the dtype (bf16, f16: 16-bit keys; f32: 32-bit), an explicit
/// one always wins, and a config left unset gives the explicit default's bits on the CPU,
/// forward and backward (the backward regenerates the forward's mask at the same resolution).
#[test]
fn default_resolution_is_resolved_per_dtype() {
    fn go<T: Dtype>() {
        let (rows, cols) = (37, 129);
        let unset = Config::new(rows, cols, 0.3, 11, 12).unwrap();
        let want = if T::KIND == DtypeKind::F32 {
            Bits32
        } else {
            Bits16
        };
        assert_eq!(unset.resolution(), None);
        assert_eq!(unset.resolution_for(T::KIND), want, "{:?}", T::KIND);
        assert_eq!(MaskResolution::default_for(T::KIND), want);
        for explicit in [Bits32, Bits16, Bits8] {
            let e = unset.with_resolution(explicit);
            assert_eq!(e.resolution_for(T::KIND), explicit, "explicit wins");
            assert_eq!(e.keying(T::KIND).resolution(), explicit);
        }
        let explicit = unset.with_resolution(want);
        let mut g = rng(0xdef);
        let x = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let r = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let (y0, m0) = fwd(&unset, &x, Some(&r), Some(&b));
        let (y1, m1) = fwd(&explicit, &x, Some(&r), Some(&b));
        check(bits_eq("unset vs explicit forward", &y0, &y1));
        assert_eq!(m0, m1, "unset vs explicit mask");
        // The other resolution keys another mask (the test can fail).
        let other = unset.with_resolution(if want == Bits32 { Bits16 } else { Bits32 });
        assert_ne!(fwd(&other, &x, Some(&r), Some(&b)).1, m0);
        // The backward regenerates the same mask: equal to the one read from the forward's.
        let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        let (dx_regen, db_regen) = bwd(&unset, &dy, None, true);
        let (dx_mask, db_mask) = bwd(&unset, &dy, Some(&m0), true);
        let (dx_e, db_e) = bwd(&explicit, &dy, None, true);
        check(bits_eq(
            "regenerated vs forward's mask dx",
            &dx_regen,
            &dx_mask,
        ));
        check(bits_eq(
            "regenerated vs forward's mask dbias",
            &db_regen,
            &db_mask,
        ));
        check(bits_eq("unset vs explicit dx", &dx_regen, &dx_e));
        check(bits_eq("unset vs explicit dbias", &db_regen, &db_e));
        for i in 0..rows * cols {
            assert_eq!(bit(&m0, i), unset.keeps(T::KIND, i as u64), "keeps {i}");
        }
    }
    for_each_dtype!(go);
}

/// Element `i`'s random key at a resolution, written out from its Philox block (not through the
/// library's keying): word `i % 4` of block `i / 4`, halfword `i % 8` of block `i / 8` (low half
/// for even `i`), or byte `i % 16` of block `i / 16` (little-endian within each word).
fn key_of(res: MaskResolution, seed: u64, call: u64, i: usize) -> u32 {
    use fusedreg::philox::block;
    match res {
        Bits32 => block(seed, call, (i / 4) as u64)[i % 4],
        Bits16 => (block(seed, call, (i / 8) as u64)[(i % 8) / 2] >> (16 * (i % 2))) & 0xffff,
        Bits8 => (block(seed, call, (i / 16) as u64)[(i % 16) / 4] >> (8 * (i % 4))) & 0xff,
    }
}

/// A narrow keying (16 or 8 bits) on one dtype, with and without a residual: every element
/// kept or dropped by its key against `round(0.3 * 2^bits)`, the values at the applied scale,
/// the backward (regenerated and from the bitmask) equal to the forward, p = 0 and p = 1 exact.
fn narrow_keying_case<T: Dtype>(res: MaskResolution, rng_seed: u64, (rows, cols): (usize, usize)) {
    let (seed, call) = (0xfeed + u64::from(res.bits()), 77);
    let bits = res.bits();
    let mut g = rng(rng_seed);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, 0.3, seed, call)
        .unwrap()
        .with_resolution(res);
    let all = 2f64.powi(bits as i32);
    assert_eq!(cfg.effective_p(T::KIND), (0.3f64 * all).round() / all);
    let x = uniform::<T>(&mut g, n, -2.0, 2.0);
    let r = uniform::<T>(&mut g, n, -2.0, 2.0);
    let (y, mask) = fwd(&cfg, &x, None, None);
    let (yr, mask_r) = fwd(&cfg, &x, Some(&r), None);
    assert_eq!(mask, mask_r, "the residual changed the {bits}-bit mask");
    let t = (0.3f64 * all).round() as u32;
    for i in 0..n {
        let key = key_of(res, seed, call, i);
        assert_eq!(bit(&mask, i), key >= t, "{bits}-bit keying of element {i}");
        assert_eq!(cfg.keeps(T::KIND, i as u64), key >= t, "Config::keeps {i}");
        let (want, want_r) = if key >= t {
            let s = cfg.scale(T::KIND);
            (
                T::from_f32_rn(x[i].to_f32() * s),
                T::from_f32_rn(x[i].to_f32().mul_add(s, r[i].to_f32())),
            )
        } else {
            (T::from_f32_rn(0.0), r[i])
        };
        assert_eq!(y[i].to_f32().to_bits(), want.to_f32().to_bits(), "y[{i}]");
        assert_eq!(
            yr[i].to_f32().to_bits(),
            want_r.to_f32().to_bits(),
            "y[{i}] with residual"
        );
    }
    let (dx, db) = bwd(&cfg, &x, None, true);
    check(bits_eq(&format!("{bits}-bit dx(dy = x) vs y"), &dx, &y));
    let (dx_m, db_m) = bwd(&cfg, &x, Some(&mask), true);
    check(bits_eq(
        &format!("{bits}-bit dx from the bitmask"),
        &dx_m,
        &dx,
    ));
    check(bits_eq(
        &format!("{bits}-bit dbias from the bitmask"),
        &db_m,
        &db,
    ));
    for p in [0.0, 1.0] {
        let c = Config::flat(4099, p, 1, 2).unwrap().with_resolution(res);
        let (y, mask) = fwd(&c, &x[..4099], None, None);
        let (yr, _) = fwd(&c, &x[..4099], Some(&r[..4099]), None);
        if p == 0.0 {
            check(bits_eq(&format!("{bits}-bit p = 0"), &y, &x[..4099]));
            assert!((0..4099).all(|i| bit(&mask, i)), "p = 0 dropped");
        } else {
            assert!(y.iter().all(|v| v.to_f32().to_bits() == 0), "p = 1 kept");
            check(bits_eq(
                &format!("{bits}-bit p = 1 with residual"),
                &yr,
                &r[..4099],
            ));
            assert!(mask.iter().all(|&w| w == 0), "p = 1 mask");
        }
    }
}

/// A narrow keying's drop rate and length independence, with and without a residual: the
/// applied p within `2^-(bits + 1)` of p, the dropped count within 5 sigma of it, the mask of a
/// shorter tensor a prefix of the longer one's.
fn narrow_drop_rate(res: MaskResolution, call_base: u64) {
    let bits = res.bits();
    let n = 1 << 20;
    let x = vec![1.0f32; n];
    let r = vec![0.5f32; n];
    for (k, p) in [1.0 / 256.0, 0.1, 0.5].into_iter().enumerate() {
        let cfg = Config::flat(n, p, 0x5eed, call_base + k as u64)
            .unwrap()
            .with_resolution(res);
        let (_, mask) = fwd(&cfg, &x, None, None);
        let (yr, mask_r) = fwd(&cfg, &x, Some(&r), None);
        assert_eq!(mask, mask_r, "the residual changed the mask");
        let kept: u64 = mask.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(
            kept,
            yr.iter().filter(|&&v| v != 0.5).count() as u64,
            "mask and y + r agree"
        );
        let dropped = (n as u64 - kept) as f64;
        let pe = cfg.effective_p(fusedreg::DtypeKind::F32);
        assert!(
            (pe - p).abs() <= 2f64.powi(-(bits as i32 + 1)),
            "applied p {pe} vs {p}"
        );
        let sigma = (n as f64 * pe * (1.0 - pe)).sqrt();
        assert!(
            (dropped - n as f64 * pe).abs() <= 5.0 * sigma,
            "{bits}-bit p = {p}: dropped {dropped}"
        );
        let short = Config::flat(5003, p, 0x5eed, call_base + k as u64)
            .unwrap()
            .with_resolution(res);
        let (_, ms) = fwd(&short, &x[..5003], None, None);
        assert!(
            (0..5003).all(|i| bit(&ms, i) == bit(&mask, i)),
            "length changed the mask"
        );
    }
}

/// 16-bit keying, with and without a residual: element i takes halfword i % 8 of Philox block
/// i / 8; p = 0 and p = 1 exact; the applied probability is round(p * 2^16) / 2^16 and the drop
/// rate is within a binomial bound of it; forward and backward agree.
#[test]
fn sixteen_bit_keying() {
    fn go<T: Dtype>() {
        narrow_keying_case::<T>(Bits16, 11, (41, 333));
    }
    for_each_dtype!(go);
    narrow_drop_rate(Bits16, 300);
}

/// 8-bit keying: element `i` takes byte `i % 16` of Philox block `i / 16` (little-endian within
/// each word), dropped below `round(p * 2^8)`; the forward (with and without a residual), the
/// backward (regenerated and from the bitmask), p = 0 / p = 1 and the drop rate follow it.
#[test]
fn eight_bit_keying() {
    fn go<T: Dtype>() {
        narrow_keying_case::<T>(Bits8, 12, (23, 331));
    }
    for_each_dtype!(go);
    narrow_drop_rate(Bits8, 400);
}

/// Every resolution is a mask resolution of the op (the list a new one must join).
#[test]
fn every_resolution_is_offered_with_and_without_a_residual() {
    let x = [1.0f32; 64];
    let r = [0.5f32; 64];
    for res in [
        MaskResolution::Bits32,
        MaskResolution::Bits16,
        MaskResolution::Bits8,
    ] {
        let cfg = Config::new(2, 32, 0.5, 1, 2).unwrap().with_resolution(res);
        let (y, mask) = fwd(&cfg, &x, None, None);
        let (yr, mask_r) = fwd(&cfg, &x, Some(&r), None);
        assert_eq!(mask, mask_r, "{res:?}");
        for i in 0..64 {
            assert_eq!(
                bit(&mask, i),
                cfg.keeps(fusedreg::DtypeKind::F32, i as u64),
                "{res:?} {i}"
            );
            assert_eq!(
                y[i] != 0.0,
                cfg.keeps(fusedreg::DtypeKind::F32, i as u64),
                "{res:?} y {i}"
            );
            assert_eq!(
                yr[i] != 0.5,
                cfg.keeps(fusedreg::DtypeKind::F32, i as u64),
                "{res:?} y + r {i}"
            );
        }
        let mut stream = r;
        cpu::forward_inplace(&cfg, &x, &mut stream, Default::default()).unwrap();
        assert_eq!(stream, yr[..], "{res:?} in place");
    }
}

/// Kept elements are scaled by one over the probability of keeping actually applied, at every
/// resolution (so the output is unbiased however coarse the keying): `scale * (1 - effective p)`
/// is 1 within the f32 rounding of the scale; a rate that rounds to dropping nothing is not
/// scaled; p = 1 scales by 0. The CPU forward applies exactly that scale.
#[test]
fn scale_is_one_over_the_applied_keep_probability() {
    for res in [Bits32, Bits16, Bits8] {
        for p in [0.0, 1e-6, 1.0 / 256.0, 0.1, 0.3, 0.5, 0.9, 0.999] {
            let cfg = Config::flat(64, p, 1, 2).unwrap().with_resolution(res);
            let keep = 1.0 - cfg.effective_p(fusedreg::DtypeKind::F32);
            if keep == 0.0 {
                // Bits8 quantises p = 0.999 to 256 / 256: everything dropped, scale 0.
                assert_eq!(
                    cfg.scale(fusedreg::DtypeKind::F32),
                    0.0,
                    "{res:?} p {p}: nothing kept"
                );
                continue;
            }
            let err = (f64::from(cfg.scale(fusedreg::DtypeKind::F32)) * keep - 1.0).abs();
            assert!(
                err <= 2f64.powi(-24) + 2f64.powi(-50),
                "{res:?} p {p}: scale {} x keep {keep} = 1 + {err}",
                cfg.scale(fusedreg::DtypeKind::F32)
            );
            if cfg.effective_p(fusedreg::DtypeKind::F32) == 0.0 {
                assert_eq!(
                    cfg.scale(fusedreg::DtypeKind::F32),
                    1.0,
                    "{res:?} p {p}: nothing dropped, nothing scaled"
                );
            }
        }
        let all = Config::flat(64, 1.0, 1, 2).unwrap().with_resolution(res);
        assert_eq!(all.scale(fusedreg::DtypeKind::F32), 0.0);
    }
    // Bits16 at p = 0.1 applies 6554 / 65536: its scale is not 1 / 0.9.
    let cfg = Config::flat(4099, 0.1, 3, 4)
        .unwrap()
        .with_resolution(Bits16);
    assert_ne!(cfg.scale(fusedreg::DtypeKind::F32), (1.0f64 / 0.9) as f32);
    let x: Vec<f32> = uniform(&mut rng(5), cfg.len(), -2.0, 2.0);
    let mut y = vec![0.0f32; cfg.len()];
    cpu::forward(&cfg, &x, &mut y, ForwardOptions::default()).unwrap();
    for i in 0..cfg.len() {
        let want = if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) {
            x[i] * cfg.scale(fusedreg::DtypeKind::F32)
        } else {
            0.0
        };
        assert_eq!(y[i].to_bits(), want.to_bits(), "element {i}");
    }
}

// ------------------------------------------------------------------------------------------
// Bad input (issue 17): every CPU entry point of `dropout` refuses bad scalars and mismatched lengths with an
// `Error` and takes extreme shapes (moved from tests/bad_input.rs, which keeps what is not one
// op's; the cases run with a residual: the strictest set of buffers).
// ------------------------------------------------------------------------------------------

mod bad_input {
    use crate::common::{refused, BAD_P};
    use fusedreg::dropout::{self as dr, cpu, Config, DropPath};
    use fusedreg::DtypeKind;
    use half::{bf16, f16};

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
        let _ = big.keeps(fusedreg::DtypeKind::F32, u64::MAX); // any 64-bit index is keyed, no panic
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
}
