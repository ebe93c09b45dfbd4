//! `fusedreg::candle::Dropout` on candle's CPU device
//! (`cargo test -p fusedreg --features candle --test candle_dropout`): forward and gradients
//! against the same computation written in plain candle ops (the mask rebuilt from fusedreg's
//! keying as a candle tensor) and against fusedreg's CPU reference bit for bit, in every dtype.
#![cfg(feature = "candle")]

mod candle_ops_util;

use candle_core::{DType, Device, Tensor, Var};
use candle_ops_util::*;
use fusedreg::candle::{Dropout, StepKeys};
use fusedreg::dropout::cpu;
use fusedreg::Dtype;
use half::{bf16, f16};

struct Case {
    dims: &'static [usize],
    p: f64,
    bias: bool,
    /// (p_path, rows_per_sample)
    path: Option<(f64, usize)>,
}

const CASES: &[Case] = &[
    Case {
        dims: &[3, 7, 33],
        p: 0.1,
        bias: true,
        path: None,
    },
    Case {
        dims: &[37, 19],
        p: 0.5,
        bias: false,
        path: None,
    },
    Case {
        dims: &[3, 11, 33],
        p: 0.25,
        bias: true,
        path: Some((0.5, 11)),
    },
    Case {
        dims: &[100, 7],
        p: 0.3,
        bias: true,
        path: Some((0.3, 1)),
    }, // several dbias slabs
    Case {
        dims: &[1000],
        p: 0.1,
        bias: false,
        path: Some((0.5, 1)),
    }, // one row
    Case {
        dims: &[5, 1],
        p: 0.9,
        bias: true,
        path: None,
    },
];

/// Forward and gradients equal plain candle ops: `y = T(f32(x) + f32(b)) * m)` (the op's own
/// definition: the sum and product in f32, rounded once to the dtype), loss = `sum(y * w)`.
/// y and dx are the same f32 operations on both sides, so they are compared bit for bit in
/// every dtype; dbias sums in another order, so it gets a bound.
#[test]
fn forward_and_gradients_match_plain_candle_ops() -> R {
    let mut g = rng(1);
    for dtype in DTYPES {
        for (k, c) in CASES.iter().enumerate() {
            let n: usize = c.dims.iter().product();
            let cols = *c.dims.last().unwrap();
            let rows = n / cols;
            let cast = |v: Vec<f32>, dims: &[usize]| tensor(&v, dims)?.to_dtype(dtype);
            let x = Var::from_tensor(&cast(data(&mut g, n), c.dims)?)?;
            let b = Var::from_tensor(&cast(data(&mut g, cols), &[cols])?)?;
            let w = cast(data(&mut g, n), c.dims)?;
            let mut site = Dropout::new(c.p, 4)?;
            if let Some((pp, rps)) = c.path {
                site = site.with_drop_path(pp, rps)?;
            }
            let keys = StepKeys::new(0xfeed + k as u64, 3);
            let bias = c.bias.then_some(b.as_tensor());

            let y = site.forward(&x, bias, Some(&keys))?;
            let grads = (&y * &w)?.sum_all()?.backward()?;

            let cfg = site.config(rows, cols, Some(&keys))?;
            let m = multiplier(&cfg)?.reshape(c.dims)?;
            let x32 = x.to_dtype(DType::F32)?;
            let t = if c.bias {
                x32.broadcast_add(&b.to_dtype(DType::F32)?)?
            } else {
                x32
            };
            let y_ref = (t * &m)?.to_dtype(dtype)?;
            let grads_ref = (&y_ref * &w)?.sum_all()?.backward()?;

            let what = |s: &str| format!("{dtype:?} case {k} {:?}: {s}", c.dims);
            assert_eq!(y.dtype(), dtype);
            assert_bits(&what("y"), &flat(&y)?, &flat(&y_ref)?);
            let gx = flat(grads.get(&x).unwrap())?;
            assert_bits(&what("dx"), &gx, &flat(grads_ref.get(&x).unwrap())?);
            if c.bias {
                // Column sums of the f32 gradients in another order, rounded to the dtype: a
                // bound scaled by the sum of magnitudes, plus the dtype's rounding.
                let db = flat(grads.get(&b).unwrap())?;
                let db_ref = flat(grads_ref.get(&b).unwrap())?;
                let gx_ref = grads_ref.get(&x).unwrap().to_dtype(DType::F32)?;
                let abs_sum = flat(&gx_ref.abs()?.reshape((rows, cols))?.sum(0)?)?;
                for col in 0..cols {
                    let bound = 1e-5 * (1.0 + abs_sum[col]) + ulp(dtype) * db_ref[col].abs();
                    assert!(
                        (db[col] - db_ref[col]).abs() <= bound,
                        "{}: column {col}: {} vs {}",
                        what("dbias"),
                        db[col],
                        db_ref[col]
                    );
                }
            } else {
                assert!(grads.get(&b).is_none());
            }
            // Some elements dropped and some kept.
            if n >= 100 {
                let wv = flat(&w)?;
                let kept = gx
                    .iter()
                    .zip(&wv)
                    .filter(|(g, w)| **g != 0.0 || **w == 0.0)
                    .count();
                assert!(kept > 0 && kept < n, "{}: kept {kept} of {n}", what("mask"));
            }
        }
    }
    Ok(())
}

