//! Bad input at the library's GPU entry points (issue 17; the CPU side: each op's `tests/<op>.rs`
//! and `tests/bad_input.rs`).
//! Each case ends in an `Error`, or a documented valid result checked against the CPU reference
//! bit for bit — never a panic, a NaN, or a silently wrong value.
//!
//! Entry points covered: `dropout::{forward, forward_inplace, backward}` with a residual (length
//! mismatches of every buffer, empty tensors with dbias, p rounding to 1),
//! `philox::gpu::mask_words` (indices past 2^64), and, in the `engine` section (the engine branch
//! changes this API), `multi_tensor::TensorSetBuilder::push`, `GlobalNorm::{new, set_max_norm,
//! set_loss_scale, copy_to_host_async}`, `AdamW::set_lr`.

use cudarc::driver::{DevicePtr, DevicePtrMut};
use fusedreg::dropout::{self as dr, cpu, BackwardOptions, Config, ForwardOptions};
use fusedreg::{Dtype, Handle};
use half::bf16;
use libtest_mimic::Trial;

use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
pub fn trials() -> Vec<Trial> {
    trials_of(
        "bad_input",
        &[
            ("dropout_length_mismatches_are_refused", dropout_lengths),
            ("dropout_empty_tensors_zero_dbias", dropout_empty),
            (
                "dropout_p_rounding_to_one_returns_the_residual",
                dropout_p_near_one,
            ),
            ("mask_words_past_2_64_are_refused", mask_words_overflow),
            ("engine_bad_scalars_are_refused", engine_scalars),
            (
                "engine_copy_to_host_async_empty_pinned_buffer",
                engine_empty_pinned,
            ),
        ],
    )
}

/// `dropout::forward` with the residual `r` (the case of the former `dropout_residual`).
fn fwd_r<'a, T: Dtype>(
    h: &Handle,
    cfg: &Config,
    x: &impl DevicePtr<T>,
    r: &cudarc::driver::CudaView<'a, T>,
    y: &mut impl DevicePtrMut<T>,
    opts: ForwardOptions<'a, T>,
) -> fusedreg::Result<()> {
    let opts = ForwardOptions {
        residual: Some(r.slice(..)),
        ..opts
    };
    dr::forward(h, cfg, x, y, opts)
}

fn dropout_lengths(h: &Handle) -> TestResult {
    let cfg = Config::new(3, 5, 0.25, 7, 8)?;
    let n = cfg.len();
    let ok = to_device(h, &vec![1.5f32; n + 1])?;
    let mut y = to_device(h, &vec![0.0f32; n + 1])?;
    for bad in [n - 1, n + 1, 0] {
        let (okv, badv) = (ok.slice(0..n), ok.slice(0..bad));
        {
            let mut yv = y.slice_mut(0..n);
            refused(
                "x",
                fwd_r(h, &cfg, &badv, &okv, &mut yv, Default::default()),
            )?;
            refused(
                "residual",
                fwd_r(h, &cfg, &okv, &badv, &mut yv, Default::default()),
            )?;
            refused(
                "inplace",
                dr::forward_inplace(h, &cfg, &badv, &mut yv, Default::default()),
            )?;
            refused(
                "dy",
                dr::backward(h, &cfg, &badv, &mut yv, Default::default()),
            )?;
        }
        let mut ybad = y.slice_mut(0..bad);
        refused(
            "y",
            fwd_r(h, &cfg, &okv, &okv, &mut ybad, Default::default()),
        )?;
    }
    // An option of the wrong length, with x, the residual (or dy) and y right.
    let bias = to_device(h, &[0.5f32; 6])?;
    let mut mask = to_device(h, &[0u32; 4])?;
    let mut dbias = to_device(h, &[0.0f32; 6])?;
    let okv = ok.slice(0..n);
    let mut refused_fwd = |what: &str, opts: ForwardOptions<'_, f32>| {
        refused(
            what,
            fwd_r(h, &cfg, &okv, &okv, &mut y.slice_mut(0..n), opts),
        )
    };
    for cols in [4, 6, 0] {
        let opts = ForwardOptions {
            bias: Some(bias.slice(0..cols)),
            ..Default::default()
        };
        refused_fwd("bias", opts)?;
    }
    for words in [0, cfg.mask_words() + 1] {
        let opts = ForwardOptions {
            mask_out: Some(mask.slice_mut(0..words)),
            ..Default::default()
        };
        refused_fwd("mask_out", opts)?;
    }
    for cols in [4, 6] {
        let opts = BackwardOptions {
            dbias: Some(dbias.slice_mut(0..cols)),
            ..Default::default()
        };
        refused(
            "dbias",
            dr::backward(h, &cfg, &okv, &mut y.slice_mut(0..n), opts),
        )?;
    }
    Ok(())
}

/// Zero rows with a bias gradient requested: dbias is the sum over no rows, zeros, as the CPU
/// reference writes (never the NaN the buffer held before).
fn dropout_empty(h: &Handle) -> TestResult {
    let cfg = Config::new(0, 5, 0.5, 1, 2)?;
    let one = to_device(h, &[bf16::ONE])?;
    let mut out = to_device(h, &[bf16::ONE])?;
    fwd_r(
        h,
        &cfg,
        &one.slice(0..0),
        &one.slice(0..0),
        &mut out.slice_mut(0..0),
        Default::default(),
    )?;
    let mut dbias = to_device(h, &[bf16::from_f32(f32::NAN); 5])?;
    let opts = BackwardOptions {
        dbias: Some(dbias.slice_mut(0..5)),
        ..Default::default()
    };
    dr::backward(h, &cfg, &one.slice(0..0), &mut out.slice_mut(0..0), opts)?;
    let got = h.stream().clone_dtoh(&dbias)?;
    let mut want = vec![bf16::from_f32(f32::NAN); 5];
    let copts = cpu::BackwardOptions {
        dbias: Some(&mut want[..]),
        ..Default::default()
    };
    cpu::backward::<bf16>(&cfg, &[], &mut [], copts)?;
    bits_eq("dbias over no rows", &got, &want)?;
    Ok(())
}

