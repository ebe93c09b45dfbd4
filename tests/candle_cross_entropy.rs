//! `fusedreg::candle::CrossEntropy` on candle's CPU device (`cargo test --features candle --test
//! candle_cross_entropy`): loss and logits gradient bit for bit against fusedreg's CPU reference
//! in every dtype with u32 and i64 targets; against PyTorch's definition written in plain candle
//! ops (log_softmax + gather); upstream gradients other than 1; ignored, empty and strided
//! inputs; bad input.
#![cfg(feature = "candle")]

mod candle_ops_util;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_ops_util::*;
use fusedreg::candle::CrossEntropy;
use fusedreg::cross_entropy::cpu;
use fusedreg::Dtype;
use rand::Rng;

/// Logits in [-4, 4), every seventh times 3: never all equal.
fn logits_data(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u: f32 = rng.random_range(-4.0..4.0);
            u * if i % 7 == 0 { 3.0 } else { 1.0 }
        })
        .collect()
}

/// Targets in `[0, vocab)`, every `ignore_every`-th row (if any) the ignore index.
fn targets_data(
    rng: &mut rand::rngs::StdRng,
    rows: usize,
    vocab: usize,
    ignore: i64,
    ignore_every: Option<usize>,
) -> Vec<i64> {
    (0..rows)
        .map(|r| match ignore_every {
            Some(e) if r % e == 1 => ignore,
            _ => rng.random_range(0..vocab as i64),
        })
        .collect()
}

struct Case {
    /// The logits' dims; the last is the vocabulary.
    dims: &'static [usize],
    alpha: f64,
    ignore: i64,
    ignore_every: Option<usize>,
}

const CASES: &[Case] = &[
    Case {
        dims: &[37, 19],
        alpha: 0.0,
        ignore: -100,
        ignore_every: Some(5),
    },
    Case {
        dims: &[3, 11, 33],
        alpha: 0.1,
        ignore: -100,
        ignore_every: Some(4),
    },
    Case {
        dims: &[4, 1000],
        alpha: 0.2,
        ignore: 0, // an in-range ignore index
        ignore_every: Some(2),
    },
    Case {
        dims: &[6, 1],
        alpha: 0.3,
        ignore: -1,
        ignore_every: None,
    },
    Case {
        dims: &[2, 2, 2100], // more than 256 groups of 8: every slot used
        alpha: 0.05,
        ignore: -100,
        ignore_every: None,
    },
];

fn ce(c: &Case) -> candle_core::Result<CrossEntropy> {
    Ok(CrossEntropy::new()
        .with_label_smoothing(c.alpha)?
        .with_ignore_index(c.ignore))
}

/// Loss and gradient equal `cpu::forward_backward` (mean reduction) bit for bit, for every dtype
/// and both target dtypes (u32 only where the targets fit).
#[test]
fn matches_the_cpu_reference_bit_for_bit() -> R {
    fn run<T: Dtype + candle_core::WithDType>(dtype: DType) -> R {
        let mut g = rng(21);
        for (k, c) in CASES.iter().enumerate() {
            let vocab = *c.dims.last().unwrap();
            let n: usize = c.dims.iter().product();
            let rows = n / vocab;
            let lead = &c.dims[..c.dims.len() - 1];
            let lv: Vec<T> = logits_data(&mut g, n)
                .into_iter()
                .map(T::from_f32_rn)
                .collect();
            let tv = targets_data(&mut g, rows, vocab, c.ignore, c.ignore_every);
            let dev = &Device::Cpu;
            let logits = Var::from_tensor(&Tensor::from_slice(&lv, c.dims, dev)?)?;
            assert_eq!(logits.dtype(), dtype);
            let site = ce(c)?;
            let cfg = site.config(rows, vocab)?;
            let mut grad_ref = vec![T::default(); n];
            let loss_ref = cpu::forward_backward(&cfg, &lv, &tv, None, &mut grad_ref).unwrap();
            let grad_ref: Vec<f32> = grad_ref.iter().map(|v| v.to_f32()).collect();
            let mut target_tensors = vec![Tensor::from_slice(&tv, lead, dev)?];
            if tv.iter().all(|&t| t >= 0) {
                let t32: Vec<u32> = tv.iter().map(|&t| t as u32).collect();
                target_tensors.push(Tensor::from_slice(&t32, lead, dev)?);
            }
            for targets in target_tensors {
                let what = format!(
                    "{dtype:?} case {k} {:?} targets {:?}",
                    c.dims,
                    targets.dtype()
                );
                let loss = site.forward(&logits, &targets)?;
                assert_eq!(loss.dtype(), DType::F32);
                assert_eq!(loss.dims(), &[] as &[usize]);
                let lv32: f32 = loss.to_scalar()?;
                assert_eq!(
                    lv32.to_bits(),
                    loss_ref.reduced.unwrap().to_bits(),
                    "{what}: loss {lv32} vs {:?}",
                    loss_ref.reduced
                );
                let grads = loss.backward()?;
                let dl = grads.get(&logits).unwrap();
                assert_eq!(dl.dims(), c.dims);
                assert_bits(&format!("{what}: grad"), &flat(dl)?, &grad_ref);
            }
        }
        Ok(())
    }
    for_each_dtype!(run)
}

