//! Criterion benches of fused dropout (with and without a residual) against the unfused baseline
//! (group `dropout`).
//!
//! * Flat tensors of 2^20, 2^24, 2^26 and 2^28 elements, bf16 and f32, no bias, without and with
//!   a residual: fused and unfused forward (the unfused one is dropout, plus the residual add:
//!   1 or 2 kernels) and backward (no dbias). Sizes that do not fit in free device memory are
//!   skipped.
//! * A `[16384, 4096]` bf16 shape with bias and a residual: fused forward (mask regenerated
//!   later, with a 1-bit mask, with a generated drop path, with 16-bit keys), the same without a
//!   residual, unfused forward (3 kernels), fused backward with dbias and unfused backward with
//!   dbias (masked scale + column sum).
//!
//! Every input is random ([`random`]: a constant fill sends every lane down one branch).
//! Throughput is each variant's own minimal bytes (`fused_forward_bytes`, `unfused_forward_bytes`,
//! ...), so GB/s says how close each gets to the copy bandwidth printed first; compare fused with
//! unfused by time. Without a GPU it prints why and exits successfully.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::CudaSlice;
use fusedreg::dropout::{
    self as dr, fused_backward_bytes, fused_forward_bytes, unfused::Unfused,
    unfused_backward_bytes, unfused_forward_bytes, BackwardOptions, Config, DropPath,
    ForwardOptions, MaskResolution, Workspace,
};
use fusedreg::{Dtype, Handle};
use fusedreg_tools::timing::{copy_bandwidth, random, BatchTimer, TimingPlan};
use half::bf16;

/// Random data in [-2, 2) (never time on constants or zeros).
fn upload<T: Dtype>(h: &Handle, n: usize, seed: u64) -> CudaSlice<T> {
    random::<T>(h, n, seed, -2.0, 2.0).expect("upload")
}

fn free_bytes(h: &Handle) -> usize {
    h.context()
        .mem_get_info()
        .map(|(free, _)| free)
        .unwrap_or(0)
}

/// Times `f` with CUDA events for criterion.
fn run(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    timer: &BatchTimer<'_>,
    id: BenchmarkId,
    bytes: u64,
    mut f: impl FnMut() -> fusedreg::Result<()>,
) {
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(id, |b| {
        b.iter_custom(|iters| timer.duration(iters, &mut f).expect("GPU run failed"))
    });
}

fn flat<T: Dtype>(
    h: &Handle,
    timer: &BatchTimer<'_>,
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let kind = T::KIND;
    let name = kind.name();
    let s = h.stream();
    for log in [20u32, 24, 26, 28] {
        let n = 1usize << log;
        // x, r, y, dy, dx, the unfused d, and the byte and bit masks.
        let need = n * (6 * kind.size() + 1) + n / 8;
        if need as f64 > 0.8 * free_bytes(h) as f64 {
            println!("dropout: skipping {name} 2^{log}: needs {need} bytes");
            continue;
        }
        let cfg = Config::flat(n, 0.1, 42, 7).expect("config");
        let x = upload::<T>(h, n, 1);
        let r = upload::<T>(h, n, 2);
        let dy = upload::<T>(h, n, 3);
        let mut y = s.alloc_zeros::<T>(n).expect("alloc");
        let mut dx = s.alloc_zeros::<T>(n).expect("alloc");
        let mut m8 = s.alloc_zeros::<u8>(n).expect("alloc");
        let mut base = Unfused::<T>::new(h);
        let size = format!("2^{log}");
        let nn = n as u64;

        for residual in [false, true] {
            let site = if residual { "_residual" } else { "" };
            let rv = || residual.then(|| r.as_view());
            run(
                group,
                timer,
                BenchmarkId::new(format!("fused_fwd{site}/{name}"), &size),
                fused_forward_bytes(kind, nn, residual, false),
                || {
                    let opts = ForwardOptions {
                        residual: rv(),
                        ..Default::default()
                    };
                    dr::forward(h, &cfg, &x, &mut y, opts)
                },
            );
            run(
                group,
                timer,
                BenchmarkId::new(format!("unfused_fwd{site}/{name}"), &size),
                unfused_forward_bytes(kind, nn, false, residual),
                || base.forward(&cfg, &x, None, rv(), &mut y, &mut m8),
            );
        }
        run(
            group,
            timer,
            BenchmarkId::new(format!("fused_bwd/{name}"), &size),
            fused_backward_bytes(kind, nn, false),
            || dr::backward(h, &cfg, &dy, &mut dx, BackwardOptions::default()),
        );
        run(
            group,
            timer,
            BenchmarkId::new(format!("unfused_bwd/{name}"), &size),
            unfused_backward_bytes(kind, nn, false),
            || base.backward(&cfg, &dy, &m8, &mut dx, None),
        );
    }
}

