//! Fused cross-entropy on the device against the CPU reference: `Math::Exact` bit for bit,
//! `Math::Fast` (the default) within its stated bound (tests/common: xent_within_fast_bound):
//! per-row losses, the reduced loss (sum, mean over several chunk levels), the gradient in place
//! and into a separate buffer, i32 and i64 targets, views at element 1, every option; NaN and
//! +inf at every position class; the out-of-range flag; the unfused baseline against its CPU
//! mirror.
//!
//! Gradient buffers are poisoned before the kernel runs, and views have a sentinel element on
//! each side that must survive.

use fusedreg::cross_entropy::{
    self as xe, cpu, unfused, Config, Outputs, Reduction, TargetIndex, Workspace,
};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;
use rand::Rng;

use crate::common::{xent_positions, xent_within_fast_bound, XentOut};
use crate::prelude::*;
use fusedreg::Math;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "cross_entropy",
        &[
            ("sweep_f32_ti64", sweep::<f32, i64>),
            ("sweep_f32_ti32", sweep::<f32, i32>),
            ("sweep_f16_ti32", sweep::<f16, i32>),
            ("sweep_f16_ti64", sweep::<f16, i64>),
            ("sweep_bf16_ti64", sweep::<bf16, i64>),
            ("sweep_bf16_ti32", sweep::<bf16, i32>),
            ("large_vocabularies_bf16", large_vocabularies::<bf16>),
            ("large_vocabularies_f32", large_vocabularies::<f32>),
            ("out_of_range_targets_raise_the_flag", out_of_range_flag),
            ("all_rows_ignored_is_zero", all_rows_ignored),
            ("many_rows_reduce_in_levels", many_rows),
            ("masked_and_large_logits", masked_and_large),
            ("repeat_runs_are_identical", repeatable),
            ("workspace_reuse_and_loss_only", workspace_and_forward),
            ("empty_input_writes_a_zero_loss", empty_input),
            ("unfused_matches_its_cpu_mirror_f32", unfused_mirror::<f32>),
            (
                "unfused_matches_its_cpu_mirror_bf16",
                unfused_mirror::<bf16>,
            ),
            ("unfused_matches_its_cpu_mirror_f16", unfused_mirror::<f16>),
            ("bad_input_is_an_error", bad_input),
            ("fast_sweep_f32_ti64", fast_sweep::<f32, i64>),
            ("fast_sweep_f16_ti32", fast_sweep::<f16, i32>),
            ("fast_sweep_bf16_ti64", fast_sweep::<bf16, i64>),
            ("fast_sweep_bf16_ti32", fast_sweep::<bf16, i32>),
            (
                "fast_large_vocabularies_bf16",
                fast_large_vocabularies::<bf16>,
            ),
            (
                "fast_large_vocabularies_f32",
                fast_large_vocabularies::<f32>,
            ),
            ("fast_masked_and_large", fast_masked_and_large),
            ("fast_repeat_runs_are_identical", fast_repeatable),
            ("fast_is_the_default", fast_is_the_default),
            ("nan_rows_exact_f32", nan_rows::<f32>),
            ("nan_rows_exact_bf16", nan_rows::<bf16>),
            ("nan_rows_exact_f16", nan_rows::<f16>),
            ("nan_rows_fast_bf16", nan_rows_fast::<bf16>),
            ("nan_rows_fast_f32", nan_rows_fast::<f32>),
        ],
    )
}

/// A target type the tests can build from i64.
trait Ti: TargetIndex + TryFrom<i64, Error: std::fmt::Debug> {}
impl<I: TargetIndex + TryFrom<i64, Error: std::fmt::Debug>> Ti for I {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Grad {
    None,
    Separate,
    InPlace,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    vocab: usize,
    alpha: f64,
    lambda: f64,
    red: Reduction,
    upstream: bool,
    grad: Grad,
    /// logits, gradient and targets are views starting at this element.
    offset: usize,
    /// -inf and ±1e4 logits among the random ones.
    specials: bool,
    /// Percent of rows ignored.
    ignored: u32,
    math: Math,
}

impl Case {
    fn new(rows: usize, vocab: usize) -> Self {
        Case {
            rows,
            vocab,
            alpha: 0.1,
            lambda: 0.0,
            red: Reduction::Mean,
            upstream: false,
            grad: Grad::InPlace,
            offset: 0,
            specials: false,
            ignored: 10,
            math: Math::Exact,
        }
    }