/// The adapter gives exactly the bits of fusedreg's CPU reference, in every dtype: y, dx, dbias.
#[test]
fn matches_the_cpu_reference_bit_for_bit() -> R {
    fn run<T: Dtype + candle_core::WithDType>(dtype: DType) -> R {
        let mut g = rng(2);
        for (k, c) in CASES.iter().enumerate() {
            let n: usize = c.dims.iter().product();
            let cols = *c.dims.last().unwrap();
            let rows = n / cols;
            let cast = |v: Vec<f32>| v.into_iter().map(T::from_f32_rn).collect::<Vec<T>>();
            let (xv, bv, dyv) = (
                cast(data(&mut g, n)),
                cast(data(&mut g, cols)),
                cast(data(&mut g, n)),
            );
            let dev = &Device::Cpu;
            let x = Var::from_tensor(&Tensor::from_slice(&xv, c.dims, dev)?)?;
            let b = Var::from_tensor(&Tensor::from_slice(&bv, cols, dev)?)?;
            let dy = Tensor::from_slice(&dyv, c.dims, dev)?;
            assert_eq!(x.dtype(), dtype);
            let mut site = Dropout::new(c.p, 1000 + k as u32)?;
            if let Some((pp, rps)) = c.path {
                site = site.with_drop_path(pp, rps)?;
            }
            let keys = StepKeys::new(77, k as u64);
            let y = site.forward(&x, c.bias.then_some(b.as_tensor()), Some(&keys))?;
            // d(sum(y * dy)) / dx is the backward applied to dy.
            let grads = (&y * &dy)?.sum_all()?.backward()?;

            let cfg = site.config(rows, cols, Some(&keys))?;
            let mut y_ref = vec![T::default(); n];
            let opts = cpu::ForwardOptions {
                bias: c.bias.then_some(&bv[..]),
                ..Default::default()
            };
            cpu::forward(&cfg, &xv, &mut y_ref, opts).unwrap();
            let (mut dx_ref, mut db_ref) = (vec![T::default(); n], vec![T::default(); cols]);
            let opts = cpu::BackwardOptions {
                dbias: c.bias.then_some(&mut db_ref[..]),
                ..Default::default()
            };
            cpu::backward(&cfg, &dyv, &mut dx_ref, opts).unwrap();

            let what = |s: &str| format!("{dtype:?} case {k}: {s}");
            let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
                Ok(flat(t)?.iter().map(|v| v.to_bits()).collect())
            };
            // Reference gradients pass through candle's gradient accumulation first (see
            // `as_candle_grad`); then every bit must agree.
            let grad_ref = |v: &[T], dims: &[usize]| -> candle_core::Result<Vec<u32>> {
                bits(&as_candle_grad(&Tensor::from_slice(v, dims, dev)?)?)
            };
            let y_ref = bits(&Tensor::from_slice(&y_ref, c.dims, dev)?)?;
            assert_eq!(bits(&y)?, y_ref, "{}", what("y"));
            let dx = bits(grads.get(&x).unwrap())?;
            assert_eq!(dx, grad_ref(&dx_ref, c.dims)?, "{}", what("dx"));
            if c.bias {
                let db = bits(grads.get(&b).unwrap())?;
                assert_eq!(db, grad_ref(&db_ref, &[cols])?, "{}", what("dbias"));
            }
        }
        Ok(())
    }
    run::<f32>(DType::F32)?;
    run::<f16>(DType::F16)?;
    run::<bf16>(DType::BF16)
}

