//! Fused dropout + residual add + LayerNorm / RMSNorm on the device against the CPU reference,
//! bit for bit: out, s, mean, rstd, dx, d_residual, dgamma, dbeta, dbias.
//!
//! Every output is poisoned before the kernel runs, and element-wise views have a sentinel
//! element on each side that must survive.

use cudarc::driver::CudaSlice;
use fusedreg::dropout_add_norm::{
    self as dan, cpu, unfused, BackwardArgs, BackwardOut, Config, ForwardArgs, ForwardOut,
    LaunchTuning, Norm, Workspace,
};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::dan::DanInputs;
use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "dropout_add_norm",
        &[
            ("shapes_f32", shapes::<f32, f32>),
            ("shapes_f16", shapes::<f16, f16>),
            ("shapes_bf16", shapes::<bf16, bf16>),
            ("shapes_bf16_residual_in_f32", shapes::<bf16, f32>),
            ("shapes_f16_residual_in_f32", shapes::<f16, f32>),
            ("every_option_f32", every_option::<f32, f32>),
            ("every_option_bf16", every_option::<bf16, bf16>),
            (
                "every_option_bf16_residual_in_f32",
                every_option::<bf16, f32>,
            ),
            ("edge_rates", edge_rates),
            ("views_at_element_1", views_at_element_1),
            ("launch_configurations_agree", launch_configurations_agree),
            ("tiers_match_the_generic_kernels", tiers_match_generic),
            ("tiers_over_many_rows_and_slabs", tiers_many_rows),
            ("dgamma_identical_across_runs", dgamma_identical_across_runs),
            ("empty_inputs", empty_inputs),
            ("unfused_matches_its_cpu_mirror_f32", unfused_mirror::<f32>),
            (
                "unfused_matches_its_cpu_mirror_bf16",
                unfused_mirror::<bf16>,
            ),
            ("bad_input_is_an_error", bad_input_is_an_error),
        ],
    )
}

#[derive(Clone, Copy, Debug)]
struct Case {
    rows: usize,
    cols: usize,
    norm: Norm,
    p: f64,
    residual: bool,
    beta: bool,
    bias: bool,
    rs: Rs,
    /// The backward gets d_s (the stream's own gradient).
    prenorm: bool,
    /// The forward updates the residual buffer in place.
    in_place: bool,
    /// LayerNorm Scaling layer (1: unscaled).
    layer: usize,
    /// Element-wise buffers are views starting at this element.
    offset: usize,
    tuning: LaunchTuning,
}

impl Case {
    fn new(rows: usize, cols: usize, norm: Norm) -> Self {
        Case {
            rows,
            cols,
            norm,
            p: 0.1,
            residual: true,
            beta: norm == Norm::LayerNorm,
            bias: true,
            rs: Rs::None,
            prenorm: true,
            in_place: false,
            layer: 3,
            offset: 0,
            tuning: LaunchTuning::default(),
        }
    }

    /// `Case::new` of each shape, under both norms: `(index of the shape, case)`.
    fn per_shape(shapes: &[(usize, usize)]) -> impl Iterator<Item = (usize, Case)> + '_ {
        shapes.iter().enumerate().flat_map(|(k, &(rows, cols))| {
            [Norm::LayerNorm, Norm::RmsNorm].map(|norm| (k, Case::new(rows, cols, norm)))
        })
    }

    fn config(&self, seed: u64) -> Config {
        let cfg = Config::new(self.rows, self.cols, self.norm, 1e-5)
            .unwrap()
            .with_dropout(self.p, seed, 0x1234_5678_9abc)
            .unwrap()
            .with_layer_norm_scaling(self.layer)
            .unwrap();
        match self.rs.drop_path(4) {
            Some(path) => cfg.with_drop_path(path),
            None => cfg,
        }
    }
}

/// The forward's inputs and the backward's output gradients.
struct Data<T, S> {
    fwd: DanInputs<T, S>,
    d_out: Vec<T>,
    d_s: Option<Vec<S>>,
}