    /// The same case with `Math::Fast`.
    fn fast(self) -> Self {
        Case {
            math: Math::Fast,
            ..self
        }
    }

    fn config(&self) -> Config {
        Config::new(self.rows, self.vocab)
            .unwrap()
            .label_smoothing(self.alpha)
            .unwrap()
            .z_loss(self.lambda)
            .unwrap()
            .reduction(self.red)
            .with_math(self.math)
    }
}

/// Logits with a model-like spread (sd ~2, a few strong ones), optionally -inf and ±1e4.
fn logits<T: Dtype>(seed: u64, n: usize, specials: bool) -> Vec<T> {
    let mut g = rng(seed);
    (0..n)
        .map(|_| {
            let mut v: f32 = (0..4).map(|_| g.random_range(-1.7f32..1.7)).sum();
            if g.random_range(0..50) == 0 {
                v += 6.0;
            }
            if specials {
                match g.random_range(0..61) {
                    0 => v = f32::NEG_INFINITY,
                    1 => v = 1e4,
                    2 => v = -1e4,
                    _ => {}
                }
            }
            T::from_f32_rn(v)
        })
        .collect()
}

fn targets<I: Ti>(seed: u64, rows: usize, vocab: usize, ignored: u32) -> Vec<I> {
    let mut g = rng(seed ^ 0x7a7a);
    (0..rows)
        .map(|_| {
            let v = if g.random_range(0..100) < ignored {
                -100
            } else {
                g.random_range(0..vocab as i64)
            };
            I::try_from(v).unwrap()
        })
        .collect()
}

struct Got<T> {
    loss: Vec<f32>,
    grad: Option<Vec<T>>,
    flag: u32,
}

/// Runs the fused op on the device for one case.
fn gpu_run<T: Dtype, I: Ti>(
    h: &Handle,
    c: &Case,
    x: &[T],
    t: &[I],
    up: &[f32],
    ws: Option<&mut Workspace>,
) -> TestResult<Got<T>> {
    let s = h.stream();
    let cfg = c.config();
    let (off, n) = (c.offset, cfg.len());
    let sent = T::from_f32_rn(-7.0);
    let tsent = I::try_from(-5).unwrap();
    let tb = upload(s, t, off, tsent)?;
    let tv = tb.slice(off..off + c.rows);
    let upb = s.clone_htod(up)?;
    let mut loss = s.clone_htod(&vec![f32::NAN; c.red.loss_len(c.rows)])?;
    let mut flag = s.alloc_zeros::<u32>(1)?;
    let mut xb = upload(s, x, off, sent)?;
    let mut gb = upload(s, &vec![T::from_f32_rn(f32::NAN); n], off, sent)?;
    {
        let out = Outputs {
            upstream: (c.upstream && c.red == Reduction::None).then(|| upb.as_view()),
            invalid_target: Some(flag.as_view_mut()),
            workspace: ws,
            ..Outputs::new(loss.as_view_mut())
        };
        match c.grad {
            Grad::None => xe::forward(h, &cfg, &xb.slice(off..off + n), &tv, out),
            Grad::Separate => xe::forward_backward(
                h,
                &cfg,
                &xb.slice(off..off + n),
                &tv,
                &mut gb.slice_mut(off..off + n),
                out,
            ),
            Grad::InPlace => {
                xe::forward_backward_inplace(h, &cfg, &mut xb.slice_mut(off..off + n), &tv, out)
            }
        }?;
    }
    let xs = download(s, &xb, off, sent, "logits")?;
    let gs = download(s, &gb, off, sent, "grad")?;
    let grad = match c.grad {
        Grad::None => {
            // Loss only: the logits and the unused gradient buffer are untouched.
            bits_eq("logits (loss only)", &xs, x)?;
            None
        }
        Grad::Separate => {
            bits_eq("logits (read only)", &xs, x)?;
            Some(gs)
        }
        Grad::InPlace => Some(xs),
    };
    Ok(Got {
        loss: s.clone_dtoh(&loss)?,
        grad,
        flag: s.clone_dtoh(&flag)?[0],
    })
}

/// The CPU reference of a case; targets outside `[0, V)` are taken as ignored (what the kernel
/// does after raising the flag).
fn cpu_run<T: Dtype, I: TargetIndex>(c: &Case, x: &[T], t: &[I], up: &[f32]) -> (Vec<f32>, Vec<T>) {
    let cfg = c.config();
    let t: Vec<i64> = t
        .iter()
        .map(|v| {
            let v = v.to_i64();
            if (0..c.vocab as i64).contains(&v) {
                v
            } else {
                -100
            }
        })
        .collect();
    let mut g = vec![T::from_f32_rn(f32::NAN); cfg.len()];
    let upo = (c.upstream && c.red == Reduction::None).then_some(up);
    let l = cpu::forward_backward(&cfg, x, &t, upo, &mut g).unwrap();
    let loss = match c.red {
        Reduction::None => l.rows,
        _ => vec![l.reduced.unwrap()],
    };
    (loss, g)
}

/// f32 bit equality where NaN equals NaN (a fully masked row is NaN, as in PyTorch).
fn loss_eq(what: &str, got: &[f32], want: &[f32]) -> TestResult {
    let canon = |v: &[f32]| -> Vec<u32> {
        v.iter()
            .map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
            .collect()
    };
    bits_eq(what, &canon(got), &canon(want))?;
    Ok(())
}

/// Gradient equality bit for bit, where any NaN equals any NaN: a NaN made by the device's
/// arithmetic (a fully masked row, as in PyTorch) is canonical there and not on the host.
fn grad_eq<T: Dtype>(what: &str, got: &[T], want: &[T]) -> TestResult {
    let canon = |v: &[T]| -> Vec<u32> {
        v.iter()
            .map(|x| {
                if x.to_f32().is_nan() {
                    0x7fc0_0000
                } else {
                    x.to_f32().to_bits()
                }
            })
            .collect()
    };
    bits_eq(what, &canon(got), &canon(want))?;
    Ok(())
}

fn check_case<T: Dtype, I: Ti>(h: &Handle, c: &Case, seed: u64) -> TestResult {
    let x = logits::<T>(seed, c.rows * c.vocab, c.specials);
    let t = targets::<I>(seed, c.rows, c.vocab, c.ignored);
    let up: Vec<f32> = (0..c.rows)
        .map(|r| 0.5 + (r % 5) as f32 * 0.75 - (r % 3) as f32)
        .collect();
    let got = gpu_run(h, c, &x, &t, &up, None)?;
    let tag = format!("{c:?} seed {seed}");
    if c.math == Math::Fast {
        fast_eq(c, &x, &t, &up, &got, &tag)?;
    } else {
        let (loss, grad) = cpu_run(c, &x, &t, &up);
        loss_eq(&format!("loss, {tag}"), &got.loss, &loss)?;
        if let Some(g) = got.grad {
            grad_eq(&format!("grad, {tag}"), &g, &grad)?;
        }
    }
    if got.flag != 0 {
        return Err(format!("flag raised for in-range targets, {tag}").into());
    }
    Ok(())
}

/// Targets as the kernel takes them: outside `[0, V)` is ignored (after raising the flag).
fn mapped<I: TargetIndex>(t: &[I], vocab: usize) -> Vec<i64> {
    t.iter()
        .map(|v| {
            let v = v.to_i64();
            if (0..vocab as i64).contains(&v) {
                v
            } else {
                -100
            }
        })
        .collect()
}

/// A `Math::Fast` result against the CPU reference, within the stated bound.
fn fast_eq<T: Dtype, I: TargetIndex>(
    c: &Case,
    x: &[T],
    t: &[I],
    up: &[f32],
    got: &Got<T>,
    tag: &str,
) -> TestResult {
    let cfg = c.config();
    let upo = (c.upstream && c.red == Reduction::None).then_some(up);
    let out = XentOut {
        rows: (c.red == Reduction::None).then_some(&got.loss[..]),
        reduced: (c.red != Reduction::None).then(|| got.loss[0]),
        grad: got.grad.as_deref(),
    };
    xent_within_fast_bound(tag, &cfg, x, &mapped(t, c.vocab), upo, out)?;
    Ok(())
}

/// Every option over vocabularies crossing the group (8), vector and slot (2048) boundaries.
fn sweep<T: Dtype, I: Ti>(h: &Handle) -> TestResult {
    sweep_in::<T, I>(h, Math::Exact)
}

/// [`sweep`] with `Math::Fast`, held to its bound.
fn fast_sweep<T: Dtype, I: Ti>(h: &Handle) -> TestResult {
    sweep_in::<T, I>(h, Math::Fast)
}

fn sweep_in<T: Dtype, I: Ti>(h: &Handle, math: Math) -> TestResult {
    let shapes = [
        (5, 1),
        (7, 7),
        (6, 8),
        (5, 9),
        (4, 36),
        (3, 2047),
        (3, 2048),
        (3, 2049),
        (4, 5003),
        (2, 32_000),
    ];
    let mut seed = 1u64;
    for &(rows, vocab) in &shapes {
        for grad in [Grad::InPlace, Grad::Separate, Grad::None] {
            for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                for offset in [0, 1] {
                    seed += 1;
                    let mut c = Case::new(rows, vocab);
                    c.grad = grad;
                    c.red = red;
                    c.offset = offset;
                    c.alpha = [0.0, 0.1, 1.0][seed as usize % 3];
                    c.lambda = if seed % 2 == 0 { 1e-4 } else { 0.0 };
                    c.upstream = seed % 4 != 1;
                    c.specials = seed % 5 == 0;
                    c.math = math;
                    check_case::<T, I>(h, &c, seed)?;
                }
            }
        }
    }
    Ok(())
}

