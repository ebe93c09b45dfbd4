//! Fused bias + activation + dropout on the device against the CPU reference, for every
//! activation and dtype, vector and scalar paths (aligned views with `cols % vec == 0`; views at
//! element 1 and odd widths), p = 0 / p = 1, the saved-h backward, inf/NaN inputs, 32- and
//! 16-bit keying, and the unfused baseline against its CPU mirror. In `Math::Exact` every output
//! (y, h_out, dx, dbias) is bit for bit; in `Math::Fast` (the default for GELU and SiLU) the
//! mask, the dropped `+0` and h_out are bit for bit and y, dx, dbias lie within the bounds stated
//! in the module docs (`tests/common/bias_act_fast.rs`), against the f64 reference.
//!
//! Outputs are poisoned before the kernels run, and every output view has a sentinel element on
//! each side that must survive.
#![allow(clippy::needless_range_loop)]

use fusedreg::bias_act_dropout::{self as bad, cpu, unfused, Activation, Config, Preact};
use fusedreg::dropping::MaskResolution;
use fusedreg::{Dtype, Handle, Math};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::prelude::*;

#[path = "../common/bias_act_fast.rs"]
pub(crate) mod fastcheck;

/// Both math modes (ReLU runs the same code in either).
const MATHS: [Math; 2] = [Math::Exact, Math::Fast];

/// Every activation under both math modes.
fn act_maths() -> impl Iterator<Item = (Activation, Math)> {
    Activation::ALL
        .into_iter()
        .flat_map(|a| MATHS.map(|m| (a, m)))
}

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "bias_act_dropout",
        &[
            ("shapes_f32", shapes::<f32>),
            ("shapes_f16", shapes::<f16>),
            ("shapes_bf16", shapes::<bf16>),
            ("edge_rates_f32", edge_rates::<f32>),
            ("edge_rates_bf16", edge_rates::<bf16>),
            ("saved_h_f32", saved_h::<f32>),
            ("saved_h_bf16", saved_h::<bf16>),
            ("inf_and_nan_inputs_f32", specials::<f32>),
            ("inf_and_nan_inputs_f16", specials::<f16>),
            ("inf_and_nan_inputs_bf16", specials::<bf16>),
            ("fast_edge_values_f32", fast_edges::<f32>),
            ("fast_edge_values_bf16", fast_edges::<bf16>),
            ("key16_f32", key16::<f32>),
            ("key16_bf16", key16::<bf16>),
            ("large_tensor_bf16", large_tensor),
            ("empty_inputs", empty_inputs),
            ("unfused_matches_its_cpu_mirror_f32", unfused_mirror::<f32>),
            ("unfused_matches_its_cpu_mirror_f16", unfused_mirror::<f16>),
            (
                "unfused_matches_its_cpu_mirror_bf16",
                unfused_mirror::<bf16>,
            ),
            ("bad_input_is_an_error", bad_input_is_an_error),
        ],
    )
}

/// Bit-for-bit, except that any NaN equals any NaN (the GPU's NaN payloads are canonical, the
/// CPU's are not; every other bit must match).
fn same_bits<T: Dtype>(what: &str, got: &[T], want: &[T]) -> TestResult {
    let g: Vec<u32> = got.iter().map(|v| canon(v.to_f32())).collect();
    let w: Vec<u32> = want.iter().map(|v| canon(v.to_f32())).collect();
    bits_eq(what, &g, &w)?;
    Ok(())
}

fn canon(v: f32) -> u32 {
    if v.is_nan() {
        0x7fff_ffff
    } else {
        v.to_bits()
    }
}

