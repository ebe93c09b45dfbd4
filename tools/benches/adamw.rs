//! Criterion benches of the optimizer step on real parameter lists: GPT-2 124M (148 tensors)
//! and a 1B-parameter Llama-like model (147 tensors), in f32 and in bf16 with f32 master
//! weights.
//!
//! * group `adamw`: the fused AdamW step alone (1 launch), the fused clip-and-step (norm +
//!   AdamW, 3 launches, no host sync) and the unfused clip-and-step (per-tensor launches, a host
//!   sync for the norm, a separate scale pass: the PyTorch-foreach / DeepSpeed way).
//! * group `global_norm`: the fused norm (2 launches) and the scale pass (1 launch).
//!
//! Throughput is the minimal-bytes formula of the *job* (`adamw::min_bytes`,
//! `adamw::clip_step_min_bytes`, `global_norm::norm_min_bytes`, `global_norm::scale_min_bytes`):
//! the fused and unfused clip-and-step report the same bytes, so their GB/s compare like their
//! times. Before the criterion runs, a table prints the launches per step and the host time per
//! step (wall-clock of the enqueue alone; for the unfused path that includes its sync).
//!
//! Without a GPU it prints why and exits successfully.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use fusedreg::adamw::{self, unfused, AdamW, AdamWConfig};
use fusedreg::global_norm::{self, GlobalNorm};
use fusedreg::multi_tensor::TensorSet;
use fusedreg::{Dtype, DtypeKind, Handle};
use fusedreg_tools::report::models::{self, ParamShape};
use fusedreg_tools::timing::{random, BatchTimer};
use half::bf16;

/// A parameter list: (name, elements, weight decay).
type Shapes = Vec<(String, usize, f32)>;

fn shapes(list: Vec<ParamShape>) -> Shapes {
    list.into_iter()
        .map(|p| (p.name, p.elements, p.weight_decay))
        .collect()
}

fn build<T: Dtype>(h: &Handle, shapes: &Shapes) -> fusedreg::Result<TensorSet> {
    let mut b = TensorSet::builder(h);
    for (_, n, _) in shapes {
        // Random parameters and gradients: a constant fill hides data-dependent branches.
        b.push(
            random::<T>(h, *n, 0xbe00 + *n as u64, -0.1, 0.1)?,
            random::<T>(h, *n, 0xbe01 + *n as u64, -0.01, 0.01)?,
        )?;
    }
    b.build()
}

/// Mean host wall-clock per call of `f` (enqueue only, no sync inside unless `f` syncs).
fn host_time(h: &Handle, calls: usize, f: &mut dyn FnMut() -> fusedreg::Result<()>) -> Duration {
    h.synchronize().expect("sync");
    let t0 = Instant::now();
    for _ in 0..calls {
        f().expect("bench call");
    }
    let dt = t0.elapsed();
    h.synchronize().expect("sync");
    dt / calls as u32
}

fn launches(h: &Handle, f: &mut dyn FnMut() -> fusedreg::Result<()>) -> u64 {
    let before = h.launch_count();
    f().expect("bench call");
    h.launch_count() - before
}

