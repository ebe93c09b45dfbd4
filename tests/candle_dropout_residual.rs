//! `fusedreg::candle::DropoutResidual` on candle's CPU device
//! (`cargo test -p fusedreg --features candle --test candle_dropout_residual`): the op against
//! the same computation written in plain candle ops, forward and gradients, on random data with
//! the mask rebuilt from fusedreg's keying as a candle tensor; and against fusedreg's CPU
//! reference bit for bit in every dtype.
#![cfg(feature = "candle")]

mod candle_ops_util;

use candle_core::{DType, Device, Tensor, Var};
use candle_ops_util::*;
use fusedreg::candle::{DropoutResidual, StepKeys};
use fusedreg::dropout::cpu;
use fusedreg::Dtype;
use half::{bf16, f16};

/// `|a - b| <= tol * (1 + |b|)` elementwise, naming the first bad index.
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}: index {i}: adapter {x} vs plain candle {y}"
        );
    }
}

struct Case {
    dims: &'static [usize],
    p: f64,
    bias: bool,
    /// (p_path, rows_per_sample)
    path: Option<(f64, usize)>,
}

const CASES: &[Case] = &[
    Case {
        dims: &[37, 19],
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
        path: None,
    }, // one row
    Case {
        dims: &[5, 1],
        p: 0.9,
        bias: true,
        path: None,
    },
];

