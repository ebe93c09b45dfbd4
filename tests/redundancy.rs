//! CPU tests of the redundancy statistics (Block Influence) measured by `dropout_add_norm`'s
//! forward (always run): BI against a plain f64 recomputation from the saved streams within the
//! stated bound, every other output bit unchanged with the meter on, determinism and exact
//! accumulation across calls, zero and non-finite rows, bad input.

mod common;

use common::dan::DanOut;
use common::{bits_eq, rng, uniform, METER_SHAPES};
use fusedreg::dropout_add_norm::{
    cpu::{
        self, norm_ss, norm_stats_chain, row_sum, stat_sums, stat_sums2, stats_chain, ForwardArgs,
    },
    Config, DropPath, Norm,
};
use fusedreg::redundancy::{self, cpu::Redundancy, row_cos, RowCos, SiteStats};
use fusedreg::{Dtype, Error};
use half::{bf16, f16};

/// The bound of the module docs for a chain `k` ([`stats_chain`] of stat_sums' three sums,
/// [`norm_stats_chain`] of dropout_add_norm's statistics).
fn bound(k: usize) -> f64 {
    (2 * k + 6) as f64 * 2f64.powi(-24) + 2f64.powi(-33)
}

/// Plain f64 BI from saved streams: per row cos(r, s) over rows where neither is zero.
fn bi_f64(r: &[f64], s: &[f64], cols: usize) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for (rr, ss) in r.chunks(cols).zip(s.chunks(cols)) {
        let dot: f64 = rr.iter().zip(ss).map(|(a, b)| a * b).sum();
        let (nr, ns) = (
            rr.iter().map(|a| a * a).sum::<f64>(),
            ss.iter().map(|a| a * a).sum::<f64>(),
        );
        if nr > 0.0 && ns > 0.0 {
            sum += dot / (nr.sqrt() * ns.sqrt());
            n += 1;
        }
    }
    (n > 0).then(|| 1.0 - sum / n as f64)
}

fn f64s<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// A forward of random data (`x` scaled by `x_scale` relative to the residual), optionally
/// metered into `site`; returns the outputs and the residual it used.
#[allow(clippy::too_many_arguments)]
fn run<T: Dtype, S: Dtype>(
    cfg: &Config,
    seed: u64,
    x_scale: f32,
    residual: bool,
    in_place: bool,
    site: Option<redundancy::cpu::Site<'_>>,
) -> (DanOut<T, S>, Option<Vec<S>>) {
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let n = rows * cols;
    let mut g = rng(seed);
    let x: Vec<T> = uniform(&mut g, n, -x_scale, x_scale);
    let r: Option<Vec<S>> = residual.then(|| uniform(&mut g, n, -2.0, 2.0));
    let gamma: Vec<T> = uniform(&mut g, cols, 0.5, 1.5);
    let bias: Vec<T> = uniform(&mut g, cols, -0.1 * x_scale, 0.1 * x_scale);
    let mut o = DanOut::new(rows, cols);
    let args = ForwardArgs {
        residual: if in_place { None } else { r.as_deref() },
        bias: Some(&bias),
        redundancy: site,
        ..ForwardArgs::new(&x, &gamma)
    };
    if in_place {
        o.s.copy_from_slice(r.as_deref().expect("in place needs a residual"));
    }
    if in_place {
        cpu::forward_inplace(cfg, args, o.outs()).unwrap();
    } else {
        cpu::forward(cfg, args, o.outs()).unwrap();
    }
    (o, r)
}

