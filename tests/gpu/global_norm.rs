//! Global norm on the GPU against the CPU mirror, bit for bit: partials, reductions, finalize,
//! per-tensor norms, the scale pass, the data-parallel hook, alignment paths, many tensors.

use std::fmt::Display;

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use fusedreg::global_norm::{cpu, GlobalNorm, NormValues};
use fusedreg::multi_tensor::{Layout, TensorSet};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::common::{bits_eq, rng, uniform};
use crate::harness::trials_of;

pub fn trials() -> Vec<Trial> {
    trials_of(
        "global_norm",
        &[
            ("norm_bit_exact_vs_cpu_f32", norm_bit_exact_f32),
            ("norm_bit_exact_vs_cpu_bf16", norm_bit_exact_bf16),
            ("norm_bit_exact_vs_cpu_f16", norm_bit_exact_f16),
            ("repeated_runs_are_bit_identical", repeated_runs_identical),
            ("misaligned_grads_take_the_scalar_path", misaligned_grads),
            ("per_tensor_norms_match_cpu", per_tensor_norms),
            ("staged_allreduce_hook", staged_allreduce_hook),
            ("scale_pass_matches_cpu", scale_pass),
            ("nonfinite_gradients_set_the_flag", nonfinite_flag),
            ("all_zero_size_tensors", all_zero_size),
            ("ten_thousand_tiny_tensors", ten_thousand_tiny),
            ("loss_scale_on_the_device", loss_scale),
            ("async_copy_into_pinned_memory", async_copy),
            (
                "async_copy_into_an_empty_pinned_buffer_is_an_error",
                async_copy_empty,
            ),
        ],
    )
}

pub fn e(x: impl Display) -> String {
    x.to_string()
}

/// Sizes crossing every vector and chunk boundary; zero-size tensors first, inside and last.
pub const SIZES: &[usize] = &[
    0, 1, 3, 4, 5, 7, 8, 9, 15, 17, 65_535, 0, 65_536, 65_537, 278_011, 196_609, 2049, 0,
];

/// Uploads `v` (never empty: zero-byte allocations are not portable; register zero-size
/// tensors with `push_empty` / `push_grad_empty`).
pub fn upload<T: DeviceRepr + Clone>(h: &Handle, v: &[T]) -> Result<CudaSlice<T>, String> {
    if v.is_empty() {
        return Err("upload of an empty vector: use push_empty".into());
    }
    h.stream().clone_htod(v).map_err(e)
}

/// Downloads a buffer (nothing to copy for an empty one).
pub fn download<T: DeviceRepr + Clone + Default>(
    h: &Handle,
    v: &impl DevicePtr<T>,
) -> Result<Vec<T>, String> {
    if v.len() == 0 {
        Ok(Vec::new())
    } else {
        h.stream().clone_dtoh(v).map_err(e)
    }
}

fn random_grads<G: Dtype>(seed: u64, sizes: &[usize]) -> Vec<Vec<G>> {
    let mut r = rng(seed);
    sizes
        .iter()
        .map(|&n| uniform::<G>(&mut r, n, -2.0, 2.0))
        .collect()
}

fn refs<G>(v: &[Vec<G>]) -> Vec<&[G]> {
    v.iter().map(|x| &x[..]).collect()
}

fn grad_set<G: Dtype>(h: &Handle, grads: &[Vec<G>]) -> Result<TensorSet, String> {
    let mut b = TensorSet::builder(h);
    for g in grads {
        if g.is_empty() {
            b.push_grad_empty::<G>().map_err(e)?;
        } else {
            b.push_grad(upload(h, g)?).map_err(e)?;
        }
    }
    b.build().map_err(e)
}

pub fn values_eq(what: &str, got: &NormValues, want: &NormValues) -> Result<(), String> {
    bits_eq(what, &[*got], &[*want])
}