/// PyTorch's definition in plain candle ops: `-(1-α)·logp[t] - α·mean(logp)` per row, averaged
/// over the rows whose target is not ignored. Loss and gradient within 2e-6 (relative to the
/// largest magnitude), with an upstream gradient of 1 and of 2.5 (`loss * 2.5`).
#[test]
fn loss_and_gradient_match_plain_candle_ops() -> R {
    let mut g = rng(22);
    for (k, c) in CASES.iter().enumerate() {
        let vocab = *c.dims.last().unwrap();
        let n: usize = c.dims.iter().product();
        let rows = n / vocab;
        let lead = &c.dims[..c.dims.len() - 1];
        let dev = &Device::Cpu;
        let logits = Var::from_tensor(&Tensor::from_slice(&logits_data(&mut g, n), c.dims, dev)?)?;
        let tv = targets_data(&mut g, rows, vocab, c.ignore, c.ignore_every);
        let targets = Tensor::from_slice(&tv, lead, dev)?;
        let valid: Vec<f32> = tv
            .iter()
            .map(|&t| f32::from(u8::from(t != c.ignore)))
            .collect();
        let n_valid: f32 = valid.iter().sum();
        let gather_at: Vec<u32> = tv
            .iter()
            .map(|&t| if t == c.ignore { 0 } else { t as u32 })
            .collect();

        for upstream in [1.0f64, 2.5] {
            let loss = (ce(c)?.forward(&logits, &targets)? * upstream)?;
            let grads = loss.backward()?;

            let logp = candle_nn::ops::log_softmax(&logits.reshape((rows, vocab))?, D::Minus1)?;
            let at = Tensor::from_slice(&gather_at, (rows, 1), dev)?;
            let nll = logp.gather(&at, 1)?.squeeze(1)?.neg()?;
            let smooth = logp.mean(1)?.neg()?;
            let per_row = ((nll * (1.0 - c.alpha))? + (smooth * c.alpha)?)?;
            let mask = Tensor::from_slice(&valid, rows, dev)?;
            let loss_ref = ((per_row * mask)?.sum_all()? * (upstream / f64::from(n_valid)))?;
            let grads_ref = loss_ref.backward()?;

            let what = format!("case {k} {:?} upstream {upstream}", c.dims);
            assert_close(
                &format!("{what}: loss"),
                &flat(&loss)?,
                &flat(&loss_ref)?,
                2e-6,
            );
            let dl = flat(grads.get(&logits).unwrap())?;
            let dl_ref = flat(grads_ref.get(&logits).unwrap())?;
            assert_close(&format!("{what}: grad"), &dl, &dl_ref, 2e-6);
            // Ignored rows: zero gradient.
            for (r, &t) in tv.iter().enumerate() {
                if t == c.ignore {
                    assert!(dl[r * vocab..(r + 1) * vocab].iter().all(|&v| v == 0.0));
                }
            }
        }
    }
    Ok(())
}

