//! `fusedreg::candle::BiasActDropout` on candle's CPU device
//! (`cargo test -p fusedreg --features candle --test candle_bias_act_dropout`): every activation,
//! forward and gradients against the same computation written in plain candle ops (candle's own
//! `gelu_erf`, `gelu` (tanh), `silu`, `relu`, the mask rebuilt from fusedreg's keying as a candle
//! tensor) and against fusedreg's CPU reference bit for bit, in every dtype.
#![cfg(feature = "candle")]

mod candle_ops_util;

use candle_core::{DType, Device, Tensor, Var};
use candle_ops_util::*;
use fusedreg::bias_act_dropout::{cpu, Activation, Config, Preact};
use fusedreg::candle::{BiasActDropout, StepKeys};
use fusedreg::Dtype;

/// `keep ? scale : 0` per element from fusedreg's keying of a `dtype` call, as a `[rows, cols]`
/// f32 candle tensor.
fn multiplier(cfg: &Config, dtype: DType) -> candle_core::Result<Tensor> {
    let keying = cfg.keying(kind(dtype));
    let scale = keying.scale();
    let m: Vec<f32> = (0..cfg.len())
        .map(|i| if keying.keeps(i as u64) { scale } else { 0.0 })
        .collect();
    tensor(&m, &[cfg.rows(), cfg.cols()])
}

/// candle's own activation for `act`.
fn candle_act(act: Activation, h: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::GeluErf => h.gelu_erf(),
        Activation::GeluTanh => h.gelu(),
        Activation::Silu => h.silu(),
        Activation::Relu => h.relu(),
    }
}

/// (dims, p, bias)
const CASES: &[(&[usize], f64, bool)] = &[
    (&[3, 7, 33], 0.1, true),
    (&[37, 19], 0.5, false),
    (&[100, 7], 0.3, true), // several dbias slabs
    (&[1000], 0.2, true),   // one row
    (&[5, 1], 0.0, true),
];