fn norm_bit_exact<G: Dtype>(h: &Handle, seed: u64) -> Result<(), String> {
    let grads = random_grads::<G>(seed, SIZES);
    let set = grad_set(h, &grads)?;
    let want_p = cpu::partials(&refs(&grads)).map_err(e)?;
    let true_norm = cpu::norm_f64(&refs(&grads));
    // Clip below and above the norm.
    for max_norm in [
        Some((true_norm * 0.5) as f32),
        Some((true_norm * 2.0) as f32),
        None,
    ] {
        let mut norm = GlobalNorm::new(&set, max_norm).map_err(e)?;
        let before = h.launch_count();
        norm.compute(&set).map_err(e)?;
        if h.launch_count() - before != 2 {
            return Err(format!(
                "compute made {} launches, expected 2",
                h.launch_count() - before
            ));
        }
        bits_eq("partials", &norm.read_partials().map_err(e)?, &want_p)?;
        let want = cpu::global_norm(&refs(&grads), max_norm, 1.0).map_err(e)?;
        let got = norm.read().map_err(e)?;
        values_eq(
            &format!("{} norm values, max_norm {max_norm:?}", G::KIND.name()),
            &got,
            &want,
        )?;
        if (f64::from(got.norm) - true_norm).abs() > 2e-6 * true_norm {
            return Err(format!("norm {} vs f64 {true_norm}", got.norm));
        }
        let clipped = max_norm.is_some_and(|m| f64::from(m) < true_norm);
        if clipped != (got.coef < 1.0) {
            return Err(format!("coef {} with max_norm {max_norm:?}", got.coef));
        }
    }
    Ok(())
}

fn norm_bit_exact_f32(h: &Handle) -> Result<(), String> {
    norm_bit_exact::<f32>(h, 1)
}

fn norm_bit_exact_bf16(h: &Handle) -> Result<(), String> {
    norm_bit_exact::<bf16>(h, 2)
}

fn norm_bit_exact_f16(h: &Handle) -> Result<(), String> {
    norm_bit_exact::<f16>(h, 3)
}

fn repeated_runs_identical(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<f32>(4, &[1_000_003, 65_537, 3]);
    let set = grad_set(h, &grads)?;
    let mut a = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    let mut b = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    a.compute(&set).map_err(e)?;
    let first = a.read().map_err(e)?;
    for _ in 0..3 {
        a.compute(&set).map_err(e)?;
        values_eq("repeat", &a.read().map_err(e)?, &first)?;
        b.compute(&set).map_err(e)?;
        values_eq("second object", &b.read().map_err(e)?, &first)?;
    }
    let want = cpu::global_norm(&refs(&grads), Some(1.0), 1.0).map_err(e)?;
    values_eq("vs cpu", &first, &want)
}

/// Registers `grads` as views starting `offset` elements into larger buffers.
fn misaligned_set<G: Dtype>(
    h: &Handle,
    grads: &[Vec<G>],
    offset: usize,
) -> Result<(TensorSet, Vec<CudaSlice<G>>), String> {
    let mut backing = Vec::new();
    let mut b = TensorSet::builder(h);
    for g in grads {
        let mut host = vec![G::from_f32_rn(7.0); g.len() + offset + 1];
        host[offset..offset + g.len()].copy_from_slice(g);
        let buf = h.stream().clone_htod(&host).map_err(e)?;
        let (ptr, guard) = buf.device_ptr(h.stream());
        drop(guard);
        let addr = ptr + (offset * G::KIND.size()) as u64;
        // SAFETY: `buf` holds g.len() elements after `offset`, lives in `backing` as long as the
        // set, and is used on the handle's stream only.
        unsafe { b.push_grad_raw(addr, g.len() as u64, G::KIND) }.map_err(e)?;
        backing.push(buf);
    }
    Ok((b.build().map_err(e)?, backing))
}