fn transformer_shape(
    h: &Handle,
    timer: &BatchTimer<'_>,
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    let (rows, cols) = (16_384usize, 4096usize);
    let n = rows * cols;
    let kind = <bf16 as Dtype>::KIND;
    let s = h.stream();
    let cfg = Config::new(rows, cols, 0.1, 42, 7).expect("config");
    let path_cfg = cfg.with_drop_path(DropPath::new(0.1, 8).expect("drop path"));
    let cfg16 = cfg.with_resolution(MaskResolution::Bits16);
    let x = upload::<bf16>(h, n, 11);
    let r = upload::<bf16>(h, n, 12);
    let dy = upload::<bf16>(h, n, 13);
    let bias = upload::<bf16>(h, cols, 14);
    let mut y = s.alloc_zeros::<bf16>(n).expect("alloc");
    let mut dx = s.alloc_zeros::<bf16>(n).expect("alloc");
    let mut dbias = s.alloc_zeros::<bf16>(cols).expect("alloc");
    let mut mask = s.alloc_zeros::<u32>(cfg.mask_words()).expect("alloc");
    let mut m8 = s.alloc_zeros::<u8>(n).expect("alloc");
    let mut ws = Workspace::new();
    let mut base = Unfused::<bf16>::new(h);
    let shape = "16384x4096";
    let nn = n as u64;
    let with = |res: bool| ForwardOptions {
        bias: Some(bias.as_view()),
        residual: res.then(|| r.as_view()),
        ..Default::default()
    };

    for (id, cfg, res) in [
        ("fused_fwd_bias", &cfg, false),
        ("fused_fwd_bias_16bit", &cfg16, false),
        ("fused_fwd_bias_residual", &cfg, true),
        ("fused_fwd_bias_residual_16bit", &cfg16, true),
        // The drop path (p_path = 0.1) reads no x for dropped rows; minimal bytes are counted
        // as without it, so its GB/s above the plain forward's shows the saving.
        ("fused_fwd_bias_residual_droppath", &path_cfg, true),
    ] {
        run(
            group,
            timer,
            BenchmarkId::new(format!("{id}/bf16"), shape),
            fused_forward_bytes(kind, nn, res, false),
            || dr::forward(h, cfg, &x, &mut y, with(res)),
        );
    }
    run(
        group,
        timer,
        BenchmarkId::new("fused_fwd_bias_residual_bitmask/bf16", shape),
        fused_forward_bytes(kind, nn, true, true),
        || {
            let opts = ForwardOptions {
                mask_out: Some(mask.as_view_mut()),
                ..with(true)
            };
            dr::forward(h, &cfg, &x, &mut y, opts)
        },
    );
    run(
        group,
        timer,
        BenchmarkId::new("unfused_fwd_bias_residual/bf16", shape),
        unfused_forward_bytes(kind, nn, true, true),
        || {
            base.forward(
                &cfg,
                &x,
                Some(bias.as_view()),
                Some(r.as_view()),
                &mut y,
                &mut m8,
            )
        },
    );
    run(
        group,
        timer,
        BenchmarkId::new("fused_bwd_dbias/bf16", shape),
        fused_backward_bytes(kind, nn, false),
        || {
            let opts = BackwardOptions {
                dbias: Some(dbias.as_view_mut()),
                workspace: Some(&mut ws),
                ..Default::default()
            };
            dr::backward(h, &cfg, &dy, &mut dx, opts)
        },
    );
    run(
        group,
        timer,
        BenchmarkId::new("unfused_bwd_dbias/bf16", shape),
        unfused_backward_bytes(kind, nn, true),
        || base.backward(&cfg, &dy, &m8, &mut dx, Some(dbias.as_view_mut())),
    );
}

fn bench(c: &mut Criterion) {
    let h = match Handle::new(0) {
        Ok(h) => h,
        Err(e) => {
            println!("dropout benches skipped: {e}");
            return;
        }
    };
    match copy_bandwidth(&h, 1 << 30, TimingPlan::quick()) {
        Ok(bw) => println!(
            "copy bandwidth (bytes read + written, {} MiB): memcpy {:.0} GB/s, copy kernel {:.0} GB/s",
            bw.bytes >> 20,
            bw.memcpy_gbps,
            bw.kernel_gbps
        ),
        Err(e) => println!("copy bandwidth: {e}"),
    }
    let timer = BatchTimer::new(&h).expect("timing events");
    let mut group = c.benchmark_group("dropout");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    flat::<bf16>(&h, &timer, &mut group);
    flat::<f32>(&h, &timer, &mut group);
    transformer_shape(&h, &timer, &mut group);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