/// Llama-3 and GPT-2 vocabularies, and the largest the issue names (2^20).
fn large_vocabularies<T: Dtype>(h: &Handle) -> TestResult {
    check_large_vocabularies::<T>(h, false, 900)
}

/// The large vocabularies, each once with i64 targets and the mean, once with i32 targets, a
/// separate gradient, an offset view, no reduction and an upstream gradient; `fast` for
/// `Math::Fast`; seeds from `seed`.
fn check_large_vocabularies<T: Dtype>(h: &Handle, fast: bool, seed: u64) -> TestResult {
    for (i, &(rows, vocab)) in [(3, 128_256), (4, 50_257), (2, 1 << 20)].iter().enumerate() {
        let mut c = Case::new(rows, vocab);
        if fast {
            c = c.fast();
        }
        c.ignored = 0;
        c.lambda = 1e-4;
        check_case::<T, i64>(h, &c, seed + i as u64)?;
        c.grad = Grad::Separate;
        c.offset = 1;
        c.red = Reduction::None;
        c.upstream = true;
        check_case::<T, i32>(h, &c, seed + 50 + i as u64)?;
    }
    Ok(())
}

fn out_of_range_flag(h: &Handle) -> TestResult {
    let (rows, vocab) = (6, 300);
    let x = logits::<f32>(3, rows * vocab, false);
    let up = vec![1.0f32; rows];
    for red in [Reduction::Mean, Reduction::None] {
        let mut c = Case::new(rows, vocab);
        c.red = red;
        let t: Vec<i64> = vec![5, 300, -100, -1, 299, 0];
        let got = gpu_run(h, &c, &x, &t, &up, None)?;
        if got.flag != 1 {
            return Err(format!("{red:?}: flag = {}, want 1", got.flag).into());
        }
        // The bad rows count as ignored: loss 0, zero gradient, not in the mean's count.
        let (loss, grad) = cpu_run(&c, &x, &t, &up);
        loss_eq("loss with bad targets", &got.loss, &loss)?;
        bits_eq("grad with bad targets", &got.grad.unwrap(), &grad)?;
        let tc: Vec<i32> = vec![5, 299, -100, 0, 1, 2];
        if gpu_run(h, &c, &x, &tc, &up, None)?.flag != 0 {
            return Err("flag raised with every target in range".into());
        }
    }
    Ok(())
}

