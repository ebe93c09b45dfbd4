//! Global norm on the GPU against the CPU mirror, bit for bit: partials, reductions, finalize,
//! per-tensor norms, the scale pass, the data-parallel hook, alignment paths, many tensors.

use cudarc::driver::{CudaSlice, DevicePtr};
use fusedreg::global_norm::{cpu, GlobalNorm, NormValues};
use fusedreg::multi_tensor::{Layout, TensorSet};
use fusedreg::{Dtype, Handle};
use half::{bf16, f16};
use libtest_mimic::Trial;

use crate::prelude::*;

#[linkme::distributed_slice(crate::TRIALS)]
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

/// Sizes crossing every vector and chunk boundary; zero-size tensors first, inside and last.
pub const SIZES: &[usize] = &[
    0, 1, 3, 4, 5, 7, 8, 9, 15, 17, 65_535, 0, 65_536, 65_537, 278_011, 196_609, 2049, 0,
];

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

fn grad_set<G: Dtype>(h: &Handle, grads: &[Vec<G>]) -> TestResult<TensorSet> {
    let mut b = TensorSet::builder(h);
    for g in grads {
        if g.is_empty() {
            b.push_grad_empty::<G>()?;
        } else {
            b.push_grad(to_device(h, g)?)?;
        }
    }
    Ok(b.build()?)
}

pub fn values_eq(what: &str, got: &NormValues, want: &NormValues) -> TestResult {
    bits_eq(what, &[*got], &[*want])?;
    Ok(())
}

/// A norm over `set` (clipping at `max_norm`), computed once.
fn computed(set: &TensorSet, max_norm: Option<f32>) -> TestResult<GlobalNorm> {
    let mut norm = GlobalNorm::new(set, max_norm)?;
    norm.compute(set)?;
    Ok(norm)
}

/// [`computed`], checking that the compute made `want` launches.
fn computed_in(
    h: &Handle,
    set: &TensorSet,
    max_norm: Option<f32>,
    want: u64,
    what: &str,
) -> TestResult<GlobalNorm> {
    let mut norm = GlobalNorm::new(set, max_norm)?;
    let before = h.launch_count();
    norm.compute(set)?;
    launches(h, before, want, what)?;
    Ok(norm)
}

fn norm_bit_exact<G: Dtype>(h: &Handle, seed: u64) -> TestResult {
    let grads = random_grads::<G>(seed, SIZES);
    let set = grad_set(h, &grads)?;
    let want_p = cpu::partials(&refs(&grads))?;
    let true_norm = cpu::norm_f64(&refs(&grads));
    // Clip below and above the norm.
    for max_norm in [
        Some((true_norm * 0.5) as f32),
        Some((true_norm * 2.0) as f32),
        None,
    ] {
        let norm = computed_in(h, &set, max_norm, 2, "compute")?;
        bits_eq("partials", &norm.read_partials()?, &want_p)?;
        let want = cpu::global_norm(&refs(&grads), max_norm, 1.0)?;
        let got = norm.read()?;
        values_eq(
            &format!("{} norm values, max_norm {max_norm:?}", G::KIND.name()),
            &got,
            &want,
        )?;
        if (f64::from(got.norm) - true_norm).abs() > 2e-6 * true_norm {
            return Err(format!("norm {} vs f64 {true_norm}", got.norm).into());
        }
        let clipped = max_norm.is_some_and(|m| f64::from(m) < true_norm);
        if clipped != (got.coef < 1.0) {
            return Err(format!("coef {} with max_norm {max_norm:?}", got.coef).into());
        }
    }
    Ok(())
}

fn norm_bit_exact_f32(h: &Handle) -> TestResult {
    norm_bit_exact::<f32>(h, 1)
}

fn norm_bit_exact_bf16(h: &Handle) -> TestResult {
    norm_bit_exact::<bf16>(h, 2)
}

fn norm_bit_exact_f16(h: &Handle) -> TestResult {
    norm_bit_exact::<f16>(h, 3)
}

