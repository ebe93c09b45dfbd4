//! The non-finite rule of each op (README, "Non-finite values: one rule per op"), checked on the
//! CPU references: a NaN, `+inf` or `-inf` planted at every position class the kernels
//! distinguish (first and last element of a row, of a vector, of an 8-element group, of a warp's
//! 32-element share, of a 64-thread column tile; first and last row), in every dtype. The emulated
//! kernels are held to the same bits as these references by the differential fuzzer
//! (`tests/emu_fuzz`), which plants specials at the same classes.

use fusedreg::dropping::{mask_bit, mask_words, Config as DropConfig};
use fusedreg::half::{bf16, f16};
use fusedreg::{bias_act_dropout as bad, dropout, dropout_add_norm as dan};
use fusedreg::{global_norm, Dtype};

const SPECIALS: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
const ROWS: usize = 3;

/// Column positions of every class for a row of `cols` elements of `T`.
fn positions<T: Dtype>(cols: usize) -> Vec<usize> {
    let vw = 16 / T::KIND.size();
    let tile = 64 * vw;
    let mut p: Vec<usize> = [0, vw - 1, vw, 7, 8, 31, 32, tile - 1, tile, cols - 1]
        .into_iter()
        .filter(|&c| c < cols)
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Shapes: one column, an odd width, a width past one column tile.
fn widths<T: Dtype>() -> [usize; 3] {
    [1, 37, 64 * 16 / T::KIND.size() + 9]
}

/// Every (cols, flat index) planting site.
fn sites<T: Dtype>() -> Vec<(usize, usize)> {
    let mut v = vec![];
    for cols in widths::<T>() {
        for row in [0, ROWS - 1] {
            for c in positions::<T>(cols) {
                v.push((cols, row * cols + c));
            }
        }
    }
    v
}

/// Finite, varied data.
fn data<T: Dtype>(n: usize, salt: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32_rn(((i * 37 + salt * 11) % 17) as f32 / 4.0 - 2.0))
        .collect()
}

fn planted<T: Dtype>(n: usize, salt: usize, at: usize, v: f32) -> Vec<T> {
    let mut d = data::<T>(n, salt);
    d[at] = T::from_f32_rn(v);
    d
}

fn bits<T: Dtype>(x: T) -> u32 {
    x.to_f32().to_bits()
}

/// `got` is the special `v` (any NaN for NaN, the same infinity otherwise).
fn is_special(got: f32, v: f32) -> bool {
    if v.is_nan() {
        got.is_nan()
    } else {
        got == v
    }
}

fn finite_except<T: Dtype>(what: &str, xs: &[T], skip: &[usize]) {
    for (j, x) in xs.iter().enumerate() {
        assert!(
            skip.contains(&j) || x.to_f32().is_finite(),
            "{what}[{j}] = {} is not finite",
            x.to_f32()
        );
    }
}