fn all_rows_ignored(h: &Handle) -> TestResult {
    for red in [Reduction::Mean, Reduction::Sum] {
        let mut c = Case::new(5, 1000);
        c.red = red;
        let x = logits::<bf16>(4, c.rows * c.vocab, false);
        let t = vec![-100i64; c.rows];
        let got = gpu_run(h, &c, &x, &t, &[], None)?;
        if got.loss != [0.0] {
            return Err(format!("{red:?}: loss {:?}, want [0.0]", got.loss).into());
        }
        bits_eq(
            "grad",
            &got.grad.unwrap(),
            &vec![bf16::ZERO; c.rows * c.vocab],
        )?;
    }
    Ok(())
}

/// More rows than one block of the sum kernel covers: two and three levels.
fn many_rows(h: &Handle) -> TestResult {
    // The last needs three levels of the sum (2 logits per row keeps it small).
    for (i, &(rows, vocab)) in [(4095usize, 8), (4097, 8), (9000, 8), (4096 * 4096 + 3, 2)]
        .iter()
        .enumerate()
    {
        for red in [Reduction::Mean, Reduction::Sum] {
            let mut c = Case::new(rows, vocab);
            c.red = red;
            c.grad = if rows > 100_000 {
                Grad::None
            } else {
                Grad::InPlace
            };
            check_case::<f32, i32>(h, &c, 700 + i as u64)?;
        }
    }
    Ok(())
}

