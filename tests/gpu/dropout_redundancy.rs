//! The Block Influence meter fed by `dropout`'s residual forward (`dropout_fwd_res_stats_*`)
//! against the CPU reference's meter, bit for bit (the site's integer words), every dtype, out
//! of place and in place, with a bias and a drop path, every keying resolution; every output
//! bit that of the forward without the meter; bad input an error.

use fusedreg::dropout::{self as dr, cpu, Config, DropPath, ForwardOptions, MaskResolution};
use fusedreg::redundancy::{cpu::Redundancy as CpuMeter, Redundancy, SiteStats};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::{bits_eq, rng, uniform};
use crate::harness::trials_of;
use crate::harness::TestResult;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "dropout_redundancy",
        &[
            ("matches_cpu_f32", matches_cpu::<f32>),
            ("matches_cpu_f16", matches_cpu::<f16>),
            ("matches_cpu_bf16", matches_cpu::<bf16>),
            ("bad_input_is_an_error", bad_input_is_an_error),
        ],
    )
}

/// Odd hidden sizes (partial groups: the scalar entry), multiples of 8 (the vector entry), past
/// 256 groups, and more rows than the launch has blocks (2048: several rows per block).
const SHAPES: [(usize, usize); 7] = [
    (7, 1),
    (9, 99),
    (33, 64),
    (20, 264),
    (4, 4104),
    (2, 20008),
    (2100, 24),
];

/// Every shape at each resolution, out of place and in place, with a bias and a drop path: the
/// device site equals the CPU meter's after two calls, and y has the bits of the plain forward.
fn matches_cpu<T: Dtype>(h: &Handle) -> TestResult<()> {
    let st = h.stream();
    let mut meter = Redundancy::new(h, 2)?;
    let resolutions = [
        MaskResolution::Bits32,
        MaskResolution::Bits16,
        MaskResolution::Bits8,
    ];
    for (k, &(rows, cols)) in SHAPES.iter().enumerate() {
        for (j, &res) in resolutions.iter().enumerate() {
            for in_place in [false, true] {
                let what = format!("{rows}x{cols} {res:?} in place {in_place}");
                let mut cfg =
                    Config::new(rows, cols, 0.1, 42, (3 * k + j) as u64)?.with_resolution(res);
                if j == 1 {
                    cfg = cfg.with_drop_path(DropPath::new(0.25, 9)?);
                }
                let mut g = rng(700 + k as u64);
                let n = cfg.len();
                let x: Vec<T> = uniform(&mut g, n, -1.0, 1.0);
                let mut r: Vec<T> = uniform(&mut g, n, -2.0, 2.0);
                for row in (0..rows).step_by(4) {
                    r[row * cols..(row + 1) * cols].fill(T::from_f32_rn(0.0));
                }
                let b: Vec<T> = uniform(&mut g, cols, -0.1, 0.1);
                // The CPU: two calls into one site.
                let cm = CpuMeter::new(1)?;
                let mut want_y = vec![T::default(); n];
                for _ in 0..2 {
                    let opts = cpu::ForwardOptions {
                        bias: Some(&b),
                        residual: Some(&r),
                        redundancy: Some(cm.site(0)?),
                        ..Default::default()
                    };
                    cpu::forward(&cfg, &x, &mut want_y, opts)?;
                }
                let want = cm.stats()?[0];
                meter.reset()?;
                let (xd, bd) = (st.clone_htod(&x)?, st.clone_htod(&b)?);
                for _ in 0..2 {
                    let rd = st.clone_htod(&r)?;
                    let mut yd = st.alloc_zeros::<T>(n)?;
                    let site = Some(meter.site(1)?);
                    let y = if in_place {
                        let mut rd = rd;
                        let opts = ForwardOptions {
                            bias: Some(bd.as_view()),
                            redundancy: site,
                            ..Default::default()
                        };
                        dr::forward_inplace(h, &cfg, &xd, &mut rd, opts)?;
                        st.clone_dtoh(&rd)?
                    } else {
                        let opts = ForwardOptions {
                            bias: Some(bd.as_view()),
                            residual: Some(rd.as_view()),
                            redundancy: site,
                            ..Default::default()
                        };
                        dr::forward(h, &cfg, &xd, &mut yd, opts)?;
                        st.clone_dtoh(&yd)?
                    };
                    bits_eq(&format!("{what}: y"), &y, &want_y)?;
                }
                let got = meter.stats()?;
                if got[1] != want || got[0] != SiteStats::default() {
                    return Err(format!("{what}: device sites {got:?}, CPU {want:?}").into());
                }
                if want.rows == 0 {
                    return Err(format!("{what}: no counted rows: the case proves nothing").into());
                }
            }
        }
    }
    Ok(())
}

/// A site without a residual, or with the 1-bit mask, is an error.
fn bad_input_is_an_error(h: &Handle) -> TestResult<()> {
    let st = h.stream();
    let cfg = Config::new(4, 64, 0.1, 1, 2)?;
    let mut meter = Redundancy::new(h, 1)?;
    let x = st.alloc_zeros::<f32>(cfg.len())?;
    let mut y = st.alloc_zeros::<f32>(cfg.len())?;
    let opts = ForwardOptions {
        redundancy: Some(meter.site(0)?),
        ..Default::default()
    };
    if dr::forward(h, &cfg, &x, &mut y, opts).is_ok() {
        return Err("a site without a residual was accepted".into());
    }
    let mut mask = st.alloc_zeros::<u32>(cfg.mask_words())?;
    let opts = ForwardOptions {
        mask_out: Some(mask.as_view_mut()),
        redundancy: Some(meter.site(0)?),
        ..Default::default()
    };
    if dr::forward_inplace(h, &cfg, &x, &mut y, opts).is_ok() {
        return Err("a site with mask_out was accepted".into());
    }
    Ok(())
}