fn misaligned_grads(h: &Handle) -> Result<(), String> {
    fn one<G: Dtype>(h: &Handle, seed: u64, offset: usize) -> Result<(), String> {
        let grads = random_grads::<G>(seed, &[65_537, 278_011, 9, 0]);
        let (set, _backing) = misaligned_set(h, &grads, offset)?;
        if set.is_grad_aligned16(0) {
            return Err("a view at an odd element reported 16-byte alignment".into());
        }
        let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
        norm.compute(&set).map_err(e)?;
        let want_p = cpu::partials(&refs(&grads)).map_err(e)?;
        bits_eq(
            &format!("{} partials, view at element {offset}", G::KIND.name()),
            &norm.read_partials().map_err(e)?,
            &want_p,
        )?;
        let want = cpu::global_norm(&refs(&grads), Some(1.0), 1.0).map_err(e)?;
        values_eq("misaligned norm", &norm.read().map_err(e)?, &want)
    }
    one::<f32>(h, 5, 1)?;
    one::<f32>(h, 6, 2)?; // 8-byte aligned: still not 16
    one::<bf16>(h, 7, 1)?;
    one::<f16>(h, 8, 3)
}

fn per_tensor_norms(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<bf16>(9, SIZES);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, None).map_err(e)?;
    if norm.read_per_tensor().is_ok() {
        return Err("read_per_tensor before per_tensor() must be an error".into());
    }
    norm.compute(&set).map_err(e)?;
    norm.per_tensor(&set).map_err(e)?;
    let (sums, norms) = norm.read_per_tensor().map_err(e)?;
    let layout = set.layout();
    let (want_s, want_n) = cpu::per_tensor(layout, &cpu::partials(&refs(&grads)).map_err(e)?);
    bits_eq("per-tensor sumsq", &sums, &want_s)?;
    bits_eq("per-tensor norms", &norms, &want_n)
}

fn staged_allreduce_hook(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<f32>(10, &[300_001, 17]);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(0.25)).map_err(e)?;
    norm.partials(&set).map_err(e)?;
    norm.reduce().map_err(e)?;
    let local = cpu::reduce(&cpu::partials(&refs(&grads)).map_err(e)?);
    let got = norm.read().map_err(e)?;
    bits_eq("stage B sumsq", &[got.sumsq], &[local])?;
    if got.coef != 1.0 || got.grad_scale != 1.0 {
        return Err("reduce() alone must not finalize".into());
    }
    // Stand-in for ncclAllReduce over 3 ranks holding the same shard: sumsq *= 3, in place.
    let summed = local * 3.0;
    // SAFETY: the address is the f64 at the start of the norm's 24-byte result buffer, live for
    // `norm`'s lifetime; the copy is ordered on the handle's stream.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(
            norm.sumsq_device_ptr(),
            &[summed],
            h.stream().cu_stream(),
        )
    }
    .map_err(e)?;
    norm.finalize().map_err(e)?;
    values_eq(
        "finalize after the all-reduce",
        &norm.read().map_err(e)?,
        &cpu::finalize(summed, Some(0.25), 1.0),
    )
}