/// Runs forward (with h_out) and backward (recomputing h, with dbias) on the GPU with views at
/// `off` and compares every output with the CPU reference.
fn run_case<T: Dtype>(
    h: &Handle,
    cfg: &Config,
    x: &[T],
    b: Option<&[T]>,
    dy: &[T],
    off: usize,
) -> TestResult {
    let s = h.stream();
    let n = cfg.len();
    let what = format!(
        "{:?} {:?} {:?} [{}, {}] p {} off {off} {}",
        cfg.act(),
        cfg.math(),
        cfg.resolution(),
        cfg.rows(),
        cfg.cols(),
        cfg.rate().p(),
        T::KIND.name()
    );
    // Math::Fast is held to its bound, Math::Exact (and ReLU in either mode) to the bits.
    let fast = cfg.math() == Math::Fast && cfg.act() != Activation::Relu;
    let h32: Vec<f32> = (0..n)
        .map(|i| match b {
            Some(b) => x[i].to_f32() + b[i % cfg.cols()].to_f32(),
            None => x[i].to_f32(),
        })
        .collect();
    let sent = T::from_f32_rn(-7.0);
    let dx_ = upload(s, x, off, sent)?;
    let db_ = b.map(|b| upload(s, b, off, sent)).transpose()?;
    let ddy = upload(s, dy, off, sent)?;
    let mut dy_out = upload(s, &vec![poison::<T>(); n], off, sent)?;
    let mut dh = upload(s, &vec![poison::<T>(); n], off, sent)?;
    {
        let xv = dx_.slice(off..off + n);
        let bv = db_.as_ref().map(|b| b.slice(off..off + cfg.cols()));
        let mut yv = dy_out.slice_mut(off..off + n);
        let hv = dh.slice_mut(off..off + n);
        bad::forward(h, cfg, &xv, bv, &mut yv, Some(hv))?;
    }
    let y = download(s, &dy_out, off, sent, "y")?;
    let hh = download(s, &dh, off, sent, "h_out")?;
    let (mut wy, mut wh) = (vec![poison::<T>(); n], vec![poison::<T>(); n]);
    cpu::forward(cfg, x, b, &mut wy, Some(&mut wh))?;
    same_bits(&format!("{what}: h_out"), &hh, &wh)?;
    if fast {
        let mut f = fastcheck::Failures::default();
        fastcheck::check_forward(cfg, &h32, &y, &mut f);
        f.result(&format!("{what}: y"))?;
    } else {
        same_bits(&format!("{what}: y"), &y, &wy)?;
    }

    let mut ddx = upload(s, &vec![poison::<T>(); n], off, sent)?;
    let mut ddb = upload(s, &vec![poison::<T>(); cfg.cols()], off, sent)?;
    {
        let xv = dx_.slice(off..off + n);
        let bv = db_.as_ref().map(|b| b.slice(off..off + cfg.cols()));
        let dyv = ddy.slice(off..off + n);
        let mut dxv = ddx.slice_mut(off..off + n);
        let dbv = ddb.slice_mut(off..off + cfg.cols());
        bad::backward(
            h,
            cfg,
            &dyv,
            Preact::X { x: xv, bias: bv },
            &mut dxv,
            Some(dbv),
        )?;
    }
    let dx = download(s, &ddx, off, sent, "dx")?;
    let db = download(s, &ddb, off, sent, "dbias")?;
    let (mut wdx, mut wdb) = (vec![poison::<T>(); n], vec![poison::<T>(); cfg.cols()]);
    cpu::backward(cfg, dy, Preact::X { x, bias: b }, &mut wdx, Some(&mut wdb))?;
    if fast {
        let mut f = fastcheck::Failures::default();
        fastcheck::check_backward(cfg, &h32, dy, &dx, Some(&db), &mut f);
        f.result(&format!("{what}: dx, dbias"))?;
    } else {
        same_bits(&format!("{what}: dx"), &dx, &wdx)?;
        same_bits(&format!("{what}: dbias"), &db, &wdb)?;
    }
    // Without dbias the dx is the same.
    {
        let xv = dx_.slice(off..off + n);
        let bv = db_.as_ref().map(|b| b.slice(off..off + cfg.cols()));
        let dyv = ddy.slice(off..off + n);
        let mut dxv = ddx.slice_mut(off..off + n);
        bad::backward(h, cfg, &dyv, Preact::X { x: xv, bias: bv }, &mut dxv, None)?;
    }
    let dx2 = download(s, &ddx, off, sent, "dx (no dbias)")?;
    // The same kernel with and without dbias: the same bits in either mode.
    same_bits(&format!("{what}: dx without dbias"), &dx2, &dx)
}

