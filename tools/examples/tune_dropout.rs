//! Launch-shape sweep for the fused dropout kernels, with and without a residual (a tuning tool,
//! not a benchmark of record): one line per (case, tuning) with GB/s by the minimal-bytes
//! formula. Results never depend on the tuning (the GPU tests check that); only the time does.
//! Inputs are random (a constant fill sends every lane down one branch).
//!
//! ```text
//! cargo run --release --example tune_dropout
//! ```

use fusedreg::dropout::{
    self as dr, BackwardOptions, Config, ForwardOptions, LaunchTuning, Workspace,
};
use fusedreg::{Dtype, Handle, Result};
use fusedreg_tools::timing::{copy_bandwidth, filled, random, time_gpu, TimingPlan};
use half::bf16;

fn sweep<T: Dtype>(
    h: &Handle,
    (rows, cols): (usize, usize),
    bias: bool,
    residual: bool,
    reference: f64,
) -> Result<()> {
    let n = rows * cols;
    let cfg = Config::new(rows, cols, 0.1, 42, 7)?;
    let x = random::<T>(h, n, 1, -2.0, 2.0)?;
    let r = random::<T>(h, n, 2, -2.0, 2.0)?;
    let b = random::<T>(h, cols, 3, -1.0, 1.0)?;
    let mut y = filled::<T>(h, n, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut db = filled::<T>(h, cols, 0)?;
    let mut ws = Workspace::new();
    let plan = TimingPlan {
        warmup: 3,
        samples: 9,
        min_sample_ms: 1.0,
    };
    let kind = T::KIND;
    let mut tunings = vec![("default".to_string(), LaunchTuning::default())];
    // A tuning that differs from the default in what `edit` sets.
    let mut add = |label: String, edit: &dyn Fn(&mut LaunchTuning)| {
        let mut t = LaunchTuning::default();
        edit(&mut t);
        tunings.push((label, t));
    };
    for slab in [4u32, 8, 32, 64] {
        add(format!("slab {slab}"), &|t| t.slab_rows = slab);
    }
    if !bias {
        for w in [1024u32, 2048, 16384, 65536] {
            add(format!("flat width {w}"), &|t| t.flat_width = w);
        }
    }
    add("block 128".into(), &|t| t.block = 128);
    add("no unroll".into(), &|t| t.unroll = false);
    let name = format!(
        "{} [{rows},{cols}]{}{}",
        kind.name(),
        if bias { " bias" } else { "" },
        if residual { " residual" } else { "" }
    );
    for (label, t) in tunings {
        let fb = dr::fused_forward_bytes(kind, n as u64, residual, false) as f64;
        let f = time_gpu(h, plan, || {
            let opts = ForwardOptions {
                bias: bias.then(|| b.as_view()),
                residual: residual.then(|| r.as_view()),
                tuning: t,
                ..Default::default()
            };
            dr::forward(h, &cfg, &x, &mut y, opts)
        })?;
        let bb = dr::fused_backward_bytes(kind, n as u64, false) as f64;
        let g = time_gpu(h, plan, || {
            let opts = BackwardOptions {
                dbias: bias.then(|| db.as_view_mut()),
                workspace: Some(&mut ws),
                tuning: t,
                ..Default::default()
            };
            dr::backward(h, &cfg, &r, &mut dx, opts)
        })?;
        let (fg, bg) = (fb / f.median() / 1e6, bb / g.median() / 1e6);
        println!(
            "{name:<26} {label:<18} fwd {:.4} ms {fg:6.0} GB/s {:4.0}% | bwd {:.4} ms {bg:6.0} GB/s {:4.0}%",
            f.median(),
            100.0 * fg / reference,
            g.median(),
            100.0 * bg / reference
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let h = match Handle::new(0) {
        Ok(h) => h,
        Err(e) => {
            println!("no GPU: {e}");
            return Ok(());
        }
    };
    let bw = copy_bandwidth(&h, 1 << 30, TimingPlan::quick())?;
    println!(
        "copy: memcpy {:.0} GB/s, kernel {:.0} GB/s",
        bw.memcpy_gbps, bw.kernel_gbps
    );
    let reference = bw.reference_gbps();
    for residual in [true, false] {
        sweep::<bf16>(&h, (16_384, 4096), true, residual, reference)?;
        sweep::<f32>(&h, (16_384, 4096), true, residual, reference)?;
        sweep::<bf16>(&h, (1, 1 << 26), false, residual, reference)?;
        sweep::<f32>(&h, (1, 1 << 26), false, residual, reference)?;
    }
    Ok(())
}