/// Forward and gradients equal plain candle ops with candle's activations, computed in f32 from
/// the same inputs and rounded to the dtype: `y = T(act(f32(x) + f32(b)) * m)`, loss =
/// `sum(y * w)`.
///
/// Bounds: candle's activations are other f32 formulas than fusedreg's (its GELU derivatives use
/// 6-digit constants), so values agree to a few parts in 10^6 of their magnitude, and after
/// rounding to f16/bf16 to one unit in the last place of the dtype more: `rel = ulp(dtype) +
/// 2e-5` of the reference, plus `2e-6 * scale * (1 + |h|)` (`* |w|` for dx) absolutely, for
/// the cancellation in `1 + tanh` / `1 + erf` near zero outputs. ReLU is the same f32
/// operations on both sides and is compared bit for bit, except at `h = 0`, where candle's
/// `relu` takes the derivative 1 and fusedreg (like PyTorch) 0. dbias sums in another order: a
/// bound scaled by the sum of magnitudes.
#[test]
fn forward_and_gradients_match_plain_candle_ops() -> R {
    let mut g = rng(1);
    let mut relu_zeros = 0;
    for act in Activation::ALL {
        for dtype in DTYPES {
            for (k, &(dims, p, with_bias)) in CASES.iter().enumerate() {
                let n: usize = dims.iter().product();
                let cols = *dims.last().unwrap();
                let rows = n / cols;
                let cast = |v: Vec<f32>, dims: &[usize]| tensor(&v, dims)?.to_dtype(dtype);
                let x = Var::from_tensor(&cast(data(&mut g, n), dims)?)?;
                let b = Var::from_tensor(&cast(data(&mut g, cols), &[cols])?)?;
                let w = cast(data(&mut g, n), dims)?;
                let site = BiasActDropout::new(act, p, 4)?;
                let keys = StepKeys::new(0xbeef + k as u64, 5);
                let bias = with_bias.then_some(b.as_tensor());

                let y = site.forward(&x, bias, Some(&keys))?;
                let grads = (&y * &w)?.sum_all()?.backward()?;

                let cfg = site.config(rows, cols, Some(&keys))?;
                let m = multiplier(&cfg, dtype)?.reshape(dims)?;
                let x32 = x.to_dtype(DType::F32)?;
                let h = if with_bias {
                    x32.broadcast_add(&b.to_dtype(DType::F32)?)?
                } else {
                    x32
                };
                let y_ref = (candle_act(act, &h)? * &m)?.to_dtype(dtype)?;
                let grads_ref = (&y_ref * &w)?.sum_all()?.backward()?;

                let what = |s: &str| format!("{act:?} {dtype:?} case {k} {dims:?}: {s}");
                let (yv, yr) = (flat(&y)?, flat(&y_ref)?);
                let (gx, gr) = (
                    flat(grads.get(&x).unwrap())?,
                    flat(grads_ref.get(&x).unwrap())?,
                );
                let (hv, mv, wv) = (flat(&h)?, flat(&m)?, flat(&w)?);
                let rel = ulp(dtype) + 2e-5;
                for i in 0..n {
                    if act == Activation::Relu {
                        if hv[i] == 0.0 {
                            relu_zeros += 1;
                            assert_eq!(gx[i], 0.0, "{}: relu'(0) at {i}", what("dx"));
                            continue;
                        }
                        assert_bits(&what("y"), &yv[i..=i], &yr[i..=i]);
                        assert_bits(&what("dx"), &gx[i..=i], &gr[i..=i]);
                        continue;
                    }
                    let within = |out: &str, got: f32, want: f32, abs: f32| {
                        assert!(
                            (got - want).abs() <= rel * want.abs() + abs,
                            "{}: index {i} (h = {}): adapter {got} vs candle {want}",
                            what(out),
                            hv[i],
                        );
                    };
                    let abs = 2e-6 * mv[i] * (1.0 + hv[i].abs());
                    within("y", yv[i], yr[i], abs);
                    within("dx", gx[i], gr[i], abs * wv[i].abs());
                }
                if with_bias {
                    let db = flat(grads.get(&b).unwrap())?;
                    let mut db_ref = flat(grads_ref.get(&b).unwrap())?;
                    let abs_sum: Vec<f32> = (0..cols)
                        .map(|c| (0..rows).map(|r| gr[r * cols + c].abs()).sum())
                        .collect();
                    if act == Activation::Relu {
                        // Take out what candle's relu'(0) = 1 added at h = 0 (bf16 and f16
                        // inputs hit x = -bias now and then).
                        for i in (0..n).filter(|&i| hv[i] == 0.0) {
                            db_ref[i % cols] -= gr[i];
                        }
                    }
                    for col in 0..cols {
                        let bound =
                            (1e-5 + rel) * (1.0 + abs_sum[col]) + ulp(dtype) * db_ref[col].abs();
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
                if p > 0.0 && n >= 100 {
                    let kept = gx.iter().filter(|&&g| g != 0.0).count();
                    assert!(kept > 0 && kept < n, "{}: kept {kept} of {n}", what("mask"));
                }
            }
        }
    }
    // The data has exact zeros (bias-free case): the h = 0 convention was exercised.
    assert!(relu_zeros > 0);
    Ok(())
}

/// The adapter gives exactly the bits of fusedreg's CPU reference (with [`Preact::X`]), in every
/// dtype and activation: y, dx, dbias.
#[test]
fn matches_the_cpu_reference_bit_for_bit() -> R {
    fn run<T: Dtype + candle_core::WithDType>(dtype: DType) -> R {
        let mut g = rng(2);
        for act in Activation::ALL {
            for (k, &(dims, p, with_bias)) in CASES.iter().enumerate() {
                let n: usize = dims.iter().product();
                let cols = *dims.last().unwrap();
                let rows = n / cols;
                let cast = |v: Vec<f32>| v.into_iter().map(T::from_f32_rn).collect::<Vec<T>>();
                let (xv, bv, dyv) = (
                    cast(data(&mut g, n)),
                    cast(data(&mut g, cols)),
                    cast(data(&mut g, n)),
                );
                let dev = &Device::Cpu;
                let x = Var::from_tensor(&Tensor::from_slice(&xv, dims, dev)?)?;
                let b = Var::from_tensor(&Tensor::from_slice(&bv, cols, dev)?)?;
                let dy = Tensor::from_slice(&dyv, dims, dev)?;
                assert_eq!(x.dtype(), dtype);
                let site = BiasActDropout::new(act, p, 1000 + k as u32)?;
                let keys = StepKeys::new(77, k as u64);
                let y = site.forward(&x, with_bias.then_some(b.as_tensor()), Some(&keys))?;
                let grads = (&y * &dy)?.sum_all()?.backward()?;

                let cfg = site.config(rows, cols, Some(&keys))?;
                let bias = with_bias.then_some(&bv[..]);
                let mut y_ref = vec![T::default(); n];
                cpu::forward(&cfg, &xv, bias, &mut y_ref, None).unwrap();
                let (mut dx_ref, mut db_ref) = (vec![T::default(); n], vec![T::default(); cols]);
                let pre = Preact::X { x: &xv[..], bias };
                let db = with_bias.then_some(&mut db_ref[..]);
                cpu::backward(&cfg, &dyv, pre, &mut dx_ref, db).unwrap();

                let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
                    Ok(flat(t)?.iter().map(|v| v.to_bits()).collect())
                };
                // Reference gradients pass through candle's gradient accumulation first (see
                // `as_candle_grad`); then every bit must agree.
                let grad_ref = |v: &[T], dims: &[usize]| -> candle_core::Result<Vec<u32>> {
                    bits(&as_candle_grad(&Tensor::from_slice(v, dims, dev)?)?)
                };
                let y_ref = bits(&Tensor::from_slice(&y_ref, dims, dev)?)?;
                let what = |s: &str| format!("{act:?} {dtype:?} case {k}: {s}");
                assert_eq!(bits(&y)?, y_ref, "{}", what("y"));
                let dx = bits(grads.get(&x).unwrap())?;
                assert_eq!(dx, grad_ref(&dx_ref, dims)?, "{}", what("dx"));
                if with_bias {
                    let db = bits(grads.get(&b).unwrap())?;
                    assert_eq!(db, grad_ref(&db_ref, &[cols])?, "{}", what("dbias"));
                }
            }
        }
        Ok(())
    }
    for_each_dtype!(run)
}

/// Without keys (evaluation) the op is `act(x + bias)`: exactly fusedreg's activation of the
/// f32 sum, rounded once, in every dtype, and within the bound above of candle's activation.
#[test]
fn evaluation_is_the_activation() -> R {
    let mut g = rng(5);
    let (rows, cols) = (9, 13);
    for act in Activation::ALL {
        let site = BiasActDropout::new(act, 0.5, 1)?;
        for dtype in DTYPES {
            let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?.to_dtype(dtype)?;
            let b = tensor(&data(&mut g, cols), &[cols])?.to_dtype(dtype)?;
            let (xv, bv) = (flat(&x)?, flat(&b)?);
            let h: Vec<f32> = (0..rows * cols).map(|i| xv[i] + bv[i % cols]).collect();
            let want = tensor(
                &h.iter().map(|&h| act.forward(h)).collect::<Vec<_>>(),
                &[rows, cols],
            )?
            .to_dtype(dtype)?;
            let y = site.forward(&x, Some(&b), None)?;
            let what = format!("{act:?} {dtype:?} eval");
            assert_bits(&what, &flat(&y)?, &flat(&want)?);
            let candle = candle_act(act, &tensor(&h, &[rows, cols])?)?.to_dtype(dtype)?;
            let (yv, cv) = (flat(&y)?, flat(&candle)?);
            for i in 0..h.len() {
                let bound = (ulp(dtype) + 2e-5) * cv[i].abs() + 2e-6 * (1.0 + h[i].abs());
                assert!(
                    (yv[i] - cv[i]).abs() <= bound,
                    "{what}: index {i}: {} vs candle {}",
                    yv[i],
                    cv[i]
                );
            }
            // Without a bias: act(x).
            let y = site.forward(&x, None, None)?;
            let want: Vec<f32> = xv.iter().map(|&v| act.forward(v)).collect();
            let want = flat(&tensor(&want, &[rows, cols])?.to_dtype(dtype)?)?;
            assert_bits(&format!("{what} no bias"), &flat(&y)?, &want);
        }
    }
    Ok(())
}

/// Masks are a function of (seed, step, site) only.
#[test]
fn masks_follow_the_keys() -> R {
    let mut g = rng(6);
    let (rows, cols) = (16, 64);
    let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    assert_masks_follow_the_keys(rows * cols, |site, keys| {
        BiasActDropout::new(Activation::GeluErf, 0.5, site)?.forward(&x, None, Some(keys))
    })
}

/// Empty tensors, p = 1.
#[test]
fn empty_and_extreme_rates() -> R {
    let site = BiasActDropout::new(Activation::Silu, 0.1, 0)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).takes_empty_tensors()?;
    let all = BiasActDropout::new(Activation::GeluTanh, 1.0, 0)?;
    XBiasOp::new(|x, b, k| all.forward(x, b, k)).drops_everything()
}

/// Non-contiguous inputs are copied: the same result as their contiguous copy, and gradients
/// flow back through the copy to the original layout; contiguous views with a start offset are
/// read in place.
#[test]
fn strided_inputs_are_copied() -> R {
    let site = BiasActDropout::new(Activation::GeluErf, 0.3, 0)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).reads_views()
}

/// Bad input is an error naming the problem, never a panic. (Mixed devices need a GPU: see
/// tests/gpu/candle/bias_act_dropout.rs.)
#[test]
fn bad_input_is_an_error() -> R {
    let site = BiasActDropout::new(Activation::Relu, 0.1, 0)?;
    XBiasOp::new(|x, b, k| site.forward(x, b, k)).refuses_bad_input(DType::U32, DType::F16, 9)
}
