//! The CPU reference of `cross_entropy` against an independent f64 implementation of PyTorch's
//! semantics, finite differences of that loss, and its own invariants (in place = separate,
//! i32 = i64 targets, reductions, ignored rows, masked and large logits, bad input).

// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::{rng, xent_positions, xent_within_fast_bound, XentOut};
use fusedreg::cross_entropy::fast_model::{self, EmuSfu, Sfu};
use fusedreg::cross_entropy::{cpu, unfused, Config, Reduction};
use fusedreg::{Dtype, Error};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use std::cell::Cell;

/// Logits with a spread like a language model's: a normal-ish bulk (sd ~2) plus a few strong
/// logits per row, never all near zero.
fn logits<T: Dtype>(seed: u64, rows: usize, vocab: usize) -> Vec<T> {
    let mut g = rng(seed);
    (0..rows * vocab)
        .map(|_| {
            let u: f32 = (0..4).map(|_| g.random_range(-1.0f32..1.0)).sum::<f32>() * 1.7;
            let spike = if g.random_range(0..50) == 0 { 6.0 } else { 0.0 };
            T::from_f32_rn(u + spike)
        })
        .collect()
}

/// Targets in range, with about `ignored_pct` % of rows set to -100.
fn targets(seed: u64, rows: usize, vocab: usize, ignored_pct: u32) -> Vec<i64> {
    let mut g = rng(seed ^ 0x5eed);
    (0..rows)
        .map(|_| {
            if g.random_range(0..100) < ignored_pct {
                -100
            } else {
                g.random_range(0..vocab as i64)
            }
        })
        .collect()
}

/// PyTorch's semantics in f64: per-row losses (0 for ignored rows).
fn loss_rows_f64(x: &[f64], t: &[i64], vocab: usize, alpha: f64, lambda: f64) -> Vec<f64> {
    t.iter()
        .enumerate()
        .map(|(r, &tr)| {
            if tr == -100 {
                return 0.0;
            }
            let row = &x[r * vocab..(r + 1) * vocab];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
            let mean = row.iter().sum::<f64>() / vocab as f64;
            let mut l = (1.0 - alpha) * (lse - row[tr as usize]);
            if alpha != 0.0 {
                l += alpha * (lse - mean);
            }
            l + lambda * lse * lse
        })
        .collect()
}

/// The scalar the gradient is of: mean / sum of the rows, or Σ upstream[r]·loss[r] for `none`.
fn objective_f64(
    x: &[f64],
    t: &[i64],
    vocab: usize,
    alpha: f64,
    lambda: f64,
    red: Reduction,
    upstream: &[f32],
) -> f64 {
    let rows = loss_rows_f64(x, t, vocab, alpha, lambda);
    let n_valid = t.iter().filter(|&&v| v != -100).count();
    match red {
        Reduction::Sum => rows.iter().sum(),
        Reduction::Mean => {
            if n_valid == 0 {
                0.0
            } else {
                rows.iter().sum::<f64>() / n_valid as f64
            }
        }
        Reduction::None => rows.iter().zip(upstream).map(|(l, &u)| l * u as f64).sum(),
    }
}

fn widen<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// The config of `rows` x `vocab` with label smoothing `alpha`, z-loss `lambda` and `red`.
fn config(rows: usize, vocab: usize, alpha: f64, lambda: f64, red: Reduction) -> Config {
    Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(alpha)
        .unwrap()
        .z_loss(lambda)
        .unwrap()
        .reduction(red)
}

fn close(what: &str, got: f64, want: f64, tol: f64) -> Result<(), String> {
    if (got - want).abs() <= tol * (1.0 + want.abs()) {
        Ok(())
    } else {
        Err(format!("{what}: got {got}, want {want} (tol {tol})"))
    }
}

