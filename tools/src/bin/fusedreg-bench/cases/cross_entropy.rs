//! Rows for cross-entropy with label smoothing, loss and gradient as one row (the op exists to
//! fuse them), against the PyTorch-eager way: log-softmax into a `[rows, vocab]` temporary, the
//! smoothed NLL, the loss sum, and a separate backward into a gradient buffer. The fused op
//! writes the gradient over the logits, so it needs no `[rows, vocab]` buffer besides them.
//!
//! Both variants are divided by the fused op's minimal bytes (`3 s` per logit: each row read
//! twice, the gradient written once). GPU rows only.

use fusedreg::cross_entropy::{self as xe, unfused, Config, Outputs, Reduction, Workspace};
use fusedreg::{Error, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::filled;
use half::bf16;

use crate::Ctx;

const ALPHA: f64 = 0.1;
const IGNORE: i64 = -100;

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
    if !ctx.wants(op, &case) {
        return Ok(());
    }
    let n = rows * vocab;
    // logits, and the baseline's log-probabilities and gradient.
    if !super::fits(h, n * 3 * 2, &case) {
        return Ok(());
    }
    ctx.progress(op, &case);
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
    // 0x3c3c is about 0.0115. After the first in-place call the buffer holds gradients: finite
    // values of the same shape, so every timed call does the same work.
    let mut logits = filled::<bf16>(h, n, 0x3c)?;
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
        xe::forward_backward_inplace(h, &cfg, &mut logits, &targets, out)
    })?;
    ctx.push(
        Row::new(op, &case, n as u64, fused)
            .with_unfused(unf)
            .note(format!(
                "fwd+bwd, 10% ignore_index, mean; gradient in place (unfused: +{:.1} GB of \
                 log-probs and gradient)",
                (2 * 2 * n) as f64 / 1e9
            )),
    );
    Ok(())
}