fn repeated_runs_identical(h: &Handle) -> TestResult {
    let grads = random_grads::<f32>(4, &[1_000_003, 65_537, 3]);
    let set = grad_set(h, &grads)?;
    let mut a = GlobalNorm::new(&set, Some(1.0))?;
    let mut b = GlobalNorm::new(&set, Some(1.0))?;
    a.compute(&set)?;
    let first = a.read()?;
    for _ in 0..3 {
        a.compute(&set)?;
        values_eq("repeat", &a.read()?, &first)?;
        b.compute(&set)?;
        values_eq("second object", &b.read()?, &first)?;
    }
    let want = cpu::global_norm(&refs(&grads), Some(1.0), 1.0)?;
    values_eq("vs cpu", &first, &want)
}

/// Registers `grads` as views starting `offset` elements into larger buffers.
fn misaligned_set<G: Dtype>(
    h: &Handle,
    grads: &[Vec<G>],
    offset: usize,
) -> TestResult<(TensorSet, Vec<CudaSlice<G>>)> {
    let mut backing = Vec::new();
    let mut b = TensorSet::builder(h);
    for g in grads {
        let mut host = vec![G::from_f32_rn(7.0); g.len() + offset + 1];
        host[offset..offset + g.len()].copy_from_slice(g);
        let buf = h.stream().clone_htod(&host)?;
        let (ptr, guard) = buf.device_ptr(h.stream());
        drop(guard);
        let addr = ptr + (offset * G::KIND.size()) as u64;
        // SAFETY: `buf` holds g.len() elements after `offset`, lives in `backing` as long as the
        // set, and is used on the handle's stream only.
        unsafe { b.push_grad_raw(addr, g.len() as u64, G::KIND) }?;
        backing.push(buf);
    }
    Ok((b.build()?, backing))
}

fn misaligned_grads(h: &Handle) -> TestResult {
    fn one<G: Dtype>(h: &Handle, seed: u64, offset: usize) -> TestResult {
        let grads = random_grads::<G>(seed, &[65_537, 278_011, 9, 0]);
        let (set, _backing) = misaligned_set(h, &grads, offset)?;
        if set.is_grad_aligned16(0) {
            return Err("a view at an odd element reported 16-byte alignment".into());
        }
        let norm = computed(&set, Some(1.0))?;
        let want_p = cpu::partials(&refs(&grads))?;
        bits_eq(
            &format!("{} partials, view at element {offset}", G::KIND.name()),
            &norm.read_partials()?,
            &want_p,
        )?;
        let want = cpu::global_norm(&refs(&grads), Some(1.0), 1.0)?;
        values_eq("misaligned norm", &norm.read()?, &want)
    }
    one::<f32>(h, 5, 1)?;
    one::<f32>(h, 6, 2)?; // 8-byte aligned: still not 16
    one::<bf16>(h, 7, 1)?;
    one::<f16>(h, 8, 3)
}

fn per_tensor_norms(h: &Handle) -> TestResult {
    let grads = random_grads::<bf16>(9, SIZES);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, None)?;
    if norm.read_per_tensor().is_ok() {
        return Err("read_per_tensor before per_tensor() must be an error".into());
    }
    norm.compute(&set)?;
    norm.per_tensor(&set)?;
    let (sums, norms) = norm.read_per_tensor()?;
    let layout = set.layout();
    let (want_s, want_n) = cpu::per_tensor(layout, &cpu::partials(&refs(&grads))?);
    bits_eq("per-tensor sumsq", &sums, &want_s)?;
    bits_eq("per-tensor norms", &norms, &want_n)?;
    Ok(())
}

fn staged_allreduce_hook(h: &Handle) -> TestResult {
    let grads = random_grads::<f32>(10, &[300_001, 17]);
    let set = grad_set(h, &grads)?;
    let mut norm = GlobalNorm::new(&set, Some(0.25))?;
    norm.partials(&set)?;
    norm.reduce()?;
    let local = cpu::reduce(&cpu::partials(&refs(&grads))?);
    let got = norm.read()?;
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
    }?;
    norm.finalize()?;
    values_eq(
        "finalize after the all-reduce",
        &norm.read()?,
        &cpu::finalize(summed, Some(0.25), 1.0),
    )
}

