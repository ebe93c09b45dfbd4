//! Helpers shared by the CPU and GPU test suites: seeded random data (never zeros) and
//! comparisons that report the first mismatches with their indices.
#![allow(dead_code)]

use fusedreg::Dtype;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod dan;

/// The (rows, cols) the CPU tests of the Block Influence meter run at (`tests/redundancy.rs`,
/// `tests/dropout_redundancy.rs`): one column, odd widths, one vector, past 256 groups.
pub const METER_SHAPES: [(usize, usize); 8] = [
    (3, 1),
    (5, 7),
    (4, 8),
    (6, 33),
    (3, 1000),
    (2, 4096),
    (9, 264),
    (2, 20008),
];

/// The edge inputs of the fast math functions (`fusedreg::fmath`), by magnitude: zero, the
/// subnormal and normal limits, infinity, NaNs (quiet, signalling, with a payload), and the
/// points where the functions switch branches or round to their limits.
pub const FMATH_EDGES: [f32; 26] = [
    0.0,
    f32::from_bits(1),
    f32::from_bits(0x007f_ffff),
    f32::MIN_POSITIVE,
    f32::MAX,
    f32::INFINITY,
    f32::from_bits(0x7fc0_0000),
    f32::from_bits(0x7f80_0001), // signalling NaN
    f32::from_bits(0x7fc1_2345),
    1.0,
    0.5,
    2.0,
    0.625,
    4.0,
    9.5,
    88.722_83,
    88.722_84,
    89.0,
    87.336_55,
    103.972_08,
    104.0,
    std::f32::consts::LN_2,
    std::f32::consts::SQRT_2,
    std::f32::consts::FRAC_1_SQRT_2,
    f32::from_bits(0x3980_0000),
    f32::from_bits(0x3f35_04f3),
];

/// Every [`FMATH_EDGES`] entry and its `radius` neighbouring bit patterns on either side, with
/// both signs.
pub fn fmath_edge_inputs(radius: i64) -> Vec<f32> {
    let mut v = Vec::new();
    for s in FMATH_EDGES {
        for d in -radius..=radius {
            for sign in [0u32, 0x8000_0000] {
                let b = (i64::from(s.to_bits() & 0x7fff_ffff) + d).clamp(0, 0x7fff_ffff) as u32;
                v.push(f32::from_bits(b | sign));
            }
        }
    }
    v
}

/// A seeded generator; print the seed in failures so they can be reproduced.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`, rounded to `T`. Never all zeros.
pub fn uniform<T: Dtype>(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32_rn(rng.random_range(lo..hi)))
        .collect()
}

/// AdamW test tensors of the given sizes: random parameters and gradients in [-1, 1), weight
/// decay cycling through 0.01, 0 and 0.1.
pub fn adamw_tensors<P: Dtype, G: Dtype>(
    seed: u64,
    sizes: &[usize],
) -> Vec<fusedreg::adamw::cpu::CpuTensor<P, G>> {
    let mut r = rng(seed);
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let wd = [0.01, 0.0, 0.1][i % 3];
            let (p, g) = (uniform(&mut r, n, -1.0, 1.0), uniform(&mut r, n, -1.0, 1.0));
            fusedreg::adamw::cpu::CpuTensor::new(p, g, wd).unwrap()
        })
        .collect()
}

/// [`adamw_tensors`] with a state layout (bf16 moments and/or no master weights).
#[allow(dead_code)] // not every test binary uses it
pub fn adamw_tensors_with<P: Dtype, G: Dtype>(
    seed: u64,
    sizes: &[usize],
    options: fusedreg::adamw::StateOptions,
) -> Vec<fusedreg::adamw::cpu::CpuTensor<P, G>> {
    adamw_tensors::<P, G>(seed, sizes)
        .into_iter()
        .map(|t| {
            fusedreg::adamw::cpu::CpuTensor::with_state(t.param, t.grad, t.weight_decay, options)
                .unwrap()
        })
        .collect()
}

/// Every state layout: (moments, master) in {f32, bf16} x {f32, none}.
#[allow(dead_code)]
pub fn all_state_options() -> Vec<fusedreg::adamw::StateOptions> {
    use fusedreg::adamw::{MasterWeights, MomentDtype, StateOptions};
    let mut v = Vec::new();
    for moments in [MomentDtype::F32, MomentDtype::Bf16] {
        for master in [MasterWeights::F32, MasterWeights::None] {
            v.push(StateOptions { moments, master });
        }
    }
    v
}

/// Fresh random gradients for every tensor.
pub fn new_grads<P: Dtype, G: Dtype>(ts: &mut [fusedreg::adamw::cpu::CpuTensor<P, G>], seed: u64) {
    let mut r = rng(seed);
    for t in ts {
        t.grad = uniform(&mut r, t.len(), -1.0, 1.0);
    }
}

/// Widens to f32.
pub fn to_f32<T: Dtype>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// How many mismatches a report lists.
const SHOWN: usize = 8;