/// p = 1 and a p that rounds to the threshold 2^32: every element dropped, y is the residual's
/// bits (the huge 1 / (1 - p) scale is never applied), as on the CPU.
fn dropout_p_near_one(h: &Handle) -> TestResult {
    for p in [1.0, 1.0 - 2f64.powi(-34)] {
        let cfg = Config::new(5, 37, p, 3, 4)?;
        let x: Vec<f32> = (0..cfg.len()).map(|i| i as f32 - 80.0).collect();
        let r: Vec<f32> = (0..cfg.len()).map(|i| 0.5 * i as f32 + 0.25).collect();
        let (dx, dres) = (to_device(h, &x)?, to_device(h, &r)?);
        let mut dy = to_device(h, &vec![f32::NAN; cfg.len()])?;
        fwd_r(h, &cfg, &dx, &dres.as_view(), &mut dy, Default::default())?;
        let got = h.stream().clone_dtoh(&dy)?;
        bits_eq(&format!("p = {p}"), &got, &r)?;
    }
    Ok(())
}

/// `mask_words(start, n)` names indices `start .. start + n`: past 2^64 they do not exist, so a
/// range that would wrap is refused (it wrapped to index 0 on the device before).
fn mask_words_overflow(h: &Handle) -> TestResult {
    use fusedreg::philox::{gpu, mask_word};
    refused(
        "start + n > 2^64",
        gpu::mask_words(h, 1, 2, u64::MAX - 3, 8),
    )?;
    refused("start + n > 2^64", gpu::mask_words(h, 1, 2, u64::MAX, 2))?;
    // The last 4 indices exist and match the CPU.
    let got = gpu::mask_words(h, 1, 2, u64::MAX - 3, 4)?;
    let want: Vec<u32> = (0..4).map(|k| mask_word(1, 2, u64::MAX - 3 + k)).collect();
    bits_eq("last words", &got, &want)?;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// engine: multi_tensor, global_norm, adamw. Kept apart: the engine branch changes this API
// (AdamW owns its state; TensorSet only tensors).
// ------------------------------------------------------------------------------------------

fn engine_scalars(h: &Handle) -> TestResult {
    use fusedreg::adamw::{AdamW, AdamWConfig};
    use fusedreg::global_norm::GlobalNorm;
    use fusedreg::multi_tensor::TensorSet;
    let mut b = TensorSet::builder(h);
    refused(
        "param/grad lengths",
        b.push(to_device(h, &[1.0f32; 4])?, to_device(h, &[1.0f32; 3])?),
    )?;
    b.push(to_device(h, &[1.0f32; 4])?, to_device(h, &[0.5f32; 4])?)?;
    let set = b.build()?;
    for bad in [f32::NAN, f32::INFINITY, -1.0, 0.0] {
        refused("GlobalNorm::new", GlobalNorm::new(&set, Some(bad)))?;
    }
    let mut norm = GlobalNorm::new(&set, Some(1.0))?;
    for bad in [f32::NAN, f32::INFINITY, -1.0, 0.0] {
        refused("set_max_norm", norm.set_max_norm(Some(bad)))?;
        refused("set_loss_scale", norm.set_loss_scale(bad))?;
    }
    // Weight decay is the optimizer's, per tensor: non-finite or negative values are refused.
    for wd in [f32::NAN, f32::INFINITY, -1.0] {
        refused(
            "weight decay",
            AdamW::new(&set, AdamWConfig::default(), &[wd]),
        )?;
    }
    refused(
        "weight decay count",
        AdamW::new(&set, AdamWConfig::default(), &[0.0, 0.0]),
    )?;
    let mut opt = AdamW::new(&set, AdamWConfig::default(), &[0.0])?;
    for bad in [f32::NAN, f32::INFINITY, -1e-3] {
        refused("set_lr", opt.set_lr(bad))?;
    }
    for cfg in [
        AdamWConfig {
            beta1: 1.0,
            ..Default::default()
        },
        AdamWConfig {
            eps: f32::NAN,
            ..Default::default()
        },
    ] {
        refused("AdamW::new config", AdamW::new(&set, cfg, &[0.0]))?;
    }
    Ok(())
}

/// Issue 17 item 6 (intended behaviour): an empty pinned buffer is an error, not a panic
/// inside cudarc.
fn engine_empty_pinned(h: &Handle) -> TestResult {
    use fusedreg::global_norm::{GlobalNorm, NormValues};
    use fusedreg::multi_tensor::TensorSet;
    let mut b = TensorSet::builder(h);
    b.push(to_device(h, &[1.0f32; 4])?, to_device(h, &[0.5f32; 4])?)?;
    let set = b.build()?;
    let norm = GlobalNorm::new(&set, Some(1.0))?;
    match crate::harness::empty_pinned::<NormValues>(h) {
        Some(mut empty) => refused("empty pinned", norm.copy_to_host_async(&mut empty)),
        None => Ok(()), // no empty pinned buffer can exist to be passed (see empty_pinned)
    }
}