impl<T: Dtype, S: Dtype> Data<T, S> {
    /// The CPU backward's arguments, after a forward that gave `s`, `mean` and `rstd`.
    fn cpu_backward_args<'a>(
        &'a self,
        s: &'a [S],
        mean: &'a [f32],
        rstd: &'a [f32],
    ) -> cpu::BackwardArgs<'a, T, S> {
        cpu::BackwardArgs {
            d_s: self.d_s.as_deref(),
            rowscale: self.fwd.rowscale.as_deref(),
            ..cpu::BackwardArgs::new(&self.d_out, s, &self.fwd.gamma, mean, rstd)
        }
    }
}

fn data<T: Dtype, S: Dtype>(c: &Case, seed: u64) -> Data<T, S> {
    let mut g = rng(seed);
    let n = c.rows * c.cols;
    let fwd = DanInputs {
        x: uniform(&mut g, n, -3.0, 3.0),
        // The in-place forward reads the residual from the stream buffer: it needs one.
        r: (c.residual || c.in_place).then(|| uniform(&mut g, n, -3.0, 3.0)),
        gamma: uniform(&mut g, c.cols, 0.5, 1.5),
        beta: c.beta.then(|| uniform(&mut g, c.cols, -0.5, 0.5)),
        bias: c.bias.then(|| uniform(&mut g, c.cols, -0.5, 0.5)),
        rowscale: c.rs.given(&mut g, c.rows, 3),
    };
    Data {
        fwd,
        d_out: uniform(&mut g, n, -1.0, 1.0),
        d_s: c.prenorm.then(|| uniform(&mut g, n, -1.0, 1.0)),
    }
}

/// Every output of a forward + backward.
struct Outs<T, S> {
    out: Vec<T>,
    s: Vec<S>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dx: Vec<T>,
    d_residual: Option<Vec<S>>,
    dgamma: Vec<T>,
    dbeta: Option<Vec<T>>,
    dbias: Option<Vec<T>>,
}

fn cpu_run<T: Dtype, S: Dtype>(c: &Case, cfg: &Config, d: &Data<T, S>) -> Outs<T, S> {
    let (n, rows, cols) = (cfg.len(), c.rows, c.cols);
    let mut o = Outs {
        out: vec![poison::<T>(); n],
        s: vec![poison::<S>(); n],
        mean: vec![f32::NAN; rows],
        rstd: vec![f32::NAN; rows],
        dx: vec![poison::<T>(); n],
        d_residual: d.fwd.r.as_ref().map(|_| vec![poison::<S>(); n]),
        dgamma: vec![poison::<T>(); cols],
        dbeta: c.beta.then(|| vec![poison::<T>(); cols]),
        dbias: c.bias.then(|| vec![poison::<T>(); cols]),
    };
    let args = d.fwd.args();
    let outs = cpu::ForwardOut {
        out: &mut o.out,
        s: &mut o.s,
        mean: &mut o.mean,
        rstd: &mut o.rstd,
    };
    cpu::forward(cfg, args, outs).unwrap();
    let args = d.cpu_backward_args(&o.s, &o.mean, &o.rstd);
    let outs = cpu::BackwardOut {
        d_residual: o.d_residual.as_deref_mut(),
        dbeta: o.dbeta.as_deref_mut(),
        dbias: o.dbias.as_deref_mut(),
        ..cpu::BackwardOut::new(&mut o.dx, &mut o.dgamma)
    };
    cpu::backward(cfg, args, outs).unwrap();
    o
}

