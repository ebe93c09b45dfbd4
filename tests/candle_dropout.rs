//! `fusedreg::candle::Dropout` and `fusedreg::candle::DropoutResidual` (one adapter on the one
//! dropout op: `y = dropout(x + b)` and `y = r + dropout(x + b)`) on candle's CPU device
//! (`cargo test -p fusedreg --features candle --test candle_dropout`): forward and gradients
//! against the same computation written in plain candle ops (the mask rebuilt from fusedreg's
//! keying as a candle tensor) and against fusedreg's CPU reference bit for bit, in every dtype.
//! Tests of the residual entry point are named `residual_*`.
#![cfg(feature = "candle")]

mod candle_ops_util;

use candle_core::{DType, Device, Tensor, Var};
use candle_ops_util::*;
use fusedreg::candle::{Dropout, DropoutResidual, StepKeys};
use fusedreg::dropout::{cpu, Config};
use fusedreg::Dtype;
use half::{bf16, f16};

#[derive(Clone, Copy)]
struct Case {
    dims: &'static [usize],
    p: f64,
    bias: bool,
    /// (p_path, rows_per_sample)
    path: Option<(f64, usize)>,
}

/// A case: dims, p, with a bias, drop path `(p_path, rows_per_sample)`.
const fn case(dims: &'static [usize], p: f64, bias: bool, path: Option<(f64, usize)>) -> Case {
    Case {
        dims,
        p,
        bias,
        path,
    }
}

/// The cases of `Dropout`.
const CASES: &[Case] = &[
    case(&[3, 7, 33], 0.1, true, None),
    case(&[37, 19], 0.5, false, None),
    case(&[3, 11, 33], 0.25, true, Some((0.5, 11))),
    case(&[100, 7], 0.3, true, Some((0.3, 1))), // several dbias slabs
    case(&[1000], 0.1, false, Some((0.5, 1))),  // one row
    case(&[5, 1], 0.9, true, None),
];

/// The cases of `DropoutResidual`: those of `Dropout` but the first (`[37, 19]` here) and the
/// one-row case (no drop path here).
const RESIDUAL_CASES: &[Case] = &[
    case(&[37, 19], 0.1, true, None),
    CASES[1],
    CASES[2],
    CASES[3],                        // several dbias slabs
    case(&[1000], 0.1, false, None), // one row
    CASES[5],
];

/// Either entry point of the adapter, so that one test body can drive both.
enum Site {
    Plain(Dropout),
    Residual(DropoutResidual),
}

impl Site {
    /// `Dropout` or (`residual`) `DropoutResidual` at rate `p` and site `site`, with the drop
    /// path `(p_path, rows_per_sample)` where given.
    fn new(
        residual: bool,
        p: f64,
        site: u32,
        path: Option<(f64, usize)>,
    ) -> candle_core::Result<Self> {
        Ok(match (residual, path) {
            (false, None) => Site::Plain(Dropout::new(p, site)?),
            (false, Some((pp, rps))) => {
                Site::Plain(Dropout::new(p, site)?.with_drop_path(pp, rps)?)
            }
            (true, None) => Site::Residual(DropoutResidual::new(p, site)?),
            (true, Some((pp, rps))) => {
                Site::Residual(DropoutResidual::new(p, site)?.with_drop_path(pp, rps)?)
            }
        })
    }

    /// The forward; `r` is the residual, given exactly when the site is `Residual`.
    fn forward(
        &self,
        x: &Tensor,
        r: Option<&Tensor>,
        b: Option<&Tensor>,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<Tensor> {
        match (self, r) {
            (Site::Plain(s), None) => s.forward(x, b, keys),
            (Site::Residual(s), Some(r)) => s.forward(x, r, b, keys),
            _ => panic!("a residual goes with DropoutResidual and only with it"),
        }
    }

    fn config(
        &self,
        rows: usize,
        cols: usize,
        keys: Option<&StepKeys>,
    ) -> candle_core::Result<Config> {
        match self {
            Site::Plain(s) => s.config(rows, cols, keys),
            Site::Residual(s) => s.config(rows, cols, keys),
        }
    }
}

/// The cases of one entry point.
fn cases(residual: bool) -> &'static [Case] {
    if residual {
        RESIDUAL_CASES
    } else {
        CASES
    }
}