fn shapes<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0xba5e);
    let vec = 16 / T::KIND.size();
    // Vector path: cols % vec == 0 and off 0; scalar path: odd cols or off 1. Row counts cross
    // the lane (4) and slab boundaries; one shape has more than 64 slab rows.
    let shapes = [
        (1, 1),
        (1, 7),
        (3, vec),
        (5, 3 * vec),
        (37, 64 * vec + vec),
        (130, 33),
        (67, 1000),
        (2000, 24),
    ];
    for (act, math) in act_maths() {
        for &(rows, cols) in &shapes {
            for off in [0, 1] {
                for with_bias in [true, false] {
                    let cfg = Config::new(rows, cols, act, 0.3, 0x1234 + rows as u64, 17)?
                        .with_math(math);
                    let x = uniform::<T>(&mut g, rows * cols, -6.0, 6.0);
                    let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
                    let dy = uniform::<T>(&mut g, rows * cols, -2.0, 2.0);
                    run_case(h, &cfg, &x, with_bias.then_some(&b[..]), &dy, off)?;
                }
            }
        }
    }
    Ok(())
}

fn edge_rates<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0xed9e);
    for (act, math) in act_maths() {
        for p in [0.0, 1.0 / 256.0, 0.5, 1.0] {
            let (rows, cols) = (19, 128);
            let cfg = Config::new(rows, cols, act, p, 99, 5)?.with_math(math);
            let x = uniform::<T>(&mut g, rows * cols, -4.0, 4.0);
            let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
            let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
            run_case(h, &cfg, &x, Some(&b), &dy, 0)?;
            run_case(h, &cfg, &x, Some(&b), &dy, 1)?;
        }
    }
    Ok(())
}

/// The backward reading a saved h (the forward's h_out) against the CPU doing the same.
fn saved_h<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0x5a7e);
    let s = h.stream();
    for (act, math) in act_maths() {
        for (rows, cols, off) in [(33, 256, 0), (33, 255, 1)] {
            let cfg = Config::new(rows, cols, act, 0.2, 3, 3)?.with_math(math);
            let n = cfg.len();
            let hh = uniform::<T>(&mut g, n, -5.0, 5.0);
            let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
            let sent = T::from_f32_rn(-7.0);
            let dh = upload(s, &hh, off, sent)?;
            let ddy = upload(s, &dy, off, sent)?;
            let mut ddx = upload(s, &vec![poison::<T>(); n], off, sent)?;
            let mut ddb = upload(s, &vec![poison::<T>(); cols], off, sent)?;
            {
                let hv = dh.slice(off..off + n);
                let dyv = ddy.slice(off..off + n);
                let mut dxv = ddx.slice_mut(off..off + n);
                let dbv = ddb.slice_mut(off..off + cols);
                bad::backward(h, &cfg, &dyv, Preact::H(hv), &mut dxv, Some(dbv))?;
            }
            let dx = download(s, &ddx, off, sent, "dx")?;
            let db = download(s, &ddb, off, sent, "dbias")?;
            let (mut wdx, mut wdb) = (vec![poison::<T>(); n], vec![poison::<T>(); cols]);
            cpu::backward(&cfg, &dy, Preact::H(&hh[..]), &mut wdx, Some(&mut wdb))?;
            if math == Math::Fast && act != Activation::Relu {
                let h32: Vec<f32> = hh.iter().map(|v| v.to_f32()).collect();
                let mut f = fastcheck::Failures::default();
                fastcheck::check_backward(&cfg, &h32, &dy, &dx, Some(&db), &mut f);
                f.result(&format!("{act:?} fast saved h"))?;
            } else {
                same_bits(&format!("{act:?} saved h: dx"), &dx, &wdx)?;
                same_bits(&format!("{act:?} saved h: dbias"), &db, &wdb)?;
            }
        }
    }
    Ok(())
}

