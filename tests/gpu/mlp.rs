//! The MLP example's kernels and cuBLAS layers against their CPU references.

use fusedreg::mlp::{cpu, gpu};
use fusedreg::Handle;
use libtest_mimic::Trial;

use crate::common::{bits_eq, close, rng, uniform};
use crate::harness::trials_of;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "mlp",
        &[
            ("bias_gelu_matches_cpu", bias_gelu_matches_cpu),
            ("colsum_and_mse_bit_exact", colsum_and_mse_bit_exact),
            ("linear_layers_match_cpu", linear_layers_match_cpu),
        ],
    )
}

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn bias_gelu_matches_cpu(h: &Handle) -> Result<(), String> {
    let (rows, cols) = (37, 129);
    let mut r = rng(11);
    let x: Vec<f32> = uniform(&mut r, rows * cols, -4.0, 4.0);
    let b: Vec<f32> = uniform(&mut r, cols, -1.0, 1.0);
    let da: Vec<f32> = uniform(&mut r, rows * cols, -1.0, 1.0);
    let s = h.stream();
    let (dx, db, dda) = (
        s.clone_htod(&x).map_err(e)?,
        s.clone_htod(&b).map_err(e)?,
        s.clone_htod(&da).map_err(e)?,
    );
    let mut out = s.clone_htod(&vec![f32::NAN; rows * cols]).map_err(e)?;
    gpu::bias_gelu_fwd(h, &dx, &db, &mut out).map_err(e)?;
    let got = s.clone_dtoh(&out).map_err(e)?;
    let mut want = vec![0.0; rows * cols];
    cpu::bias_gelu_fwd(&x, &b, &mut want);
    // CUDA's tanhf and libm's tanh differ in the last ulps.
    close("bias_gelu fwd", &f64s(&got), &f64s(&want), 1e-6, 1e-5)?;
    gpu::bias_gelu_bwd(h, &dx, &db, &dda, &mut out).map_err(e)?;
    let got = s.clone_dtoh(&out).map_err(e)?;
    cpu::bias_gelu_bwd(&x, &b, &da, &mut want);
    close("bias_gelu bwd", &f64s(&got), &f64s(&want), 1e-6, 1e-5)
}

fn colsum_and_mse_bit_exact(h: &Handle) -> Result<(), String> {
    let s = h.stream();
    let mut r = rng(12);
    for (rows, cols) in [(1, 5), (4096, 96), (70_001, 3)] {
        let x: Vec<f32> = uniform(&mut r, rows * cols, -1.0, 1.0);
        let dx = s.clone_htod(&x).map_err(e)?;
        let mut scratch = s
            .alloc_zeros::<f32>(gpu::colsum_scratch_len(rows, cols))
            .map_err(e)?;
        let mut out = s.clone_htod(&vec![f32::NAN; cols]).map_err(e)?;
        gpu::colsum(h, &dx, rows, &mut scratch, &mut out).map_err(e)?;
        bits_eq(
            &format!("colsum [{rows}, {cols}]"),
            &s.clone_dtoh(&out).map_err(e)?,
            &cpu::colsum(&x, rows, cols),
        )?;
    }
    for n in [1usize, 4095, 4097, 300_007] {
        let y: Vec<f32> = uniform(&mut r, n, -2.0, 2.0);
        let t: Vec<f32> = uniform(&mut r, n, -2.0, 2.0);
        let (dy_, dt) = (s.clone_htod(&y).map_err(e)?, s.clone_htod(&t).map_err(e)?);
        let mut ddy = s.clone_htod(&vec![f32::NAN; n]).map_err(e)?;
        let mut part = s.alloc_zeros::<f32>(gpu::mse_scratch_len(n)).map_err(e)?;
        gpu::mse_grad(h, &dy_, &dt, &mut ddy, &mut part).map_err(e)?;
        let loss = gpu::mse_from_partials(h, &part, n).map_err(e)?;
        let mut want = vec![0.0; n];
        let want_loss = cpu::mse_grad(&y, &t, &mut want);
        bits_eq(
            &format!("mse dy n={n}"),
            &s.clone_dtoh(&ddy).map_err(e)?,
            &want,
        )?;
        if loss.to_bits() != want_loss.to_bits() {
            return Err(format!("mse loss n={n}: gpu {loss} cpu {want_loss}"));
        }
    }
    Ok(())
}

fn linear_layers_match_cpu(h: &Handle) -> Result<(), String> {
    let blas = gpu::Blas::new(h).map_err(e)?;
    let s = h.stream();
    let (t, inp, out) = (33, 48, 20);
    let mut r = rng(13);
    let x: Vec<f32> = uniform(&mut r, t * inp, -1.0, 1.0);
    let w: Vec<f32> = uniform(&mut r, out * inp, -1.0, 1.0);
    let dy: Vec<f32> = uniform(&mut r, t * out, -1.0, 1.0);
    let (dx_, dw_, ddy) = (
        s.clone_htod(&x).map_err(e)?,
        s.clone_htod(&w).map_err(e)?,
        s.clone_htod(&dy).map_err(e)?,
    );
    let mut y = s.clone_htod(&vec![f32::NAN; t * out]).map_err(e)?;
    blas.linear_fwd(&dx_, &dw_, &mut y, inp, out).map_err(e)?;
    let mut want = vec![0.0; t * out];
    cpu::linear_fwd(&x, &w, &mut want, inp, out);
    close(
        "linear fwd",
        &f64s(&s.clone_dtoh(&y).map_err(e)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )?;
    let init: Vec<f32> = uniform(&mut r, t * inp, -1.0, 1.0);
    let mut gx = s.clone_htod(&init).map_err(e)?;
    blas.linear_bwd_input(&ddy, &dw_, &mut gx, inp, out, true)
        .map_err(e)?;
    let mut want = init.clone();
    cpu::linear_bwd_input(&dy, &w, &mut want, inp, out, true);
    close(
        "linear bwd input (accumulate)",
        &f64s(&s.clone_dtoh(&gx).map_err(e)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )?;
    let mut gw = s.clone_htod(&vec![f32::NAN; out * inp]).map_err(e)?;
    blas.linear_bwd_weight(&ddy, &dx_, &mut gw, inp, out)
        .map_err(e)?;
    let mut want = vec![0.0; out * inp];
    cpu::linear_bwd_weight(&dy, &x, &mut want, inp, out);
    close(
        "linear bwd weight",
        &f64s(&s.clone_dtoh(&gw).map_err(e)?),
        &f64s(&want),
        1e-4,
        1e-4,
    )
}