/// The masked-and-large problem on `c` (4 rows of 4099): alpha `alpha`, z-loss 1e-4, no
/// reduction, nothing ignored; bf16 logits with row 0 half masked (-inf) and row 1 at ±1e4.
fn masked_and_large_input(c: &mut Case, alpha: f64) -> (Vec<bf16>, Vec<i64>) {
    let vocab = c.vocab;
    c.alpha = alpha;
    c.lambda = 1e-4;
    c.red = Reduction::None;
    c.ignored = 0;
    let mut x = logits::<bf16>(5, 4 * vocab, false);
    for j in (0..vocab).step_by(2) {
        x[j] = bf16::NEG_INFINITY; // row 0: half the vocabulary masked
    }
    for j in 0..vocab {
        x[vocab + j] = bf16::from_f32(if j % 3 == 0 { 1e4 } else { -1e4 });
    }
    (x, vec![1, 4, 7, 8])
}

fn masked_and_large(h: &Handle) -> TestResult {
    for alpha in [0.0, 0.1] {
        let mut c = Case::new(4, 4099);
        let (x, t) = masked_and_large_input(&mut c, alpha);
        let got = gpu_run(h, &c, &x, &t, &[], None)?;
        let (loss, grad) = cpu_run(&c, &x, &t, &[]);
        loss_eq("loss", &got.loss, &loss)?;
        let g = got.grad.unwrap();
        bits_eq("grad", &g, &grad)?;
        if g.iter().any(|v| v.to_f32().is_nan()) || got.loss.iter().any(|v| v.is_nan()) {
            return Err(format!("α {alpha}: NaN in the loss or the gradient").into());
        }
    }
    Ok(())
}

fn repeatable(h: &Handle) -> TestResult {
    same_bits_on_every_run(h, Case::new(64, 32_003))
}