#[test]
fn loss_matches_f64_pytorch_semantics() {
    // Vocabularies crossing every group (8) and slot (256 groups = 2048 elements) boundary.
    for (i, &vocab) in [1usize, 2, 7, 8, 9, 255, 2047, 2048, 2049, 4101, 50_257]
        .iter()
        .enumerate()
    {
        let rows = if vocab > 10_000 { 3 } else { 9 };
        let x = logits::<f32>(i as u64, rows, vocab);
        let t = targets(i as u64, rows, vocab, 20);
        for &alpha in &[0.0, 0.1, 1.0] {
            for &lambda in &[0.0, 1e-4] {
                for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                    let cfg = config(rows, vocab, alpha, lambda, red);
                    let got = cpu::forward(&cfg, &x, &t).unwrap();
                    let want = loss_rows_f64(
                        &widen(&x),
                        &t,
                        vocab,
                        f64::from(alpha as f32),
                        f64::from(lambda as f32),
                    );
                    for r in 0..rows {
                        close(
                            &format!("V {vocab} α {alpha} λ {lambda} row {r}"),
                            f64::from(got.rows[r]),
                            want[r],
                            2e-6,
                        )
                        .unwrap();
                    }
                    let obj = objective_f64(&widen(&x), &t, vocab, alpha, lambda, red, &[]);
                    match red {
                        Reduction::None => assert_eq!(got.reduced, None),
                        _ => close(
                            &format!("V {vocab} {red:?}"),
                            f64::from(got.reduced.unwrap()),
                            obj,
                            1e-5,
                        )
                        .unwrap(),
                    }
                }
            }
        }
    }
}

#[test]
fn alpha_zero_is_plain_cross_entropy() {
    let (rows, vocab) = (6, 1000);
    let x = logits::<f32>(11, rows, vocab);
    let t = targets(11, rows, vocab, 0);
    let cfg = Config::new(rows, vocab).unwrap().reduction(Reduction::None);
    let got = cpu::forward(&cfg, &x, &t).unwrap();
    for r in 0..rows {
        let row = &x[r * vocab..(r + 1) * vocab];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        close(
            &format!("row {r}"),
            f64::from(got.rows[r]),
            lse - f64::from(row[t[r] as usize]),
            1e-6,
        )
        .unwrap();
    }
    // α = 0 with an explicit label_smoothing(0.0) is the same bits as the default.
    let explicit = cfg.label_smoothing(0.0).unwrap();
    assert_eq!(cpu::forward(&explicit, &x, &t).unwrap(), got);
}

/// The reference gradient (f32) against central finite differences of the f64 objective.
#[test]
fn gradient_matches_finite_differences() {
    let cases = [
        (3usize, 9usize, 0.0, 0.0, Reduction::Mean),
        (4, 17, 0.1, 0.0, Reduction::Mean),
        (3, 33, 0.3, 1e-2, Reduction::Sum),
        (5, 12, 0.1, 1e-3, Reduction::None),
        (2, 1, 0.1, 0.0, Reduction::Mean),
        (4, 2050, 0.1, 1e-4, Reduction::Mean),
    ];
    for (ci, &(rows, vocab, alpha, lambda, red)) in cases.iter().enumerate() {
        let x = logits::<f32>(100 + ci as u64, rows, vocab);
        let mut t = targets(100 + ci as u64, rows, vocab, 0);
        t[rows - 1] = -100; // one ignored row: its gradient is exactly 0
        let upstream: Vec<f32> = (0..rows).map(|r| 0.25 + r as f32 * 0.7).collect();
        let cfg = config(rows, vocab, alpha, lambda, red);
        let up = (red == Reduction::None).then_some(&upstream[..]);
        let mut grad = vec![f32::NAN; rows * vocab];
        cpu::forward_backward(&cfg, &x, &t, up, &mut grad).unwrap();
        let a = f64::from(alpha as f32);
        let l = f64::from(lambda as f32);
        let mut xd = widen(&x);
        let h = 1e-5;
        // Every element of small cases; a sample (incl. the targets) of the large one.
        let idx: Vec<usize> = if rows * vocab <= 600 {
            (0..rows * vocab).collect()
        } else {
            let mut v: Vec<usize> = (0..rows * vocab).step_by(97).collect();
            v.extend((0..rows - 1).map(|r| r * vocab + t[r] as usize));
            v
        };
        for i in idx {
            let keep = xd[i];
            xd[i] = keep + h;
            let up_ = objective_f64(&xd, &t, vocab, a, l, red, &upstream);
            xd[i] = keep - h;
            let down = objective_f64(&xd, &t, vocab, a, l, red, &upstream);
            xd[i] = keep;
            let fd = (up_ - down) / (2.0 * h);
            let got = f64::from(grad[i]);
            assert!(
                (got - fd).abs() <= 2e-6 + 1e-4 * fd.abs(),
                "case {ci} ({rows}x{vocab}, α {alpha}, λ {lambda}, {red:?}) [{i}]: grad {got}, finite difference {fd}"
            );
        }
        assert!(grad[(rows - 1) * vocab..].iter().all(|&g| g.to_bits() == 0));
    }
}