/// Bit-for-bit equality of two slices of plain data, reporting the first differing indices.
pub fn bits_eq<T: bytemuck::Pod + std::fmt::Debug>(
    what: &str,
    got: &[T],
    want: &[T],
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} != expected {}",
            got.len(),
            want.len()
        ));
    }
    let bytes = std::mem::size_of::<T>();
    let mut bad = Vec::new();
    let mut count = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if bytemuck::bytes_of(g) != bytemuck::bytes_of(w) {
            count += 1;
            if bad.len() < SHOWN {
                bad.push(format!("  [{i}] got {g:?} want {w:?}"));
            }
        }
    }
    if count == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what}: {count} of {} elements ({bytes}-byte) differ bit for bit; first:\n{}",
            got.len(),
            bad.join("\n")
        ))
    }
}

/// `|got - want| <= atol + rtol * |want|` elementwise (NaN never passes), reporting the first
/// failing indices.
pub fn close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} != expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut bad = Vec::new();
    let mut count = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs();
        if !ok {
            count += 1;
            if bad.len() < SHOWN {
                bad.push(format!(
                    "  [{i}] got {g:e} want {w:e} (diff {:e})",
                    (g - w).abs()
                ));
            }
        }
    }
    if count == 0 {
        Ok(())
    } else {
        Err(format!(
            "{what}: {count} of {} elements outside atol {atol:e} + rtol {rtol:e}; first:\n{}",
            got.len(),
            bad.join("\n")
        ))
    }
}

/// Turns a `Result<(), String>` into a panic with the message (for `#[test]` functions).
#[track_caller]
pub fn check(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// The element positions of a cross-entropy row of `vocab` logits that the kernel treats
/// differently (`kernels/cross_entropy.cu`): the first and last element of the row, of a 16-byte
/// vector (8 elements of a 16-bit dtype, 4 of f32), of a group (8), of a slot (group `g` belongs
/// to slot `g % 256`: its first and last group), of a warp's share of a round (32 consecutive
/// groups), of the unrolled block (4 rounds), and of the partial last group. Sorted, unique.
#[allow(dead_code)]
pub fn xent_positions(vocab: usize) -> Vec<usize> {
    const GROUP: usize = 8;
    const SLOTS: usize = 256;
    let groups = vocab.div_ceil(GROUP);
    let mut p = vec![0, vocab - 1];
    let group = |p: &mut Vec<usize>, g: usize| {
        if g < groups {
            let a = g * GROUP;
            // group (and bf16/f16 vector) ends, f32 vector ends, a middle element
            p.extend([a, a + 7, a + 3, a + 4, a + 1]);
        }
    };
    for g in [
        0, 1, 2, 31, 32, 33, 63, 255, 256, 257, 511, 512, 767, 1023, 1024, 1025,
    ] {
        group(&mut p, g);
    }
    group(&mut p, groups - 1);
    // Every slot's first and last group for a spread of slots (lane 0 and 31 of warps 0, 1, 7).
    for s in [0, 1, 31, 32, 63, 224, 254, 255] {
        if s < groups {
            group(&mut p, s);
            group(&mut p, s + SLOTS * ((groups - 1 - s) / SLOTS));
        }
    }
    // A warp's share of round r: groups 256 r + 32 w .. + 31.
    for r in [0, 1, 3, 4, 5] {
        for w in [0, 1, 7] {
            let g0 = SLOTS * r + 32 * w;
            group(&mut p, g0);
            group(&mut p, g0 + 31);
        }
    }
    p.retain(|&i| i < vocab);
    p.sort_unstable();
    p.dedup();
    p
}

/// Outputs of a `Math::Fast` cross-entropy call to hold to the stated bound: per-row losses, the
/// reduced loss, the gradient (each optional).
#[allow(dead_code)]
pub struct XentOut<'a, T> {
    pub rows: Option<&'a [f32]>,
    pub reduced: Option<f32>,
    pub grad: Option<&'a [T]>,
}

/// The spacing of `T` at `y` (one unit in the last place of the result rounded to `T`).
#[allow(dead_code)]
pub fn dtype_ulp<T: Dtype>(y: f64) -> f64 {
    let (mant, min_exp) = match T::KIND {
        fusedreg::DtypeKind::F32 => (23, -126),
        fusedreg::DtypeKind::F16 => (10, -14),
        fusedreg::DtypeKind::Bf16 => (7, -126),
    };
    let e = if y == 0.0 {
        min_exp
    } else {
        (y.abs().log2().floor() as i32).max(min_exp)
    };
    2f64.powi(e - mant)
}