fn dropout_rule<T: Dtype>() {
    let zero = T::from_f32_rn(0.0);
    for (cols, i) in sites::<T>() {
        let n = ROWS * cols;
        let cfg = DropConfig::new(ROWS, cols, 0.5, 5, i as u64).unwrap();
        let col = i % cols;
        for v in SPECIALS {
            let what = format!("{:?} dropout cols {cols} at {i} = {v}", T::KIND);
            let x = planted::<T>(n, 1, i, v);
            let (mut y, mut mask) = (vec![zero; n], vec![0u32; mask_words(n)]);
            let opts = dropout::cpu::ForwardOptions {
                mask_out: Some(&mut mask),
                ..Default::default()
            };
            dropout::cpu::forward(&cfg, &x, &mut y, opts).unwrap();
            let kept = mask_bit(&mask, i).unwrap();
            if kept {
                assert!(
                    is_special(y[i].to_f32(), v),
                    "{what}: kept y = {}",
                    y[i].to_f32()
                );
            } else {
                assert_eq!(bits(y[i]), 0, "{what}: dropped y must be +0");
            }
            finite_except(&what, &y, &[i]);

            // Backward: dy planted; dbias's column follows the kept element.
            let dy = planted::<T>(n, 2, i, v);
            let (mut dx, mut db) = (vec![zero; n], vec![zero; cols]);
            let opts = dropout::cpu::BackwardOptions {
                dbias: Some(&mut db),
                ..Default::default()
            };
            dropout::cpu::backward(&cfg, &dy, &mut dx, opts).unwrap();
            if kept {
                assert!(is_special(dx[i].to_f32(), v), "{what}: kept dx");
                assert!(is_special(db[col].to_f32(), v), "{what}: dbias column");
                finite_except(&what, &db, &[col]);
            } else {
                assert_eq!(bits(dx[i]), 0, "{what}: dropped dx must be +0");
                finite_except(&what, &db, &[]);
            }
            finite_except(&what, &dx, &[i]);

            // With a residual: a dropped x leaves the residual's bits; a special residual
            // shows whatever the keep bit.
            fn with<T>(r: &[T]) -> dropout::cpu::ForwardOptions<'_, T> {
                dropout::cpu::ForwardOptions {
                    residual: Some(r),
                    ..Default::default()
                }
            }
            let r = data::<T>(n, 3);
            let mut yr = vec![zero; n];
            dropout::cpu::forward(&cfg, &x, &mut yr, with(&r)).unwrap();
            if kept {
                assert!(is_special(yr[i].to_f32(), v), "{what}: residual kept");
            } else {
                assert_eq!(bits(yr[i]), bits(r[i]), "{what}: dropped y = residual");
            }
            let r = planted::<T>(n, 3, i, v);
            dropout::cpu::forward(&cfg, &data::<T>(n, 1), &mut yr, with(&r)).unwrap();
            assert!(is_special(yr[i].to_f32(), v), "{what}: special residual");
            finite_except(&what, &yr, &[i]);
        }
    }
}

fn bias_act_rule<T: Dtype>() {
    let zero = T::from_f32_rn(0.0);
    let acts = [
        bad::Activation::GeluErf,
        bad::Activation::GeluTanh,
        bad::Activation::Silu,
        bad::Activation::Relu,
    ];
    for (cols, i) in sites::<T>() {
        let n = ROWS * cols;
        for act in acts {
            let cfg = bad::Config::new(ROWS, cols, act, 0.5, 9, i as u64)
                .unwrap()
                .with_math(fusedreg::Math::Exact);
            let kept = cfg.keeps(T::KIND, i as u64);
            for v in SPECIALS {
                let what = format!("{:?} {act:?} cols {cols} at {i} = {v}", T::KIND);
                let x = planted::<T>(n, 1, i, v);
                let mut y = vec![zero; n];
                bad::cpu::forward(&cfg, &x, None, &mut y, None).unwrap();
                let got = y[i].to_f32();
                if !kept {
                    assert_eq!(bits(y[i]), 0, "{what}: dropped y must be +0");
                } else if v == f32::NEG_INFINITY {
                    // The saturated limit: -0 for GELU and SiLU, +0 for ReLU.
                    let want = if act == bad::Activation::Relu {
                        0.0f32
                    } else {
                        -0.0
                    };
                    assert_eq!(got.to_bits(), want.to_bits(), "{what}: act(-inf)");
                } else {
                    assert!(is_special(got, v), "{what}: y = {got}");
                }
                finite_except(&what, &y, &[i]);

                // act'(±inf) = 1 / 0 and act'(NaN) = NaN (ReLU included): dx from dy = 1.
                let dy = vec![T::from_f32_rn(1.0); n];
                let mut dx = vec![zero; n];
                let pre = bad::Preact::X {
                    x: &x[..],
                    bias: None,
                };
                bad::cpu::backward(&cfg, &dy, pre, &mut dx, None).unwrap();
                let got = dx[i].to_f32();
                if !kept {
                    assert_eq!(bits(dx[i]), 0, "{what}: dropped dx must be +0");
                } else if v.is_nan() {
                    assert!(got.is_nan(), "{what}: act'(NaN) -> {got}");
                } else if v > 0.0 {
                    assert_eq!(got, 2.0, "{what}: act'(+inf) = 1 times scale 2");
                } else {
                    assert_eq!(got, 0.0, "{what}: act'(-inf) = 0");
                }
                finite_except(&what, &dx, &[i]);
            }
        }
    }
}

