//! CPU tests of the redundancy statistics (Block Influence) measured by `dropout`'s residual
//! forward, the final add of a block (always run): BI against a plain f64 recomputation from
//! the saved streams within the stated bound, every output bit unchanged with the meter on (in
//! place too), determinism and exact accumulation across calls, zero and non-finite rows, bad
//! input. The emulated kernels against this reference: tests/redundancy_emu.rs.

mod common;

use common::{rng, uniform, METER_SHAPES};
use fusedreg::dropout::{cpu, Config, DropPath, MaskResolution};
use fusedreg::dropout_add_norm::cpu::{stat_sums, stats_chain};
use fusedreg::redundancy::{cpu::Redundancy, row_cos, RowCos, SiteStats};
use fusedreg::{Dtype, Error};
use half::{bf16, f16};

/// The bound of the module docs for a row of `cols` columns.
fn bound(cols: usize) -> f64 {
    (2 * stats_chain(cols) + 6) as f64 * 2f64.powi(-24) + 2f64.powi(-33)
}

/// Plain f64 BI from saved streams: per row cos(r, y) over rows where neither is zero.
fn bi_f64<T: Dtype>(r: &[T], y: &[T], cols: usize) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for (rr, yy) in r.chunks(cols).zip(y.chunks(cols)) {
        let f = |v: &T| f64::from(v.to_f32());
        let dot: f64 = rr.iter().zip(yy).map(|(a, b)| f(a) * f(b)).sum();
        let nr: f64 = rr.iter().map(|a| f(a) * f(a)).sum();
        let ny: f64 = yy.iter().map(|a| f(a) * f(a)).sum();
        if nr > 0.0 && ny > 0.0 {
            sum += dot / (nr.sqrt() * ny.sqrt());
            n += 1;
        }
    }
    (n > 0).then(|| 1.0 - sum / n as f64)
}

/// Random x, residual and bias for `cfg` (x scaled by `x_scale` against the residual).
fn inputs<T: Dtype>(cfg: &Config, seed: u64, x_scale: f32) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut g = rng(seed);
    let n = cfg.len();
    let x = uniform(&mut g, n, -x_scale, x_scale);
    let r = uniform(&mut g, n, -2.0, 2.0);
    let b = uniform(&mut g, cfg.cols(), -0.1 * x_scale, 0.1 * x_scale);
    (x, r, b)
}

/// One residual forward (out of place or in place), metered into `meter`'s site 0 or not.
fn forward<T: Dtype>(
    cfg: &Config,
    (x, r, b): &(Vec<T>, Vec<T>, Vec<T>),
    in_place: bool,
    meter: Option<&Redundancy>,
) -> Vec<T> {
    let site = meter.map(|m| m.site(0).unwrap());
    let mut y = vec![T::default(); cfg.len()];
    if in_place {
        y.copy_from_slice(r);
        let opts = cpu::ForwardOptions {
            bias: Some(b),
            redundancy: site,
            ..Default::default()
        };
        cpu::forward_inplace(cfg, x, &mut y, opts).unwrap();
    } else {
        let opts = cpu::ForwardOptions {
            bias: Some(b),
            residual: Some(r),
            redundancy: site,
            ..Default::default()
        };
        cpu::forward(cfg, x, &mut y, opts).unwrap();
    }
    y
}

fn bi_vs_f64<T: Dtype>(in_place: bool) {
    for (k, &(rows, cols)) in METER_SHAPES.iter().enumerate() {
        for x_scale in [2.0f32, 1e-2] {
            let cfg = Config::new(rows, cols, 0.1, 42, k as u64).unwrap();
            let meter = Redundancy::new(1).unwrap();
            let data = inputs::<T>(&cfg, 100 + k as u64, x_scale);
            let y = forward(&cfg, &data, in_place, Some(&meter));
            let got = meter.bi().unwrap()[0].unwrap();
            let want = bi_f64(&data.1, &y, cols).unwrap();
            assert!(
                (got - want).abs() <= bound(cols),
                "{:?} {rows}x{cols} x_scale {x_scale}: BI {got} vs f64 {want} (bound {})",
                T::KIND,
                bound(cols)
            );
            assert_eq!(meter.stats().unwrap()[0].rows, rows as u64);
        }
    }
}

#[test]
fn bi_matches_a_plain_f64_recomputation_within_the_bound() {
    for in_place in [false, true] {
        bi_vs_f64::<f32>(in_place);
        bi_vs_f64::<f16>(in_place);
        bi_vs_f64::<bf16>(in_place);
    }
}

/// Each row adds exactly what `stat_sums` and `row_cos` give for its saved streams: the pinned
/// order is dropout_add_norm's, one home.
#[test]
fn each_row_adds_the_pinned_statistic() {
    let cfg = Config::new(5, 37, 0.3, 7, 8).unwrap();
    let data = inputs::<bf16>(&cfg, 3, 1.0);
    let meter = Redundancy::new(1).unwrap();
    let y = forward(&cfg, &data, false, Some(&meter));
    let mut want = SiteStats::default();
    for row in 0..5 {
        let span = row * 37..(row + 1) * 37;
        let (r, yy) = (&data.1[span.clone()], &y[span]);
        let [dot, rr, ss] = stat_sums(37, |j| r[j].to_f32(), |j| yy[j].to_f32());
        want.add(row_cos(dot, rr, ss));
    }
    assert_eq!(meter.stats().unwrap()[0], want);
}

