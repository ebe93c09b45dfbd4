//! The Block Influence meter on the device ([`fusedreg::redundancy::Redundancy`], fed by
//! `dropout_add_norm`'s `*_stats_*` forwards) against the CPU reference's meter, bit for bit
//! (the site's integer words), on every dtype pair, the register tiers and the generic kernels;
//! every other output bit unchanged with the meter on; the words identical from run to run and
//! launch configuration to launch configuration; bad input an error.

use fusedreg::dropout_add_norm::{
    self as dan, cpu, Config, DropPath, ForwardArgs, ForwardOut, LaunchTuning, Norm,
};
use fusedreg::redundancy::{self, Redundancy, SiteStats};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::{bits_eq, rng, uniform};
use crate::dropout_add_norm::forced_tunings;
use crate::harness::trials_of;
use crate::harness::TestResult;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "redundancy",
        &[
            ("matches_cpu_f32", matches_cpu::<f32, f32>),
            ("matches_cpu_f16", matches_cpu::<f16, f16>),
            ("matches_cpu_bf16", matches_cpu::<bf16, bf16>),
            ("matches_cpu_f16_residual_in_f32", matches_cpu::<f16, f32>),
            ("matches_cpu_bf16_residual_in_f32", matches_cpu::<bf16, f32>),
            ("launch_configurations_agree", launch_configurations_agree),
            ("bad_input_is_an_error", bad_input_is_an_error),
        ],
    )
}

/// Hidden sizes through every register tier (t1 .. t8), past them (20008) and off the vector
/// path (1, 99).
const SHAPES: [(usize, usize); 9] = [
    (7, 1),
    (9, 99),
    (33, 64),
    (20, 264),
    (8, 2056),
    (4, 4104),
    (3, 8200),
    (2, 16384),
    (2, 20008),
];

struct Data<T, S> {
    x: Vec<T>,
    r: Vec<S>,
    gamma: Vec<T>,
}

/// Random inputs; every 4th residual row is exactly zero (an excluded row).
fn data<T: Dtype, S: Dtype>(rows: usize, cols: usize, seed: u64) -> Data<T, S> {
    let mut g = rng(seed);
    let n = rows * cols;
    let x = uniform(&mut g, n, -1.0, 1.0);
    let mut r: Vec<S> = uniform(&mut g, n, -2.0, 2.0);
    for row in (0..rows).step_by(4) {
        r[row * cols..(row + 1) * cols].fill(S::from_f32_rn(0.0));
    }
    let gamma = uniform(&mut g, cols, 0.5, 1.5);
    Data { x, r, gamma }
}

fn config(rows: usize, cols: usize, norm: Norm, path: bool) -> TestResult<Config> {
    let mut cfg = Config::new(rows, cols, norm, 1e-5).and_then(|c| c.with_dropout(0.1, 42, 7))?;
    if path {
        cfg = cfg.with_drop_path(DropPath::new(0.25, 9)?);
    }
    Ok(cfg)
}

/// The CPU meter after one forward.
fn cpu_site<T: Dtype, S: Dtype>(cfg: &Config, d: &Data<T, S>) -> TestResult<SiteStats> {
    let (rows, n) = (cfg.rows(), cfg.len());
    let meter = redundancy::cpu::Redundancy::new(1)?;
    let (mut out, mut s) = (vec![T::default(); n], vec![S::default(); n]);
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let args = cpu::ForwardArgs {
        residual: Some(&d.r),
        redundancy: Some(meter.site(0)?),
        ..cpu::ForwardArgs::new(&d.x, &d.gamma)
    };
    let outs = cpu::ForwardOut {
        out: &mut out,
        s: &mut s,
        mean: &mut mean,
        rstd: &mut rstd,
    };
    cpu::forward(cfg, args, outs)?;
    Ok(meter.stats()?[0])
}

