//! `fusedreg::candle::DropoutAddNorm` on candle's CPU device (`cargo test --features candle
//! --test candle_dropout_add_norm`): forward and every gradient (x, residual, bias, gamma, beta,
//! from both outputs) against the same computation written in plain candle ops on random data,
//! with the mask rebuilt from fusedreg's keying; bit for bit against fusedreg's CPU reference in
//! every dtype; LayerNorm Scaling, evaluation, empty and strided inputs, bad input.
#![cfg(feature = "candle")]

mod candle_ops_util;
#[path = "common/dan.rs"]
mod dan;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_ops_util::*;
use dan::DanOut;
use fusedreg::candle::{DropoutAddNorm, StepKeys};
use fusedreg::dropout_add_norm::{cpu, Config, Norm};
use fusedreg::Dtype;

/// Random data with every fifth element times 10, as these tests have always drawn (the shared
/// `data` takes 100).
fn data(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    data_with_outliers(rng, n, 10.0)
}

fn var(v: &[f32], dims: &[usize]) -> candle_core::Result<Var> {
    Var::from_tensor(&tensor(v, dims)?)
}

/// `keep ? scale * rowscale : 0` per element, from fusedreg's keying, as `[rows, cols]`.
fn multiplier(cfg: &Config, dtype: DType) -> candle_core::Result<Tensor> {
    let keying = cfg.keying(kind(dtype));
    let scale = keying.scale();
    let row_multiplier = |row: usize| {
        cfg.drop_path()
            .map_or(scale, |p| scale * p.row_scale(cfg.seed(), row as u64))
    };
    multiplier_of(cfg.rows(), cfg.cols(), row_multiplier, |i| keying.keeps(i))
}

struct Case {
    dims: &'static [usize],
    norm: Norm,
    p: f64,
    residual: bool,
    bias: bool,
    beta: bool,
    path: Option<(f64, usize)>,
    layer: Option<usize>,
}

const fn case(dims: &'static [usize], norm: Norm, p: f64) -> Case {
    Case {
        dims,
        norm,
        p,
        residual: true,
        bias: true,
        beta: true,
        path: None,
        layer: None,
    }
}

const CASES: &[Case] = &[
    case(&[37, 19], Norm::LayerNorm, 0.1),
    case(&[37, 19], Norm::RmsNorm, 0.1),
    Case {
        beta: false,
        bias: false,
        ..case(&[3, 11, 33], Norm::RmsNorm, 0.25)
    },
    Case {
        path: Some((0.5, 11)),
        layer: Some(3),
        ..case(&[3, 11, 33], Norm::LayerNorm, 0.25)
    },
    Case {
        residual: false,
        path: Some((0.3, 1)),
        ..case(&[100, 7], Norm::LayerNorm, 0.3)
    },
    Case {
        residual: false,
        beta: false,
        layer: Some(4),
        ..case(&[5, 257], Norm::RmsNorm, 0.0)
    },
    Case {
        bias: false,
        ..case(&[1, 1000], Norm::LayerNorm, 0.5)
    },
    // One column: LayerNorm of a single value is beta (xhat = 0); RMSNorm is sign * gamma.
    case(&[9, 1], Norm::LayerNorm, 0.2),
    case(&[9, 1], Norm::RmsNorm, 0.2),
];

struct Inputs {
    x: Var,
    residual: Var,
    bias: Var,
    gamma: Var,
    beta: Var,
    /// Weights of the loss `sum(out * w_out) + sum(s * w_s)`: random d_out and d_s.
    w_out: Tensor,
    w_s: Tensor,
}

fn inputs(g: &mut rand::rngs::StdRng, dims: &[usize]) -> candle_core::Result<Inputs> {
    let n: usize = dims.iter().product();
    let cols = *dims.last().unwrap();
    // gamma around 1, not exactly 1, so its gradient and use are both exercised.
    let gamma: Vec<f32> = data(g, cols).iter().map(|v| 1.0 + v / 10.0).collect();
    Ok(Inputs {
        x: var(&data(g, n), dims)?,
        residual: var(&data(g, n), dims)?,
        bias: var(&data(g, cols), &[cols])?,
        gamma: var(&gamma, &[cols])?,
        beta: var(&data(g, cols), &[cols])?,
        w_out: tensor(&data(g, n), dims)?,
        w_s: tensor(&data(g, n), dims)?,
    })
}