/// dbias against plain candle's: column sums of the f32 gradients in another order, so a bound
/// scaled by the column's sum of magnitudes of `gx_ref` (`[rows, cols]`, f32), plus `rounding`
/// relative to the value (the output dtype's rounding; 0 where there is none).
fn assert_dbias_near(what: &str, db: &[f32], db_ref: &[f32], gx_ref: &Tensor, rounding: f32) -> R {
    let abs_sum = flat(&gx_ref.abs()?.sum(0)?)?;
    for col in 0..db.len() {
        let bound = 1e-5 * (1.0 + abs_sum[col]) + rounding * db_ref[col].abs();
        assert!(
            (db[col] - db_ref[col]).abs() <= bound,
            "{what}: column {col}: {} vs {}",
            db[col],
            db_ref[col]
        );
    }
    Ok(())
}

/// Some elements dropped and some kept, read off dx = w * m (an element counts as kept where its
/// gradient is nonzero or its weight is zero); only where there are enough elements to tell.
fn assert_some_dropped(what: &str, p: f64, gx: &[f32], w: &[f32]) {
    let n = gx.len();
    let kept = gx
        .iter()
        .zip(w)
        .filter(|(g, w)| **g != 0.0 || **w == 0.0)
        .count();
    if p > 0.0 && n >= 100 {
        assert!(kept > 0 && kept < n, "{what}: kept {kept} of {n}");
    }
}

/// `Dropout`: forward and gradients equal plain candle ops: `y = T(f32(x) + f32(b)) * m)` (the
/// op's own definition: the sum and product in f32, rounded once to the dtype), loss =
/// `sum(y * w)`. y and dx are the same f32 operations on both sides, so they are compared bit
/// for bit in every dtype; dbias sums in another order, so it gets a bound.
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
            let site = Site::new(false, c.p, 4, c.path)?;
            let keys = StepKeys::new(0xfeed + k as u64, 3);
            let bias = c.bias.then_some(b.as_tensor());

            let y = site.forward(&x, None, bias, Some(&keys))?;
            let grads = (&y * &w)?.sum_all()?.backward()?;

            let cfg = site.config(rows, cols, Some(&keys))?;
            let m = multiplier(&cfg, dtype)?.reshape(c.dims)?;
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
                // Rounded to the dtype at the end: its rounding on top.
                let gx_ref = grads_ref.get(&x).unwrap().to_dtype(DType::F32)?;
                assert_dbias_near(
                    &what("dbias"),
                    &flat(grads.get(&b).unwrap())?,
                    &flat(grads_ref.get(&b).unwrap())?,
                    &gx_ref.reshape((rows, cols))?,
                    ulp(dtype),
                )?;
            } else {
                assert!(grads.get(&b).is_none());
            }
            assert_some_dropped(&what("mask"), c.p, &gx, &flat(&w)?);
        }
    }
    Ok(())
}

/// `DropoutResidual`: forward and every gradient equal the same computation in plain candle ops
/// (f32): `y = r + (x + b) * m`, loss = `sum(y * w)`.
#[test]
fn residual_forward_and_gradients_match_plain_candle_ops() -> R {
    let mut g = rng(1);
    for (k, c) in RESIDUAL_CASES.iter().enumerate() {
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
        let site = Site::new(true, c.p, 4, c.path)?;
        let keys = StepKeys::new(0xfeed + k as u64, 3);
        let bias = c.bias.then_some(b.as_tensor());

        let y = site.forward(&x, Some(&r), bias, Some(&keys))?;
        let grads = (&y * &w)?.sum_all()?.backward()?;

        // The same in plain candle ops, with the mask from fusedreg's keying.
        let cfg = site.config(rows, cols, Some(&keys))?;
        let m = multiplier(&cfg, x.dtype())?.reshape(c.dims)?;
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
            // f32 throughout: no rounding to another dtype.
            assert_dbias_near(
                &what("dbias"),
                &flat(grads.get(&b).unwrap())?,
                &flat(grads_ref.get(&b).unwrap())?,
                &grads_ref.get(&x).unwrap().reshape((rows, cols))?,
                0.0,
            )?;
        } else {
            assert!(grads.get(&b).is_none());
        }
        assert_some_dropped(&what("mask"), c.p, &gx, &wv);
    }
    Ok(())
}