/// Forward and every gradient of the adapter equal the same computation in plain candle ops
/// (f32): `y = r + (x + b) * m`, loss = `sum(y * w)`.
#[test]
fn forward_and_gradients_match_plain_candle_ops() -> R {
    let mut g = rng(1);
    for (k, c) in CASES.iter().enumerate() {
        let n: usize = c.dims.iter().product();
        let cols = *c.dims.last().unwrap();
        let rows = n / cols;
        let (xv, rv, bv, wv) = (
            data(&mut g, n),
            data(&mut g, n),
            data(&mut g, cols),
            data(&mut g, n),
        );
        let x = Var::from_tensor(&tensor(&xv, c.dims)?)?;
        let r = Var::from_tensor(&tensor(&rv, c.dims)?)?;
        let b = Var::from_tensor(&tensor(&bv, &[cols])?)?;
        let w = tensor(&wv, c.dims)?;
        let mut site = DropoutResidual::new(c.p, 4)?;
        if let Some((pp, rps)) = c.path {
            site = site.with_drop_path(pp, rps)?;
        }
        let keys = StepKeys::new(0xfeed + k as u64, 3);
        let bias = c.bias.then_some(b.as_tensor());

        let y = site.forward(&x, &r, bias, Some(&keys))?;
        let grads = (&y * &w)?.sum_all()?.backward()?;

        // The same in plain candle ops, with the mask from fusedreg's keying.
        let cfg = site.config(rows, cols, Some(&keys))?;
        let m = multiplier(&cfg)?.reshape(c.dims)?;
        let t = if c.bias {
            x.broadcast_add(&b)?
        } else {
            x.as_tensor().clone()
        };
        let tm = (t * &m)?;
        let y_ref = (r.as_tensor() + &tm)?;
        let grads_ref = (&y_ref * &w)?.sum_all()?.backward()?;

        let what = |s: &str| format!("case {k} {:?}: {s}", c.dims);
        // fma(t, m, r) rounds once, candle's t * m + r twice: at most an ulp or so of the
        // operands' magnitude apart (the sum may cancel), not bits.
        let (yv, yr) = (flat(&y)?, flat(&y_ref)?);
        let mag = flat(&(tm.abs()? + r.abs()?)?)?;
        for i in 0..n {
            let bound = 2.5e-7 * mag[i] + f32::MIN_POSITIVE;
            assert!(
                (yv[i] - yr[i]).abs() <= bound,
                "{}: index {i}: adapter {} vs plain candle {} (operands' magnitude {})",
                what("y"),
                yv[i],
                yr[i],
                mag[i]
            );
        }
        // dx = w * m is one f32 multiply on both sides; dresidual is w itself.
        let gx = flat(grads.get(&x).unwrap())?;
        assert_bits(&what("dx"), &gx, &flat(grads_ref.get(&x).unwrap())?);
        assert_bits(
            &what("dresidual"),
            &flat(grads.get(&r).unwrap())?,
            &flat(grads_ref.get(&r).unwrap())?,
        );
        if c.bias {
            // Column sums in another order: a bound scaled by the sum of magnitudes.
            let db = flat(grads.get(&b).unwrap())?;
            let db_ref = flat(grads_ref.get(&b).unwrap())?;
            let abs_sum = flat(
                &grads_ref
                    .get(&x)
                    .unwrap()
                    .abs()?
                    .reshape((rows, cols))?
                    .sum(0)?,
            )?;
            for col in 0..cols {
                let bound = 1e-5 * (1.0 + abs_sum[col]);
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
        // Some elements dropped and some kept, where p allows.
        let kept = gx
            .iter()
            .zip(&wv)
            .filter(|(g, w)| **g != 0.0 || **w == 0.0)
            .count();
        if c.p > 0.0 && n >= 100 {
            assert!(kept > 0 && kept < n, "{}: kept {kept} of {n}", what("mask"));
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
            let (xv, rv, bv, dyv) = (
                cast(data(&mut g, n)),
                cast(data(&mut g, n)),
                cast(data(&mut g, cols)),
                cast(data(&mut g, n)),
            );
            let dev = &Device::Cpu;
            let x = Var::from_tensor(&Tensor::from_slice(&xv, c.dims, dev)?)?;
            let r = Var::from_tensor(&Tensor::from_slice(&rv, c.dims, dev)?)?;
            let b = Var::from_tensor(&Tensor::from_slice(&bv, cols, dev)?)?;
            let dy = Tensor::from_slice(&dyv, c.dims, dev)?;
            assert_eq!(x.dtype(), dtype);
            let mut site = DropoutResidual::new(c.p, 1000 + k as u32)?;
            if let Some((pp, rps)) = c.path {
                site = site.with_drop_path(pp, rps)?;
            }
            let keys = StepKeys::new(77, k as u64);
            let y = site.forward(&x, &r, c.bias.then_some(b.as_tensor()), Some(&keys))?;
            // d(sum(y * dy)) / dx is the backward applied to dy.
            let grads = (&y * &dy)?.sum_all()?.backward()?;

            let cfg = site.config(rows, cols, Some(&keys))?;
            let mut y_ref = vec![T::default(); n];
            let opts = cpu::ForwardOptions {
                bias: c.bias.then_some(&bv[..]),
                residual: Some(&rv),
                ..Default::default()
            };
            cpu::forward(&cfg, &xv, &mut y_ref, opts).unwrap();
            let (mut dx_ref, mut db_ref) = (vec![T::default(); n], vec![T::default(); cols]);
            let opts = cpu::BackwardOptions {
                dbias: c.bias.then_some(&mut db_ref[..]),
                ..Default::default()
            };
            cpu::backward(&cfg, &dyv, &mut dx_ref, opts).unwrap();

            let to32 = |v: &[T]| v.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
            let what = |s: &str| format!("{dtype:?} case {k}: {s}");
            assert_bits(&what("y"), &flat(&y)?, &to32(&y_ref));
            // The gradient reaching y from `sum(y * dy)` is `1 * dy`: dy exactly, in every dtype.
            assert_bits(&what("dx"), &flat(grads.get(&x).unwrap())?, &to32(&dx_ref));
            assert_bits(
                &what("dresidual"),
                &flat(grads.get(&r).unwrap())?,
                &to32(&dyv),
            );
            if c.bias {
                assert_bits(
                    &what("dbias"),
                    &flat(grads.get(&b).unwrap())?,
                    &to32(&db_ref),
                );
            }
        }
        Ok(())
    }
    run::<f32>(DType::F32)?;
    run::<f16>(DType::F16)?;
    run::<bf16>(DType::BF16)
}

/// A residual block `y = r + dropout(r W + b)`: the residual takes gradient along both paths and
/// candle adds them; W's gradient flows through the op. Same as plain candle ops.
#[test]
fn a_residual_block_trains_like_plain_candle() -> R {
    let mut g = rng(3);
    let (rows, hidden) = (24, 16);
    let r = Var::from_tensor(&tensor(&data(&mut g, rows * hidden), &[rows, hidden])?)?;
    let wm =
        Var::from_tensor(&(tensor(&data(&mut g, hidden * hidden), &[hidden, hidden])? * 0.1)?)?;
    let b = Var::from_tensor(&tensor(&data(&mut g, hidden), &[hidden])?)?;
    let target = tensor(&data(&mut g, rows * hidden), &[rows, hidden])?;
    let site = DropoutResidual::new(0.2, 0)?.with_drop_path(0.25, 4)?;
    let keys = StepKeys::new(5, 0);

    let h = r.matmul(&wm)?;
    let y = site.forward(&h, &r, Some(&b), Some(&keys))?;
    let loss = (&y - &target)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;

    let m = multiplier(&site.config(rows, hidden, Some(&keys))?)?;
    let y_ref = (r.as_tensor() + (h.broadcast_add(&b)? * &m)?)?;
    let loss_ref = (&y_ref - &target)?.sqr()?.mean_all()?;
    let grads_ref = loss_ref.backward()?;

    assert_close("loss", &flat(&loss)?, &flat(&loss_ref)?, 1e-5);
    for (name, v) in [("r", &r), ("W", &wm), ("b", &b)] {
        assert_close(
            name,
            &flat(grads.get(v).unwrap())?,
            &flat(grads_ref.get(v).unwrap())?,
            1e-4,
        );
    }
    Ok(())
}

/// A drop path on `[batch, seq, hidden]` with one draw per sample: a dropped sample's output is
/// its residual, bit for bit, and its x gets no gradient.
#[test]
fn drop_path_drops_whole_samples() -> R {
    let mut g = rng(4);
    let (batch, seq, hidden) = (64, 5, 8);
    let n = batch * seq * hidden;
    let x = Var::from_tensor(&tensor(&data(&mut g, n), &[batch, seq, hidden])?)?;
    let r = tensor(&data(&mut g, n), &[batch, seq, hidden])?;
    let site = DropoutResidual::new(0.0, 9)?.with_drop_path(0.5, seq)?;
    let keys = StepKeys::new(11, 2);
    let y = site.forward(&x, &r, None, Some(&keys))?;
    let grads = y.sum_all()?.backward()?;
    let (yv, rv, gx) = (flat(&y)?, flat(&r)?, flat(grads.get(&x).unwrap())?);
    let cfg = site.config(batch * seq, hidden, Some(&keys))?;
    let path = cfg.drop_path().unwrap();
    let mut dropped = 0;
    for s in 0..batch {
        let scale = path.row_scale(keys.seed(), (s * seq) as u64);
        let span = s * seq * hidden..(s + 1) * seq * hidden;
        if scale == 0.0 {
            dropped += 1;
            assert_bits("dropped sample y", &yv[span.clone()], &rv[span.clone()]);
            assert!(
                gx[span].iter().all(|&v| v == 0.0),
                "sample {s}: dx not zero"
            );
        } else {
            assert!(
                gx[span].iter().all(|&v| v == 2.0),
                "sample {s}: dx not 1 / (1 - 0.5)"
            );
        }
    }
    assert!(
        (16..=48).contains(&dropped),
        "{dropped} of {batch} samples dropped"
    );
    Ok(())
}

/// Without keys (evaluation) the op is `x + bias + residual` rounded once: exactly candle's sum
/// in f32, and the gradient passes unchanged.
#[test]
fn evaluation_is_the_plain_sum() -> R {
    let mut g = rng(5);
    let (rows, cols) = (9, 13);
    let x = Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[rows, cols])?)?;
    let r = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let b = tensor(&data(&mut g, cols), &[cols])?;
    let site = DropoutResidual::new(0.5, 1)?.with_drop_path(0.5, 1)?;
    let y = site.forward(&x, &r, Some(&b), None)?;
    let y_ref = (x.broadcast_add(&b)? + &r)?;
    assert_bits("eval y", &flat(&y)?, &flat(&y_ref)?);
    let grads = y.sum_all()?.backward()?;
    assert!(flat(grads.get(&x).unwrap())?.iter().all(|&v| v == 1.0));
    Ok(())
}