fn site_of(c: &Case, site: u32) -> candle_core::Result<DropoutAddNorm> {
    let eps = 1e-5;
    let mut s = match c.norm {
        Norm::LayerNorm => DropoutAddNorm::layer_norm(eps, site)?,
        Norm::RmsNorm => DropoutAddNorm::rms_norm(eps, site)?,
    }
    .with_dropout(c.p)?;
    if let Some((pp, rps)) = c.path {
        s = s.with_drop_path(pp, rps)?;
    }
    if let Some(l) = c.layer {
        s = s.with_layer_norm_scaling(l)?;
    }
    Ok(s)
}

/// `(out, s)` in plain candle ops: `s = r + (x + b) * m`, LayerNorm / RMSNorm from mean, sqr,
/// sqrt and broadcasts (candle_nn's fused norms have no backward).
fn plain(c: &Case, v: &Inputs, cfg: &Config) -> candle_core::Result<(Tensor, Tensor)> {
    let m = multiplier(cfg, v.x.dtype())?.reshape(c.dims)?;
    let t = if c.bias {
        v.x.broadcast_add(&v.bias)?
    } else {
        v.x.as_tensor().clone()
    };
    let tm = (t * m)?;
    let s = if c.residual {
        (v.residual.as_tensor() + tm)?
    } else {
        tm
    };
    let eps = f64::from(cfg.eps());
    let xhat = match c.norm {
        Norm::LayerNorm => {
            let d = s.broadcast_sub(&s.mean_keepdim(D::Minus1)?)?;
            let var = d.sqr()?.mean_keepdim(D::Minus1)?;
            d.broadcast_div(&(var + eps)?.sqrt()?)?
        }
        Norm::RmsNorm => {
            let ms = s.sqr()?.mean_keepdim(D::Minus1)?;
            s.broadcast_div(&(ms + eps)?.sqrt()?)?
        }
    };
    let mut out = xhat.broadcast_mul(&v.gamma)?;
    if c.beta {
        out = out.broadcast_add(&v.beta)?;
    }
    let ls = c.layer.map_or(1.0, |l| 1.0 / (l as f64).sqrt());
    Ok(((out * ls)?, s))
}

fn run(
    site: &DropoutAddNorm,
    c: &Case,
    v: &Inputs,
    keys: Option<&StepKeys>,
) -> candle_core::Result<(Tensor, Tensor)> {
    site.forward(
        &v.x,
        c.residual.then_some(v.residual.as_tensor()),
        c.bias.then_some(v.bias.as_tensor()),
        &v.gamma,
        c.beta.then_some(v.beta.as_tensor()),
        keys,
    )
}

/// Forward and every gradient equal plain candle ops (f32) within 2e-5 of each tensor's largest
/// magnitude: `loss = sum(out * w_out) + sum(s * w_s)`, so `d_out` and `d_s` are both random.
#[test]
fn forward_and_gradients_match_plain_candle_ops() -> R {
    let mut g = rng(11);
    for (k, c) in CASES.iter().enumerate() {
        let v = inputs(&mut g, c.dims)?;
        let n: usize = c.dims.iter().product();
        let cols = *c.dims.last().unwrap();
        let site = site_of(c, 4)?;
        let keys = StepKeys::new(0xabc + k as u64, 2);
        let (out, s) = run(&site, c, &v, Some(&keys))?;
        assert_eq!((out.dims(), s.dims()), (c.dims, c.dims));
        let loss = ((&out * &v.w_out)?.sum_all()? + (&s * &v.w_s)?.sum_all()?)?;
        let grads = loss.backward()?;

        let cfg = site.config(n / cols, cols, Some(&keys))?;
        let (out_ref, s_ref) = plain(c, &v, &cfg)?;
        let loss_ref = ((&out_ref * &v.w_out)?.sum_all()? + (&s_ref * &v.w_s)?.sum_all()?)?;
        let grads_ref = loss_ref.backward()?;

        let what = |s: &str| format!("case {k} {:?} {:?}: {s}", c.dims, c.norm);
        let tol = 2e-5;
        assert_close(&what("s"), &flat(&s)?, &flat(&s_ref)?, tol);
        assert_close(&what("out"), &flat(&out)?, &flat(&out_ref)?, tol);
        let mut checked = vec![("x", &v.x), ("gamma", &v.gamma)];
        if c.residual {
            checked.push(("residual", &v.residual));
        }
        if c.bias {
            checked.push(("bias", &v.bias));
        }
        if c.beta {
            checked.push(("beta", &v.beta));
        }
        for (name, t) in checked {
            let got = grads.get(t).unwrap_or_else(|| panic!("{}", what(name)));
            let want = grads_ref.get(t).unwrap();
            assert_eq!(got.dims(), t.dims(), "{}", what(name));
            assert_close(&what(&format!("d{name}")), &flat(got)?, &flat(want)?, tol);
        }
        for (on, t) in [
            (c.residual, &v.residual),
            (c.bias, &v.bias),
            (c.beta, &v.beta),
        ] {
            assert!(on || grads.get(t).is_none(), "{}", what("unused input"));
        }
        // Some elements dropped and some kept, where p allows.
        if c.p > 0.0 && n >= 100 {
            let dx = flat(grads.get(&v.x).unwrap())?;
            let zeros = dx.iter().filter(|&&d| d == 0.0).count();
            assert!(zeros > 0 && zeros < n, "{}: {zeros} of {n}", what("mask"));
        }
    }
    Ok(())
}