fn gpu_run<T: Dtype, S: Dtype>(
    h: &Handle,
    c: &Case,
    cfg: &Config,
    d: &Data<T, S>,
    ws: Option<&mut Workspace>,
) -> TestResult<Outs<T, S>> {
    let st = h.stream();
    let (off, n, rows, cols) = (c.offset, cfg.len(), c.rows, c.cols);
    let (tx, ts) = (T::from_f32_rn(-7.0), S::from_f32_rn(-7.0));
    let x = upload(st, &d.fwd.x, off, tx)?;
    let gamma = st.clone_htod(&d.fwd.gamma)?;
    let htod = |v: &Option<Vec<T>>| v.as_ref().map(|b| st.clone_htod(b)).transpose();
    let beta = htod(&d.fwd.beta)?;
    let bias = htod(&d.fwd.bias)?;
    let rowscale = d
        .fwd
        .rowscale
        .as_ref()
        .map(|b| st.clone_htod(b))
        .transpose()?;
    let residual = match (&d.fwd.r, c.in_place) {
        (Some(r), false) => Some(upload(st, r, off, ts)?),
        _ => None,
    };
    // In place, the stream buffer holds the residual on entry.
    let mut s_buf = match (&d.fwd.r, c.in_place) {
        (Some(r), true) => upload(st, r, off, ts)?,
        _ => upload(st, &vec![poison::<S>(); n], off, ts)?,
    };
    let mut out = upload(st, &vec![poison::<T>(); n], off, tx)?;
    let mut mean = st.clone_htod(&vec![f32::NAN; rows])?;
    let mut rstd = st.clone_htod(&vec![f32::NAN; rows])?;
    let args = ForwardArgs {
        residual: residual.as_ref().map(|r| r.slice(off..off + n)),
        beta: beta.as_ref().map(|b| b.as_view()),
        bias: bias.as_ref().map(|b| b.as_view()),
        rowscale: rowscale.as_ref().map(|b| b.as_view()),
        tuning: c.tuning,
        ..ForwardArgs::new(x.slice(off..off + n), gamma.as_view())
    };
    let outs = ForwardOut {
        out: out.slice_mut(off..off + n),
        s: s_buf.slice_mut(off..off + n),
        mean: mean.as_view_mut(),
        rstd: rstd.as_view_mut(),
    };
    if c.in_place {
        dan::forward_inplace(h, cfg, args, outs)?;
    } else {
        dan::forward(h, cfg, args, outs)?;
    }

    let d_out = upload(st, &d.d_out, off, tx)?;
    let d_s = d.d_s.as_ref().map(|v| upload(st, v, off, ts)).transpose()?;
    let mut dx = upload(st, &vec![poison::<T>(); n], off, tx)?;
    let mut d_res = d
        .fwd
        .r
        .as_ref()
        .map(|_| upload(st, &vec![poison::<S>(); n], off, ts))
        .transpose()?;
    let mut dgamma = st.clone_htod(&vec![poison::<T>(); cols])?;
    let pois = |want: bool| {
        want.then(|| st.clone_htod(&vec![poison::<T>(); cols]))
            .transpose()
    };
    let mut dbeta = pois(c.beta)?;
    let mut dbias = pois(c.bias)?;
    let args = BackwardArgs {
        d_s: d_s.as_ref().map(|v| v.slice(off..off + n)),
        rowscale: rowscale.as_ref().map(|b| b.as_view()),
        workspace: ws,
        tuning: c.tuning,
        ..BackwardArgs::new(
            d_out.slice(off..off + n),
            s_buf.slice(off..off + n),
            gamma.as_view(),
            mean.as_view(),
            rstd.as_view(),
        )
    };
    let outs = BackwardOut {
        d_residual: d_res.as_mut().map(|v| v.slice_mut(off..off + n)),
        dbeta: dbeta.as_mut().map(|v| v.as_view_mut()),
        dbias: dbias.as_mut().map(|v| v.as_view_mut()),
        ..BackwardOut::new(dx.slice_mut(off..off + n), dgamma.as_view_mut())
    };
    dan::backward(h, cfg, args, outs)?;

    let dtoh = |b: &CudaSlice<T>| st.clone_dtoh(b);
    Ok(Outs {
        out: download(st, &out, off, tx, "out")?,
        s: download(st, &s_buf, off, ts, "s")?,
        mean: st.clone_dtoh(&mean)?,
        rstd: st.clone_dtoh(&rstd)?,
        dx: download(st, &dx, off, tx, "dx")?,
        d_residual: d_res
            .as_ref()
            .map(|b| download(st, b, off, ts, "d_residual"))
            .transpose()?,
        dgamma: dtoh(&dgamma)?,
        dbeta: dbeta.as_ref().map(dtoh).transpose()?,
        dbias: dbias.as_ref().map(dtoh).transpose()?,
    })
}