fn bi_vs_f64<T: Dtype, S: Dtype>(norm: Norm, in_place: bool) {
    for (k, &(rows, cols)) in METER_SHAPES.iter().enumerate() {
        for x_scale in [2.0f32, 1e-2] {
            let cfg = Config::new(rows, cols, norm, 1e-5)
                .unwrap()
                .with_dropout(0.1, 42, k as u64)
                .unwrap();
            let meter = Redundancy::new(1).unwrap();
            let seed = 100 + k as u64;
            let (o, r) = run::<T, S>(
                &cfg,
                seed,
                x_scale,
                true,
                in_place,
                Some(meter.site(0).unwrap()),
            );
            let want = bi_f64(&f64s(r.as_deref().unwrap()), &f64s(&o.s), cols).unwrap();
            let st = meter.stats().unwrap()[0];
            assert_eq!((st.rows, st.nonfinite), (rows as u64, 0));
            let got = st.bi().unwrap();
            let tol = bound(norm_stats_chain(cols, norm));
            assert!(
                (got - want).abs() <= tol,
                "{rows}x{cols} {} / {} x{x_scale}: BI {got} vs f64 {want} (bound {tol})",
                T::KIND.name(),
                S::KIND.name(),
            );
        }
    }
}

#[test]
fn bi_matches_a_plain_f64_recomputation_within_the_bound() {
    bi_vs_f64::<f32, f32>(Norm::LayerNorm, false);
    bi_vs_f64::<bf16, bf16>(Norm::RmsNorm, false);
    bi_vs_f64::<f16, f16>(Norm::LayerNorm, true);
    bi_vs_f64::<bf16, f32>(Norm::LayerNorm, true);
    bi_vs_f64::<f16, f32>(Norm::RmsNorm, false);
}

/// The stream after the add for hard case `case` of the per-row tests, from random `r` and `d`:
/// 0 nearly parallel, 1 nearly opposite, 2 orthogonal-ish, 3 and 4 of very different lengths,
/// 5 a large update; 6 and 7 a mean that dwarfs the spread (LayerNorm's |s|² from its sums).
fn hard_stream(case: usize, r: &[f32], d: &[f32]) -> Vec<f32> {
    let pair = |f: fn(f32, f32) -> f32| r.iter().zip(d).map(|(&a, &b)| f(a, b)).collect();
    match case {
        0 => pair(|a, b| a + 1e-4 * b),
        1 => pair(|a, b| -a + 1e-3 * b),
        2 => d.to_vec(),
        3 => pair(|a, b| 1e6 * a + b),
        4 => pair(|a, b| 1e-12 * (a + b)),
        5 => pair(|a, b| a + 10.0 * b),
        6 => d.iter().map(|b| 1000.0 + b).collect(),
        _ => d.iter().map(|b| -3.0e4 + 1e-2 * b).collect(),
    }
}

/// Per row, on vectors built to be hard: nearly parallel (cos near 1, where BI is small),
/// nearly opposite, orthogonal, and of very different lengths.
#[test]
fn row_cosine_is_within_the_bound_per_row() {
    let mut g = rng(7);
    for cols in [1usize, 8, 9, 255, 2048, 4100, 16384] {
        for case in 0..6 {
            let r: Vec<f32> = uniform(&mut g, cols, -3.0, 3.0);
            let d: Vec<f32> = uniform(&mut g, cols, -1.0, 1.0);
            let s = hard_stream(case, &r, &d);
            let [dot, rr, ss] = stat_sums(cols, |j| r[j], |j| s[j]);
            let RowCos::Cos(c) = row_cos(dot, rr, ss) else {
                panic!("{cols} case {case}: not counted")
            };
            let (r64, s64) = (f64s(&r), f64s(&s));
            let want = 1.0 - bi_f64(&r64, &s64, cols).unwrap();
            let tol = bound(stats_chain(cols)) - 2f64.powi(-33);
            assert!(
                (f64::from(c) - want).abs() <= tol,
                "{cols} case {case}: cos {c} vs {want} (tol {tol})"
            );
        }
    }
}

