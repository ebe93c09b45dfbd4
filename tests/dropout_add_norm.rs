//! CPU tests of the fused dropout + residual add + LayerNorm / RMSNorm reference (always run):
//! the stream against `dropout` with a residual, the norm against an f64 formula, LayerNorm Scaling
//! against `1 / sqrt(l)`, p = 0 against an unfused add + norm, gradients against finite
//! differences in f64, in place, residual in f32, hidden sizes 1, odd and 16384, bad input.
// Element-wise comparisons read best with explicit indices.
#![allow(clippy::needless_range_loop)]

mod common;

use common::dan::{DanInputs, DanOut};
use common::{bits_eq, check, close, rng, uniform};
use fusedreg::dropout as dr;
use fusedreg::dropout_add_norm::{
    colsum_slab_count,
    cpu::{self, row_sum, BackwardArgs, BackwardOut, ForwardArgs, ForwardOut},
    layer_norm_scaling, Config, DropPath, Norm,
};
use fusedreg::dropping::MaskResolution;
use fusedreg::{Dtype, Error};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug)]
struct Opts {
    residual: bool,
    beta: bool,
    bias: bool,
    rowscale: bool,
}

const ALL: Opts = Opts {
    residual: true,
    beta: true,
    bias: true,
    rowscale: true,
};

fn data<T: Dtype, S: Dtype>(rows: usize, cols: usize, o: Opts, seed: u64) -> DanInputs<T, S> {
    let mut g = rng(seed);
    let n = rows * cols;
    DanInputs {
        x: uniform(&mut g, n, -2.0, 2.0),
        r: o.residual.then(|| uniform(&mut g, n, -2.0, 2.0)),
        gamma: uniform(&mut g, cols, 0.5, 1.5),
        beta: o.beta.then(|| uniform(&mut g, cols, -0.5, 0.5)),
        bias: o.bias.then(|| uniform(&mut g, cols, -0.5, 0.5)),
        rowscale: o.rowscale.then(|| {
            let mut v = uniform::<f32>(&mut g, rows, 0.5, 2.0);
            v.iter_mut().step_by(3).for_each(|s| *s = 0.0);
            v
        }),
    }
}

fn fwd<T: Dtype, S: Dtype>(cfg: &Config, d: &DanInputs<T, S>) -> DanOut<T, S> {
    let mut f = DanOut::new(cfg.rows(), cfg.cols());
    cpu::forward(cfg, d.args(), f.outs()).unwrap();
    f
}

fn f64s<T: Dtype>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

/// The norm of one row in f64 from the formula (two-pass variance), times `ls`.
fn norm_f64(
    norm: Norm,
    v: &[f64],
    gamma: &[f64],
    beta: Option<&[f64]>,
    eps: f64,
    ls: f64,
) -> Vec<f64> {
    let n = v.len() as f64;
    let (mean, var) = match norm {
        Norm::LayerNorm => {
            let mean = v.iter().sum::<f64>() / n;
            (
                mean,
                v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / n,
            )
        }
        Norm::RmsNorm => (0.0, v.iter().map(|a| a * a).sum::<f64>() / n),
    };
    let rstd = 1.0 / (var + eps).sqrt();
    (0..v.len())
        .map(|j| ((v[j] - mean) * rstd * gamma[j] + beta.map_or(0.0, |b| b[j])) * ls)
        .collect()
}

/// The stream equals `dropout`'s output with a residual bit for bit (same keying, same arithmetic),
/// for every dtype, with and without bias, row scale, drop path and dropout.
const RESOLUTIONS: [MaskResolution; 3] = [
    MaskResolution::Bits32,
    MaskResolution::Bits16,
    MaskResolution::Bits8,
];