/// `c` with a separate gradient, run twice on the same inputs: the same loss and gradient bits.
fn same_bits_on_every_run(h: &Handle, mut c: Case) -> TestResult {
    c.grad = Grad::Separate;
    let x = logits::<bf16>(6, c.rows * c.vocab, false);
    let t = targets::<i64>(6, c.rows, c.vocab, 10);
    let a = gpu_run(h, &c, &x, &t, &[], None)?;
    let b = gpu_run(h, &c, &x, &t, &[], None)?;
    bits_eq("loss", &a.loss, &b.loss)?;
    bits_eq("grad", &a.grad.unwrap(), &b.grad.unwrap())?;
    Ok(())
}

fn workspace_and_forward(h: &Handle) -> TestResult {
    let mut ws = Workspace::new();
    for (i, &rows) in [10usize, 5000, 3].iter().enumerate() {
        let mut c = Case::new(rows, 40);
        let x = logits::<f16>(7 + i as u64, rows * 40, false);
        let t = targets::<i32>(7 + i as u64, rows, 40, 10);
        let (loss, grad) = cpu_run(&c, &x, &t, &[]);
        let got = gpu_run(h, &c, &x, &t, &[], Some(&mut ws))?;
        loss_eq("loss (workspace)", &got.loss, &loss)?;
        bits_eq("grad (workspace)", &got.grad.unwrap(), &grad)?;
        c.grad = Grad::None;
        let got = gpu_run(h, &c, &x, &t, &[], Some(&mut ws))?;
        loss_eq("loss (forward only)", &got.loss, &loss)?;
    }
    if ws.capacity() < 5000 {
        return Err(format!("workspace holds {} f32, want >= 5000", ws.capacity()).into());
    }
    Ok(())
}

fn empty_input(h: &Handle) -> TestResult {
    let s = h.stream();
    let cfg = Config::new(0, 100)?;
    let x = s.alloc_zeros::<f32>(1)?;
    let t = s.alloc_zeros::<i64>(1)?;
    let mut loss = s.clone_htod(&[f32::NAN])?;
    xe::forward(
        h,
        &cfg,
        &x.slice(0..0),
        &t.slice(0..0),
        Outputs::new(loss.as_view_mut()),
    )?;
    let got = s.clone_dtoh(&loss)?;
    if got != [0.0] {
        return Err(format!("empty mean: {got:?}, want [0.0]").into());
    }
    Ok(())
}

fn unfused_mirror<T: Dtype>(h: &Handle) -> TestResult {
    let s = h.stream();
    for (i, &(rows, vocab, red)) in [
        (5, 2049, Reduction::Mean),
        (3, 7, Reduction::None),
        (4, 32_000, Reduction::Sum),
    ]
    .iter()
    .enumerate()
    {
        let mut c = Case::new(rows, vocab);
        c.red = red;
        c.lambda = 1e-4;
        c.upstream = true;
        let cfg = c.config();
        let x = logits::<T>(20 + i as u64, rows * vocab, i == 0);
        let t = targets::<i64>(20 + i as u64, rows, vocab, 20);
        let up: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 * 0.5).collect();
        let upo = (red == Reduction::None).then_some(&up[..]);
        let mut want_g = vec![T::from_f32_rn(0.0); cfg.len()];
        let want = unfused::forward_backward_cpu(&cfg, &x, &t, upo, &mut want_g)?;
        let xb = s.clone_htod(&x)?;
        let tb = s.clone_htod(&t)?;
        let upb = s.clone_htod(&up)?;
        let mut lp = s.alloc_zeros::<T>(cfg.len())?;
        let mut g = s.alloc_zeros::<T>(cfg.len())?;
        let mut loss = s.alloc_zeros::<f32>(red.loss_len(rows))?;
        let out = Outputs {
            upstream: upo.map(|_| upb.as_view()),
            ..Outputs::new(loss.as_view_mut())
        };
        unfused::forward_backward(h, &cfg, &xb, &tb, &mut lp, &mut g, out)?;
        let got_loss = s.clone_dtoh(&loss)?;
        let want_loss = match red {
            Reduction::None => want.rows.clone(),
            _ => vec![want.reduced.unwrap()],
        };
        loss_eq(&format!("unfused loss {i}"), &got_loss, &want_loss)?;
        grad_eq(&format!("unfused grad {i}"), &s.clone_dtoh(&g)?, &want_g)?;
    }
    Ok(())
}