/// One device forward (into `meter`'s `site` when given); returns out, s, mean and rstd.
#[allow(clippy::type_complexity)]
fn gpu_forward<T: Dtype, S: Dtype>(
    h: &Handle,
    cfg: &Config,
    d: &Data<T, S>,
    tuning: LaunchTuning,
    meter: Option<(&mut Redundancy, usize)>,
) -> TestResult<(Vec<T>, Vec<S>, Vec<f32>, Vec<f32>)> {
    let st = h.stream();
    let (rows, n) = (cfg.rows(), cfg.len());
    let x = st.clone_htod(&d.x)?;
    let r = st.clone_htod(&d.r)?;
    let gamma = st.clone_htod(&d.gamma)?;
    let mut out = st.alloc_zeros::<T>(n)?;
    let mut s = st.alloc_zeros::<S>(n)?;
    let mut mean = st.alloc_zeros::<f32>(rows)?;
    let mut rstd = st.alloc_zeros::<f32>(rows)?;
    let site = match meter {
        Some((m, i)) => Some(m.site(i)?),
        None => None,
    };
    let args = ForwardArgs {
        residual: Some(r.as_view()),
        redundancy: site,
        tuning,
        ..ForwardArgs::new(x.as_view(), gamma.as_view())
    };
    let outs = ForwardOut {
        out: out.as_view_mut(),
        s: s.as_view_mut(),
        mean: mean.as_view_mut(),
        rstd: rstd.as_view_mut(),
    };
    dan::forward(h, cfg, args, outs)?;
    Ok((
        st.clone_dtoh(&out)?,
        st.clone_dtoh(&s)?,
        st.clone_dtoh(&mean)?,
        st.clone_dtoh(&rstd)?,
    ))
}

/// Every shape, LayerNorm and RMSNorm, with and without a drop path: the device meter's site
/// equals the CPU meter's after two calls (twice one call's words), the other site stays zero,
/// and out, s, mean and rstd have the bits of the forward without the meter.
fn matches_cpu<T: Dtype, S: Dtype>(h: &Handle) -> TestResult<()> {
    let mut meter = Redundancy::new(h, 2)?;
    for (k, &(rows, cols)) in SHAPES.iter().enumerate() {
        for (norm, path) in [(Norm::LayerNorm, false), (Norm::RmsNorm, true)] {
            let what = format!("{rows}x{cols} {norm:?} drop path {path}");
            let cfg = config(rows, cols, norm, path)?;
            let d = data::<T, S>(rows, cols, 500 + k as u64);
            let want = cpu_site(&cfg, &d)?;
            meter.reset()?;
            let plain = gpu_forward(h, &cfg, &d, LaunchTuning::default(), None)?;
            for _ in 0..2 {
                let on = gpu_forward(h, &cfg, &d, LaunchTuning::default(), Some((&mut meter, 1)))?;
                bits_eq(&format!("{what}: out"), &on.0, &plain.0)?;
                bits_eq(&format!("{what}: s"), &on.1, &plain.1)?;
                bits_eq(&format!("{what}: mean"), &on.2, &plain.2)?;
                bits_eq(&format!("{what}: rstd"), &on.3, &plain.3)?;
            }
            let got = meter.stats()?;
            let twice = SiteStats {
                cos_sum: want.cos_sum.wrapping_mul(2),
                rows: 2 * want.rows,
                nonfinite: 2 * want.nonfinite,
            };
            if got[1] != twice || got[0] != SiteStats::default() {
                return Err(format!(
                    "{what}: device sites {got:?}, CPU (twice one call) {twice:?}"
                )
                .into());
            }
            if want.rows == 0 {
                return Err(format!("{what}: no counted rows: the case proves nothing").into());
            }
        }
    }
    Ok(())
}

/// The scalar path, the generic kernels, a capped grid (several rows per block) and no shared
/// memory give the same site words as the default, run after run.
fn launch_configurations_agree(h: &Handle) -> TestResult<()> {
    let mut meter = Redundancy::new(h, 1)?;
    for (rows, cols) in [(300, 2048), (64, 4104)] {
        let cfg = config(rows, cols, Norm::LayerNorm, false)?;
        let d = data::<bf16, bf16>(rows, cols, 77);
        let mut first = None;
        let defaults = [LaunchTuning::default(), LaunchTuning::default()];
        for tuning in defaults.into_iter().chain(forced_tunings()) {
            meter.reset()?;
            gpu_forward(h, &cfg, &d, tuning, Some((&mut meter, 0)))?;
            let got = meter.stats()?[0];
            match first {
                None => first = Some(got),
                Some(f) if f != got => {
                    return Err(format!("{rows}x{cols} {tuning:?}: {got:?}, default {f:?}").into())
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// A site past the meter, zero sites and a wrong-length BI buffer are errors.
fn bad_input_is_an_error(h: &Handle) -> TestResult<()> {
    let mut meter = Redundancy::new(h, 2)?;
    if meter.site(2).is_ok() || Redundancy::new(h, 0).is_ok() {
        return Err("a missing site or an empty meter was accepted".into());
    }
    if meter.bi_into(&mut [0.0; 3]).is_ok() {
        return Err("a BI buffer of the wrong length was accepted".into());
    }
    Ok(())
}