/// Masks are a function of (seed, step, site) only: the same keys give the same result (so a
/// recomputed forward matches), another step or site another mask.
#[test]
fn masks_follow_the_keys() -> R {
    let mut g = rng(6);
    let (rows, cols) = (16, 64);
    let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let r = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let keys = StepKeys::new(123, 7);
    let a = DropoutResidual::new(0.5, 2)?;
    let y1 = flat(&a.forward(&x, &r, None, Some(&keys))?)?;
    let y2 = flat(&a.forward(&x, &r, None, Some(&keys))?)?;
    assert_bits("same keys", &y1, &y2);
    let next = flat(&a.forward(&x, &r, None, Some(&keys.next_step()?))?)?;
    let other_site = flat(&DropoutResidual::new(0.5, 3)?.forward(&x, &r, None, Some(&keys))?)?;
    let other_seed = flat(&a.forward(&x, &r, None, Some(&StepKeys::new(124, 7)))?)?;
    for (name, v) in [
        ("next step", next),
        ("other site", other_site),
        ("other seed", other_seed),
    ] {
        let same = v
            .iter()
            .zip(&y1)
            .filter(|(a, b)| a.to_bits() == b.to_bits())
            .count();
        // p = 0.5: about half the elements differ; identical masks would make all equal.
        assert!(
            same < rows * cols * 3 / 4,
            "{name}: {same} of {} equal",
            rows * cols
        );
    }
    Ok(())
}