/// The stream is `dropout` with a residual, bit for bit, at every keying resolution (the same
/// keep bits and the same scale at the probability applied).
#[test]
fn stream_equals_dropout_with_a_residual() {
    fn run<T: Dtype>() {
        for (rows, cols) in [(5, 8), (7, 33), (3, 1), (2, 300)] {
            for (p, res) in [0.0, 0.1, 0.5, 1.0, 0.3]
                .into_iter()
                .flat_map(|p| RESOLUTIONS.map(|r| (p, r)))
            {
                for (bias, rs, path) in [
                    (false, false, false),
                    (true, true, false),
                    (true, false, true),
                ] {
                    let o = Opts {
                        residual: true,
                        beta: false,
                        bias,
                        rowscale: rs,
                    };
                    let d = data::<T, T>(rows, cols, o, 11);
                    let mut cfg = Config::new(rows, cols, Norm::LayerNorm, 1e-5)
                        .unwrap()
                        .with_dropout(p, 42, 7)
                        .unwrap()
                        .with_resolution(res);
                    let mut dcfg = dr::Config::new(rows, cols, p, 42, 7)
                        .unwrap()
                        .with_resolution(res);
                    if path {
                        let dp = DropPath::new(0.5, 99).unwrap();
                        cfg = cfg.with_drop_path(dp);
                        dcfg = dcfg.with_drop_path(dp);
                    }
                    let f = fwd(&cfg, &d);
                    let mut y = vec![T::from_f32_rn(f32::NAN); rows * cols];
                    let opts = dr::cpu::ForwardOptions {
                        bias: d.bias.as_deref(),
                        residual: d.r.as_deref(),
                        rowscale: d.rowscale.as_deref(),
                        ..Default::default()
                    };
                    dr::cpu::forward(&dcfg, &d.x, &mut y, opts).unwrap();
                    check(bits_eq(
                        &format!(
                            "{} {rows}x{cols} p {p} {res:?} bias {bias} rs {rs} path {path}",
                            T::KIND.name()
                        ),
                        &f.s,
                        &y,
                    ));
                }
            }
        }
    }
    run::<f32>();
    run::<f16>();
    run::<bf16>();
}

/// p = 0, no row scale: the fused op equals an unfused add followed by a norm in the same
/// reduction order, bit for bit.
#[test]
fn p0_equals_unfused_add_then_norm() {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        for (rows, cols) in [(4, 64), (3, 77), (2, 1), (1, 2049)] {
            let o = Opts {
                residual: true,
                beta: norm == Norm::LayerNorm,
                bias: true,
                rowscale: false,
            };
            let d = data::<bf16, bf16>(rows, cols, o, 5);
            let cfg = Config::new(rows, cols, norm, 1e-5).unwrap();
            let f = fwd(&cfg, &d);
            let r = d.r.as_ref().unwrap();
            for row in 0..rows {
                // Unfused: t = x + bias (f32), s = bf16(t + r), then the norm of s.
                let s: Vec<bf16> = (0..cols)
                    .map(|j| {
                        let i = row * cols + j;
                        let t = d.x[i].to_f32() + d.bias.as_ref().unwrap()[j].to_f32();
                        bf16::from_f32_rn(t + r[i].to_f32())
                    })
                    .collect();
                check(bits_eq("s", &f.s[row * cols..(row + 1) * cols], &s));
                let v: Vec<f32> = s.iter().map(|a| a.to_f32()).collect();
                let n = cols as f32;
                let (mean, ms) = match norm {
                    Norm::LayerNorm => {
                        let mean = row_sum(cols, |j| v[j]) / n;
                        (mean, row_sum(cols, |j| (v[j] - mean) * (v[j] - mean)) / n)
                    }
                    Norm::RmsNorm => (0.0, row_sum(cols, |j| v[j] * v[j]) / n),
                };
                let rstd = 1.0 / (ms + 1e-5f32).sqrt();
                assert_eq!(f.mean[row].to_bits(), mean.to_bits(), "row {row} mean");
                assert_eq!(f.rstd[row].to_bits(), rstd.to_bits(), "row {row} rstd");
                let out: Vec<bf16> = (0..cols)
                    .map(|j| {
                        let xh = (v[j] - mean) * rstd;
                        let g = d.gamma[j].to_f32();
                        let y = match &d.beta {
                            Some(b) => xh.mul_add(g, b[j].to_f32()),
                            None => xh * g,
                        };
                        bf16::from_f32_rn(y)
                    })
                    .collect();
                check(bits_eq(
                    &format!("{norm:?} {rows}x{cols} row {row} out"),
                    &f.out[row * cols..(row + 1) * cols],
                    &out,
                ));
            }
        }
    }
}