/// The adapter gives exactly the bits of fusedreg's CPU reference in dtype `T`, for every case
/// of the entry point: y, dx, dbias, and (`residual`) dresidual.
fn matches_the_cpu_reference<T: Dtype + candle_core::WithDType>(dtype: DType, residual: bool) -> R {
    let mut g = rng(2);
    for (k, c) in cases(residual).iter().enumerate() {
        let n: usize = c.dims.iter().product();
        let cols = *c.dims.last().unwrap();
        let rows = n / cols;
        let mut draw = |len| {
            data(&mut g, len)
                .into_iter()
                .map(T::from_f32_rn)
                .collect::<Vec<T>>()
        };
        let xv = draw(n);
        let rv = residual.then(|| draw(n));
        let (bv, dyv) = (draw(cols), draw(n));
        let dev = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_slice(&xv, c.dims, dev)?)?;
        let r = match &rv {
            Some(rv) => Some(Var::from_tensor(&Tensor::from_slice(rv, c.dims, dev)?)?),
            None => None,
        };
        let b = Var::from_tensor(&Tensor::from_slice(&bv, cols, dev)?)?;
        let dy = Tensor::from_slice(&dyv, c.dims, dev)?;
        assert_eq!(x.dtype(), dtype);
        let site = Site::new(residual, c.p, 1000 + k as u32, c.path)?;
        let keys = StepKeys::new(77, k as u64);
        let bias = c.bias.then_some(b.as_tensor());
        let y = site.forward(&x, r.as_ref().map(|r| r.as_tensor()), bias, Some(&keys))?;
        // d(sum(y * dy)) / dx is the backward applied to dy.
        let grads = (&y * &dy)?.sum_all()?.backward()?;

        let cfg = site.config(rows, cols, Some(&keys))?;
        let mut y_ref = vec![T::default(); n];
        let opts = cpu::ForwardOptions {
            bias: c.bias.then_some(&bv[..]),
            residual: rv.as_deref(),
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
        if let Some(r) = &r {
            // The gradient reaching y from `sum(y * dy)` is `1 * dy`: dy exactly, in every dtype.
            let dr = bits(grads.get(r).unwrap())?;
            assert_eq!(dr, grad_ref(&dyv, c.dims)?, "{}", what("dresidual"));
        }
        if c.bias {
            let db = bits(grads.get(&b).unwrap())?;
            assert_eq!(db, grad_ref(&db_ref, &[cols])?, "{}", what("dbias"));
        }
    }
    Ok(())
}

/// `Dropout` gives exactly the bits of fusedreg's CPU reference, in every dtype: y, dx, dbias.
#[test]
fn matches_the_cpu_reference_bit_for_bit() -> R {
    matches_the_cpu_reference::<f32>(DType::F32, false)?;
    matches_the_cpu_reference::<f16>(DType::F16, false)?;
    matches_the_cpu_reference::<bf16>(DType::BF16, false)
}

/// `DropoutResidual` gives exactly the bits of fusedreg's CPU reference, in every dtype: y, dx,
/// dresidual, dbias.
#[test]
fn residual_matches_the_cpu_reference_bit_for_bit() -> R {
    matches_the_cpu_reference::<f32>(DType::F32, true)?;
    matches_the_cpu_reference::<f16>(DType::F16, true)?;
    matches_the_cpu_reference::<bf16>(DType::BF16, true)
}