/// Every row ignored: loss 0 (not NaN), gradient 0. No rows at all: the same.
#[test]
fn nothing_to_average() -> R {
    let dev = &Device::Cpu;
    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), dev)?)?;
    let targets = Tensor::new(&[-100i64, -100, -100], dev)?;
    let loss = CrossEntropy::new().forward(&logits, &targets)?;
    assert_eq!(loss.to_scalar::<f32>()?, 0.0);
    let grads = loss.backward()?;
    assert!(flat(grads.get(&logits).unwrap())?.iter().all(|&v| v == 0.0));

    let empty = Var::zeros((0, 7), DType::BF16, dev)?;
    let none = Tensor::zeros(0, DType::U32, dev)?;
    let loss = CrossEntropy::new().forward(&empty, &none)?;
    assert_eq!(loss.to_scalar::<f32>()?, 0.0);
    let grads = loss.backward()?;
    assert_eq!(grads.get(&empty).unwrap().dims(), &[0, 7]);
    Ok(())
}

/// Strided logits and targets are copied: the same loss and gradient as contiguous ones.
#[test]
fn non_contiguous_inputs_are_copied() -> R {
    let mut g = rng(23);
    let (rows, vocab) = (9, 40);
    let dev = &Device::Cpu;
    let lt = Var::from_tensor(&Tensor::from_slice(
        &logits_data(&mut g, rows * vocab),
        (vocab, rows),
        dev,
    )?)?;
    let logits = lt.t()?;
    assert!(!logits.is_contiguous());
    let tv = targets_data(&mut g, 2 * rows, vocab, -100, Some(3));
    let targets = Tensor::from_slice(&tv, (rows, 2), dev)?.i((.., 0))?;
    assert!(!targets.is_contiguous());
    let ce = CrossEntropy::new().with_label_smoothing(0.1)?;
    let l1 = ce.forward(&logits, &targets)?;
    let l2 = ce.forward(&logits.contiguous()?, &targets.contiguous()?)?;
    assert_eq!(
        l1.to_scalar::<f32>()?.to_bits(),
        l2.to_scalar::<f32>()?.to_bits()
    );
    let g1 = l1.backward()?;
    let g1 = g1.get(&lt).unwrap().t()?;
    let g2 = l2.backward()?;
    let g2 = g2.get(&lt).unwrap().t()?;
    assert_same_bits("grad", &flat(&g1)?, &flat(&g2)?);
    Ok(())
}

/// Bad input is an error naming the problem, never a panic.
#[test]
fn bad_input_is_an_error() -> R {
    let dev = &Device::Cpu;
    let logits = Tensor::randn(0f32, 1.0, (4, 5), dev)?;
    let ce = CrossEntropy::new();
    let err = |r: candle_core::Result<Tensor>, want: &str| {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("accepted; wanted an error with {want:?}"));
        assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
    };
    let t = Tensor::new(&[0i64, 1, 2, 3], dev)?;
    // Targets: float, other integer types, wrong shape, out of range (both sides).
    err(ce.forward(&logits, &t.to_dtype(DType::F32)?), "u32 or i64");
    err(ce.forward(&logits, &t.to_dtype(DType::U8)?), "u32 or i64");
    err(
        ce.forward(&logits, &Tensor::new(&[0i64, 1, 2], dev)?),
        "targets are [3]",
    );
    err(
        ce.forward(&logits, &t.reshape((4, 1))?),
        "targets are [4, 1]",
    );
    err(
        ce.forward(&logits, &Tensor::new(&[0i64, 5, 2, 3], dev)?),
        "target 5 of row 1 is outside [0, 5)",
    );
    err(
        ce.forward(&logits, &Tensor::new(&[0i64, 1, -1, 3], dev)?),
        "target -1 of row 2",
    );
    err(
        ce.forward(&logits, &Tensor::new(&[0u32, 1, 2, 9], dev)?),
        "target 9 of row 3",
    );
    // Logits: dtype, scalar, empty vocabulary.
    err(ce.forward(&logits.to_dtype(DType::F64)?, &t), "F64");
    err(
        ce.forward(&Tensor::new(1f32, dev)?, &Tensor::new(0i64, dev)?),
        "scalar",
    );
    err(
        ce.forward(&Tensor::zeros((4, 0), DType::F32, dev)?, &t),
        "vocab = 0",
    );
    // Settings.
    assert!(ce.with_label_smoothing(-0.1).is_err());
    assert!(ce.with_label_smoothing(1.1).is_err());
    Ok(())
}