/// dropout_add_norm's row cosine (r·s and |r|² from [`stat_sums2`], |s|² from the norm's sums by
/// [`norm_ss`]) within the bound of [`norm_stats_chain`], row by row, on the same hard cases and
/// on streams whose mean dwarfs their spread (LayerNorm's `fma(sum, mean, sq)` then rests on the
/// mean's rounding).
#[test]
fn norm_row_cosine_is_within_the_bound_per_row() {
    let mut g = rng(8);
    for cols in [1usize, 8, 9, 255, 2048, 4100, 16384, 20008] {
        for case in 0..8 {
            let r: Vec<f32> = uniform(&mut g, cols, -3.0, 3.0);
            let d: Vec<f32> = uniform(&mut g, cols, -1.0, 1.0);
            let s = hard_stream(case, &r, &d);
            let n = cols as f32;
            let [dot, rr] = stat_sums2(cols, |j| r[j], |j| s[j]);
            let (r64, s64) = (f64s(&r), f64s(&s));
            let want = 1.0 - bi_f64(&r64, &s64, cols).unwrap();
            for norm in [Norm::LayerNorm, Norm::RmsNorm] {
                let ss = match norm {
                    Norm::LayerNorm => {
                        let sum = row_sum(cols, |j| s[j]);
                        let mean = sum / n;
                        let sq = row_sum(cols, |j| (s[j] - mean) * (s[j] - mean));
                        norm_ss(norm, sum, mean, sq)
                    }
                    Norm::RmsNorm => norm_ss(norm, row_sum(cols, |j| s[j] * s[j]), 0.0, 0.0),
                };
                let RowCos::Cos(c) = row_cos(dot, rr, ss) else {
                    panic!("{cols} case {case} {norm:?}: not counted")
                };
                let tol = bound(norm_stats_chain(cols, norm)) - 2f64.powi(-33);
                assert!(
                    (f64::from(c) - want).abs() <= tol,
                    "{cols} case {case} {norm:?}: cos {c} vs {want} (tol {tol})"
                );
            }
        }
    }
}

fn same_outputs<T: Dtype, S: Dtype>(a: &DanOut<T, S>, b: &DanOut<T, S>) {
    bits_eq("out", &a.out, &b.out).unwrap();
    bits_eq("s", &a.s, &b.s).unwrap();
    bits_eq("mean", &a.mean, &b.mean).unwrap();
    bits_eq("rstd", &a.rstd, &b.rstd).unwrap();
}

#[test]
fn the_meter_changes_no_output_bit() {
    for (k, &(rows, cols)) in METER_SHAPES.iter().enumerate() {
        for norm in [Norm::LayerNorm, Norm::RmsNorm] {
            let cfg = Config::new(rows, cols, norm, 1e-6)
                .unwrap()
                .with_dropout(0.25, 3, 9)
                .unwrap()
                .with_drop_path(DropPath::new(0.3, 11).unwrap());
            let meter = Redundancy::new(2).unwrap();
            for in_place in [false, true] {
                let (off, _) = run::<bf16, f32>(&cfg, k as u64, 1.0, true, in_place, None);
                let site = Some(meter.site(1).unwrap());
                let (on, _) = run::<bf16, f32>(&cfg, k as u64, 1.0, true, in_place, site);
                same_outputs(&off, &on);
                let (off, _) = run::<f16, f16>(&cfg, k as u64, 1.0, false, false, None);
                let site = Some(meter.site(0).unwrap());
                let (on, _) = run::<f16, f16>(&cfg, k as u64, 1.0, false, false, site);
                same_outputs(&off, &on);
            }
            // Without a residual every row is excluded: site 0 has no BI.
            assert_eq!(meter.stats().unwrap()[0], SiteStats::default());
            assert_eq!(meter.bi().unwrap()[0], None);
            assert_eq!(meter.stats().unwrap()[1].rows, 2 * rows as u64);
        }
    }
}

#[test]
fn accumulation_is_deterministic_and_exact_across_calls() {
    let cfg = Config::new(37, 520, Norm::LayerNorm, 1e-5)
        .unwrap()
        .with_dropout(0.1, 5, 6)
        .unwrap();
    let once = |seed| {
        let m = Redundancy::new(1).unwrap();
        run::<f32, f32>(&cfg, seed, 0.5, true, false, Some(m.site(0).unwrap()));
        m.stats().unwrap()[0]
    };
    let (a, b) = (once(1), once(2));
    assert_eq!(a, once(1), "two runs of the same call differ");
    let both = Redundancy::new(1).unwrap();
    run::<f32, f32>(&cfg, 1, 0.5, true, false, Some(both.site(0).unwrap()));
    run::<f32, f32>(&cfg, 2, 0.5, true, false, Some(both.site(0).unwrap()));
    let st = both.stats().unwrap()[0];
    assert_eq!(
        (st.cos_sum, st.rows),
        (a.cos_sum + b.cos_sum, a.rows + b.rows),
        "calls must add exactly (integer accumulators)"
    );
    let mut both = both;
    both.reset();
    assert_eq!(both.stats().unwrap()[0], SiteStats::default());
}