/// Inputs with infinities, NaNs, zeros, huge and tiny values: NaN compares as a class.
fn specials<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0x0ddc);
    let vals = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.0,
        -0.0,
        1e4,
        -1e4,
        30.0,
        -30.0,
        1e-6,
    ];
    for (act, math) in act_maths() {
        let (rows, cols) = (16, 64);
        let cfg = Config::new(rows, cols, act, 0.25, 1, 1)?.with_math(math);
        let mut x = uniform::<T>(&mut g, rows * cols, -8.0, 8.0);
        for (i, v) in x.iter_mut().enumerate().step_by(5) {
            *v = T::from_f32_rn(vals[(i / 5) % vals.len()]);
        }
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let mut dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
        for (i, v) in dy.iter_mut().enumerate().step_by(7) {
            *v = T::from_f32_rn(vals[(i / 7) % vals.len()]);
        }
        run_case(h, &cfg, &x, Some(&b), &dy, 0)?;
        run_case(h, &cfg, &x, Some(&b), &dy, 1)?;
    }
    Ok(())
}

/// A tensor with many slabs and rows (the slab partition at its largest rows per slab).
fn large_tensor(h: &Handle) -> TestResult {
    let mut g = rng(0x1a26e);
    let (rows, cols) = (4099, 1032);
    let x = uniform::<bf16>(&mut g, rows * cols, -4.0, 4.0);
    let b = uniform::<bf16>(&mut g, cols, -1.0, 1.0);
    let dy = uniform::<bf16>(&mut g, rows * cols, -1.0, 1.0);
    for math in MATHS {
        let cfg = Config::new(rows, cols, Activation::GeluTanh, 0.1, 7, 8)?.with_math(math);
        run_case(h, &cfg, &x, Some(&b), &dy, 0)?;
    }
    Ok(())
}

/// Math::Fast on the values where its formulas change regime: 0, ±tiny and subnormal, the zero
/// crossings of act', the clamps (±9, ±16, ±80), where 2^z overflows or flushes (GELU tanh
/// near -10, SiLU near ±88), the saturation bounds, huge values, ±inf and NaN; with dy
/// random. Both paths, every activation.
fn fast_edges<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0xfa57);
    let mut vals = vec![
        0.0f32,
        -0.0,
        1e-30,
        -1e-30,
        1e-40,
        -1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3e38,
        -3e38,
    ];
    for v in [
        0.5f32, 0.7518, 1.278, 4.0, 7.9, 9.0, 9.5, 10.0, 10.2, 13.0, 15.9, 16.0, 16.5, 80.0, 87.5,
        88.8, 100.0, 128.0, 200.0,
    ] {
        vals.push(v);
        vals.push(-v);
    }
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
        let (rows, cols) = (9, 64);
        let cfg = Config::new(rows, cols, act, 0.1, 21, 22)?.with_math(Math::Fast);
        let n = rows * cols;
        let x: Vec<T> = (0..n)
            .map(|i| T::from_f32_rn(vals[i % vals.len()]))
            .collect();
        let dy = uniform::<T>(&mut g, n, -2.0, 2.0);
        run_case(h, &cfg, &x, None, &dy, 0)?;
        run_case(h, &cfg, &x, None, &dy, 1)?;
    }
    Ok(())
}

/// 16-bit keying (`MaskResolution::Bits16`) in both math modes, both paths, with and without
/// bias: the CPU reference keys the same halfwords.
fn key16<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0x1616);
    for (act, math) in act_maths() {
        for p in [0.1, 0.5] {
            for &(rows, cols) in &[(37usize, 136usize), (21, 33)] {
                let cfg = Config::new(rows, cols, act, p, 5, 6)?
                    .with_math(math)
                    .with_resolution(MaskResolution::Bits16);
                let x = uniform::<T>(&mut g, rows * cols, -5.0, 5.0);
                let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
                let dy = uniform::<T>(&mut g, rows * cols, -1.0, 1.0);
                run_case(h, &cfg, &x, Some(&b), &dy, 0)?;
                run_case(h, &cfg, &x, None, &dy, 1)?;
            }
        }
    }
    Ok(())
}

fn empty_inputs(h: &Handle) -> TestResult {
    let s = h.stream();
    let cfg = Config::new(0, 24, Activation::Silu, 0.1, 1, 1)?;
    let x = s.alloc_zeros::<f32>(0)?;
    let mut y = s.alloc_zeros::<f32>(0)?;
    bad::forward(h, &cfg, &x, None, &mut y, None)?;
    let mut dx = s.alloc_zeros::<f32>(0)?;
    let mut db = s.clone_htod(&[f32::NAN; 24])?;
    bad::backward(
        h,
        &cfg,
        &x,
        Preact::X {
            x: x.as_view(),
            bias: None,
        },
        &mut dx,
        Some(db.as_view_mut()),
    )?;
    let got = s.clone_dtoh(&db)?;
    if got.iter().any(|v| v.to_bits() != 0) {
        return Err(format!("dbias of no rows should be +0: {got:?}").into());
    }
    Ok(())
}