fn scale_pass(h: &Handle) -> Result<(), String> {
    fn one<G: Dtype>(h: &Handle, seed: u64) -> Result<(), String> {
        let grads = random_grads::<G>(seed, &[0, 65_537, 1001, 5, 0]);
        let mut set = grad_set(h, &grads)?;
        let true_norm = cpu::norm_f64(&refs(&grads)) as f32;
        // Clipping: grads *= coef < 1.
        let mut norm = GlobalNorm::new(&set, Some(true_norm / 3.0)).map_err(e)?;
        norm.compute(&set).map_err(e)?;
        let v = norm.read().map_err(e)?;
        if v.coef >= 1.0 {
            return Err(format!("expected clipping, coef {}", v.coef));
        }
        let before = h.launch_count();
        norm.scale_grads(&mut set).map_err(e)?;
        if h.launch_count() - before != 1 {
            return Err("the scale pass is one launch".into());
        }
        for (i, g) in grads.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let mut want = g.clone();
            cpu::scale(&mut want, v.grad_scale);
            let got = download(h, &set.grad::<G>(i).map_err(e)?)?;
            bits_eq(&format!("{} scaled grad {i}", G::KIND.name()), &got, &want)?;
        }
        // No clipping needed: coef 1, nothing rewritten.
        let mut set = grad_set(h, &grads)?;
        let mut norm = GlobalNorm::new(&set, Some(true_norm * 10.0)).map_err(e)?;
        norm.compute(&set).map_err(e)?;
        norm.scale_grads(&mut set).map_err(e)?;
        for (i, g) in grads.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            bits_eq(
                "grads with coef 1",
                &download(h, &set.grad::<G>(i).map_err(e)?)?,
                g,
            )?;
        }
        Ok(())
    }
    one::<f32>(h, 11)?;
    one::<bf16>(h, 12)?;
    one::<f16>(h, 13)?;
    // Non-finite: the flag is set and the scale pass writes nothing.
    let mut grads = random_grads::<f32>(14, &[70_000, 3]);
    grads[0][65_600] = f32::NAN;
    let mut set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(1e-3)).map_err(e)?;
    norm.compute(&set).map_err(e)?;
    norm.scale_grads(&mut set).map_err(e)?;
    if norm.read().map_err(e)?.nonfinite != 1 {
        return Err("NaN gradient not flagged".into());
    }
    for (i, g) in grads.iter().enumerate() {
        bits_eq(
            "grads with the flag set",
            &download(h, &set.grad::<f32>(i).map_err(e)?)?,
            g,
        )?;
    }
    Ok(())
}

fn nonfinite_flag(h: &Handle) -> Result<(), String> {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e20] {
        let mut grads = random_grads::<f32>(15, &[100, 200_000]);
        grads[1][131_072] = bad; // first element of a chunk
        let set = grad_set(h, &grads)?;
        let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
        norm.compute(&set).map_err(e)?;
        let v = norm.read().map_err(e)?;
        if v.nonfinite != 1 {
            return Err(format!("gradient {bad}: flag not set ({v:?})"));
        }
    }
    let mut grads = random_grads::<bf16>(16, &[10]);
    grads[0][9] = bf16::INFINITY;
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, None).map_err(e)?;
    norm.compute(&set).map_err(e)?;
    match norm.read().map_err(e)?.nonfinite {
        1 => Ok(()),
        _ => Err("bf16 inf not flagged".into()),
    }
}

fn all_zero_size(h: &Handle) -> Result<(), String> {
    let grads: Vec<Vec<f32>> = vec![Vec::new(); 3];
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    let before = h.launch_count();
    norm.compute(&set).map_err(e)?;
    if h.launch_count() - before != 1 {
        return Err("no chunks: only the reduce+finalize launch".into());
    }
    values_eq(
        "empty set",
        &norm.read().map_err(e)?,
        &cpu::finalize(0.0, Some(1.0), 1.0),
    )
}

/// `count` tiny tensors as views into one buffer at arbitrary (often misaligned) offsets.
pub fn tiny_sizes(count: usize) -> Vec<usize> {
    (0..count).map(|i| (i * 7 + i / 13) % 38).collect()
}