/// `Math::Fast`'s stated error bound against the CPU reference (src/cross_entropy/mod.rs,
/// "Math::Fast"), for one call: checks every given output against `cpu::forward_backward` (NaN
/// where the reference is NaN, the same infinity where it is infinite, within the bound
/// elsewhere). Targets outside `[0, V)` must already be mapped to the ignore index. Returns the
/// largest |error| / bound seen (how tight the bound is) and where.
#[allow(dead_code)]
pub fn xent_within_fast_bound<T: Dtype>(
    what: &str,
    cfg: &fusedreg::cross_entropy::Config,
    x: &[T],
    t: &[i64],
    upstream: Option<&[f32]>,
    got: XentOut<'_, T>,
) -> Result<(f64, String), String> {
    use fusedreg::cross_entropy::{cpu, Reduction};
    let (rows, v) = (cfg.rows(), cfg.vocab());
    let mut g_ref = vec![T::from_f32_rn(0.0); rows * v];
    let r = cpu::forward_backward(cfg, x, t, upstream, &mut g_ref).map_err(|e| e.to_string())?;
    let u = 2f64.powi(-21);
    let (alpha, lambda) = (f64::from(cfg.alpha()), f64::from(cfg.lambda()));
    let conf = f64::from(1.0 - cfg.alpha());
    let eps = f64::from(cfg.alpha() / v as f32);
    let n_groups =
        v.div_ceil(fusedreg::cross_entropy::GROUP * fusedreg::cross_entropy::SLOTS) as f64;
    let mut worst = (0.0f64, String::new());
    let mut check = |name: String, got: f64, want: f64, bound: f64| -> Result<(), String> {
        if want.is_nan() || want.is_infinite() {
            let ok = (want.is_nan() && got.is_nan()) || got == want;
            return if ok {
                Ok(())
            } else {
                Err(format!("{what}: {name}: got {got}, want {want}"))
            };
        }
        let err = (got - want).abs();
        // Negated on purpose: a NaN error fails the check.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(err <= bound) {
            return Err(format!(
                "{what}: {name}: got {got:e}, want {want:e}: error {err:e} > bound {bound:e}"
            ));
        }
        if bound > 0.0 && err / bound > worst.0 {
            worst = (
                err / bound,
                format!("{what}: {name}: error {err:e}, bound {bound:e}"),
            );
        }
        Ok(())
    };
    let n_valid = t.iter().filter(|&&ti| ti != cfg.get_ignore_index()).count();
    let mut sum_bound = 0.0f64;
    let mut sum_abs = 0.0f64;
    for row in 0..rows {
        let Ok(ti) = usize::try_from(t[row]) else {
            continue;
        };
        if t[row] == cfg.get_ignore_index() {
            continue;
        }
        let xs: Vec<f64> = x[row * v..(row + 1) * v]
            .iter()
            .map(|e| f64::from(e.to_f32()))
            .collect();
        let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + xs.iter().map(|&e| (e - m).exp()).sum::<f64>().ln();
        let mean = xs.iter().sum::<f64>() / v as f64;
        let delta = (2.0 * n_groups + 24.0 + lse.abs()) * u;
        let zf = 1.0 + 2.0 * lambda * lse;
        // The kernel skips a term whose weight is 0 (and so does this: 0·inf would be NaN).
        let term = |w: f64, v: f64| if w == 0.0 { 0.0 } else { (w * v).abs() };
        let terms = term(conf, lse - xs[ti]) + term(alpha, lse - mean) + term(lambda, lse * lse);
        let w = conf + alpha + 2.0 * lambda * (lse.abs() + delta);
        let lb = w * delta + u * terms;
        let want = f64::from(r.rows[row]);
        sum_bound += lb;
        sum_abs += want.abs();
        if let Some(rows_got) = got.rows {
            check(
                format!("loss row {row}"),
                f64::from(rows_got[row]),
                want,
                lb,
            )?;
        }
        if let Some(g) = got.grad {
            let scale = f64::from(match cfg.get_reduction() {
                Reduction::Mean => 1.0 / n_valid as f32,
                Reduction::Sum => 1.0,
                Reduction::None => upstream.map_or(1.0, |up| up[row]),
            });
            for j in 0..v {
                let p = (xs[j] - lse).exp();
                let gb = scale.abs()
                    * (p * (zf.abs() * (delta + 4.0 * u) + 2.0 * lambda * delta)
                        + u * (zf.abs() + eps + if j == ti { conf } else { 0.0 }));
                let want = f64::from(g_ref[row * v + j].to_f32());
                let b = gb + dtype_ulp::<T>(want.abs() + gb);
                check(
                    format!("grad [{row}, {j}]"),
                    f64::from(g[row * v + j].to_f32()),
                    want,
                    b,
                )?;
            }
        }
    }
    if let (Some(red), Some(want)) = (got.reduced, r.reduced) {
        let div = if cfg.get_reduction() == Reduction::Mean {
            n_valid.max(1) as f64
        } else {
            1.0
        };
        let b =
            (sum_bound + 2f64.powi(-16) * sum_abs) / div + 2f64.powi(-24) * f64::from(want).abs();
        check("reduced loss".into(), f64::from(red), f64::from(want), b)?;
    }
    Ok(worst)
}

/// Bad scalars the probe used for probabilities.
pub const BAD_P: [f64; 7] = [
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    -1e-300,
    -0.5,
    1.0 + f64::EPSILON,
    1e300,
];

/// The input was refused with an argument or shape error (not a driver error, not a panic).
#[track_caller]
pub fn refused<T: std::fmt::Debug>(what: &str, r: fusedreg::Result<T>) {
    match r {
        Err(fusedreg::Error::InvalidArgument { .. } | fusedreg::Error::ShapeMismatch { .. }) => {}
        other => panic!("{what}: expected InvalidArgument or ShapeMismatch, got {other:?}"),
    }
}