fn scale_pass(h: &Handle) -> TestResult {
    fn one<G: Dtype>(h: &Handle, seed: u64) -> TestResult {
        let grads = random_grads::<G>(seed, &[0, 65_537, 1001, 5, 0]);
        let mut set = grad_set(h, &grads)?;
        let true_norm = cpu::norm_f64(&refs(&grads)) as f32;
        // Clipping: grads *= coef < 1.
        let norm = computed(&set, Some(true_norm / 3.0))?;
        let v = norm.read()?;
        if v.coef >= 1.0 {
            return Err(format!("expected clipping, coef {}", v.coef).into());
        }
        let before = h.launch_count();
        norm.scale_grads(&mut set)?;
        launches(h, before, 1, "the scale pass")?;
        for (i, g) in grads.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            let mut want = g.clone();
            cpu::scale(&mut want, v.grad_scale);
            let got = to_host(h, &set.grad::<G>(i)?)?;
            bits_eq(&format!("{} scaled grad {i}", G::KIND.name()), &got, &want)?;
        }
        // No clipping needed: coef 1, nothing rewritten.
        let mut set = grad_set(h, &grads)?;
        let norm = computed(&set, Some(true_norm * 10.0))?;
        norm.scale_grads(&mut set)?;
        for (i, g) in grads.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
            bits_eq("grads with coef 1", &to_host(h, &set.grad::<G>(i)?)?, g)?;
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
    let norm = computed(&set, Some(1e-3))?;
    norm.scale_grads(&mut set)?;
    if norm.read()?.nonfinite != 1 {
        return Err("NaN gradient not flagged".into());
    }
    for (i, g) in grads.iter().enumerate() {
        bits_eq(
            "grads with the flag set",
            &to_host(h, &set.grad::<f32>(i)?)?,
            g,
        )?;
    }
    Ok(())
}

fn nonfinite_flag(h: &Handle) -> TestResult {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e20] {
        let mut grads = random_grads::<f32>(15, &[100, 200_000]);
        grads[1][131_072] = bad; // first element of a chunk
        let set = grad_set(h, &grads)?;
        let norm = computed(&set, Some(1.0))?;
        let v = norm.read()?;
        if v.nonfinite != 1 {
            return Err(format!("gradient {bad}: flag not set ({v:?})").into());
        }
    }
    let mut grads = random_grads::<bf16>(16, &[10]);
    grads[0][9] = bf16::INFINITY;
    let set = grad_set(h, &grads)?;
    let norm = computed(&set, None)?;
    match norm.read()?.nonfinite {
        1 => Ok(()),
        _ => Err("bf16 inf not flagged".into()),
    }
}

fn all_zero_size(h: &Handle) -> TestResult {
    let grads: Vec<Vec<f32>> = vec![Vec::new(); 3];
    let set = grad_set(h, &grads)?;
    let norm = computed_in(
        h,
        &set,
        Some(1.0),
        1,
        "no chunks: only the reduce+finalize launch",
    )?;
    values_eq(
        "empty set",
        &norm.read()?,
        &cpu::finalize(0.0, Some(1.0), 1.0),
    )
}

/// `count` tiny tensors as views into one buffer at arbitrary (often misaligned) offsets.
pub fn tiny_sizes(count: usize) -> Vec<usize> {
    (0..count).map(|i| (i * 7 + i / 13) % 38).collect()
}