/// The adapter gives exactly the bits of fusedreg's CPU reference in every dtype: out, s, dx,
/// d_residual, dgamma, dbeta, dbias. With `use_s` false only `out` takes gradient (candle then
/// hands the op zeros for `d_s`, which adds nothing).
#[test]
fn matches_the_cpu_reference_bit_for_bit() -> R {
    fn run_dtype<T: Dtype + candle_core::WithDType>(dtype: DType) -> R {
        let mut g = rng(12);
        for (k, c) in CASES.iter().enumerate() {
            for use_s in [true, false] {
                one::<T>(&mut g, dtype, k, c, use_s)?;
            }
        }
        Ok(())
    }
    fn one<T: Dtype + candle_core::WithDType>(
        g: &mut rand::rngs::StdRng,
        dtype: DType,
        k: usize,
        c: &Case,
        use_s: bool,
    ) -> R {
        let dims = c.dims;
        let n: usize = dims.iter().product();
        let cols = *dims.last().unwrap();
        let rows = n / cols;
        let cast = |v: Vec<f32>| v.into_iter().map(T::from_f32_rn).collect::<Vec<T>>();
        let (xv, rv, bv, gv, betav, dov, dsv) = (
            cast(data(g, n)),
            cast(data(g, n)),
            cast(data(g, cols)),
            cast(data(g, cols).iter().map(|v| 1.0 + v / 10.0).collect()),
            cast(data(g, cols)),
            cast(data(g, n)),
            cast(data(g, n)),
        );
        let dev = &Device::Cpu;
        let mk = |v: &[T], d: &[usize]| -> candle_core::Result<Var> {
            Var::from_tensor(&Tensor::from_slice(v, d, dev)?)
        };
        let (x, r, b, gamma, beta) = (
            mk(&xv, dims)?,
            mk(&rv, dims)?,
            mk(&bv, &[cols])?,
            mk(&gv, &[cols])?,
            mk(&betav, &[cols])?,
        );
        let (w_out, w_s) = (
            Tensor::from_slice(&dov, dims, dev)?,
            Tensor::from_slice(&dsv, dims, dev)?,
        );
        assert_eq!(x.dtype(), dtype);
        let site = site_of(c, 100 + k as u32)?;
        let keys = StepKeys::new(77, k as u64);
        let (out, s) = site.forward(
            &x,
            c.residual.then_some(r.as_tensor()),
            c.bias.then_some(b.as_tensor()),
            &gamma,
            c.beta.then_some(beta.as_tensor()),
            Some(&keys),
        )?;
        // d(sum(out * w_out)) / d(out) is w_out exactly (times 1), in every dtype.
        let mut loss = (&out * &w_out)?.sum_all()?;
        if use_s {
            loss = (loss + (&s * &w_s)?.sum_all()?)?;
        }
        let grads = loss.backward()?;

        let cfg = site.config(rows, cols, Some(&keys))?;
        let args = cpu::ForwardArgs {
            residual: c.residual.then_some(&rv[..]),
            bias: c.bias.then_some(&bv[..]),
            beta: c.beta.then_some(&betav[..]),
            ..cpu::ForwardArgs::new(&xv, &gv)
        };
        let mut f = DanOut::<T, T>::new(rows, cols);
        cpu::forward(&cfg, args, f.outs()).unwrap();
        let DanOut {
            out: out_ref,
            s: s_ref,
            mean,
            rstd,
        } = f;
        let mut dx = vec![T::default(); n];
        let mut dres = vec![T::default(); n];
        let (mut dgamma, mut dbeta, mut dbias) = (
            vec![T::default(); cols],
            vec![T::default(); cols],
            vec![T::default(); cols],
        );
        let args = cpu::BackwardArgs {
            d_s: use_s.then_some(&dsv[..]),
            ..cpu::BackwardArgs::new(&dov, &s_ref, &gv, &mean, &rstd)
        };
        let outs = cpu::BackwardOut {
            d_residual: Some(&mut dres),
            dbeta: Some(&mut dbeta),
            dbias: Some(&mut dbias),
            ..cpu::BackwardOut::new(&mut dx, &mut dgamma)
        };
        cpu::backward(&cfg, args, outs).unwrap();

        let to32 = |v: &[T]| v.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
        let what = |s: &str| format!("{dtype:?} case {k} {:?} use_s {use_s}: {s}", c.dims);
        assert_same_bits(&what("out"), &flat(&out)?, &to32(&out_ref));
        assert_same_bits(&what("s"), &flat(&s)?, &to32(&s_ref));
        let grad = |t: &Var| flat(grads.get(t).unwrap());
        assert_bits(&what("dx"), &grad(&x)?, &to32(&dx));
        assert_bits(&what("dgamma"), &grad(&gamma)?, &to32(&dgamma));
        if c.residual {
            assert_bits(&what("dresidual"), &grad(&r)?, &to32(&dres));
        }
        if c.beta {
            assert_bits(&what("dbeta"), &grad(&beta)?, &to32(&dbeta));
        }
        if c.bias {
            assert_bits(&what("dbias"), &grad(&b)?, &to32(&dbias));
        }
        Ok(())
    }
    for_each_dtype!(run_dtype)
}

