//! Rows for cross-entropy with label smoothing, loss and gradient as one row (the op exists to
//! fuse them), against the PyTorch-eager way: log-softmax into a `[rows, vocab]` temporary, the
//! smoothed NLL, the loss sum, and a separate backward into a gradient buffer. The fused op can
//! write the gradient over the logits (no `[rows, vocab]` buffer besides them); the row times the
//! same kernel writing to a second buffer, so that every timed call reads the same random logits.
//!
//! Both variants are divided by the fused op's minimal bytes (`3 s` per logit: each row read
//! twice, the gradient written once). GPU rows only.

use fusedreg::cross_entropy::{self as xe, unfused, Config, Outputs, Reduction, Workspace};
use fusedreg::{Error, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::{filled, random};
use half::bf16;

use crate::Ctx;

const ALPHA: f64 = 0.1;
const IGNORE: i64 = -100;

super::case!(run);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let Some(h) = ctx.handle.clone() else {
        return Ok(());
    };
    // Llama-3's vocabulary at 8k tokens, GPT-2's at 16k (the shapes of REFERENCE.md §8).
    shape(ctx, &h, 8192, 128_256)?;
    if !ctx.quick {
        shape(ctx, &h, 16_384, 50_257)?;
    }
    Ok(())
}

fn shape(ctx: &mut Ctx, h: &Handle, rows: usize, vocab: usize) -> Result<()> {
    let op = "cross_entropy";
    let case = format!("bf16 [{rows},{vocab}] smoothing {ALPHA} i64 targets");
    let n = rows * vocab;
    // logits, and the baseline's log-probabilities and gradient.
    if !super::starts(ctx, h, op, &[op], &case, n * 3 * 2) {
        return Ok(());
    }
    let cfg = Config::new(rows, vocab)?
        .label_smoothing(ALPHA)?
        .ignore_index(IGNORE)
        .reduction(Reduction::Mean);
    // Every tenth row ignored; the others' targets spread over the vocabulary.
    let t: Vec<i64> = (0..rows as u64)
        .map(|r| {
            if r % 10 == 3 {
                IGNORE
            } else {
                (r.wrapping_mul(2_654_435_761) % vocab as u64) as i64
            }
        })
        .collect();
    let targets = h
        .stream()
        .clone_htod(&t)
        .map_err(Error::driver("targets"))?;
    // Random logits (a spread of a few units, as a trained model's): the running maximum and the
    // exps see real data. The fused row writes its gradient to `grad`, not over the logits, so
    // every timed call reads the same random logits; it is the in-place op's kernel and bytes.
    let logits = random::<bf16>(h, n, 0xce01, -8.0, 8.0)?;
    let mut lp = filled::<bf16>(h, n, 0)?;
    let mut grad = filled::<bf16>(h, n, 0)?;
    let mut loss = filled::<f32>(h, 1, 0)?;
    let mut ws = Workspace::new();
    let plan = ctx.plan;
    let bytes = xe::fused_bytes(
        fusedreg::DtypeKind::Bf16,
        rows as u64,
        vocab as u64,
        8,
        true,
    ) as f64;

    let unf = Measurement::gpu(h, plan, bytes, || {
        let out = Outputs {
            workspace: Some(&mut ws),
            ..Outputs::new(loss.as_view_mut())
        };
        unfused::forward_backward(h, &cfg, &logits, &targets, &mut lp, &mut grad, out)
    })?;
    let fused = Measurement::gpu(h, plan, bytes, || {
        let out = Outputs {
            workspace: Some(&mut ws),
            ..Outputs::new(loss.as_view_mut())
        };
        xe::forward_backward(h, &cfg, &logits, &targets, &mut grad, out)
    })?;
    ctx.push(
        Row::new(op, &case, n as u64, fused)
            .with_unfused(unf)
            .note(format!(
                "fwd+bwd, 10% ignore_index, mean, random logits; gradient to a second buffer (the \
                 in-place op's kernel; unfused: +{:.1} GB of log-probs and gradient)",
                (2 * 2 * n) as f64 / 1e9
            )),
    );
    Ok(())
}