/// `DropoutResidual` in a residual block `y = r + dropout(r W + b)`: the residual takes gradient
/// along both paths and candle adds them; W's gradient flows through the op. Same as plain
/// candle ops.
#[test]
fn residual_a_residual_block_trains_like_plain_candle() -> R {
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

    let m = multiplier(&site.config(rows, hidden, Some(&keys))?, h.dtype())?;
    let y_ref = (r.as_tensor() + (h.broadcast_add(&b)? * &m)?)?;
    let loss_ref = (&y_ref - &target)?.sqr()?.mean_all()?;
    let grads_ref = loss_ref.backward()?;

    // `|a - b| <= tol * (1 + |b|)`.
    assert_near("loss", &flat(&loss)?, &flat(&loss_ref)?, 1e-5, 1e-5);
    for (name, v) in [("r", &r), ("W", &wm), ("b", &b)] {
        assert_near(
            name,
            &flat(grads.get(v).unwrap())?,
            &flat(grads_ref.get(v).unwrap())?,
            1e-4,
            1e-4,
        );
    }
    Ok(())
}

/// A drop path on `[batch, seq, hidden]` with one draw per sample: a dropped sample's output is
/// zero (`Dropout`) or its residual (`DropoutResidual`), bit for bit, and its x gets no
/// gradient; a kept one is scaled by `1 / (1 - p_path)`.
fn drop_path_drops_whole_samples_of(residual: bool) -> R {
    let mut g = rng(4);
    let (batch, seq, hidden) = (64, 5, 8);
    let n = batch * seq * hidden;
    let xv = data(&mut g, n);
    let x = Var::from_tensor(&tensor(&xv, &[batch, seq, hidden])?)?;
    // What a dropped sample's output is: the residual, or zeros.
    let rv = if residual {
        data(&mut g, n)
    } else {
        vec![0.0; n]
    };
    let r = tensor(&rv, &[batch, seq, hidden])?;
    let site = Site::new(residual, 0.0, 9, Some((0.5, seq)))?;
    let keys = StepKeys::new(11, 2);
    let y = site.forward(&x, residual.then_some(&r), None, Some(&keys))?;
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
            assert_same_bits("dropped sample y", &yv[span.clone()], &rv[span.clone()]);
            assert!(
                gx[span].iter().all(|&v| v == 0.0),
                "sample {s}: dx not zero"
            );
        } else {
            if !residual {
                let want: Vec<f32> = xv[span.clone()].iter().map(|v| v * 2.0).collect();
                assert_bits("kept sample y", &yv[span.clone()], &want);
            }
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

#[test]
fn drop_path_drops_whole_samples() -> R {
    drop_path_drops_whole_samples_of(false)
}

#[test]
fn residual_drop_path_drops_whole_samples() -> R {
    drop_path_drops_whole_samples_of(true)
}

/// `Dropout` without keys (evaluation) is the identity plus the bias: `x` itself without a bias,
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

/// `DropoutResidual` without keys (evaluation) is `x + bias + residual` rounded once: exactly
/// candle's sum in f32, and the gradient passes unchanged.
#[test]
fn residual_evaluation_is_the_plain_sum() -> R {
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

/// Masks are a function of (seed, step, site) only, for either entry point.
fn masks_follow_the_keys_of(residual: bool) -> R {
    let mut g = rng(6);
    let (rows, cols) = (16, 64);
    let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    let r = match residual {
        true => Some(tensor(&data(&mut g, rows * cols), &[rows, cols])?),
        false => None,
    };
    assert_masks_follow_the_keys(rows * cols, |site, keys| {
        Site::new(residual, 0.5, site, None)?.forward(&x, r.as_ref(), None, Some(keys))
    })
}

#[test]
fn masks_follow_the_keys() -> R {
    masks_follow_the_keys_of(false)
}

#[test]
fn residual_masks_follow_the_keys() -> R {
    masks_follow_the_keys_of(true)
}

/// Empty tensors (no rows, no columns, with a drop path), p = 0 and p = 1.
#[test]
fn empty_and_extreme_rates() -> R {
    let site = Dropout::new(0.1, 0)?.with_drop_path(0.5, 1)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).takes_empty_tensors()?;
    let all = Dropout::new(1.0, 0)?;
    XBiasOp::new(|x, b, k| all.forward(x, b, k)).drops_everything()?;
    // p = 0: exactly x.
    let x = p1_input()?;
    let y = Dropout::new(0.0, 0)?.forward(&x, None, Some(&StepKeys::new(1, 1)))?;
    assert_bits("p = 0", &flat(&y)?, &flat(&x)?);
    Ok(())
}

/// Non-contiguous inputs are copied (same result as their contiguous copy, gradients flow back
/// through the copy: dx of a transposed x is the multiplier, transposed); contiguous views with
/// a start offset are read in place.
#[test]
fn strided_and_offset_inputs() -> R {
    let site = Dropout::new(0.3, 0)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).reads_views()?;
    let mut g = rng(8);
    let (rows, cols) = (12, 10);
    let keys = StepKeys::new(9, 0);
    for dtype in DTYPES {
        let xt =
            Var::from_tensor(&tensor(&data(&mut g, rows * cols), &[cols, rows])?.to_dtype(dtype)?)?;
        let y = site.forward(&xt.t()?, None, Some(&keys))?;
        let grads = y.sum_all()?.backward()?;
        let m = multiplier(&site.config(rows, cols, Some(&keys))?, dtype)?.to_dtype(dtype)?;
        assert_bits(
            "strided dx",
            &flat(grads.get(&xt).unwrap())?,
            &flat(&m.t()?)?,
        );
    }
    Ok(())
}