/// Empty tensors, p = 0 and p = 1.
#[test]
fn empty_and_extreme_rates() -> R {
    let dev = &Device::Cpu;
    let keys = StepKeys::new(1, 1);
    // No rows: y is empty and dbias is zeros.
    let x = Var::zeros((0, 6), DType::F32, dev)?;
    let r = Tensor::zeros((0, 6), DType::F32, dev)?;
    let b = Var::from_tensor(&Tensor::ones(6, DType::F32, dev)?)?;
    let y = DropoutResidual::new(0.1, 0)?.forward(&x, &r, Some(&b), Some(&keys))?;
    assert_eq!(y.dims(), &[0, 6]);
    let grads = y.sum_all()?.backward()?;
    assert_eq!(flat(grads.get(&b).unwrap())?, vec![0.0; 6]);
    assert_eq!(grads.get(&x).unwrap().dims(), &[0, 6]);

    let mut g = rng(7);
    let (rows, cols) = (7, 9);
    let x = Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[rows, cols])?)?;
    let r = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    // p = 1: y is the residual's bits, no gradient to x.
    let y = DropoutResidual::new(1.0, 0)?.forward(&x, &r, None, Some(&keys))?;
    assert_bits("p = 1", &flat(&y)?, &flat(&r)?);
    let grads = y.sum_all()?.backward()?;
    assert!(flat(grads.get(&x).unwrap())?.iter().all(|&v| v == 0.0));
    // p = 0: exactly x + r.
    let y = DropoutResidual::new(0.0, 0)?.forward(&x, &r, None, Some(&keys))?;
    assert_bits("p = 0", &flat(&y)?, &flat(&(x.as_tensor() + &r)?)?);
    Ok(())
}