/// LayerNorm Scaling multiplies the output by 1 / sqrt(layer): in f32 the scaled output is the
/// unscaled one times the factor, bit for bit (one f32 multiply on both sides), for training and
/// evaluation; `s` is untouched.
#[test]
fn layer_norm_scaling_scales_the_output() -> R {
    let mut g = rng(13);
    let c = &CASES[0];
    let v = inputs(&mut g, c.dims)?;
    let keys = StepKeys::new(3, 1);
    for layer in [1usize, 3, 4, 12] {
        for k in [Some(&keys), None] {
            let plain_site = site_of(c, 9)?;
            let scaled_site = plain_site.with_layer_norm_scaling(layer)?;
            let (o1, s1) = run(&plain_site, c, &v, k)?;
            let (o2, s2) = run(&scaled_site, c, &v, k)?;
            let f = (1.0 / (layer as f64).sqrt()) as f32;
            assert_eq!(scaled_site.layer_scale(), f);
            let want: Vec<f32> = flat(&o1)?.iter().map(|v| v * f).collect();
            assert_same_bits(&format!("layer {layer}: out"), &flat(&o2)?, &want);
            assert_same_bits(&format!("layer {layer}: s"), &flat(&s2)?, &flat(&s1)?);
        }
    }
    Ok(())
}

/// Without keys (evaluation) the op is the p = 0 computation with no drop path, forward and
/// gradients, bit for bit; LayerNorm Scaling stays.
#[test]
fn no_keys_is_the_p_zero_computation() -> R {
    let mut g = rng(14);
    for c in &CASES[..4] {
        let v = inputs(&mut g, c.dims)?;
        let train_site = site_of(c, 5)?.with_dropout(0.5)?.with_drop_path(0.5, 1)?;
        let zero = Case {
            p: 0.0,
            path: None,
            ..*c
        };
        let zero_site = site_of(&zero, 5)?;
        let keys = StepKeys::new(1, 1);
        let (o1, s1) = run(&train_site, c, &v, None)?;
        let (o2, s2) = run(&zero_site, c, &v, Some(&keys))?;
        assert_same_bits("out", &flat(&o1)?, &flat(&o2)?);
        assert_same_bits("s", &flat(&s1)?, &flat(&s2)?);
        let g1 = ((&o1 * &v.w_out)?.sum_all()? + (&s1 * &v.w_s)?.sum_all()?)?.backward()?;
        let g2 = ((&o2 * &v.w_out)?.sum_all()? + (&s2 * &v.w_s)?.sum_all()?)?.backward()?;
        for t in [&v.x, &v.gamma] {
            assert_bits(
                "grad",
                &flat(g1.get(t).unwrap())?,
                &flat(g2.get(t).unwrap())?,
            );
        }
        // And with dropout and a drop path in training, the result differs.
        let (o3, _) = run(&train_site, c, &v, Some(&keys))?;
        assert_ne!(flat(&o3)?, flat(&o1)?);
    }
    Ok(())
}