fn ten_thousand_tiny(h: &Handle) -> TestResult {
    let sizes = tiny_sizes(10_000);
    let grads = random_grads::<bf16>(17, &sizes);
    let flat: Vec<bf16> = grads.iter().flatten().copied().collect();
    let buf = h.stream().clone_htod(&flat)?;
    let (base, _g) = buf.device_ptr(h.stream());
    let mut b = TensorSet::builder(h);
    let mut at = 0u64;
    for g in &grads {
        // SAFETY: each range lies inside `buf`, which outlives the set.
        unsafe { b.push_grad_raw(base + 2 * at, g.len() as u64, fusedreg::DtypeKind::Bf16) }?;
        at += g.len() as u64;
    }
    let set = b.build()?;
    let norm = computed_in(h, &set, Some(1.0), 2, "10,000 tensors")?;
    bits_eq(
        "10k partials",
        &norm.read_partials()?,
        &cpu::partials(&refs(&grads))?,
    )?;
    values_eq(
        "10k norm",
        &norm.read()?,
        &cpu::global_norm(&refs(&grads), Some(1.0), 1.0)?,
    )?;
    let layout = Layout::new(&sizes.iter().map(|&n| n as u64).collect::<Vec<_>>())?;
    if layout.num_chunks() != sizes.iter().filter(|&&n| n > 0).count() {
        return Err("one chunk per non-empty tiny tensor".into());
    }
    Ok(())
}

fn loss_scale(h: &Handle) -> TestResult {
    let grads = random_grads::<f32>(18, &[123_457]);
    let scaled: Vec<Vec<f32>> = grads
        .iter()
        .map(|g| g.iter().map(|&x| x * 4096.0).collect())
        .collect();
    let set = grad_set(h, &scaled)?;
    let mut norm = GlobalNorm::new(&set, Some(0.5))?;
    norm.set_loss_scale(4096.0)?;
    if norm.set_loss_scale(0.0).is_ok() || norm.set_loss_scale(f32::NAN).is_ok() {
        return Err("invalid loss scales accepted".into());
    }
    norm.compute(&set)?;
    let got = norm.read()?;
    values_eq(
        "loss-scaled norm",
        &got,
        &cpu::global_norm(&refs(&scaled), Some(0.5), 4096.0)?,
    )?;
    let plain = cpu::global_norm(&refs(&grads), Some(0.5), 1.0)?;
    if got.norm != plain.norm || got.grad_scale != plain.coef / 4096.0 {
        return Err(format!("loss scale not divided out: {got:?} vs {plain:?}").into());
    }
    Ok(())
}

fn async_copy(h: &Handle) -> TestResult {
    let grads = random_grads::<f32>(19, &[5000]);
    let set = grad_set(h, &grads)?;
    let norm = computed(&set, Some(1.0))?;
    // SAFETY: the pinned buffer is only read after the stream is synchronized.
    let mut pinned = unsafe { h.context().alloc_pinned::<NormValues>(1) }?;
    norm.copy_to_host_async(&mut pinned)?;
    h.synchronize()?;
    let got = pinned.as_slice()?[0];
    values_eq("pinned copy", &got, &norm.read()?)
}

/// Issue 17, item 6: an empty pinned buffer is an Error, and the result stays readable
/// afterwards. On the H200 (driver 580, cudarc 0.19.10) the panic the probe saw comes from cudarc's
/// own `alloc_pinned(0)` (the driver returns a null pointer for zero bytes and cudarc asserts), so
/// no empty `PinnedHostSlice` can be made there; `crate::harness::empty_pinned` says which case ran.
fn async_copy_empty(h: &Handle) -> TestResult {
    let grads = random_grads::<f32>(21, &[5000]);
    let set = grad_set(h, &grads)?;
    let norm = computed(&set, Some(1.0))?;
    if let Some(mut empty) = crate::harness::empty_pinned::<NormValues>(h) {
        if norm.copy_to_host_async(&mut empty).is_ok() {
            return Err("a copy into an empty pinned buffer was accepted".into());
        }
    }
    let grads: Vec<&[f32]> = grads.iter().map(|g| &g[..]).collect();
    let want = cpu::global_norm(&grads, Some(1.0), 1.0)?;
    values_eq("after the refused copy", &norm.read()?, &want)
}
