//! The stochastic-depth row: one training step of the residual MLP (24 blocks, hidden 1024,
//! 4096 tokens) with a linear schedule to p_L = 0.5, where dropped blocks launch nothing, against
//! the same step computing every block (what timm's and torchvision's drop path cost: the
//! dropped branch is computed and multiplied by zero).

use fusedreg::stochastic_depth::Schedule;
use fusedreg::Result;
use fusedreg_tools::mlp::{MlpConfig, Trainer};
use fusedreg_tools::report::{Measurement, Row};

use crate::Ctx;

const OP: &str = "train step (stochastic depth)";

super::case!(run);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let gpu = ctx.handle.is_some();
    let base = if gpu {
        MlpConfig::gpu()
    } else {
        MlpConfig::cpu()
    };
    let case = format!(
        "{} blocks x {}, {} tokens, linear p_L=0.5",
        base.blocks, base.hidden, base.tokens
    );
    if !ctx.wants(OP, &case) {
        return Ok(());
    }
    ctx.progress(OP, &case);
    let mut times = Vec::new();
    let mut blocks_run = 0.0;
    for depth in [Some(Schedule::linear(0.5)), None] {
        let cfg = MlpConfig {
            depth: depth.clone(),
            ..base.clone()
        };
        let m = match &ctx.handle {
            Some(h) => {
                let mut t = match Trainer::gpu(h, cfg) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("\nskipping the training-step row: {e}");
                        return Ok(());
                    }
                };
                // Every sample averages over many steps, so the mean number of blocks run
                // approaches the schedule's expectation (about 3/4 of them).
                let mut runs = (0u64, 0u64);
                let m = Measurement::gpu(h, ctx.plan, 0.0, || {
                    runs.0 += t.next_plan().running() as u64;
                    runs.1 += 1;
                    t.step(false).map(|_| ())
                })?;
                if depth.is_some() {
                    blocks_run = runs.0 as f64 / runs.1 as f64;
                }
                m
            }
            None => {
                let mut t = Trainer::cpu(cfg)?;
                Measurement::cpu(ctx.plan, 0.0, || {
                    t.step(false).expect("cpu step");
                })
            }
        };
        times.push(m);
    }
    let (with, without) = (times.remove(0), times.remove(0));
    let note = if gpu {
        format!(
            "{blocks_run:.1} of {} blocks run per step on average; unfused = every block computed",
            base.blocks
        )
    } else {
        "CPU reference ops".to_string()
    };
    ctx.push(
        Row::new(OP, &case, base.tokens as u64, with)
            .with_unfused(without)
            .note(note),
    );
    Ok(())
}