/// Non-contiguous inputs are copied (same result as their contiguous copy, gradients flow back
/// through the copy); contiguous views with a start offset are read in place.
#[test]
fn strided_and_offset_inputs() -> R {
    let mut g = rng(8);
    let (rows, cols) = (12, 10);
    let keys = StepKeys::new(9, 0);
    let site = DropoutResidual::new(0.3, 0)?;
    let xt = Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[cols, rows])?)?;
    let x = xt.t()?; // [rows, cols], strided
    assert!(!x.is_contiguous());
    let r = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let y = site.forward(&x, &r, None, Some(&keys))?;
    let y_copy = site.forward(&x.contiguous()?, &r, None, Some(&keys))?;
    assert_bits("strided x", &flat(&y)?, &flat(&y_copy)?);
    let grads = y.sum_all()?.backward()?;
    let m = multiplier(&site.config(rows, cols, Some(&keys))?)?;
    assert_bits(
        "strided dx",
        &flat(grads.get(&xt).unwrap())?,
        &flat(&m.t()?)?,
    );

    // Offset views: rows 1..rows+1 of a bigger tensor, and a bias at element offset 1.
    let big = tensor(&data(&mut g, (rows + 2) * cols), &[rows + 2, cols])?;
    let xo = big.narrow(0, 1, rows)?;
    assert!(xo.is_contiguous());
    let bb = tensor(&data(&mut g, cols + 1), &[cols + 1])?;
    let bo = bb.narrow(0, 1, cols)?;
    let y = site.forward(&xo, &r, Some(&bo), Some(&keys))?;
    let y_copy = site.forward(&xo.copy()?, &r, Some(&bo.copy()?), Some(&keys))?;
    assert_bits("offset views", &flat(&y)?, &flat(&y_copy)?);
    Ok(())
}

/// Bad input is an error naming the problem, never a panic.
#[test]
fn bad_input_is_an_error() -> R {
    let dev = &Device::Cpu;
    let keys = StepKeys::new(1, 0);
    let site = DropoutResidual::new(0.1, 0)?;
    let x = Tensor::zeros((4, 8), DType::F32, dev)?;
    let r = Tensor::zeros((4, 8), DType::F32, dev)?;
    let expect = |res: candle_core::Result<Tensor>, needle: &str| {
        let e = res.expect_err(needle).to_string();
        assert!(
            e.contains(needle),
            "error {e:?} does not mention {needle:?}"
        );
    };
    let f64x = x.to_dtype(DType::F64)?;
    expect(site.forward(&f64x, &f64x, None, Some(&keys)), "F64");
    let u8x = x.to_dtype(DType::U8)?;
    expect(site.forward(&u8x, &u8x, None, Some(&keys)), "U8");
    expect(
        site.forward(&x, &r.to_dtype(DType::BF16)?, None, Some(&keys)),
        "residual",
    );
    expect(
        site.forward(
            &x,
            &Tensor::zeros((4, 9), DType::F32, dev)?,
            None,
            Some(&keys),
        ),
        "differ",
    );
    expect(
        site.forward(
            &x,
            &r,
            Some(&Tensor::zeros(7, DType::F32, dev)?),
            Some(&keys),
        ),
        "bias",
    );
    expect(
        site.forward(
            &x,
            &r,
            Some(&Tensor::zeros(8, DType::BF16, dev)?),
            Some(&keys),
        ),
        "bias",
    );
    let s = Tensor::new(1f32, dev)?;
    expect(site.forward(&s, &s, None, Some(&keys)), "scalar");
    Ok(())
}

/// Issue 25, finding 4: keys built at any step never overflow when advanced; every step at or
/// past `MAX_STEPS` is refused by `next_step` and by `call`.
#[test]
fn step_keys_never_overflow() {
    use fusedreg::candle::MAX_STEPS;
    for step in [
        MAX_STEPS - 1,
        MAX_STEPS,
        MAX_STEPS + 1,
        u64::MAX - 1,
        u64::MAX,
    ] {
        let k = StepKeys::new(3, step);
        assert!(k.next_step().is_err(), "step {step} advanced");
        assert!(
            k.call(0, 0).is_err() || step < MAX_STEPS,
            "step {step} keyed"
        );
    }
    assert_eq!(
        StepKeys::new(3, MAX_STEPS - 2)
            .next_step()
            .map(|k| k.step())
            .ok(),
        Some(MAX_STEPS - 1)
    );
}
