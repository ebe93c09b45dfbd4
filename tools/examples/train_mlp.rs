//! End-to-end: train a deep residual MLP with fusedreg's fused dropout-residual, stochastic
//! depth (dropped blocks launch nothing), global-norm clipping and AdamW, the matrix products
//! through cuBLAS, on synthetic data (regressing the outputs of a fixed random teacher).
//!
//! ```text
//! cargo run --release --example train_mlp                  # GPU if present, else the CPU size
//! cargo run --release --example train_mlp -- --cpu         # CPU reference ops, small size
//! cargo run --release --example train_mlp -- --bench       # GPU: step time, linear p_L = 0.5 vs none
//! cargo run --release --example train_mlp -- --steps 300 --no-depth
//! ```

use std::time::Instant;

use fusedreg::stochastic_depth::Schedule;
use fusedreg::{Handle, Result};
use fusedreg_tools::mlp::{Backend, MlpConfig, Trainer};

struct Args {
    cpu: bool,
    bench: bool,
    steps: Option<u64>,
    no_depth: bool,
}

fn args() -> Args {
    let mut a = Args {
        cpu: false,
        bench: false,
        steps: None,
        no_depth: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--cpu" => a.cpu = true,
            "--bench" => a.bench = true,
            "--no-depth" => a.no_depth = true,
            "--steps" => a.steps = it.next().and_then(|s| s.parse().ok()),
            other => eprintln!("ignoring unknown argument {other}"),
        }
    }
    a
}

/// Trains for `steps`, printing the loss every `every` steps; returns (first, last) loss.
fn train<B: Backend>(
    t: &mut Trainer<B>,
    steps: u64,
    every: u64,
    sync: &dyn Fn() -> Result<()>,
) -> Result<(f64, f64)> {
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut t0 = Instant::now();
    for s in 0..steps {
        let report = s % every == 0 || s + 1 == steps;
        let loss = t.step(report)?;
        if report {
            sync()?;
            let per = t0.elapsed().as_secs_f64() * 1e3 / if s == 0 { 1.0 } else { every as f64 };
            let running = t.next_plan().running();
            println!(
                "step {s:5}  loss {loss:.5}  {per:8.2} ms/step  (next step runs {running} blocks)"
            );
            if s == 0 {
                first = loss;
            }
            last = loss;
            t0 = Instant::now();
        }
    }
    Ok((first, last))
}

fn main() -> Result<()> {
    let a = args();
    let handle = if a.cpu { None } else { Handle::new(0).ok() };
    match handle {
        None => {
            let mut cfg = MlpConfig::cpu();
            if a.no_depth {
                cfg.depth = None;
            }
            println!(
                "CPU run (reference ops): {} blocks, hidden {}, {} tokens",
                cfg.blocks, cfg.hidden, cfg.tokens
            );
            let mut t = Trainer::cpu(cfg)?;
            let (first, last) = train(&mut t, a.steps.unwrap_or(60), 10, &|| Ok(()))?;
            println!("loss {first:.5} -> {last:.5}");
        }
        Some(h) => {
            let mut cfg = MlpConfig::gpu();
            if a.no_depth {
                cfg.depth = None;
            }
            if a.bench {
                return bench(&h, cfg);
            }
            println!(
                "GPU run on {}: {} blocks, hidden {}, {} tokens per step, stochastic depth {:?}",
                h.device_info()?.name,
                cfg.blocks,
                cfg.hidden,
                cfg.tokens,
                cfg.depth
            );
            let mut t = Trainer::gpu(&h, cfg)?;
            let (first, last) = train(&mut t, a.steps.unwrap_or(200), 20, &|| h.synchronize())?;
            println!("loss {first:.5} -> {last:.5}");
        }
    }
    Ok(())
}

/// Time per step with a linear schedule (p_L = 0.5) against no stochastic depth, and the loss
/// curves of both.
fn bench(h: &Handle, cfg: MlpConfig) -> Result<()> {
    let steps = 60;
    let mut results = Vec::new();
    for depth in [None, Some(Schedule::linear(0.5))] {
        let mut c = cfg.clone();
        c.depth = depth.clone();
        let mut t = Trainer::gpu(h, c)?;
        for _ in 0..5 {
            t.step(false)?; // warm-up: cuBLAS heuristics, module loads
        }
        h.synchronize()?;
        let t0 = Instant::now();
        let mut blocks = 0;
        for _ in 0..steps {
            blocks += t.next_plan().running();
            t.step(false)?;
        }
        h.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let loss = t.step(true)?;
        println!(
            "{:<32} {ms:8.2} ms/step, {:.1} blocks/step on average, loss after {} steps {loss:.5}",
            match &depth {
                None => "no stochastic depth".to_string(),
                Some(s) => format!("{s:?}"),
            },
            blocks as f64 / steps as f64,
            steps + 6
        );
        results.push(ms);
    }
    println!(
        "stochastic depth / none: {:.3}x the step time",
        results[1] / results[0]
    );
    Ok(())
}