/// Strided inputs are copied: the result equals the contiguous call's, and gradients reach the
/// strided views.
#[test]
fn non_contiguous_inputs_are_copied() -> R {
    let mut g = rng(15);
    let (rows, cols) = (13, 21);
    let xt = var(&data(&mut g, rows * cols), &[cols, rows])?;
    let x = xt.t()?; // [rows, cols], strided
    assert!(!x.is_contiguous());
    let r = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
    // gamma as a strided view: every other element of a longer vector.
    let gamma_long = var(&data(&mut g, 2 * cols), &[cols, 2])?;
    let gamma = gamma_long.narrow(1, 0, 1)?.squeeze(1)?;
    assert!(!gamma.is_contiguous());
    let site = DropoutAddNorm::layer_norm(1e-5, 0)?.with_dropout(0.2)?;
    let keys = StepKeys::new(8, 8);
    let (o1, s1) = site.forward(&x, Some(&r), None, &gamma, None, Some(&keys))?;
    let (o2, s2) = site.forward(
        &x.contiguous()?,
        Some(&r),
        None,
        &gamma.contiguous()?,
        None,
        Some(&keys),
    )?;
    assert_same_bits("out", &flat(&o1)?, &flat(&o2)?);
    assert_same_bits("s", &flat(&s1)?, &flat(&s2)?);
    let grads = o1.sum_all()?.backward()?;
    assert_eq!(grads.get(&xt).unwrap().dims(), &[cols, rows]);
    assert_eq!(grads.get(&gamma_long).unwrap().dims(), &[cols, 2]);
    Ok(())
}

/// No rows: empty outputs, zero gamma/beta/bias gradients, no error.
#[test]
fn empty_input() -> R {
    let dev = &Device::Cpu;
    let x = Var::zeros((0, 8), DType::F32, dev)?;
    let r = Var::zeros((0, 8), DType::F32, dev)?;
    let gamma = Var::ones(8, DType::F32, dev)?;
    let beta = Var::ones(8, DType::F32, dev)?;
    let site = DropoutAddNorm::rms_norm(1e-6, 1)?.with_dropout(0.1)?;
    let (out, s) = site.forward(
        &x,
        Some(&r),
        Some(&beta),
        &gamma,
        Some(&beta),
        Some(&StepKeys::new(1, 1)),
    )?;
    assert_eq!((out.dims(), s.dims()), (&[0usize, 8][..], &[0usize, 8][..]));
    let grads = (out.sum_all()? + s.sum_all()?)?.backward()?;
    assert_eq!(flat(grads.get(&gamma).unwrap())?, vec![0.0; 8]);
    assert_eq!(grads.get(&x).unwrap().dims(), &[0, 8]);
    Ok(())
}

/// Bad input is an error naming the problem, never a panic.
#[test]
fn bad_input_is_an_error() -> R {
    let dev = &Device::Cpu;
    let x = Tensor::ones((4, 8), DType::F32, dev)?;
    let g8 = Tensor::ones(8, DType::F32, dev)?;
    let site = DropoutAddNorm::layer_norm(1e-5, 0)?;
    let keys = Some(StepKeys::new(1, 0));
    let k = keys.as_ref();
    let err = |r: candle_core::Result<(Tensor, Tensor)>, want: &str| {
        let e = r
            .err()
            .unwrap_or_else(|| panic!("accepted; wanted an error with {want:?}"));
        assert!(e.to_string().contains(want), "{e} (wanted {want:?})");
    };
    // dtype: unsupported, and mixed.
    let x64 = x.to_dtype(DType::F64)?;
    err(
        site.forward(&x64, None, None, &g8.to_dtype(DType::F64)?, None, k),
        "F64",
    );
    let g16 = g8.to_dtype(DType::BF16)?;
    err(site.forward(&x, None, None, &g16, None, k), "gamma");
    let r16 = x.to_dtype(DType::F16)?;
    err(site.forward(&x, Some(&r16), None, &g8, None, k), "residual");
    // shapes
    let r_bad = Tensor::ones((4, 9), DType::F32, dev)?;
    err(
        site.forward(&x, Some(&r_bad), None, &g8, None, k),
        "residual",
    );
    let g7 = Tensor::ones(7, DType::F32, dev)?;
    err(site.forward(&x, None, None, &g7, None, k), "gamma");
    let g_2d = Tensor::ones((1, 8), DType::F32, dev)?;
    err(site.forward(&x, None, None, &g_2d, None, k), "gamma");
    err(site.forward(&x, None, None, &g8, Some(&g7), k), "beta");
    err(site.forward(&x, None, Some(&g7), &g8, None, k), "bias");
    let scalar = Tensor::new(1f32, dev)?;
    err(site.forward(&scalar, None, None, &g8, None, k), "scalar");
    let no_cols = Tensor::ones((4, 0), DType::F32, dev)?;
    let g0 = Tensor::ones(0, DType::F32, dev)?;
    err(site.forward(&no_cols, None, None, &g0, None, k), "cols = 0");
    // settings
    assert!(DropoutAddNorm::layer_norm(0.0, 0).is_err());
    assert!(DropoutAddNorm::layer_norm(-1e-5, 0).is_err());
    assert!(DropoutAddNorm::rms_norm(f64::INFINITY, 0).is_err());
    assert!(site.with_dropout(1.01).is_err());
    assert!(site.with_drop_path(0.1, 0).is_err());
    assert!(site.with_layer_norm_scaling(0).is_err());
    Ok(())
}