fn norm_rule<T: Dtype>() {
    let zero = T::from_f32_rn(0.0);
    for (cols, i) in sites::<T>() {
        let n = ROWS * cols;
        let row = i / cols;
        let row_range = row * cols..(row + 1) * cols;
        for norm in [dan::Norm::LayerNorm, dan::Norm::RmsNorm] {
            let cfg = dan::Config::new(ROWS, cols, norm, 1e-5)
                .unwrap()
                .with_dropout(0.5, 13, i as u64)
                .unwrap();
            let kept = cfg.keeps(T::KIND, i as u64);
            for (v, in_residual) in SPECIALS.iter().flat_map(|&v| [(v, false), (v, true)]) {
                let what = format!(
                    "{:?} {norm:?} cols {cols} at {i} = {v} (residual {in_residual})",
                    T::KIND
                );
                let (x, r) = if in_residual {
                    (data::<T>(n, 1), planted::<T>(n, 2, i, v))
                } else {
                    (planted::<T>(n, 1, i, v), data::<T>(n, 2))
                };
                let gamma = data::<T>(cols, 4);
                let mut args = dan::cpu::ForwardArgs::<T, T>::new(&x, &gamma);
                args.residual = Some(&r);
                let (mut out, mut s) = (vec![zero; n], vec![zero; n]);
                let (mut mean, mut rstd) = (vec![0f32; ROWS], vec![0f32; ROWS]);
                let o = dan::cpu::ForwardOut {
                    out: &mut out,
                    s: &mut s,
                    mean: &mut mean,
                    rstd: &mut rstd,
                };
                dan::cpu::forward(&cfg, args, o).unwrap();
                if !kept && !in_residual {
                    // Not read: the stream keeps the residual, the row is finite.
                    assert_eq!(bits(s[i]), bits(r[i]), "{what}: dropped s = residual");
                    finite_except(&what, &out, &[]);
                    continue;
                }
                assert!(is_special(s[i].to_f32(), v), "{what}: s");
                if v.is_nan() || norm == dan::Norm::LayerNorm {
                    for j in row_range.clone() {
                        assert!(out[j].to_f32().is_nan(), "{what}: out[{j}] must be NaN");
                    }
                    assert!(rstd[row].is_nan(), "{what}: rstd");
                } else {
                    // RMSNorm of an infinity: rstd = 0, the element NaN (inf * 0), the rest 0.
                    assert_eq!(rstd[row], 0.0, "{what}: rstd");
                    assert!(out[i].to_f32().is_nan(), "{what}: out at the infinity");
                    for j in row_range.clone().filter(|&j| j != i) {
                        assert_eq!(out[j].to_f32(), 0.0, "{what}: out[{j}]");
                    }
                }
                let others: Vec<usize> = row_range.clone().collect();
                finite_except(&what, &out, &others);
            }
        }
    }
}

fn global_norm_rule<T: Dtype>() {
    for (cols, i) in sites::<T>() {
        for v in SPECIALS {
            let g = planted::<T>(ROWS * cols, 1, i, v);
            let vals = global_norm::cpu::global_norm(&[&g[..]], Some(1.0), 1.0).unwrap();
            assert_eq!(vals.nonfinite, 1, "{:?} cols {cols} at {i} = {v}", T::KIND);
        }
        let g = data::<T>(ROWS * cols, 1);
        let vals = global_norm::cpu::global_norm(&[&g[..]], Some(1.0), 1.0).unwrap();
        assert_eq!(vals.nonfinite, 0);
    }
}

macro_rules! every_dtype {
    ($($name:ident => $f:ident,)*) => {$(
        #[test]
        fn $name() {
            $f::<f32>();
            $f::<f16>();
            $f::<bf16>();
        }
    )*};
}

every_dtype! {
    dropout_with_and_without_residual => dropout_rule,
    bias_act_dropout => bias_act_rule,
    dropout_add_norm => norm_rule,
    global_norm_flag => global_norm_rule,
}
