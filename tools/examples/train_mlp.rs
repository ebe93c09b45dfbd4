//! End-to-end: train a deep residual MLP with fusedreg's fused dropout-residual, stochastic
//! depth (dropped blocks launch nothing), global-norm clipping and AdamW, the matrix products
//! through cuBLAS, on synthetic data (regressing the outputs of a fixed random teacher).
//!
//! ```text
//! cargo run --release --example train_mlp                  # GPU if present, else the CPU size
//! cargo run --release --example train_mlp -- --cpu         # CPU reference ops, small size
//! cargo run --release --example train_mlp -- --bench       # GPU: step time, linear p_L = 0.5 vs none
//! cargo run --release --example train_mlp -- --steps 300 --no-depth
//! cargo run --release --example train_mlp -- --prenorm ln     # pre-norm, LayerNorm Scaling on vs off
//! cargo run --release --example train_mlp -- --prenorm rms --cpu
//! ```
//!
//! `--prenorm [ln|rms]` trains the pre-norm variant (every block's entry a fused dropout + add +
//! LayerNorm / RMSNorm) twice from the same seed, with LayerNorm Scaling (`1 / sqrt(l)` on the
//! l-th entry norm) and without, and prints both loss curves side by side: 24 blocks on the GPU,
//! 12 small blocks on the CPU.

use std::time::Instant;

use fusedreg::dropout_add_norm::Norm;
use fusedreg::stochastic_depth::Schedule;
use fusedreg::{Handle, Result};
use fusedreg_tools::mlp::{Backend, MlpConfig, PreNorm, Trainer};

struct Args {
    cpu: bool,
    bench: bool,
    steps: Option<u64>,
    no_depth: bool,
    prenorm: Option<Norm>,
}

fn args() -> Args {
    let mut a = Args {
        cpu: false,
        bench: false,
        steps: None,
        no_depth: false,
        prenorm: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--cpu" => a.cpu = true,
            "--bench" => a.bench = true,
            "--no-depth" => a.no_depth = true,
            "--steps" => a.steps = it.next().and_then(|s| s.parse().ok()),
            "--prenorm" => {
                a.prenorm = match it.next().as_deref() {
                    Some("ln") => Some(Norm::LayerNorm),
                    Some("rms") => Some(Norm::RmsNorm),
                    other => {
                        eprintln!("--prenorm takes ln or rms, got {other:?}; using ln");
                        Some(Norm::LayerNorm)
                    }
                }
            }
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
    if let Some(norm) = a.prenorm {
        return prenorm(handle.as_ref(), norm, &a);
    }
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

/// The pre-norm variant trained twice from the same seed, LayerNorm Scaling on and off; the two
/// loss curves side by side.
fn prenorm(handle: Option<&Handle>, norm: Norm, a: &Args) -> Result<()> {
    let mut cfg = match handle {
        Some(_) => MlpConfig::gpu(),
        // Deeper than the residual model's CPU run, so the depth scaling has layers to act on.
        None => MlpConfig {
            blocks: 12,
            ..MlpConfig::cpu()
        },
    };
    if a.no_depth {
        cfg.depth = None;
    }
    let (steps, every) = match handle {
        Some(_) => (a.steps.unwrap_or(200), 20),
        None => (a.steps.unwrap_or(100), 10),
    };
    println!(
        "pre-norm {norm:?} on {}: {} blocks, hidden {}, {} tokens, stochastic depth {:?}",
        match handle {
            Some(h) => h.device_info()?.name,
            None => "the CPU (reference ops)".to_string(),
        },
        cfg.blocks,
        cfg.hidden,
        cfg.tokens,
        cfg.depth
    );
    let mut curves = Vec::new();
    for scaling in [true, false] {
        let c = MlpConfig {
            prenorm: Some(PreNorm::new(norm, scaling)),
            ..cfg.clone()
        };
        curves.push(match handle {
            Some(h) => curve(&mut Trainer::gpu(h, c)?, steps, every)?,
            None => curve(&mut Trainer::cpu(c)?, steps, every)?,
        });
    }
    println!("{:>6}  {:>14}  {:>14}", "step", "LNS on", "LNS off");
    for ((s, on), (_, off)) in curves[0].iter().zip(&curves[1]) {
        println!("{s:>6}  {on:>14.5}  {off:>14.5}");
    }
    let (on, off) = (curves[0].last(), curves[1].last());
    if let (Some((_, on)), Some((_, off))) = (on, off) {
        println!(
            "final loss: LayerNorm Scaling on {on:.5}, off {off:.5} (on / off = {:.3})",
            on / off
        );
    }
    Ok(())
}

/// The loss every `every` steps and at the last step.
fn curve<B: Backend>(t: &mut Trainer<B>, steps: u64, every: u64) -> Result<Vec<(u64, f64)>> {
    let mut out = Vec::new();
    for s in 0..steps {
        let report = s % every == 0 || s + 1 == steps;
        let loss = t.step(report)?;
        if report {
            out.push((s, loss));
        }
    }
    Ok(out)
}