/// Block Influence through the adapter (`DropoutAddNorm::measured`) counts exactly what the
/// library's CPU meter counts when the library's CPU reference runs the same calls: every
/// site's integers equal, in evaluation and in training (dropout + drop path), with and without
/// a bias; a call without a residual adds no rows; the plain `forward` adds nothing.
#[test]
fn block_influence_matches_the_library_meter() -> R {
    use fusedreg::candle::BlockInfluence;
    use fusedreg::redundancy;
    let mut g = rng(24);
    let (rows, cols) = (6, 40);
    let meter = BlockInfluence::new(3, &Device::Cpu)?;
    let reference = redundancy::cpu::Redundancy::new(3)?;
    let base = DropoutAddNorm::layer_norm(1e-5, 4)?.with_dropout(0.25)?;
    let sites = [base, base.with_drop_path(0.5, 2)?, base];
    let keys = StepKeys::new(9, 3);
    for (i, site) in sites.iter().enumerate() {
        for (k, keys) in [None, Some(&keys)].into_iter().enumerate() {
            let x = data(&mut g, rows * cols);
            let r: Vec<f32> = data(&mut g, rows * cols).iter().map(|v| v * 3.0).collect();
            let gamma = data(&mut g, cols);
            let bias = data(&mut g, cols);
            let with_bias = k == 1;
            let (xt, rt, gt, bt) = (
                tensor(&x, &[rows, cols])?,
                tensor(&r, &[rows, cols])?,
                tensor(&gamma, &[cols])?,
                tensor(&bias, &[cols])?,
            );
            let b = with_bias.then_some(&bt);
            let (out, s) = site
                .measured(&meter, i)?
                .forward(&xt, Some(&rt), b, &gt, None, keys)?;
            // The reference: the same call on the library's CPU reference and meter.
            let cfg = site.config(rows, cols, keys)?;
            let mut o = DanOut::<f32, f32>::new(rows, cols);
            let args = cpu::ForwardArgs {
                residual: Some(&r),
                bias: with_bias.then_some(&bias[..]),
                redundancy: Some(reference.site(i)?),
                ..cpu::ForwardArgs::new(&x, &gamma)
            };
            cpu::forward(&cfg, args, o.outs())?;
            assert_same_bits("out", &flat(&out)?, &o.out);
            assert_same_bits("s", &flat(&s)?, &o.s);
        }
        // No residual: no rows; the unmeasured forward: nothing.
        let x = tensor(&data(&mut g, rows * cols), &[rows, cols])?;
        let gamma = tensor(&data(&mut g, cols), &[cols])?;
        site.measured(&meter, i)?
            .forward(&x, None, None, &gamma, None, None)?;
        site.forward(&x, Some(&x), None, &gamma, None, None)?;
    }
    let (got, want) = (meter.stats()?, reference.stats()?);
    assert_eq!(got, want);
    assert!(got.iter().all(|s| s.rows == 2 * rows as u64), "{got:?}");
    assert_eq!(meter.bi()?, reference.bi()?);
    // Bad site, meter reset.
    assert!(base.measured(&meter, 3).is_err());
    meter.reset()?;
    assert!(meter.stats()?.iter().all(|s| s.rows == 0));
    Ok(())
}