/// The statistics and the output against the f64 formula, every option, hidden sizes 1, odd,
/// and 16384.
#[test]
fn output_matches_the_f64_formula() {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        for (rows, cols) in [(3, 1), (4, 7), (3, 1001), (2, 16384)] {
            for o in [
                ALL,
                Opts {
                    residual: false,
                    beta: false,
                    bias: false,
                    rowscale: false,
                },
            ] {
                for layer in [1, 6] {
                    let d = data::<f32, f32>(rows, cols, o, 21);
                    let cfg = Config::new(rows, cols, norm, 1e-5)
                        .unwrap()
                        .with_dropout(0.2, 3, 4)
                        .unwrap()
                        .with_layer_norm_scaling(layer)
                        .unwrap();
                    let f = fwd(&cfg, &d);
                    let ls = 1.0 / (layer as f64).sqrt();
                    let gamma = f64s(&d.gamma);
                    let beta = d.beta.as_ref().map(|b| f64s(b));
                    let what = format!("{norm:?} {rows}x{cols} {o:?} layer {layer}");
                    for row in 0..rows {
                        let v = f64s(&f.s[row * cols..(row + 1) * cols]);
                        let want = norm_f64(norm, &v, &gamma, beta.as_deref(), 1e-5, ls);
                        let got = f64s(&f.out[row * cols..(row + 1) * cols]);
                        // Hidden 1 under LayerNorm: xhat = 0, out = beta * ls exactly.
                        check(close(&format!("{what} row {row}"), &got, &want, 2e-5, 2e-5));
                    }
                }
            }
        }
    }
}

/// LayerNorm Scaling is `1 / sqrt(l)` on the output: with l = 4 every output is exactly half
/// of the unscaled one (a power of two commutes with the rounding); layer 1 is unscaled.
#[test]
fn layer_norm_scaling_follows_the_formula() {
    assert_eq!(layer_norm_scaling(1).unwrap(), 1.0);
    for l in [2usize, 3, 12, 48, 1000] {
        assert_eq!(
            layer_norm_scaling(l).unwrap(),
            (1.0 / (l as f64).sqrt()) as f32
        );
    }
    assert!(matches!(
        layer_norm_scaling(0),
        Err(Error::InvalidArgument { .. })
    ));
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        let d = data::<bf16, f32>(6, 40, ALL, 8);
        let base = Config::new(6, 40, norm, 1e-5)
            .unwrap()
            .with_dropout(0.1, 1, 2)
            .unwrap();
        let f1 = fwd(&base.with_layer_norm_scaling(1).unwrap(), &d);
        let f0 = fwd(&base, &d);
        check(bits_eq("layer 1 = unscaled", &f1.out, &f0.out));
        let f4 = fwd(&base.with_layer_norm_scaling(4).unwrap(), &d);
        let half: Vec<bf16> = f0
            .out
            .iter()
            .map(|v| bf16::from_f32_rn(v.to_f32() * 0.5))
            .collect();
        check(bits_eq("layer 4 = unscaled / 2", &f4.out, &half));
        // The stream and the statistics do not depend on the layer scale.
        check(bits_eq("s", &f4.s, &f0.s));
        check(bits_eq("rstd", &f4.rstd, &f0.rstd));
    }
}

/// In place equals out of place, bit for bit.
#[test]
fn in_place_equals_out_of_place() {
    let d = data::<f16, f16>(5, 24, ALL, 9);
    let cfg = Config::new(5, 24, Norm::LayerNorm, 1e-5)
        .unwrap()
        .with_dropout(0.3, 5, 6)
        .unwrap();
    let f = fwd(&cfg, &d);
    let mut o = DanOut::<f16, f16>::new(5, 24);
    o.s = d.r.clone().unwrap();
    let args = ForwardArgs {
        residual: None,
        ..d.args()
    };
    cpu::forward_inplace(&cfg, args, o.outs()).unwrap();
    check(bits_eq("s", &o.s, &f.s));
    check(bits_eq("out", &o.out, &f.out));
    check(bits_eq("rstd", &o.rstd, &f.rstd));
    // Passing a residual too is refused.
    assert!(matches!(
        cpu::forward_inplace(&cfg, d.args(), o.outs()),
        Err(Error::InvalidArgument { .. })
    ));
}