fn ten_thousand_tiny(h: &Handle) -> Result<(), String> {
    let sizes = tiny_sizes(10_000);
    let grads = random_grads::<bf16>(17, &sizes);
    let flat: Vec<bf16> = grads.iter().flatten().copied().collect();
    let buf = h.stream().clone_htod(&flat).map_err(e)?;
    let (base, _g) = buf.device_ptr(h.stream());
    let mut b = TensorSet::builder(h);
    let mut at = 0u64;
    for g in &grads {
        // SAFETY: each range lies inside `buf`, which outlives the set.
        unsafe { b.push_grad_raw(base + 2 * at, g.len() as u64, fusedreg::DtypeKind::Bf16) }
            .map_err(e)?;
        at += g.len() as u64;
    }
    let set = b.build().map_err(e)?;
    let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    let before = h.launch_count();
    norm.compute(&set).map_err(e)?;
    if h.launch_count() - before != 2 {
        return Err(format!(
            "10,000 tensors: {} launches, expected 2",
            h.launch_count() - before
        ));
    }
    bits_eq(
        "10k partials",
        &norm.read_partials().map_err(e)?,
        &cpu::partials(&refs(&grads)).map_err(e)?,
    )?;
    values_eq(
        "10k norm",
        &norm.read().map_err(e)?,
        &cpu::global_norm(&refs(&grads), Some(1.0), 1.0).map_err(e)?,
    )?;
    let layout = Layout::new(&sizes.iter().map(|&n| n as u64).collect::<Vec<_>>()).map_err(e)?;
    if layout.num_chunks() != sizes.iter().filter(|&&n| n > 0).count() {
        return Err("one chunk per non-empty tiny tensor".into());
    }
    Ok(())
}

fn loss_scale(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<f32>(18, &[123_457]);
    let scaled: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.iter().map(|&x| x * 4096.0).collect())
        .collect();
    let set = grad_set(h, &scaled)?;
    let mut norm = GlobalNorm::new(&set, Some(0.5)).map_err(e)?;
    norm.set_loss_scale(4096.0).map_err(e)?;
    if norm.set_loss_scale(0.0).is_ok() || norm.set_loss_scale(f32::NAN).is_ok() {
        return Err("invalid loss scales accepted".into());
    }
    norm.compute(&set).map_err(e)?;
    let got = norm.read().map_err(e)?;
    values_eq(
        "loss-scaled norm",
        &got,
        &cpu::global_norm(&refs(&scaled), Some(0.5), 4096.0).map_err(e)?,
    )?;
    let plain = cpu::global_norm(&refs(&grads), Some(0.5), 1.0).map_err(e)?;
    if got.norm != plain.norm || got.grad_scale != plain.coef / 4096.0 {
        return Err(format!("loss scale not divided out: {got:?} vs {plain:?}"));
    }
    Ok(())
}

fn async_copy(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<f32>(19, &[5000]);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    norm.compute(&set).map_err(e)?;
    // SAFETY: the pinned buffer is only read after the stream is synchronized.
    let mut pinned = unsafe { h.context().alloc_pinned::<NormValues>(1) }.map_err(e)?;
    norm.copy_to_host_async(&mut pinned).map_err(e)?;
    h.synchronize().map_err(e)?;
    let got = pinned.as_slice().map_err(e)?[0];
    values_eq("pinned copy", &got, &norm.read().map_err(e)?)
}

/// Issue 17, item 6: an empty pinned buffer is an Error (it panicked inside cudarc on a null
/// pointer), and the result stays readable afterwards.
fn async_copy_empty(h: &Handle) -> Result<(), String> {
    let grads = random_grads::<f32>(21, &[5000]);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(1.0)).map_err(e)?;
    norm.compute(&set).map_err(e)?;
    // SAFETY: nothing is ever read from the (empty) buffer.
    match unsafe { h.context().alloc_pinned::<NormValues>(0) } {
        Ok(mut empty) => {
            if norm.copy_to_host_async(&mut empty).is_ok() {
                return Err("a copy into an empty pinned buffer was accepted".into());
            }
        }
        // The driver refusing a zero-byte pinned allocation leaves no empty buffer to pass.
        Err(err) => eprintln!("alloc_pinned(0) refused by the driver ({err}): nothing to check"),
    }
    let grads: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
    let want = cpu::global_norm(&grads, Some(1.0), 1.0).map_err(e)?;
    values_eq("after the refused copy", &norm.read().map_err(e)?, &want)
}