#[test]
fn in_place_equals_separate_and_forward() {
    let (rows, vocab) = (7, 301);
    let x = logits::<bf16>(5, rows, vocab);
    let t = targets(5, rows, vocab, 15);
    for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let cfg = config(rows, vocab, 0.1, 1e-4, red);
        let mut grad = vec![bf16::NAN; rows * vocab];
        let a = cpu::forward_backward(&cfg, &x, &t, None, &mut grad).unwrap();
        let mut inplace = x.clone();
        let b = cpu::forward_backward_inplace(&cfg, &mut inplace, &t, None).unwrap();
        let c = cpu::forward(&cfg, &x, &t).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(grad
            .iter()
            .zip(&inplace)
            .all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}

#[test]
fn i32_and_i64_targets_agree() {
    let (rows, vocab) = (9, 77);
    let x = logits::<f16>(6, rows, vocab);
    let t64 = targets(6, rows, vocab, 30);
    let t32: Vec<i32> = t64.iter().map(|&v| v as i32).collect();
    let cfg = Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(0.2)
        .unwrap();
    let (mut g1, mut g2) = (vec![f16::ZERO; rows * vocab], vec![f16::ZERO; rows * vocab]);
    let a = cpu::forward_backward(&cfg, &x, &t64, None, &mut g1).unwrap();
    let b = cpu::forward_backward(&cfg, &x, &t32, None, &mut g2).unwrap();
    assert_eq!(a, b);
    assert_eq!(g1, g2);
}

/// Half-precision logits: the math is f32 on the widened values, so the loss equals the f32
/// reference on the same (widened) values exactly, and the gradient is that f32 gradient
/// rounded once.
#[test]
fn half_dtypes_are_f32_math_rounded_once() {
    let (rows, vocab) = (5, 515);
    let xb = logits::<bf16>(8, rows, vocab);
    let xf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let t = targets(8, rows, vocab, 10);
    let cfg = Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(0.1)
        .unwrap();
    let (mut gb, mut gf) = (vec![bf16::ZERO; rows * vocab], vec![0.0f32; rows * vocab]);
    let a = cpu::forward_backward(&cfg, &xb, &t, None, &mut gb).unwrap();
    let b = cpu::forward_backward(&cfg, &xf, &t, None, &mut gf).unwrap();
    assert_eq!(a, b);
    for i in 0..rows * vocab {
        assert_eq!(gb[i].to_bits(), bf16::from_f32(gf[i]).to_bits(), "[{i}]");
    }
}

#[test]
fn reduction_none_scales_each_row_by_its_own_upstream() {
    let (rows, vocab) = (6, 129);
    let x = logits::<f32>(9, rows, vocab);
    let t = targets(9, rows, vocab, 0);
    let upstream = [3.0f32, 0.5, 0.0, -1.25, 7.0, 1e-3];
    let none = Config::new(rows, vocab)
        .unwrap()
        .label_smoothing(0.1)
        .unwrap()
        .reduction(Reduction::None);
    let sum = none.reduction(Reduction::Sum);
    let mut gn = vec![0.0f32; rows * vocab];
    let mut gs = vec![0.0f32; rows * vocab];
    let ln = cpu::forward_backward(&none, &x, &t, Some(&upstream), &mut gn).unwrap();
    let ls = cpu::forward_backward(&sum, &x, &t, None, &mut gs).unwrap();
    assert_eq!(ln.rows, ls.rows); // the loss is not scaled
    for r in 0..rows {
        for j in 0..vocab {
            let i = r * vocab + j;
            // scale 1 leaves d exact, so d·u is the same single rounding.
            assert_eq!(
                gn[i].to_bits(),
                (gs[i] * upstream[r]).to_bits(),
                "row {r} col {j}"
            );
        }
    }
    // Without an upstream buffer every row's scale is 1.
    let mut g1 = vec![0.0f32; rows * vocab];
    cpu::forward_backward(&none, &x, &t, None, &mut g1).unwrap();
    assert_eq!(g1, gs);
    // Mean: the sum's gradient divided by n_valid (one rounding of d·(1/n)).
    let mean = none.reduction(Reduction::Mean);
    let mut gm = vec![0.0f32; rows * vocab];
    let lm = cpu::forward_backward(&mean, &x, &t, None, &mut gm).unwrap();
    assert_eq!(lm.n_valid, rows as u64);
    let inv = 1.0f32 / rows as f32;
    assert!(gm
        .iter()
        .zip(&gs)
        .all(|(m, s)| m.to_bits() == (s * inv).to_bits()));
}

#[test]
fn all_rows_ignored_is_zero_not_nan() {
    let (rows, vocab) = (4, 50);
    let x = logits::<f32>(12, rows, vocab);
    let t = vec![-100i64; rows];
    for red in [Reduction::Mean, Reduction::Sum] {
        let cfg = Config::new(rows, vocab)
            .unwrap()
            .label_smoothing(0.1)
            .unwrap()
            .reduction(red);
        let mut g = x.clone();
        let loss = cpu::forward_backward_inplace(&cfg, &mut g, &t, None).unwrap();
        assert_eq!(loss.reduced, Some(0.0));
        assert_eq!(loss.n_valid, 0);
        assert!(g.iter().all(|&v| v.to_bits() == 0));
    }
    // No rows at all.
    let cfg = Config::new(0, vocab).unwrap();
    let loss = cpu::forward::<f32, i64>(&cfg, &[], &[]).unwrap();
    assert_eq!(loss.reduced, Some(0.0));
    // A custom ignore index.
    let cfg = Config::new(rows, vocab).unwrap().ignore_index(3);
    let t = [3i64, 1, 3, 3];
    let loss = cpu::forward(&cfg, &x, &t).unwrap();
    assert_eq!(loss.n_valid, 1);
    assert_eq!(loss.reduced, Some(loss.rows[1]));
}

#[test]
fn one_element_rows() {
    let x = [3.5f32, -1e4, 0.0];
    let t = [0i64, 0, -100];
    let cfg = Config::new(3, 1)
        .unwrap()
        .label_smoothing(0.3)
        .unwrap()
        .reduction(Reduction::None);
    let mut g = [f32::NAN; 3];
    let loss = cpu::forward_backward(&cfg, &x, &t, None, &mut g).unwrap();
    assert_eq!(loss.rows, [0.0, 0.0, 0.0]);
    assert!(g.iter().all(|&v| v == 0.0), "{g:?}");
}

#[test]
fn masked_and_large_logits_stay_finite() {
    let vocab = 1031;
    let mut x = logits::<f32>(13, 3, vocab);
    // Row 0: half the vocabulary masked to -inf. Row 1: ±1e4. Row 2: -inf except the target.
    for j in (0..vocab).step_by(2) {
        x[j] = f32::NEG_INFINITY;
    }
    for j in 0..vocab {
        x[vocab + j] = if j % 3 == 0 { 1e4 } else { -1e4 };
    }
    for j in 0..vocab {
        if j != 5 {
            x[2 * vocab + j] = f32::NEG_INFINITY;
        }
    }
    let t = [1i64, 4, 5];
    let cfg = Config::new(3, vocab)
        .unwrap()
        .z_loss(1e-4)
        .unwrap()
        .reduction(Reduction::None);
    let mut g = vec![f32::NAN; 3 * vocab];
    let loss = cpu::forward_backward(&cfg, &x, &t, None, &mut g).unwrap();
    assert!(loss.rows.iter().all(|l| l.is_finite()), "{:?}", loss.rows);
    assert!(g.iter().all(|v| v.is_finite()));
    // Masked logits get exactly zero gradient (α = 0), and each row's gradient sums to ~0
    // (z-loss: to 2λ·lse).
    assert!((0..vocab).step_by(2).all(|j| g[j] == 0.0));
    let want = loss_rows_f64(&widen(&x), &t, vocab, 0.0, f64::from(1e-4f32));
    for r in 0..3 {
        close(&format!("row {r}"), f64::from(loss.rows[r]), want[r], 1e-6).unwrap();
    }
    // The row of ±1e4: lse ≈ 1e4 + ln(344): loss of a -1e4 target ≈ 2e4.
    assert!((loss.rows[1] - (2e4 + 344f32.ln() + 1e-4 * (1e4 + 344f32.ln()).powi(2))).abs() < 2.0);
    // With α > 0 a -inf logit makes the loss +inf (as PyTorch), but never NaN.
    let smooth = cfg.label_smoothing(0.1).unwrap();
    let mut g = vec![f32::NAN; 3 * vocab];
    let loss = cpu::forward_backward(&smooth, &x, &t, None, &mut g).unwrap();
    assert_eq!(loss.rows[0], f32::INFINITY);
    assert!(loss.rows[1].is_finite());
    assert!(g.iter().all(|v| v.is_finite()));
}

#[test]
fn unfused_mirror_is_close_to_the_fused_reference() {
    let (rows, vocab) = (6, 3001);
    let t = targets(14, rows, vocab, 20);
    for red in [Reduction::None, Reduction::Mean] {
        let cfg = config(rows, vocab, 0.1, 1e-4, red);
        let x = logits::<f32>(14, rows, vocab);
        let (mut a, mut b) = (vec![0.0f32; rows * vocab], vec![0.0f32; rows * vocab]);
        let la = unfused::forward_backward_cpu(&cfg, &x, &t, None, &mut a).unwrap();
        let lb = cpu::forward_backward(&cfg, &x, &t, None, &mut b).unwrap();
        for r in 0..rows {
            close("loss", f64::from(la.rows[r]), f64::from(lb.rows[r]), 1e-5).unwrap();
        }
        assert!(a
            .iter()
            .zip(&b)
            .all(|(p, q)| (p - q).abs() <= 1e-6 + 1e-4 * q.abs()));
        // bf16: the log-probabilities are rounded to bf16 first, so only a loose bound holds.
        let xb = logits::<bf16>(14, rows, vocab);
        let (mut a, mut b) = (
            vec![bf16::ZERO; rows * vocab],
            vec![bf16::ZERO; rows * vocab],
        );
        let la = unfused::forward_backward_cpu(&cfg, &xb, &t, None, &mut a).unwrap();
        let lb = cpu::forward_backward(&cfg, &xb, &t, None, &mut b).unwrap();
        for r in 0..rows {
            close(
                "bf16 loss",
                f64::from(la.rows[r]),
                f64::from(lb.rows[r]),
                2e-2,
            )
            .unwrap();
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let cfg = Config::new(2, 4).unwrap();
    let x = [0.0f32; 8];
    let mut g = [0.0f32; 8];
    // α outside [0, 1], λ < 0, vocab 0, overflow.
    assert!(matches!(
        cfg.label_smoothing(1.01),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        cfg.label_smoothing(-0.01),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(cfg.label_smoothing(f64::NAN).is_err());
    assert!(cfg.z_loss(-1e-4).is_err());
    assert!(cfg.z_loss(f64::NAN).is_err());
    assert!(Config::new(2, 0).is_err());
    assert!(Config::new(usize::MAX / 2, 4).is_err());
    assert!(Config::new((1 << 31) + 1, 1).is_err());
    assert!(Config::new(1 << 31, 1 << 20).is_ok()); // the largest sizes are accepted
                                                    // Shape mismatches.
    let t = [0i64, 1];
    assert!(matches!(
        cpu::forward(&cfg, &x[..7], &t),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        cpu::forward(&cfg, &x, &t[..1]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        cpu::forward_backward(&cfg, &x, &t, None, &mut g[..7]),
        Err(Error::ShapeMismatch { .. })
    ));
    let none = cfg.reduction(Reduction::None);
    assert!(matches!(
        cpu::forward_backward(&none, &x, &t, Some(&[1.0]), &mut g),
        Err(Error::ShapeMismatch { .. })
    ));
    // An upstream gradient with mean or sum is refused, not silently ignored.
    assert!(matches!(
        cpu::forward_backward(&cfg, &x, &t, Some(&[1.0, 1.0]), &mut g),
        Err(Error::InvalidArgument { .. })
    ));
    // Targets out of range (not the ignore index): an error, and nothing written.
    for bad in [4i64, -1, -101, i64::MAX] {
        let mut y = [7.0f32; 8];
        let e = cpu::forward_backward_inplace(&cfg, &mut y, &[0, bad], None).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        assert_eq!(y, [7.0; 8]);
        assert!(unfused::forward_backward_cpu(&cfg, &x, &[bad, 0], None, &mut g).is_err());
    }
    assert!(cpu::forward(&cfg, &x, &[0i32, 4]).is_err());
}

/// A NaN with a random sign and payload (quiet, so every dtype keeps it a NaN).
fn nan_of<T: Dtype>(g: &mut StdRng) -> T {
    let bits = 0x7fc0_0000 | (g.random::<u32>() & 0x803f_ffff);
    T::from_f32_rn(f32::from_bits(bits))
}

/// One row per (position class, special value, background): the special value at that position,
/// the rest random logits, all -inf, or -inf in the special value's group and in every group of
/// its slot before it (the reference skips the exp of a group while the slot's max is -inf: the
/// path that used to drop the NaN).
fn special_rows<T: Dtype>(vocab: usize, seed: u64) -> (Vec<T>, Vec<i64>, Vec<(usize, bool)>) {
    let mut g = rng(seed);
    let bulk = logits::<T>(seed, 1, vocab);
    let (mut x, mut t, mut what) = (Vec::new(), Vec::new(), Vec::new());
    for &p in &xent_positions(vocab) {
        for nan in [true, false] {
            for background in 0..3 {
                let mut row = bulk.clone();
                let slot_of = |j: usize| (j / 8) % 256;
                for (j, v) in row.iter_mut().enumerate() {
                    let masked = match background {
                        0 => false,
                        1 => true,
                        _ => slot_of(j) == slot_of(p) && j / 8 <= p / 8,
                    };
                    if masked {
                        *v = T::from_f32_rn(f32::NEG_INFINITY);
                    }
                }
                row[p] = if nan {
                    nan_of(&mut g)
                } else {
                    T::from_f32_rn(f32::INFINITY)
                };
                x.extend(row);
                // The target is the special element itself in every third row.
                t.push(if background == 2 {
                    p as i64
                } else {
                    g.random_range(0..vocab as i64)
                });
                what.push((p, nan));
            }
        }
    }
    (x, t, what)
}

/// PyTorch's rule (issue #25): a NaN anywhere in a row that is not ignored, or a +inf, makes that
/// row's loss NaN, its whole gradient row NaN, and the reduced loss NaN. At every position class
/// the kernel distinguishes, in every dtype, with and without smoothing and z-loss.
#[test]
fn nan_or_plus_inf_anywhere_makes_the_row_nan() {
    for (i, &vocab) in [1usize, 2, 7, 8, 9, 36, 2048, 2056, 5003, 8 * 256 * 5 + 20]
        .iter()
        .enumerate()
    {
        special_row_case::<f32>(vocab, 40 + i as u64);
        special_row_case::<bf16>(vocab, 60 + i as u64);
        special_row_case::<f16>(vocab, 80 + i as u64);
    }
}

fn special_row_case<T: Dtype>(vocab: usize, seed: u64) {
    let (x, t, what) = special_rows::<T>(vocab, seed);
    let rows = t.len();
    for (alpha, lambda) in [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (1.0, 1e-4)] {
        for red in [Reduction::None, Reduction::Mean] {
            let cfg = config(rows, vocab, alpha, lambda, red);
            // A zero upstream gradient does not hide the NaN (PyTorch: NaN * 0 = NaN).
            let up: Vec<f32> = (0..rows).map(|r| (r % 3) as f32).collect();
            let upo = (red == Reduction::None).then_some(&up[..]);
            let mut grad = vec![T::from_f32_rn(0.0); rows * vocab];
            let loss = cpu::forward_backward(&cfg, &x, &t, upo, &mut grad).unwrap();
            for (r, &(p, nan)) in what.iter().enumerate() {
                let name = format!(
                    "{} V {vocab} α {alpha} λ {lambda} {red:?} row {r}: {} at {p}",
                    T::KIND.name(),
                    if nan { "NaN" } else { "+inf" }
                );
                assert!(loss.rows[r].is_nan(), "{name}: loss {}", loss.rows[r]);
                let row = &grad[r * vocab..(r + 1) * vocab];
                if let Some(j) = row.iter().position(|v| !v.to_f32().is_nan()) {
                    panic!("{name}: gradient [{j}] = {:?} is not NaN", row[j]);
                }
            }
            if red == Reduction::Mean {
                assert!(loss.reduced.unwrap().is_nan());
            }
        }
    }
}

/// An ignored row is not read: NaN logits there leave its loss 0 and its gradient 0, and the
/// reduced loss finite. (PyTorch's log-softmax backward would turn it into a NaN gradient row;
/// the ignored row's loss is 0 there too.)
#[test]
fn nan_in_an_ignored_row_is_not_read() {
    let vocab = 2056;
    let mut x = logits::<bf16>(70, 2, vocab);
    x[3] = bf16::NAN;
    let t = [-100i64, 5];
    let cfg = Config::new(2, vocab).unwrap().label_smoothing(0.1).unwrap();
    let mut g = x.clone();
    let loss = cpu::forward_backward_inplace(&cfg, &mut g, &t, None).unwrap();
    assert_eq!(loss.rows[0], 0.0);
    assert!(loss.reduced.unwrap().is_finite());
    assert!(g[..vocab].iter().all(|v| v.to_bits() == 0));
    assert!(g[vocab..].iter().all(|v| v.to_f32().is_finite()));
}

/// A pessimistic model of the special-function unit: every result of the emulation's model
/// moved by the documented worst error (PTX ISA / CUDA C Programming Guide: `ex2.approx` 2 ulp,
/// `lg2.approx` 2^-22 absolute in [0.5, 2] and 2 ulp elsewhere), all up, all down, or each in a
/// random direction. Exact results the hardware documents are kept: 2^0 = 1, 2^-inf = 0, NaN.
struct Pessimistic {
    dir: Dir,
    state: Cell<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Dir {
    Up,
    Down,
    Random,
}

impl Pessimistic {
    fn new(dir: Dir, seed: u64) -> Self {
        Pessimistic {
            dir,
            state: Cell::new(seed | 1),
        }
    }
    /// +1, -1, or a random sign.
    fn sign(&self) -> f64 {
        match self.dir {
            Dir::Up => 1.0,
            Dir::Down => -1.0,
            Dir::Random => {
                let mut z = self.state.get();
                z ^= z << 13;
                z ^= z >> 7;
                z ^= z << 17;
                self.state.set(z);
                if z & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            }
        }
    }
}

impl Sfu for Pessimistic {
    fn ex2(&self, x: f32) -> f32 {
        let y = EmuSfu.ex2(x);
        if x == 0.0 || y == 0.0 || !y.is_finite() {
            return y;
        }
        (f64::from(y) * (1.0 + self.sign() * 2f64.powi(-22))) as f32
    }
    fn lg2(&self, x: f32) -> f32 {
        let y = EmuSfu.lg2(x);
        if !y.is_finite() {
            return y;
        }
        let err = 2f64.powi(-22) * f64::from(y.abs()).max(1.0);
        (f64::from(y) + self.sign() * err) as f32
    }
}

/// Rows that stress the fast path: language-model-like logits, one dominant logit (tiny
/// probabilities elsewhere), huge logits (±1e4 and 3e4), tiny ones (around 1e-30), half masked
/// to -inf, ascending rows (the maximum moves at every group: the longest chain of rescales),
/// constant rows.
fn stress_rows<T: Dtype>(seed: u64, rows: usize, vocab: usize) -> Vec<T> {
    let mut g = rng(seed);
    let base = logits::<f32>(seed, rows, vocab);
    let mut x = Vec::with_capacity(rows * vocab);
    for r in 0..rows {
        let row = &base[r * vocab..(r + 1) * vocab];
        for (j, &b) in row.iter().enumerate() {
            let f = j as f32 / vocab as f32;
            let v = match r % 8 {
                0 => b,
                1 => {
                    if j == 3 % vocab {
                        30.0
                    } else {
                        b * 0.1
                    }
                }
                2 => {
                    if g.random_range(0..3) == 0 {
                        1e4
                    } else {
                        -1e4
                    }
                }
                3 => b * 1e-30,
                4 => {
                    if j % 2 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        b
                    }
                }
                5 => 20.0 * f + b * 1e-3,
                6 => 3e4 + b,
                _ => 1.5,
            };
            x.push(T::from_f32_rn(v));
        }
    }
    x
}

/// `Math::Fast`'s stated bound (module docs) holds for the fast kernel's arithmetic
/// (`fast_model`) under a pessimistic model of the hardware, against the CPU reference: random
/// and edge rows, every option, every dtype.
#[test]
fn fast_math_is_within_its_stated_bound_under_a_pessimistic_sfu() {
    // The largest |error| / bound, over f32 results (the f32 part of the bound) and over all
    // (16-bit results may differ by the dtype's last unit, which the bound allows).
    let mut worst = (0.0f64, String::new());
    let mut worst_f32 = (0.0f64, String::new());
    let mut case = 0u64;
    for &vocab in &[
        1usize, 2, 7, 8, 9, 36, 2047, 2048, 2049, 5003, 32_000, 128_256,
    ] {
        let rows = if vocab > 10_000 { 8 } else { 16 };
        for (alpha, lambda) in [(0.0, 0.0), (0.1, 0.0), (0.1, 1e-4), (1.0, 1e-2)] {
            for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
                case += 1;
                let dir = [Dir::Up, Dir::Down, Dir::Random][case as usize % 3];
                let sfu = Pessimistic::new(dir, case);
                let mut t = targets(case, rows, vocab, 15);
                t[0] = (vocab - 1) as i64;
                let up: Vec<f32> = (0..rows).map(|r| [1.0, -0.5, 0.0, 3.0][r % 4]).collect();
                let upo = (red == Reduction::None).then_some(&up[..]);
                let cfg = config(rows, vocab, alpha, lambda, red);
                let what = format!("V {vocab} α {alpha} λ {lambda} {red:?} {dir:?}");
                let w32 = fast_case::<f32>(&what, &cfg, case, &t, upo, &sfu);
                if w32.0 > worst_f32.0 {
                    worst_f32 = w32.clone();
                }
                let mut cases = vec![w32, fast_case::<bf16>(&what, &cfg, case, &t, upo, &sfu)];
                if vocab < 10_000 {
                    cases.push(fast_case::<f16>(&what, &cfg, case, &t, upo, &sfu));
                }
                for w in cases {
                    if w.0 > worst.0 {
                        worst = w;
                    }
                }
            }
        }
    }
    eprintln!("largest |error| / bound: {:.3} ({})", worst.0, worst.1);
    eprintln!("f32 results: {:.3} ({})", worst_f32.0, worst_f32.1);
    assert!(worst.0 > 0.0, "the bound was never exercised");
}

fn fast_case<T: Dtype>(
    what: &str,
    cfg: &Config,
    seed: u64,
    t: &[i64],
    upo: Option<&[f32]>,
    sfu: &Pessimistic,
) -> (f64, String) {
    let x = stress_rows::<T>(seed, cfg.rows(), cfg.vocab());
    let mut g = vec![T::from_f32_rn(0.0); cfg.len()];
    let l = fast_model::forward_backward(cfg, &x, t, upo, &mut g, sfu).unwrap();
    let out = XentOut {
        rows: Some(&l.rows),
        reduced: l.reduced,
        grad: Some(&g),
    };
    let what = format!("{} {what}", T::KIND.name());
    xent_within_fast_bound(&what, cfg, &x, t, upo, out).unwrap_or_else(|e| panic!("{e}"))
}

/// The fast arithmetic follows the non-finite table of the module docs like the reference: a NaN
/// or +inf anywhere makes the row NaN, at every position class.
#[test]
fn fast_math_makes_nan_rows_nan_at_every_position() {
    for (i, &vocab) in [1usize, 9, 2056, 5003, 8 * 256 * 5 + 20].iter().enumerate() {
        let (x, t, _) = special_rows::<bf16>(vocab, 300 + i as u64);
        let cfg = Config::new(t.len(), vocab)
            .unwrap()
            .label_smoothing(0.1)
            .unwrap()
            .reduction(Reduction::None);
        let mut g = vec![bf16::ZERO; x.len()];
        let l = fast_model::forward_backward(&cfg, &x, &t, None, &mut g, &EmuSfu).unwrap();
        assert!(l.rows.iter().all(|v| v.is_nan()), "V {vocab}");
        assert!(g.iter().all(|v| v.to_f32().is_nan()), "V {vocab}");
    }
}