#[test]
fn the_meter_changes_no_output_bit() {
    for res in [
        MaskResolution::Bits32,
        MaskResolution::Bits16,
        MaskResolution::Bits8,
    ] {
        for in_place in [false, true] {
            let cfg = Config::new(9, 264, 0.25, 1, 2)
                .unwrap()
                .with_resolution(res)
                .with_drop_path(DropPath::new(0.3, 5).unwrap());
            let data = inputs::<f16>(&cfg, 11, 1.0);
            let plain = forward(&cfg, &data, in_place, None);
            let meter = Redundancy::new(1).unwrap();
            let measured = forward(&cfg, &data, in_place, Some(&meter));
            let bits = |v: &[f16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&measured), "{res:?} in place {in_place}");
            // Dropped rows (drop path) leave y = r: cos 1, still counted.
            assert_eq!(meter.stats().unwrap()[0].rows, 9);
        }
    }
}

#[test]
fn accumulation_is_deterministic_and_exact_across_calls() {
    let cfg = Config::new(6, 1000, 0.1, 3, 4).unwrap();
    let data = inputs::<f32>(&cfg, 5, 1.0);
    let (a, b) = (Redundancy::new(2).unwrap(), Redundancy::new(2).unwrap());
    forward(&cfg, &data, false, Some(&a));
    forward(&cfg, &data, false, Some(&b));
    let once = a.stats().unwrap()[0];
    assert_eq!(once, b.stats().unwrap()[0]);
    forward(&cfg, &data, true, Some(&a));
    let twice = a.stats().unwrap()[0];
    assert_eq!(twice.cos_sum, 2 * once.cos_sum);
    assert_eq!(twice.rows, 2 * once.rows);
    // Site 1 untouched.
    assert_eq!(a.stats().unwrap()[1], SiteStats::default());
}

#[test]
fn zero_and_non_finite_rows_follow_the_contract() {
    let (rows, cols) = (4, 16);
    // p = 0 and no bias: y = r + x exactly; row 0: r = 0 (excluded); row 1: x = -r (y = 0,
    // excluded); row 2: an infinity (non-finite); row 3: y = 2 r (cos 1).
    let cfg = Config::new(rows, cols, 0.0, 1, 1).unwrap();
    let mut g = rng(9);
    let mut r: Vec<f32> = uniform(&mut g, rows * cols, 0.5, 1.0);
    let mut x: Vec<f32> = vec![0.0; rows * cols];
    r[..cols].fill(0.0);
    x[..cols].copy_from_slice(&uniform::<f32>(&mut g, cols, -1.0, 1.0));
    for j in 0..cols {
        x[cols + j] = -r[cols + j];
        x[3 * cols + j] = r[3 * cols + j];
    }
    x[2 * cols + 3] = f32::INFINITY;
    let meter = Redundancy::new(1).unwrap();
    let mut y = vec![0f32; rows * cols];
    let opts = cpu::ForwardOptions {
        residual: Some(&r),
        redundancy: Some(meter.site(0).unwrap()),
        ..Default::default()
    };
    cpu::forward(&cfg, &x, &mut y, opts).unwrap();
    let s = meter.stats().unwrap()[0];
    assert_eq!((s.rows, s.nonfinite), (1, 1));
    // Row 3: cos 1 up to the f32 rounding of its sums (the bound of the module docs).
    let cos = s.cos_sum as f64 / (1u64 << 32) as f64;
    assert!((cos - 1.0).abs() <= bound(cols), "{cos}");
    assert!(meter.bi().unwrap()[0].unwrap().is_nan());
    assert_eq!(row_cos(0.0, 0.0, 1.0), RowCos::Excluded);
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let cfg = Config::new(2, 8, 0.1, 1, 1).unwrap();
    let (x, r) = (vec![1.0f32; 16], vec![2.0f32; 16]);
    let meter = Redundancy::new(1).unwrap();
    let mut y = vec![-7.0f32; 16];
    // No residual: there is no stream before the add.
    let opts = cpu::ForwardOptions {
        redundancy: Some(meter.site(0).unwrap()),
        ..Default::default()
    };
    let e = cpu::forward(&cfg, &x, &mut y, opts).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
    assert!(e.to_string().contains("residual"), "{e}");
    // With the 1-bit mask.
    let mut mask = vec![0u32; cfg.mask_words()];
    let opts = cpu::ForwardOptions {
        residual: Some(&r),
        mask_out: Some(&mut mask),
        redundancy: Some(meter.site(0).unwrap()),
        ..Default::default()
    };
    let e = cpu::forward(&cfg, &x, &mut y, opts).unwrap_err();
    assert!(e.to_string().contains("mask"), "{e}");
    let opts = cpu::ForwardOptions {
        mask_out: Some(&mut mask),
        redundancy: Some(meter.site(0).unwrap()),
        ..Default::default()
    };
    assert!(cpu::forward_inplace(&cfg, &x, &mut y, opts).is_err());
    assert!(y.iter().all(|&v| v == -7.0), "nothing written on error");
    assert_eq!(meter.stats().unwrap()[0], SiteStats::default());
}