fn compare<T: Dtype, S: Dtype>(what: &str, got: &Outs<T, S>, want: &Outs<T, S>) -> TestResult {
    let w = |n: &str| format!("{what}: {n}");
    bits_eq(&w("s"), &got.s, &want.s)?;
    bits_eq(&w("mean"), &got.mean, &want.mean)?;
    bits_eq(&w("rstd"), &got.rstd, &want.rstd)?;
    bits_eq(&w("out"), &got.out, &want.out)?;
    bits_eq(&w("dx"), &got.dx, &want.dx)?;
    if let (Some(g), Some(e)) = (&got.d_residual, &want.d_residual) {
        bits_eq(&w("d_residual"), g, e)?;
    }
    bits_eq(&w("dgamma"), &got.dgamma, &want.dgamma)?;
    if let (Some(g), Some(e)) = (&got.dbeta, &want.dbeta) {
        bits_eq(&w("dbeta"), g, e)?;
    }
    if let (Some(g), Some(e)) = (&got.dbias, &want.dbias) {
        bits_eq(&w("dbias"), g, e)?;
    }
    Ok(())
}

/// Forward and backward on the GPU against the CPU reference, bit for bit.
fn run_case<T: Dtype, S: Dtype>(h: &Handle, c: &Case, seed: u64) -> TestResult<Outs<T, S>> {
    let what = format!("{}/{} {c:?} seed {seed}", T::KIND.name(), S::KIND.name());
    let cfg = c.config(seed);
    let d = data::<T, S>(c, seed);
    let want = cpu_run(c, &cfg, &d);
    let got = gpu_run(h, c, &cfg, &d, None)?;
    compare(&what, &got, &want)?;
    Ok(got)
}

/// Hidden sizes 1, odd, multiples of 8 (the vector path), 16384 and above; row counts crossing
/// slab boundaries (1025 rows: 2 rows per slab, a partial last slab).
fn shapes<T: Dtype, S: Dtype>(h: &Handle) -> TestResult {
    let shapes = [
        (1, 1),
        (5, 1),
        (17, 7),
        (9, 8),
        (33, 1000),
        (7, 1001),
        (64, 1024),
        (3, 4104),
        (4, 16384),
        (2, 20008),
        (1025, 24),
    ];
    for (k, base) in Case::per_shape(&shapes) {
        let rs = [Rs::None, Rs::Given, Rs::Path, Rs::PerSample][k % 4];
        run_case::<T, S>(h, &Case { rs, ..base }, 1000 + k as u64)?;
    }
    Ok(())
}

