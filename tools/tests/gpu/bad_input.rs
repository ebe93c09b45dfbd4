//! Bad input at the tools' GPU entry points (issue 17; the CPU side is `tools_bad_input.rs`).
//! Each case ends in an `Error` or a documented valid result checked against the CPU reference.
//!
//! Entry points covered: `mlp::gpu::{mse_grad, mse_from_partials, colsum, bias_gelu_fwd}`,
//! `timing::{filled, copy_bandwidth}`.

use fusedreg::Handle;
use fusedreg_tools::mlp::{cpu, gpu};
use fusedreg_tools::timing::{copy_bandwidth, filled, TimingPlan};
use libtest_mimic::Trial;

use crate::prelude::*;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "bad_input",
        &[
            ("every_tools_kernel_loads", every_tools_kernel_loads),
            ("mse_of_nothing_is_an_error", mse_of_nothing),
            ("colsum_of_no_rows_is_zero", colsum_no_rows),
            ("mlp_length_mismatches_are_refused", mlp_lengths),
            ("timing_sizes_that_overflow_are_refused", timing_overflow),
        ],
    )
}

/// Every kernel the tools launch loads into the device's context (the tools' counterpart of the
/// library's `harness::every_kernel_loads`).
fn every_tools_kernel_loads(h: &Handle) -> TestResult {
    let n = fusedreg_tools::load_all_kernels(h)?;
    if n < 6 {
        return Err(format!("only {n} tools kernels loaded, expected copy + 5 mlp kernels").into());
    }
    Ok(())
}

/// Issue 17 item 5: `mse_from_partials(.., n = 0)` returned NaN (0 / 0) where the CPU refuses
/// n = 0; `mse_grad` on empty buffers returned Ok and wrote nothing. Both are errors now.
fn mse_of_nothing(h: &Handle) -> TestResult {
    let s = h.stream();
    let partials = s.clone_htod(&[0.0f32; 4])?;
    refused(
        "mse_from_partials(n = 0)",
        gpu::mse_from_partials(h, &partials, 0),
    )?;
    let one = s.clone_htod(&[1.0f32])?;
    let mut dy = s.clone_htod(&[1.0f32])?;
    let mut part = s.clone_htod(&[0.0f32])?;
    refused(
        "mse_grad of nothing",
        gpu::mse_grad(
            h,
            &one.slice(0..0),
            &one.slice(0..0),
            &mut dy.slice_mut(0..0),
            &mut part,
        ),
    )?;
    // The CPU agrees.
    refused("cpu mse_grad of nothing", cpu::mse_grad(&[], &[], &mut []))
}

/// The column sums of zero rows are zeros, as the CPU reference returns; the output buffer held
/// NaN before (the kernel wrapper used to return without writing it).
fn colsum_no_rows(h: &Handle) -> TestResult {
    let s = h.stream();
    let x = s.clone_htod(&[1.0f32])?;
    let mut scratch = s.clone_htod(&[0.0f32])?;
    let mut out = s.clone_htod(&[f32::NAN; 7])?;
    gpu::colsum(h, &x.slice(0..0), 0, &mut scratch, &mut out)?;
    let got = s.clone_dtoh(&out)?;
    bits_eq("colsum of no rows", &got, &cpu::colsum(&[], 0, 7)?)?;
    Ok(())
}

fn mlp_lengths(h: &Handle) -> TestResult {
    let s = h.stream();
    let x = s.clone_htod(&[0.5f32; 13])?;
    let mut out = s.clone_htod(&[0.0f32; 13])?;
    let bias = s.clone_htod(&[0.1f32; 5])?;
    // 12 elements are not whole rows of 5; out of another length; scratch too small.
    refused(
        "bias_gelu_fwd rows",
        gpu::bias_gelu_fwd(h, &x.slice(0..12), &bias, &mut out.slice_mut(0..12)),
    )?;
    refused(
        "bias_gelu_fwd out",
        gpu::bias_gelu_fwd(h, &x.slice(0..10), &bias, &mut out.slice_mut(0..11)),
    )?;
    let mut scratch = s.clone_htod(&[0.0f32; 1])?;
    let mut sums = s.clone_htod(&[0.0f32; 5])?;
    refused(
        "colsum scratch",
        gpu::colsum(h, &x.slice(0..10), 2, &mut scratch, &mut sums),
    )?;
    refused(
        "colsum x",
        gpu::colsum(h, &x.slice(0..11), 2, &mut scratch, &mut sums),
    )?;
    let partials = s.clone_htod(&[0.0f32; 1])?;
    refused("mse partials", gpu::mse_from_partials(h, &partials, 4097))
}

/// Issue 17 item 8: byte sizes that overflow are refused before anything is allocated (they
/// overflowed inside `copy_bandwidth` and inside cudarc's allocation).
fn timing_overflow(h: &Handle) -> TestResult {
    refused(
        "filled::<f32>(usize::MAX / 4 + 1)",
        filled::<f32>(h, usize::MAX / 4 + 1, 1),
    )?;
    refused("filled::<u64>(usize::MAX)", filled::<u64>(h, usize::MAX, 1))?;
    refused(
        "copy_bandwidth(u64::MAX)",
        copy_bandwidth(h, u64::MAX, TimingPlan::quick()),
    )?;
    refused(
        "copy_bandwidth(u64::MAX - 15)",
        copy_bandwidth(h, u64::MAX - 15, TimingPlan::quick()),
    )
}