/// residual_in_f32: the stream is f32 (`s = fma(t, m, r)` not rounded to bf16).
#[test]
fn residual_in_f32_keeps_the_stream_in_f32() {
    let (rows, cols) = (4, 40);
    let d = data::<bf16, f32>(rows, cols, ALL, 12);
    let cfg = Config::new(rows, cols, Norm::RmsNorm, 1e-6)
        .unwrap()
        .with_dropout(0.25, 8, 9)
        .unwrap();
    let f = fwd(&cfg, &d);
    let r = d.r.as_ref().unwrap();
    let (rs, bias) = (d.rowscale.as_ref().unwrap(), d.bias.as_ref().unwrap());
    let mut fractional = 0;
    for i in 0..rows * cols {
        let (row, j) = (i / cols, i % cols);
        let m = if cfg.keeps(fusedreg::DtypeKind::Bf16, i as u64) {
            cfg.scale(fusedreg::DtypeKind::Bf16) * rs[row]
        } else {
            0.0
        };
        let want = if m != 0.0 {
            (d.x[i].to_f32() + bias[j].to_f32()).mul_add(m, r[i])
        } else {
            r[i]
        };
        assert_eq!(f.s[i].to_bits(), want.to_bits(), "s[{i}]");
        fractional += usize::from(bf16::from_f32_rn(want).to_f32() != want);
    }
    assert!(
        fractional > rows * cols / 2,
        "the test data must exercise f32 precision"
    );
}

/// Dropped rows (row scale 0, drop path) keep the residual's bits and get dx = 0.
#[test]
fn dropped_rows_pass_the_residual_through() {
    let (rows, cols) = (12, 16);
    let d = data::<f32, f32>(
        rows,
        cols,
        Opts {
            rowscale: false,
            ..ALL
        },
        4,
    );
    let path = DropPath::new(0.5, 1234).unwrap();
    let cfg = Config::new(rows, cols, Norm::LayerNorm, 1e-5)
        .unwrap()
        .with_dropout(0.1, 1, 2)
        .unwrap()
        .with_drop_path(path);
    let f = fwd(&cfg, &d);
    let b = bwd(&cfg, &d, &f, true, 77);
    let mut dropped = 0;
    for row in 0..rows {
        let range = row * cols..(row + 1) * cols;
        if path.row_scale(1, row as u64) == 0.0 {
            dropped += 1;
            check(bits_eq(
                "s",
                &f.s[range.clone()],
                &d.r.as_ref().unwrap()[range.clone()],
            ));
            assert!(b.dx[range].iter().all(|&v| v == 0.0), "row {row}: dx not 0");
        }
    }
    assert!(
        (2..10).contains(&dropped),
        "{dropped} of {rows} rows dropped"
    );
}

struct Bwd<T, S> {
    dx: Vec<T>,
    dres: Vec<S>,
    dgamma: Vec<T>,
    dbeta: Vec<T>,
    dbias: Vec<T>,
    d_out: Vec<T>,
    d_s: Option<Vec<S>>,
}

fn bwd<T: Dtype, S: Dtype>(
    cfg: &Config,
    d: &DanInputs<T, S>,
    f: &DanOut<T, S>,
    prenorm: bool,
    seed: u64,
) -> Bwd<T, S> {
    let (n, cols) = (cfg.len(), cfg.cols());
    let mut g = rng(seed);
    let mut b = Bwd {
        dx: vec![T::from_f32_rn(f32::NAN); n],
        dres: vec![S::from_f32_rn(f32::NAN); n],
        dgamma: vec![T::from_f32_rn(f32::NAN); cols],
        dbeta: vec![T::from_f32_rn(f32::NAN); cols],
        dbias: vec![T::from_f32_rn(f32::NAN); cols],
        d_out: uniform(&mut g, n, -1.0, 1.0),
        d_s: prenorm.then(|| uniform(&mut g, n, -1.0, 1.0)),
    };
    let args = BackwardArgs {
        d_s: b.d_s.as_deref(),
        rowscale: d.rowscale.as_deref(),
        ..BackwardArgs::new(&b.d_out, &f.s, &d.gamma, &f.mean, &f.rstd)
    };
    let outs = BackwardOut {
        d_residual: Some(&mut b.dres),
        dbeta: Some(&mut b.dbeta),
        dbias: Some(&mut b.dbias),
        ..BackwardOut::new(&mut b.dx, &mut b.dgamma)
    };
    cpu::backward(cfg, args, outs).unwrap();
    b
}