/// A drop path on `[batch, seq, hidden]` with one draw per sample: a dropped sample's output and
/// its x gradient are zero; a kept one is scaled by `1 / (1 - p_path)`.
#[test]
fn drop_path_drops_whole_samples() -> R {
    let mut g = rng(4);
    let (batch, seq, hidden) = (64, 5, 8);
    let n = batch * seq * hidden;
    let xv = data(&mut g, n);
    let x = Var::from_tensor(&tensor(&xv, &[batch, seq, hidden])?)?;
    let site = Dropout::new(0.0, 9)?.with_drop_path(0.5, seq)?;
    let keys = StepKeys::new(11, 2);
    let y = site.forward(&x, None, Some(&keys))?;
    let grads = y.sum_all()?.backward()?;
    let (yv, gx) = (flat(&y)?, flat(grads.get(&x).unwrap())?);
    let cfg = site.config(batch * seq, hidden, Some(&keys))?;
    let path = cfg.drop_path().unwrap();
    let mut dropped = 0;
    for s in 0..batch {
        let scale = path.row_scale(keys.seed(), (s * seq) as u64);
        let span = s * seq * hidden..(s + 1) * seq * hidden;
        if scale == 0.0 {
            dropped += 1;
            assert!(yv[span.clone()].iter().all(|&v| v.to_bits() == 0));
            assert!(gx[span].iter().all(|&v| v == 0.0), "sample {s}: dx");
        } else {
            let want: Vec<f32> = xv[span.clone()].iter().map(|v| v * 2.0).collect();
            assert_bits("kept sample y", &yv[span.clone()], &want);
            assert!(gx[span].iter().all(|&v| v == 2.0), "sample {s}: dx");
        }
    }
    assert!(
        (16..=48).contains(&dropped),
        "{dropped} of {batch} samples dropped"
    );
    Ok(())
}

/// Without keys (evaluation) the op is the identity plus the bias: `x` itself without a bias,
/// candle's `broadcast_add` (one rounding) with one, in every dtype; gradients pass unchanged.
#[test]
fn evaluation_is_x_plus_bias() -> R {
    let mut g = rng(5);
    let (rows, cols) = (9, 13);
    let site = Dropout::new(0.5, 1)?.with_drop_path(0.5, 1)?;
    for dtype in DTYPES {
        let x =
            Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[rows, cols])?.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&tensor(&data(&mut g, cols), &[cols])?.to_dtype(dtype)?)?;
        let y = site.forward(&x, None, None)?;
        assert_bits(&format!("{dtype:?} eval y"), &flat(&y)?, &flat(&x)?);
        let y = site.forward(&x, Some(&b), None)?;
        let y_ref = x.broadcast_add(&b)?;
        assert_bits(&format!("{dtype:?} eval y + b"), &flat(&y)?, &flat(&y_ref)?);
        let grads = y.sum_all()?.backward()?;
        assert!(flat(grads.get(&x).unwrap())?.iter().all(|&v| v == 1.0));
        let db = flat(grads.get(&b).unwrap())?;
        assert!(db.iter().all(|&v| v == rows as f32), "{dtype:?}: {db:?}");
    }
    Ok(())
}

/// Masks are a function of (seed, step, site) only: the same keys give the same result (so a
/// recomputed forward matches), another step, site or seed another mask.
#[test]
fn masks_follow_the_keys() -> R {
    let mut g = rng(6);
    let (rows, cols) = (16, 64);
    let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let keys = StepKeys::new(123, 7);
    let a = Dropout::new(0.5, 2)?;
    let y1 = flat(&a.forward(&x, None, Some(&keys))?)?;
    let y2 = flat(&a.forward(&x, None, Some(&keys))?)?;
    assert_eq!(same_bits(&y1, &y2), y1.len(), "same keys");
    let next = flat(&a.forward(&x, None, Some(&keys.next_step()?))?)?;
    let other_site = flat(&Dropout::new(0.5, 3)?.forward(&x, None, Some(&keys))?)?;
    let other_seed = flat(&a.forward(&x, None, Some(&StepKeys::new(124, 7)))?)?;
    for (name, v) in [
        ("next step", next),
        ("other site", other_site),
        ("other seed", other_seed),
    ] {
        let same = same_bits(&v, &y1);
        // p = 0.5: about half the elements differ; identical masks would make all equal.
        assert!(
            same < rows * cols * 3 / 4,
            "{name}: {same} of {} equal",
            rows * cols
        );
    }
    Ok(())
}