fn bad_input(h: &Handle) -> TestResult {
    let s = h.stream();
    let cfg = Config::new(2, 4)?;
    let x = s.alloc_zeros::<f32>(8)?;
    let mut g = s.alloc_zeros::<f32>(8)?;
    let t = s.alloc_zeros::<i32>(2)?;
    let up = s.alloc_zeros::<f32>(2)?;
    let mut loss = s.alloc_zeros::<f32>(2)?;
    let mut flag = s.alloc_zeros::<u32>(1)?;
    let refused = [
        xe::forward(
            h,
            &cfg,
            &x.slice(0..7),
            &t,
            Outputs::new(loss.slice_mut(0..1)),
        ),
        xe::forward(
            h,
            &cfg,
            &x,
            &t.slice(0..1),
            Outputs::new(loss.slice_mut(0..1)),
        ),
        xe::forward(h, &cfg, &x, &t, Outputs::new(loss.slice_mut(0..2))), // mean: 1
        xe::forward_backward(
            h,
            &cfg,
            &x,
            &t,
            &mut g.slice_mut(0..6),
            Outputs::new(loss.slice_mut(0..1)),
        ),
        // A per-row upstream gradient with the mean is refused, not silently ignored.
        xe::forward_backward(
            h,
            &cfg,
            &x,
            &t,
            &mut g,
            Outputs {
                upstream: Some(up.as_view()),
                ..Outputs::new(loss.slice_mut(0..1))
            },
        ),
        xe::forward(
            h,
            &cfg,
            &x,
            &t,
            Outputs {
                invalid_target: Some(flag.slice_mut(0..0)),
                ..Outputs::new(loss.slice_mut(0..1))
            },
        ),
    ];
    for (i, r) in refused.iter().enumerate() {
        if r.is_ok() {
            return Err(format!("bad call {i} was accepted").into());
        }
    }
    Ok(())
}

/// Llama-3's vocabulary and 2^20 with `Math::Fast` (the benchmark's shape of row).
fn fast_large_vocabularies<T: Dtype>(h: &Handle) -> TestResult {
    check_large_vocabularies::<T>(h, true, 1900)
}

/// Masked (-inf) and ±1e4 logits with `Math::Fast`: finite, within the bound.
fn fast_masked_and_large(h: &Handle) -> TestResult {
    for alpha in [0.0, 0.1] {
        let mut c = Case::new(4, 4099).fast();
        let (x, t) = masked_and_large_input(&mut c, alpha);
        let got = gpu_run(h, &c, &x, &t, &[], None)?;
        fast_eq(&c, &x, &t, &[], &got, &format!("masked α {alpha}"))?;
        let g = got.grad.as_ref().unwrap();
        if g.iter().any(|v| v.to_f32().is_nan()) || got.loss.iter().any(|v| v.is_nan()) {
            return Err(format!("α {alpha}: NaN in the loss or the gradient").into());
        }
    }
    Ok(())
}

/// `Math::Fast` is deterministic too: the same bits on every run.
fn fast_repeatable(h: &Handle) -> TestResult {
    same_bits_on_every_run(h, Case::new(64, 32_003).fast())
}