/// The loss `sum(d_out * out) + sum(d_s * s)` of the op in f64, from f64 inputs.
#[allow(clippy::too_many_arguments)]
fn loss_f64(
    cfg: &Config,
    x: &[f64],
    r: &[f64],
    gamma: &[f64],
    beta: &[f64],
    bias: &[f64],
    mult: &[f64],
    d_out: &[f64],
    d_s: &[f64],
) -> f64 {
    let (rows, cols) = (cfg.rows(), cfg.cols());
    let mut loss = 0.0;
    for row in 0..rows {
        let v: Vec<f64> = (0..cols)
            .map(|j| {
                let i = row * cols + j;
                r[i] + mult[i] * (x[i] + bias[j])
            })
            .collect();
        let out = norm_f64(
            cfg.norm(),
            &v,
            gamma,
            Some(beta),
            f64::from(cfg.eps()),
            f64::from(cfg.layer_scale()),
        );
        for j in 0..cols {
            let i = row * cols + j;
            loss += d_out[i] * out[j] + d_s[i] * v[j];
        }
    }
    loss
}

/// Gradients of the CPU reference against central finite differences of the op in f64:
/// LayerNorm and RMSNorm, dropout with a row scale, prenorm, LayerNorm Scaling, hidden 1 and odd.
#[test]
fn gradients_match_finite_differences() {
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        for (rows, cols) in [(3, 1), (3, 5), (4, 13)] {
            for (p, layer) in [(0.0, 1), (0.3, 5)] {
                let d = data::<f32, f32>(rows, cols, ALL, 31 + cols as u64);
                let cfg = Config::new(rows, cols, norm, 1e-3)
                    .unwrap()
                    .with_dropout(p, 17, 18)
                    .unwrap()
                    .with_layer_norm_scaling(layer)
                    .unwrap();
                let f = fwd(&cfg, &d);
                let b = bwd(&cfg, &d, &f, true, 5);
                let rs = d.rowscale.as_ref().unwrap();
                let mult: Vec<f64> = (0..rows * cols)
                    .map(|i| {
                        if cfg.keeps(fusedreg::DtypeKind::F32, i as u64) {
                            f64::from(cfg.scale(fusedreg::DtypeKind::F32) * rs[i / cols])
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mut x = f64s(&d.x);
                let mut r = f64s(d.r.as_ref().unwrap());
                let mut gamma = f64s(&d.gamma);
                let mut beta = f64s(d.beta.as_ref().unwrap());
                let mut bias = f64s(d.bias.as_ref().unwrap());
                let (d_out, d_s) = (f64s(&b.d_out), f64s(b.d_s.as_ref().unwrap()));
                let what = format!("{norm:?} {rows}x{cols} p {p} layer {layer}");
                // d/dv of the loss by central differences, for each input vector in turn.
                let h = 1e-6;
                macro_rules! fd {
                    ($v:ident) => {{
                        let mut grad = vec![0.0; $v.len()];
                        for k in 0..$v.len() {
                            let keep = $v[k];
                            $v[k] = keep + h;
                            let up =
                                loss_f64(&cfg, &x, &r, &gamma, &beta, &bias, &mult, &d_out, &d_s);
                            $v[k] = keep - h;
                            let down =
                                loss_f64(&cfg, &x, &r, &gamma, &beta, &bias, &mult, &d_out, &d_s);
                            $v[k] = keep;
                            grad[k] = (up - down) / (2.0 * h);
                        }
                        grad
                    }};
                }
                let (gx, gr, gg, gb, gbias) = (fd!(x), fd!(r), fd!(gamma), fd!(beta), fd!(bias));
                let tol = (2e-4, 2e-3);
                check(close(
                    &format!("{what} dx"),
                    &f64s(&b.dx),
                    &gx,
                    tol.0,
                    tol.1,
                ));
                check(close(
                    &format!("{what} d_residual"),
                    &f64s(&b.dres),
                    &gr,
                    tol.0,
                    tol.1,
                ));
                check(close(
                    &format!("{what} dgamma"),
                    &f64s(&b.dgamma),
                    &gg,
                    tol.0,
                    tol.1,
                ));
                check(close(
                    &format!("{what} dbeta"),
                    &f64s(&b.dbeta),
                    &gb,
                    tol.0,
                    tol.1,
                ));
                check(close(
                    &format!("{what} dbias"),
                    &f64s(&b.dbias),
                    &gbias,
                    tol.0,
                    tol.1,
                ));
            }
        }
    }
}

/// The backward's column sums follow the slab partition (one slab boundary crossed at 1025
/// rows), and every dtype pair runs.
#[test]
fn backward_runs_for_every_dtype_pair_and_many_slabs() {
    fn run<T: Dtype, S: Dtype>() {
        let (rows, cols) = (1025, 9);
        assert!(colsum_slab_count(rows) < rows);
        let d = data::<T, S>(rows, cols, ALL, 3);
        let cfg = Config::new(rows, cols, Norm::LayerNorm, 1e-5)
            .unwrap()
            .with_dropout(0.1, 1, 1)
            .unwrap();
        let f = fwd(&cfg, &d);
        let b = bwd(&cfg, &d, &f, false, 4);
        // dbeta is the column sum of d_out * ls: compare with f64.
        let want: Vec<f64> = (0..cols)
            .map(|j| {
                (0..rows)
                    .map(|r| f64::from(b.d_out[r * cols + j].to_f32()))
                    .sum()
            })
            .collect();
        check(close("dbeta", &f64s(&b.dbeta), &want, 0.05, 0.01));
        assert!(b.dx.iter().all(|v| v.to_f32().is_finite()));
    }
    run::<f32, f32>();
    run::<f16, f16>();
    run::<bf16, bf16>();
    run::<f16, f32>();
    run::<bf16, f32>();
}

/// No rows: the forward writes nothing; the backward's column gradients are zeros.
#[test]
fn empty_input() {
    let cfg = Config::new(0, 8, Norm::LayerNorm, 1e-5).unwrap();
    let gamma = [1.0f32; 8];
    let mut o = DanOut::<f32, f32>::new(0, 8);
    cpu::forward(&cfg, ForwardArgs::new(&[], &gamma), o.outs()).unwrap();
    let mut dg = [f32::NAN; 8];
    cpu::backward::<f32, f32>(
        &cfg,
        BackwardArgs::new(&[], &[], &gamma, &[], &[]),
        BackwardOut::new(&mut [], &mut dg),
    )
    .unwrap();
    assert_eq!(dg, [0.0; 8]);
}

#[test]
fn bad_input_is_an_error() {
    // Config: eps <= 0 or not finite, layer scale not finite, cols 0, overflow, p outside [0, 1].
    for eps in [0.0, -1e-5, f32::NAN, f32::INFINITY] {
        assert!(
            matches!(
                Config::new(2, 8, Norm::LayerNorm, eps),
                Err(Error::InvalidArgument { .. })
            ),
            "eps {eps}"
        );
    }
    let cfg = Config::new(2, 8, Norm::LayerNorm, 1e-5).unwrap();
    for ls in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(
            matches!(cfg.with_layer_scale(ls), Err(Error::InvalidArgument { .. })),
            "ls {ls}"
        );
    }
    assert!(matches!(
        Config::new(2, 0, Norm::RmsNorm, 1e-5),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        Config::new(usize::MAX, 3, Norm::RmsNorm, 1e-5),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        cfg.with_dropout(f64::NAN, 0, 0),
        Err(Error::InvalidArgument { .. })
    ));

    // Shapes.
    let d = data::<f32, f32>(2, 8, ALL, 1);
    let mut o = DanOut::<f32, f32>::new(2, 8);
    let mut run = |args: ForwardArgs<'_, f32, f32>, out_len: usize, mean_len: usize| {
        let outs = ForwardOut {
            out: &mut o.out[..out_len],
            s: &mut o.s,
            mean: &mut o.mean[..mean_len],
            rstd: &mut o.rstd,
        };
        cpu::forward(&cfg, args, outs)
    };
    assert!(run(d.args(), 16, 2).is_ok());
    // Each input or output one short (out, mean, x, gamma, beta, row scale, residual): refused.
    let short = &d.r.as_ref().unwrap()[..8];
    for (what, args, out_len, mean_len) in [
        ("out", d.args(), 15, 2),
        ("mean", d.args(), 16, 1),
        (
            "x",
            ForwardArgs {
                x: &d.x[..15],
                ..d.args()
            },
            16,
            2,
        ),
        (
            "gamma",
            ForwardArgs {
                gamma: &d.gamma[..7],
                ..d.args()
            },
            16,
            2,
        ),
        (
            "beta",
            ForwardArgs {
                beta: Some(&d.gamma[..7]),
                ..d.args()
            },
            16,
            2,
        ),
        (
            "rowscale",
            ForwardArgs {
                rowscale: Some(&[1.0]),
                ..d.args()
            },
            16,
            2,
        ),
        (
            "residual",
            ForwardArgs {
                residual: Some(short),
                ..d.args()
            },
            16,
            2,
        ),
    ] {
        let e = run(args, out_len, mean_len);
        assert!(
            matches!(e, Err(Error::ShapeMismatch { .. })),
            "{what}: {e:?}"
        );
    }
    // A row scale together with a drop path.
    let pcfg = cfg.with_drop_path(DropPath::new(0.1, 3).unwrap());
    assert!(matches!(
        cpu::forward(&pcfg, d.args(), o.outs()),
        Err(Error::InvalidArgument { .. })
    ));
    // A stream type that is neither x's nor f32.
    let xb: Vec<bf16> = vec![bf16::ONE; 16];
    let gb: Vec<bf16> = vec![bf16::ONE; 8];
    let mut mixed = DanOut::<bf16, f16>::new(2, 8);
    assert!(matches!(
        cpu::forward(&cfg, ForwardArgs::new(&xb, &gb), mixed.outs()),
        Err(Error::InvalidArgument { .. })
    ));

    // Backward shapes.
    let f = fwd(&cfg, &d);
    let d_out = vec![1.0f32; 16];
    let (mut dx, mut dg) = (vec![0.0f32; 16], vec![0.0f32; 8]);
    let ok = cpu::backward(
        &cfg,
        BackwardArgs::new(&d_out, &f.s, &d.gamma, &f.mean, &f.rstd),
        BackwardOut::new(&mut dx, &mut dg),
    );
    assert!(ok.is_ok());
    // d_out, mean, dgamma one short: refused.
    let full = BackwardArgs::new(&d_out, &f.s, &d.gamma, &f.mean, &f.rstd);
    for (what, args, dg_len) in [
        (
            "d_out",
            BackwardArgs::new(&d_out[..15], &f.s, &d.gamma, &f.mean, &f.rstd),
            8,
        ),
        (
            "mean",
            BackwardArgs::new(&d_out, &f.s, &d.gamma, &f.mean[..1], &f.rstd),
            8,
        ),
        ("dgamma", full, 7),
    ] {
        let e = cpu::backward(&cfg, args, BackwardOut::new(&mut dx, &mut dg[..dg_len]));
        assert!(
            matches!(e, Err(Error::ShapeMismatch { .. })),
            "{what}: {e:?}"
        );
    }
    let args = BackwardArgs {
        d_s: Some(&d_out[..3]),
        ..BackwardArgs::new(&d_out, &f.s, &d.gamma, &f.mean, &f.rstd)
    };
    assert!(matches!(
        cpu::backward(&cfg, args, BackwardOut::new(&mut dx, &mut dg)),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// The unfused baseline's CPU mirror: the forward gives the fused bits; the backward's dgamma and
/// dbeta too (same norm backward), dx and d_residual too in f32 (nothing rounds between its
/// kernels there), dbias to rounding (`dropout`'s summation order).
#[test]
fn unfused_mirror_agrees_with_the_fused_op() {
    use fusedreg::dropout_add_norm::unfused;
    for norm in [Norm::LayerNorm, Norm::RmsNorm] {
        for (rows, cols) in [(7, 24), (5, 13), (40, 1)] {
            let d = data::<f32, f32>(rows, cols, ALL, 41);
            let cfg = Config::new(rows, cols, norm, 1e-5)
                .unwrap()
                .with_dropout(0.2, 9, 10)
                .unwrap()
                .with_layer_norm_scaling(2)
                .unwrap();
            let f = fwd(&cfg, &d);
            let n = rows * cols;
            let mut o = DanOut::<f32, f32>::new(rows, cols);
            unfused::forward_cpu(&cfg, d.args(), o.outs()).unwrap();
            let what = format!("{norm:?} {rows}x{cols}");
            check(bits_eq(&format!("{what} s"), &o.s, &f.s));
            check(bits_eq(&format!("{what} out"), &o.out, &f.out));
            check(bits_eq(&format!("{what} rstd"), &o.rstd, &f.rstd));

            let b = bwd(&cfg, &d, &f, true, 6);
            let (mut dx, mut dres, mut dg, mut db, mut dbias) = (
                vec![0f32; n],
                vec![0f32; n],
                vec![0f32; cols],
                vec![0f32; cols],
                vec![0f32; cols],
            );
            let args = BackwardArgs {
                d_s: b.d_s.as_deref(),
                rowscale: d.rowscale.as_deref(),
                ..BackwardArgs::new(&b.d_out, &f.s, &d.gamma, &f.mean, &f.rstd)
            };
            let outs = BackwardOut {
                d_residual: Some(&mut dres),
                dbeta: Some(&mut db),
                dbias: Some(&mut dbias),
                ..BackwardOut::new(&mut dx, &mut dg)
            };
            unfused::backward_cpu(&cfg, args, outs).unwrap();
            check(bits_eq(&format!("{what} dgamma"), &dg, &b.dgamma));
            check(bits_eq(&format!("{what} dbeta"), &db, &b.dbeta));
            check(bits_eq(&format!("{what} d_residual"), &dres, &b.dres));
            check(bits_eq(&format!("{what} dx"), &dx, &b.dx));
            check(close(
                &format!("{what} dbias"),
                &f64s(&dbias),
                &f64s(&b.dbias),
                1e-5,
                1e-5,
            ));
            // Without a residual (or d_residual) the baseline refuses.
            let args = ForwardArgs {
                residual: None,
                ..d.args()
            };
            assert!(matches!(
                unfused::forward_cpu(&cfg, args, o.outs()),
                Err(Error::InvalidArgument { .. })
            ));
        }
    }
}

/// The keying resolution is kept in either order of `with_dropout` / `with_resolution`, and the
/// scale is taken at the probability applied.
#[test]
fn resolution_survives_with_dropout_and_sets_the_scale() {
    let base = Config::new(4, 40, Norm::RmsNorm, 1e-6).unwrap();
    let a = base
        .with_resolution(MaskResolution::Bits8)
        .with_dropout(0.1, 3, 4)
        .unwrap();
    let b = base
        .with_dropout(0.1, 3, 4)
        .unwrap()
        .with_resolution(MaskResolution::Bits8);
    use fusedreg::DtypeKind::{Bf16, F32};
    assert_eq!(a.keying(Bf16), b.keying(Bf16));
    assert_eq!(a.effective_p(F32), 26.0 / 256.0);
    assert_eq!(a.scale(Bf16), (256.0f64 / 230.0) as f32);
    let k16 = base
        .with_dropout(0.1, 3, 4)
        .unwrap()
        .with_resolution(MaskResolution::Bits16);
    assert_eq!(k16.keying(F32).threshold(), 6554);
    assert!((0..160).any(|i| a.keeps(F32, i) != k16.keeps(F32, i)));
    // Unset, the resolution follows the dtype; with_dropout keeps it unset.
    let d = base.with_dropout(0.1, 3, 4).unwrap();
    assert_eq!(d.resolution(), None);
    assert_eq!(d.keying(Bf16), k16.keying(Bf16));
    assert_eq!(d.keying(F32).resolution(), MaskResolution::Bits32);
}