/// Empty tensors (no rows, no columns), p = 0 and p = 1.
#[test]
fn empty_and_extreme_rates() -> R {
    let dev = &Device::Cpu;
    let keys = StepKeys::new(1, 1);
    for dtype in DTYPES {
        // No rows: y is empty and dbias is zeros.
        let x = Var::zeros((0, 6), dtype, dev)?;
        let b = Var::from_tensor(&Tensor::ones(6, dtype, dev)?)?;
        let site = Dropout::new(0.1, 0)?.with_drop_path(0.5, 1)?;
        let y = site.forward(&x, Some(&b), Some(&keys))?;
        assert_eq!(y.dims(), &[0, 6]);
        let grads = y.sum_all()?.backward()?;
        assert_eq!(flat(grads.get(&b).unwrap())?, vec![0.0; 6]);
        assert_eq!(grads.get(&x).unwrap().dims(), &[0, 6]);
        // No columns, and a batch dimension of 0.
        for dims in [&[4usize, 0][..], &[2, 0, 5]] {
            let x = Var::zeros(dims, dtype, dev)?;
            let cols = *dims.last().unwrap();
            let b = Var::zeros(cols, dtype, dev)?;
            let y = site.forward(&x, Some(&b), Some(&keys))?;
            assert_eq!(y.dims(), dims);
            let grads = y.sum_all()?.backward()?;
            assert_eq!(grads.get(&x).unwrap().dims(), dims);
            assert_eq!(flat(grads.get(&b).unwrap())?, vec![0.0; cols]);
        }
    }

    let mut g = rng(7);
    let (rows, cols) = (7, 9);
    let x = Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[rows, cols])?)?;
    // p = 1: y is +0 everywhere, no gradient to x.
    let y = Dropout::new(1.0, 0)?.forward(&x, None, Some(&keys))?;
    assert!(flat(&y)?.iter().all(|v| v.to_bits() == 0));
    let grads = y.sum_all()?.backward()?;
    assert!(flat(grads.get(&x).unwrap())?.iter().all(|&v| v == 0.0));
    // p = 0: exactly x.
    let y = Dropout::new(0.0, 0)?.forward(&x, None, Some(&keys))?;
    assert_bits("p = 0", &flat(&y)?, &flat(&x)?);
    Ok(())
}

/// Non-contiguous inputs are copied (same result as their contiguous copy, gradients flow back
/// through the copy); contiguous views with a start offset are read in place.
#[test]
fn strided_and_offset_inputs() -> R {
    let mut g = rng(8);
    let (rows, cols) = (12, 10);
    let keys = StepKeys::new(9, 0);
    let site = Dropout::new(0.3, 0)?;
    for dtype in DTYPES {
        let xt =
            Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[cols, rows])?.to_dtype(dtype)?)?;
        let x = xt.t()?; // [rows, cols], strided
        assert!(!x.is_contiguous());
        let b = tensor(&data(&mut g, cols), &[cols])?.to_dtype(dtype)?;
        let y = site.forward(&x, Some(&b), Some(&keys))?;
        let y_copy = site.forward(&x.contiguous()?, Some(&b), Some(&keys))?;
        assert_bits("strided x", &flat(&y)?, &flat(&y_copy)?);
        let grads = y.sum_all()?.backward()?;
        let m = multiplier(&site.config(rows, cols, Some(&keys))?)?.to_dtype(dtype)?;
        assert_bits(
            "strided dx",
            &flat(grads.get(&xt).unwrap())?,
            &flat(&m.t()?)?,
        );

        // Offset views: rows 1..rows+1 of a bigger tensor, and a bias at element offset 1.
        let big = tensor(&data(&mut g, (rows + 2) * cols), &[rows + 2, cols])?.to_dtype(dtype)?;
        let xo = big.narrow(0, 1, rows)?;
        assert!(xo.is_contiguous());
        let bb = tensor(&data(&mut g, cols + 1), &[cols + 1])?.to_dtype(dtype)?;
        let bo = bb.narrow(0, 1, cols)?;
        let y = site.forward(&xo, Some(&bo), Some(&keys))?;
        let y_copy = site.forward(&xo.copy()?, Some(&bo.copy()?), Some(&keys))?;
        assert_bits("offset views", &flat(&y)?, &flat(&y_copy)?);
    }
    Ok(())
}

/// Bad input is an error naming the problem, never a panic. (Mixed devices need a GPU: see
/// tests/gpu/candle/dropout.rs.)
#[test]
fn bad_input_is_an_error() -> R {
    let dev = &Device::Cpu;
    let keys = StepKeys::new(1, 0);
    let site = Dropout::new(0.1, 0)?;
    let x = Tensor::zeros((4, 8), DType::F32, dev)?;
    for k in [Some(&keys), None] {
        expect_err(site.forward(&x.to_dtype(DType::F64)?, None, k), "F64");
        expect_err(site.forward(&x.to_dtype(DType::U8)?, None, k), "U8");
        let b16 = Tensor::zeros(8, DType::BF16, dev)?;
        expect_err(site.forward(&x, Some(&b16), k), "bias");
        let b7 = Tensor::zeros(7, DType::F32, dev)?;
        expect_err(site.forward(&x, Some(&b7), k), "bias");
        let b18 = Tensor::zeros((1, 8), DType::F32, dev)?;
        expect_err(site.forward(&x, Some(&b18), k), "bias");
        let s = Tensor::new(1f32, dev)?;
        expect_err(site.forward(&s, None, k), "scalar");
    }
    Ok(())
}