fn bench_model<T: Dtype>(c: &mut Criterion, h: &Handle, model: &str, shapes: &Shapes) {
    let kind = T::KIND;
    let label = match kind {
        DtypeKind::F32 => "f32",
        _ => "bf16+f32master",
    };
    let id = format!("{model}/{label}");
    let params: u64 = shapes.iter().map(|s| s.1 as u64).sum();
    let mut set = match build::<T>(h, shapes) {
        Ok(s) => s,
        Err(e) => {
            println!("{id}: skipped ({e})");
            return;
        }
    };
    let wds: Vec<f32> = shapes.iter().map(|s| s.2).collect();
    let opt = AdamW::new(&set, AdamWConfig::default(), &wds).expect("adamw");
    // A threshold far below the norm: every step clips, so the unfused scale pass always writes
    // (the fused scale pass skips its writes when coef is exactly 1).
    let mut norm = GlobalNorm::new(&set, Some(1e-7)).expect("norm");
    let timer = BatchTimer::new(h).expect("timer");

    // Launches and host time per step.
    let l_step = launches(h, &mut || opt.step(&mut set, None));
    let l_fused = launches(h, &mut || opt.clip_and_step(&mut set, &mut norm));
    let l_unfused = launches(h, &mut || {
        unfused::clip_and_step(&opt, &mut set, &mut norm).map(|_| ())
    });
    let t_step = host_time(h, 20, &mut || opt.step(&mut set, None));
    let t_fused = host_time(h, 20, &mut || opt.clip_and_step(&mut set, &mut norm));
    let t_unfused = host_time(h, 5, &mut || {
        unfused::clip_and_step(&opt, &mut set, &mut norm).map(|_| ())
    });
    println!(
        "{id}: {} tensors, {:.1}M params | launches/step: step {l_step}, fused clip+step \
         {l_fused}, unfused {l_unfused} | host time/step: step {:.1} us, fused clip+step \
         {:.1} us, unfused (incl. its sync) {:.1} us",
        shapes.len(),
        params as f64 / 1e6,
        t_step.as_secs_f64() * 1e6,
        t_fused.as_secs_f64() * 1e6,
        t_unfused.as_secs_f64() * 1e6
    );

    {
        let mut g = c.benchmark_group("adamw");
        g.throughput(Throughput::Bytes(adamw::min_bytes(params, kind, kind)));
        g.bench_function(format!("fused_step/{id}"), |b| {
            b.iter_custom(|n| {
                timer
                    .duration(n, &mut || opt.step(&mut set, None))
                    .expect("step")
            })
        });
        let job = adamw::clip_step_min_bytes(params, kind, kind);
        g.throughput(Throughput::Bytes(job));
        g.bench_function(format!("fused_clip_step/{id}"), |b| {
            b.iter_custom(|n| {
                timer
                    .duration(n, &mut || opt.clip_and_step(&mut set, &mut norm))
                    .expect("clip step")
            })
        });
        g.bench_function(format!("unfused_clip_step/{id}"), |b| {
            b.iter_custom(|n| {
                timer
                    .duration(n, &mut || {
                        unfused::clip_and_step(&opt, &mut set, &mut norm).map(|_| ())
                    })
                    .expect("unfused step")
            })
        });
        g.finish();
    }
    {
        let mut g = c.benchmark_group("global_norm");
        g.throughput(Throughput::Bytes(global_norm::norm_min_bytes(params, kind)));
        g.bench_function(format!("compute/{id}"), |b| {
            b.iter_custom(|n| timer.duration(n, &mut || norm.compute(&set)).expect("norm"))
        });
        norm.compute(&set).expect("norm");
        g.throughput(Throughput::Bytes(global_norm::scale_min_bytes(
            params, kind,
        )));
        g.bench_function(format!("scale/{id}"), |b| {
            b.iter_custom(|n| {
                timer
                    .duration(n, &mut || norm.scale_grads(&mut set))
                    .expect("scale")
            })
        });
        g.finish();
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let h = match Handle::new(0) {
        Ok(h) => h,
        Err(e) => {
            println!("adamw / global_norm benches skipped: {e}");
            return;
        }
    };
    let (gpt2, llama) = (shapes(models::gpt2_124m()), shapes(models::llama_1b()));
    assert_eq!((gpt2.len(), llama.len()), (148, 147));
    assert_eq!(gpt2.iter().map(|s| s.1).sum::<usize>(), 124_439_808);
    for (model, shapes) in [("gpt2-124m", gpt2), ("llama-1b", llama)] {
        bench_model::<f32>(&mut c, &h, model, &shapes);
        bench_model::<bf16>(&mut c, &h, model, &shapes);
    }
    c.final_summary();
}