fn unfused_mirror<T: Dtype>(h: &Handle) -> TestResult {
    let mut g = rng(0x0f05);
    let s = h.stream();
    for act in Activation::ALL {
        let (rows, cols) = (45, 257);
        let cfg = Config::new(rows, cols, act, 0.2, 11, 12)?;
        let n = cfg.len();
        let x = uniform::<T>(&mut g, n, -4.0, 4.0);
        let b = uniform::<T>(&mut g, cols, -1.0, 1.0);
        let dy = uniform::<T>(&mut g, n, -1.0, 1.0);
        let (dxx, dbb, ddy) = (s.clone_htod(&x)?, s.clone_htod(&b)?, s.clone_htod(&dy)?);
        let mut dyo = s.clone_htod(&vec![poison::<T>(); n])?;
        let mut dm = s.clone_htod(&vec![7u8; n])?;
        let mut dh = s.clone_htod(&vec![poison::<T>(); n])?;
        unfused::forward(h, &cfg, &dxx, &dbb, &mut dyo, &mut dm, &mut dh)?;
        let (mut wy, mut wm, mut wh) =
            (vec![poison::<T>(); n], vec![0u8; n], vec![poison::<T>(); n]);
        unfused::forward_cpu(&cfg, &x, &b, &mut wy, &mut wm, &mut wh)?;
        same_bits("unfused y", &s.clone_dtoh(&dyo)?, &wy)?;
        same_bits("unfused h", &s.clone_dtoh(&dh)?, &wh)?;
        bits_eq("unfused mask", &s.clone_dtoh(&dm)?, &wm)?;
        let mut ddx = s.clone_htod(&vec![poison::<T>(); n])?;
        let mut ddb = s.clone_htod(&vec![poison::<T>(); cols])?;
        unfused::backward(h, &cfg, &ddy, &dm, &dh, &mut ddx, Some(ddb.as_view_mut()))?;
        let (mut wdx, mut wdb) = (vec![poison::<T>(); n], vec![poison::<T>(); cols]);
        unfused::backward_cpu(&cfg, &dy, &wm, &wh, &mut wdx, Some(&mut wdb))?;
        same_bits("unfused dx", &s.clone_dtoh(&ddx)?, &wdx)?;
        same_bits("unfused dbias", &s.clone_dtoh(&ddb)?, &wdb)?;
    }
    Ok(())
}

fn bad_input_is_an_error(h: &Handle) -> TestResult {
    let s = h.stream();
    let cfg = Config::new(4, 8, Activation::Relu, 0.1, 1, 1)?;
    let x = s.alloc_zeros::<f32>(32)?;
    let short = s.alloc_zeros::<f32>(31)?;
    let mut y = s.alloc_zeros::<f32>(32)?;
    let shape = |r: fusedreg::Result<()>| matches!(r, Err(fusedreg::Error::ShapeMismatch { .. }));
    if !shape(bad::forward(h, &cfg, &short, None, &mut y, None)) {
        return Err("short x accepted".into());
    }
    let b7 = s.alloc_zeros::<f32>(7)?;
    if !shape(bad::forward(h, &cfg, &x, Some(b7.as_view()), &mut y, None)) {
        return Err("short bias accepted".into());
    }
    if !shape(bad::backward(
        h,
        &cfg,
        &x,
        Preact::H(short.as_view()),
        &mut y,
        None,
    )) {
        return Err("short h accepted".into());
    }
    let mut db = s.alloc_zeros::<f32>(9)?;
    if !shape(bad::backward(
        h,
        &cfg,
        &x,
        Preact::H(x.as_view()),
        &mut y,
        Some(db.as_view_mut()),
    )) {
        return Err("long dbias accepted".into());
    }
    Ok(())
}