/// Bad input is an error naming the problem, never a panic. (Mixed devices need a GPU: see
/// tests/gpu/candle/dropout.rs.)
#[test]
fn bad_input_is_an_error() -> R {
    let site = Dropout::new(0.1, 0)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).refuses_bad_input(DType::U8, DType::BF16, 7)
}

/// `DropoutResidual`: empty tensors, p = 0 and p = 1.
#[test]
fn residual_empty_and_extreme_rates() -> R {
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
fn residual_strided_and_offset_inputs() -> R {
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
    let m = multiplier(&site.config(rows, cols, Some(&keys))?, x.dtype())?;
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
fn residual_bad_input_is_an_error() -> R {
    let dev = &Device::Cpu;
    let keys = StepKeys::new(1, 0);
    let site = DropoutResidual::new(0.1, 0)?;
    let x = Tensor::zeros((4, 8), DType::F32, dev)?;
    let r = Tensor::zeros((4, 8), DType::F32, dev)?;
    let f64x = x.to_dtype(DType::F64)?;
    expect_err(site.forward(&f64x, &f64x, None, Some(&keys)), "F64");
    let u8x = x.to_dtype(DType::U8)?;
    expect_err(site.forward(&u8x, &u8x, None, Some(&keys)), "U8");
    expect_err(
        site.forward(&x, &r.to_dtype(DType::BF16)?, None, Some(&keys)),
        "residual",
    );
    expect_err(
        site.forward(
            &x,
            &Tensor::zeros((4, 9), DType::F32, dev)?,
            None,
            Some(&keys),
        ),
        "differ",
    );
    expect_err(
        site.forward(
            &x,
            &r,
            Some(&Tensor::zeros(7, DType::F32, dev)?),
            Some(&keys),
        ),
        "bias",
    );
    expect_err(
        site.forward(
            &x,
            &r,
            Some(&Tensor::zeros(8, DType::BF16, dev)?),
            Some(&keys),
        ),
        "bias",
    );
    let s = Tensor::new(1f32, dev)?;
    expect_err(site.forward(&s, &s, None, Some(&keys)), "scalar");
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