/// A default `Config` runs the fast kernel: its result equals an explicit `Math::Fast` one bit
/// for bit, and (on these random rows) differs from `Math::Exact` somewhere.
fn fast_is_the_default(h: &Handle) -> TestResult {
    let base = Case::new(16, 5003);
    let x = logits::<f32>(9, base.rows * base.vocab, false);
    let t = targets::<i64>(9, base.rows, base.vocab, 10);
    let s = h.stream();
    let run = |cfg: &Config| -> TestResult<Vec<f32>> {
        let mut xb = s.clone_htod(&x)?;
        let tb = s.clone_htod(&t)?;
        let mut loss = s.alloc_zeros::<f32>(1)?;
        xe::forward_backward_inplace(h, cfg, &mut xb, &tb, Outputs::new(loss.as_view_mut()))?;
        let mut v = s.clone_dtoh(&xb)?;
        v.extend(s.clone_dtoh(&loss)?);
        Ok(v)
    };
    let default = Config::new(base.rows, base.vocab)?.label_smoothing(0.1)?;
    let d = run(&default)?;
    let f = run(&default.with_math(Math::Fast))?;
    let e = run(&default.with_math(Math::Exact))?;
    bits_eq("default vs Math::Fast", &d, &f)?;
    if d.iter().zip(&e).all(|(a, b)| a.to_bits() == b.to_bits()) {
        return Err("the default gave Math::Exact's bits everywhere".into());
    }
    Ok(())
}

/// NaN (random payloads) or +inf at every position class, on random, all -inf and partly -inf
/// backgrounds: `Math::Exact` equals the CPU reference (NaN rows included) bit for bit.
fn nan_rows<T: Dtype>(h: &Handle) -> TestResult {
    nan_rows_in::<T>(h, Math::Exact)
}

/// The same rows with `Math::Fast`: NaN exactly where the reference is NaN.
fn nan_rows_fast<T: Dtype>(h: &Handle) -> TestResult {
    nan_rows_in::<T>(h, Math::Fast)
}

fn nan_rows_in<T: Dtype>(h: &Handle, math: Math) -> TestResult {
    for (i, &vocab) in [1usize, 9, 36, 2056, 5003, 8 * 256 * 5 + 20, 128_256]
        .iter()
        .enumerate()
    {
        let pos = xent_positions(vocab);
        let rows = pos.len() * 2;
        let mut g = rng(500 + i as u64);
        let mut x = logits::<T>(500 + i as u64, rows * vocab, false);
        let mut t = Vec::with_capacity(rows);
        for r in 0..rows {
            let p = pos[r % pos.len()];
            let row = &mut x[r * vocab..(r + 1) * vocab];
            if r % 3 == 1 {
                row.fill(T::from_f32_rn(f32::NEG_INFINITY));
            } else if r % 3 == 2 {
                for (j, v) in row.iter_mut().enumerate() {
                    if (j / 8) % 256 == (p / 8) % 256 && j / 8 <= p / 8 {
                        *v = T::from_f32_rn(f32::NEG_INFINITY);
                    }
                }
            }
            row[p] = if r < pos.len() {
                T::from_f32_rn(f32::from_bits(
                    0x7fc0_0000 | (g.random::<u32>() & 0x803f_ffff),
                ))
            } else {
                T::from_f32_rn(f32::INFINITY)
            };
            t.push(if r % 4 == 0 {
                p as i64
            } else {
                g.random_range(0..vocab as i64)
            });
        }
        for red in [Reduction::None, Reduction::Mean] {
            let mut c = Case::new(rows, vocab);
            c.red = red;
            c.math = math;
            c.upstream = true;
            c.ignored = 0;
            let up: Vec<f32> = (0..rows).map(|r| (r % 3) as f32).collect();
            let got = gpu_run(h, &c, &x, &t, &up, None)?;
            let (loss, grad) = cpu_run(&c, &x, &t, &up);
            let tag = format!("{} V {vocab} {red:?} {math:?}", T::KIND.name());
            if math == Math::Exact {
                loss_eq(&format!("loss, {tag}"), &got.loss, &loss)?;
                grad_eq(&format!("grad, {tag}"), got.grad.as_ref().unwrap(), &grad)?;
            } else {
                if !got.loss.iter().all(|v| v.is_nan()) {
                    return Err(format!("{tag}: a loss is not NaN: {:?}", got.loss).into());
                }
                if let Some(j) = got
                    .grad
                    .as_ref()
                    .unwrap()
                    .iter()
                    .position(|v| !v.to_f32().is_nan())
                {
                    return Err(format!("{tag}: gradient [{j}] is not NaN").into());
                }
            }
        }
    }
    Ok(())
}