#[test]
fn zero_and_non_finite_rows_follow_the_contract() {
    let (rows, cols) = (4, 16);
    let cfg = Config::new(rows, cols, Norm::LayerNorm, 1e-5).unwrap();
    let mut g = rng(3);
    let r: Vec<f32> = uniform(&mut g, rows * cols, -1.0, 1.0);
    // Row 0: x = -r, so s = r + x = 0 exactly (excluded). Row 1: r = 0 (excluded). Row 2: x = 0,
    // s = r (cos 1). Row 3: x random.
    let mut x: Vec<f32> = uniform(&mut g, rows * cols, -1.0, 1.0);
    let mut res = r.clone();
    for j in 0..cols {
        x[j] = -r[j];
        res[cols + j] = 0.0;
        x[2 * cols + j] = 0.0;
    }
    let (st, s) = metered(&cfg, &x, &res);
    assert!(s[..cols].iter().all(|&v| v == 0.0));
    assert_eq!((st.rows, st.nonfinite), (2, 0));
    let cos3 = 1.0 - bi_f64(&f64s(&res[3 * cols..]), &f64s(&s[3 * cols..]), cols).unwrap();
    assert!(
        (st.mean_cos().unwrap() - (1.0 + cos3) / 2.0).abs()
            < bound(norm_stats_chain(cols, Norm::LayerNorm))
    );

    // An infinity in x makes its row non-finite, and the site's BI NaN.
    x[3 * cols + 5] = f32::INFINITY;
    let (st, _) = metered(&cfg, &x, &res);
    assert_eq!((st.rows, st.nonfinite), (1, 1));
    assert!(st.bi().unwrap().is_nan());
}

/// One forward of the given f32 x and residual (gamma 1, no bias) into a fresh meter: the
/// site's words and s.
fn metered(cfg: &Config, x: &[f32], res: &[f32]) -> (SiteStats, Vec<f32>) {
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let gamma = vec![1.0f32; cols];
    let meter = Redundancy::new(1).unwrap();
    let mut o = DanOut::<f32, f32>::new(rows, cols);
    let args = ForwardArgs {
        residual: Some(res),
        redundancy: Some(meter.site(0).unwrap()),
        ..ForwardArgs::new(x, &gamma)
    };
    cpu::forward(cfg, args, o.outs()).unwrap();
    let st = meter.stats().unwrap()[0];
    (st, o.s)
}

#[test]
fn bad_input_is_an_error() {
    assert!(matches!(
        Redundancy::new(0),
        Err(Error::InvalidArgument { .. })
    ));
    let meter = Redundancy::new(3).unwrap();
    let e = meter.site(3).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("3 sites"),
        "{e}"
    );
    assert!(matches!(
        meter.bi_into(&mut [0.0; 2]),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut ok = [0.0; 3];
    meter.bi_into(&mut ok).unwrap();

    // Wrong lengths with a meter: the op's error, and the meter is untouched.
    let cfg = Config::new(2, 8, Norm::RmsNorm, 1e-5).unwrap();
    let (x, r, gamma) = ([1.0f32; 16], [1.0f32; 16], [1.0f32; 8]);
    let mut o = DanOut::<f32, f32>::new(2, 8);
    o.s.pop(); // s one short
    let args = ForwardArgs {
        residual: Some(&r),
        redundancy: Some(meter.site(0).unwrap()),
        ..ForwardArgs::new(&x, &gamma)
    };
    assert!(matches!(
        cpu::forward(&cfg, args, o.outs()),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(meter.stats().unwrap()[0], SiteStats::default());
}