/// Every combination of the options on a vector-path shape and on an odd one.
fn every_option<T: Dtype, S: Dtype>(h: &Handle) -> TestResult {
    let mut seed = 5000;
    for (rows, cols) in [(13, 40), (6, 45)] {
        for norm in [Norm::LayerNorm, Norm::RmsNorm] {
            for residual in [false, true] {
                for in_place in [false, true] {
                    if in_place && !residual {
                        continue;
                    }
                    for (beta, bias) in [(false, false), (true, true), (true, false)] {
                        for rs in [Rs::None, Rs::Given, Rs::Path] {
                            for prenorm in [false, true] {
                                for layer in [1, 7] {
                                    seed += 1;
                                    let c = Case {
                                        residual,
                                        in_place,
                                        beta,
                                        bias,
                                        rs,
                                        prenorm,
                                        layer,
                                        ..Case::new(rows, cols, norm)
                                    };
                                    run_case::<T, S>(h, &c, seed)?;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// p = 0 and p = 1 (no generator work), and a row scale that drops every row.
fn edge_rates(h: &Handle) -> TestResult {
    for (k, p) in [0.0, 1.0, 0.5].into_iter().enumerate() {
        for norm in [Norm::LayerNorm, Norm::RmsNorm] {
            let c = Case {
                p,
                rs: Rs::Given,
                ..Case::new(40, 264, norm)
            };
            run_case::<bf16, bf16>(h, &c, 7000 + k as u64)?;
            run_case::<f32, f32>(h, &c, 7100 + k as u64)?;
        }
    }
    Ok(())
}

/// Views starting at element 1 (the scalar path for a shape that would take the vector path).
fn views_at_element_1(h: &Handle) -> TestResult {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        for in_place in [false, true] {
            let c = Case {
                offset: 1,
                in_place,
                rs: Rs::Given,
                ..Case::new(20, 512, norm)
            };
            run_case::<f32, f32>(h, &c, 8000)?;
            run_case::<bf16, bf16>(h, &c, 8001)?;
            run_case::<f16, f32>(h, &c, 8002)?;
        }
    }
    Ok(())
}

/// Each launch path the defaults do not take, forced alone: the scalar path, a capped forward
/// grid (several rows per block), no shared-memory caches, the generic kernels. (Also
/// tests/gpu/redundancy.rs.)
pub(crate) fn forced_tunings() -> [LaunchTuning; 4] {
    [
        LaunchTuning {
            force_scalar: true,
            ..Default::default()
        },
        LaunchTuning {
            max_grid: 7,
            ..Default::default()
        },
        LaunchTuning {
            no_smem: true,
            ..Default::default()
        },
        LaunchTuning {
            generic: true,
            ..Default::default()
        },
    ]
}

/// The scalar path, a capped forward grid, no shared-memory caches and the generic kernels give
/// the same bits as the defaults (4104 columns: the backward's partials need more than 48 KiB of shared memory).
fn launch_configurations_agree(h: &Handle) -> TestResult {
    for (norm, cols) in [(Norm::LayerNorm, 2048), (Norm::RmsNorm, 4104)] {
        let base = Case::new(300, cols, norm);
        let a = run_case::<bf16, bf16>(h, &base, 9000)?;
        for tuning in forced_tunings() {
            let b = run_case::<bf16, bf16>(h, &Case { tuning, ..base }, 9000)?;
            compare(&format!("{tuning:?} vs default"), &b, &a)?;
        }
    }
    Ok(())
}

/// Every register tier (t1 with 32, 128 and 256 partials; t2; t4 over 2 segments; t8 over 4, or
/// the generic backward for an f32 stream) against the CPU reference and against the generic
/// kernels forced by `LaunchTuning::generic`, bit for bit, with and without beta and bias (the
/// backward accumulates only the wanted column partials).
fn tiers_match_generic(h: &Handle) -> TestResult {
    fn one<T: Dtype, S: Dtype>(h: &Handle, c: &Case, seed: u64) -> TestResult {
        let fast = run_case::<T, S>(h, c, seed)?;
        let generic = Case {
            tuning: LaunchTuning {
                generic: true,
                ..Default::default()
            },
            ..*c
        };
        let slow = run_case::<T, S>(h, &generic, seed)?;
        compare(&format!("{c:?}: tier vs generic"), &fast, &slow)
    }
    let shapes = [
        (37, 64),
        (20, 1024),
        (9, 2048),
        (30, 4096),
        (6, 6144),
        (5, 8192),
        (3, 12288),
        (2, 16384),
    ];
    for (k, base) in Case::per_shape(&shapes) {
        for (beta, bias) in [(true, false), (false, true)] {
            let c = Case {
                beta,
                bias,
                rs: [Rs::None, Rs::Given, Rs::Path][k % 3],
                ..base
            };
            let seed = 12_000 + 10 * k as u64;
            one::<bf16, bf16>(h, &c, seed)?;
            one::<f32, f32>(h, &c, seed + 1)?;
            one::<bf16, f32>(h, &c, seed + 2)?;
            one::<f16, f16>(h, &c, seed + 3)?;
        }
    }
    Ok(())
}

/// The t2 tier with more rows than resident forward blocks (each loops over rows) and 3 rows per
/// backward slab with a partial last slab.
fn tiers_many_rows(h: &Handle) -> TestResult {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        let c = Case::new(2500, 4096, norm);
        run_case::<bf16, bf16>(h, &c, 13_000)?;
        run_case::<f32, f32>(h, &c, 13_001)?;
    }
    Ok(())
}

/// The column gradients are identical from run to run, with and without a reused workspace,
/// on a shape with many slabs (4096 rows: 4 rows per slab).
fn dgamma_identical_across_runs(h: &Handle) -> TestResult {
    let c = Case::new(4096, 768, Norm::LayerNorm);
    let cfg = c.config(11);
    let d = data::<bf16, bf16>(&c, 11);
    let want = cpu_run(&c, &cfg, &d);
    let mut ws = Workspace::new();
    let first = gpu_run(h, &c, &cfg, &d, Some(&mut ws))?;
    compare("run 1", &first, &want)?;
    for run in 2..5 {
        let again = if run % 2 == 0 {
            gpu_run(h, &c, &cfg, &d, Some(&mut ws))?
        } else {
            gpu_run(h, &c, &cfg, &d, None)?
        };
        bits_eq(&format!("run {run}: dgamma"), &again.dgamma, &first.dgamma)?;
        bits_eq(
            &format!("run {run}: dbeta"),
            again.dbeta.as_ref().unwrap(),
            first.dbeta.as_ref().unwrap(),
        )?;
        bits_eq(
            &format!("run {run}: dbias"),
            again.dbias.as_ref().unwrap(),
            first.dbias.as_ref().unwrap(),
        )?;
    }
    Ok(())
}

/// No rows: nothing is launched forward; the backward writes zero column gradients.
fn empty_inputs(h: &Handle) -> TestResult {
    let st = h.stream();
    let cfg = Config::new(0, 64, Norm::LayerNorm, 1e-5)?;
    let z = |n: usize| st.alloc_zeros::<f32>(n);
    let (x, gamma, mut out, mut s, mut mean, mut rstd) =
        (z(0)?, z(64)?, z(0)?, z(0)?, z(0)?, z(0)?);
    let before = h.launch_count();
    let outs = ForwardOut {
        out: out.as_view_mut(),
        s: s.as_view_mut(),
        mean: mean.as_view_mut(),
        rstd: rstd.as_view_mut(),
    };
    dan::forward(
        h,
        &cfg,
        ForwardArgs::new(x.as_view(), gamma.as_view()),
        outs,
    )?;
    launches(h, before, 0, "the empty forward")?;
    let mut dgamma = st.clone_htod(&vec![f32::NAN; 64])?;
    let mut dx = z(0)?;
    let args = BackwardArgs::new(
        x.as_view(),
        s.as_view(),
        gamma.as_view(),
        mean.as_view(),
        rstd.as_view(),
    );
    dan::backward(
        h,
        &cfg,
        args,
        BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut()),
    )?;
    let got = st.clone_dtoh(&dgamma)?;
    bits_eq("dgamma of no rows", &got, &vec![0.0f32; 64])?;
    Ok(())
}

fn bad_input_is_an_error(h: &Handle) -> TestResult {
    let st = h.stream();
    let cfg = Config::new(4, 64, Norm::RmsNorm, 1e-5)?;
    let z = |n: usize| st.alloc_zeros::<f32>(n);
    let (x, gamma, r) = (z(256)?, z(64)?, z(256)?);
    let (mut out, mut s, mut mean, mut rstd) = (z(256)?, z(256)?, z(4)?, z(4)?);
    let mut fwd = |x_len: usize, gamma_len: usize, residual: bool, in_place: bool| {
        let args = ForwardArgs {
            residual: residual.then(|| r.as_view()),
            ..ForwardArgs::new(x.slice(0..x_len), gamma.slice(0..gamma_len))
        };
        let outs = ForwardOut {
            out: out.as_view_mut(),
            s: s.as_view_mut(),
            mean: mean.as_view_mut(),
            rstd: rstd.as_view_mut(),
        };
        if in_place {
            dan::forward_inplace(h, &cfg, args, outs)
        } else {
            dan::forward(h, &cfg, args, outs)
        }
    };
    let bad = [
        ("x too short", fwd(255, 64, false, false)),
        ("gamma too short", fwd(256, 63, false, false)),
        ("in place with a residual", fwd(256, 64, true, true)),
    ];
    for (what, r) in bad {
        if r.is_ok() {
            return Err(format!("{what}: accepted").into());
        }
    }
    fwd(256, 64, true, false)?;
    // A stream type that is neither x's nor f32.
    let xb = st.alloc_zeros::<bf16>(256)?;
    let gb = st.alloc_zeros::<bf16>(64)?;
    let mut ob = st.alloc_zeros::<bf16>(256)?;
    let mut sh = st.alloc_zeros::<f16>(256)?;
    let outs = ForwardOut {
        out: ob.as_view_mut(),
        s: sh.as_view_mut(),
        mean: mean.as_view_mut(),
        rstd: rstd.as_view_mut(),
    };
    if dan::forward(h, &cfg, ForwardArgs::new(xb.as_view(), gb.as_view()), outs).is_ok() {
        return Err("an f16 stream with bf16 x was accepted".into());
    }
    // Backward: dgamma of the wrong length.
    let (mut dx, mut dg) = (z(256)?, z(63)?);
    let args = BackwardArgs::new(
        x.as_view(),
        s.as_view(),
        gamma.as_view(),
        mean.as_view(),
        rstd.as_view(),
    );
    if dan::backward(
        h,
        &cfg,
        args,
        BackwardOut::new(dx.as_view_mut(), dg.as_view_mut()),
    )
    .is_ok()
    {
        return Err("dgamma of 63 for 64 columns was accepted".into());
    }
    Ok(())
}

/// The unfused baseline (dropout with its residual, then a separate norm; backward the other way round)
/// against its CPU mirror, bit for bit, on the vector path and on an odd shape.
fn unfused_mirror<T: Dtype>(h: &Handle) -> TestResult {
    let st = h.stream();
    for (k, &(rows, cols, norm)) in [
        (33, 1024, Norm::LayerNorm),
        (9, 77, Norm::RmsNorm),
        (1025, 8, Norm::LayerNorm),
    ]
    .iter()
    .enumerate()
    {
        let c = Case {
            rs: Rs::Given,
            ..Case::new(rows, cols, norm)
        };
        let seed = 9500 + k as u64;
        let cfg = c.config(seed);
        let d = data::<T, T>(&c, seed);
        let n = cfg.len();
        let what = format!("unfused {} {c:?}", T::KIND.name());
        // CPU mirror.
        let (mut out, mut s, mut mean, mut rstd) = (
            vec![poison::<T>(); n],
            vec![poison::<T>(); n],
            vec![f32::NAN; rows],
            vec![f32::NAN; rows],
        );
        let args = d.fwd.args();
        let outs = cpu::ForwardOut {
            out: &mut out,
            s: &mut s,
            mean: &mut mean,
            rstd: &mut rstd,
        };
        unfused::forward_cpu(&cfg, args, outs)?;
        let (mut dx, mut dres, mut dg, mut db, mut dbias) = (
            vec![poison::<T>(); n],
            vec![poison::<T>(); n],
            vec![poison::<T>(); cols],
            vec![poison::<T>(); cols],
            vec![poison::<T>(); cols],
        );
        let args = d.cpu_backward_args(&s, &mean, &rstd);
        let outs = cpu::BackwardOut {
            d_residual: Some(&mut dres),
            dbeta: d.fwd.beta.as_ref().map(|_| &mut db[..]),
            dbias: Some(&mut dbias),
            ..cpu::BackwardOut::new(&mut dx, &mut dg)
        };
        unfused::backward_cpu(&cfg, args, outs)?;

        // GPU.
        let up = |v: &[T]| st.clone_htod(v);
        let (x, r, gamma, d_out) = (
            up(&d.fwd.x)?,
            up(d.fwd.r.as_ref().unwrap())?,
            up(&d.fwd.gamma)?,
            up(&d.d_out)?,
        );
        let beta = d.fwd.beta.as_ref().map(|b| up(b)).transpose()?;
        let bias = up(d.fwd.bias.as_ref().unwrap())?;
        let d_s = up(d.d_s.as_ref().unwrap())?;
        let rs = st.clone_htod(d.fwd.rowscale.as_ref().unwrap())?;
        let z = |len: usize| st.clone_htod(&vec![poison::<T>(); len]);
        let (mut g_out, mut g_s) = (z(n)?, z(n)?);
        let mut g_mean = st.clone_htod(&vec![f32::NAN; rows])?;
        let mut g_rstd = st.clone_htod(&vec![f32::NAN; rows])?;
        let args = ForwardArgs {
            residual: Some(r.as_view()),
            beta: beta.as_ref().map(|b| b.as_view()),
            bias: Some(bias.as_view()),
            rowscale: Some(rs.as_view()),
            ..ForwardArgs::new(x.as_view(), gamma.as_view())
        };
        let outs = ForwardOut {
            out: g_out.as_view_mut(),
            s: g_s.as_view_mut(),
            mean: g_mean.as_view_mut(),
            rstd: g_rstd.as_view_mut(),
        };
        unfused::forward(h, &cfg, args, outs)?;
        let (mut g_dx, mut g_dres, mut g_dg, mut g_db, mut g_dbias) =
            (z(n)?, z(n)?, z(cols)?, z(cols)?, z(cols)?);
        let args = BackwardArgs {
            d_s: Some(d_s.as_view()),
            rowscale: Some(rs.as_view()),
            ..BackwardArgs::new(
                d_out.as_view(),
                g_s.as_view(),
                gamma.as_view(),
                g_mean.as_view(),
                g_rstd.as_view(),
            )
        };
        let outs = BackwardOut {
            d_residual: Some(g_dres.as_view_mut()),
            dbeta: d.fwd.beta.as_ref().map(|_| g_db.as_view_mut()),
            dbias: Some(g_dbias.as_view_mut()),
            ..BackwardOut::new(g_dx.as_view_mut(), g_dg.as_view_mut())
        };
        unfused::backward(h, &cfg, args, outs)?;
        let back = |b: &CudaSlice<T>| st.clone_dtoh(b);
        bits_eq(&format!("{what}: s"), &back(&g_s)?, &s)?;
        bits_eq(&format!("{what}: mean"), &st.clone_dtoh(&g_mean)?, &mean)?;
        bits_eq(&format!("{what}: rstd"), &st.clone_dtoh(&g_rstd)?, &rstd)?;
        bits_eq(&format!("{what}: out"), &back(&g_out)?, &out)?;
        bits_eq(&format!("{what}: d_residual"), &back(&g_dres)?, &dres)?;
        bits_eq(&format!("{what}: dx"), &back(&g_dx)?, &dx)?;
        bits_eq(&format!("{what}: dgamma"), &back(&g_dg)?, &dg)?;
        if d.fwd.beta.is_some() {
            bits_eq(&format!("{what}: dbeta"), &back(&g_db)?, &db)?;
        }
        bits_eq(&format!("{what}: dbias"), &back(&g_dbias)?, &dbias)?;
    }
    Ok(())
}
