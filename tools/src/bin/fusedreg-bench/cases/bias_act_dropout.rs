//! Rows for the FFN site `y = dropout(act(x + bias))`, forward and backward with dbias, against
//! the PyTorch-eager way (bias add keeping h, activation, dropout writing a byte mask; masked
//! scale, activation gradient, a separate column sum).
//!
//! The fused backward recomputes `h = x + bias` from the forward's input ([`Preact::X`]), so the
//! fused forward stores nothing for it. Both variants of a row are divided by the fused op's
//! minimal bytes. Inputs are random (uniform, seeded). GPU rows only.

use fusedreg::bias_act_dropout::{self as bad, unfused, Activation, Config, Preact};
use fusedreg::dropping::MaskResolution;
use fusedreg::{Dtype, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::{filled, random};
use half::bf16;

use super::{COLS, P, ROWS};
use crate::Ctx;

super::case!(run);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let Some(h) = ctx.handle.clone() else {
        return Ok(());
    };
    for act in [Activation::GeluTanh, Activation::Relu] {
        shape::<bf16>(ctx, &h, act)?;
        if !ctx.quick {
            shape::<f32>(ctx, &h, act)?;
        }
    }
    Ok(())
}

fn shape<T: Dtype>(ctx: &mut Ctx, h: &Handle, act: Activation) -> Result<()> {
    let name = match act {
        Activation::GeluTanh => "gelu-tanh",
        Activation::GeluErf => "gelu-erf",
        Activation::Silu => "silu",
        Activation::Relu => "relu",
    };
    let case = format!("{} [{ROWS},{COLS}] bias {name}", T::KIND.name());
    let (fwd, bwd) = ("bias_act_dropout fwd", "bias_act_dropout bwd");
    let n = ROWS * COLS;
    let kind = T::KIND;
    // x, y, dy, dx, the baseline's h and temporary, and its byte mask.
    let need = n * (6 * kind.size() + 1);
    if !super::starts(ctx, h, "bias_act_dropout", &[fwd, bwd], &case, need) {
        return Ok(());
    }
    // 32-bit keys named, not the dtype's default (16-bit at bf16 since 2026-12-07): these rows
    // keep the meaning of their recorded GPU figures and of the sass-budget entries they carry.
    let cfg = Config::new(ROWS, COLS, act, P, 42, 7)?.with_resolution(MaskResolution::Bits32);
    // Pre-activations of both signs and a few units: GELU's range branches diverge as on real data.
    let x = random::<T>(h, n, 0xba01, -3.0, 3.0)?;
    let dy = random::<T>(h, n, 0xba02, -1.0, 1.0)?;
    let b = random::<T>(h, COLS, 0xba03, -0.5, 0.5)?;
    let mut y = filled::<T>(h, n, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut pre = filled::<T>(h, n, 0)?;
    let mut m8 = filled::<u8>(h, n, 1)?;
    let mut dbias = filled::<T>(h, COLS, 0)?;
    let plan = ctx.plan;
    let nn = n as u64;

    if ctx.wants(fwd, &case) {
        let bytes = bad::fused_forward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            bad::forward(h, &cfg, &x, Some(b.as_view()), &mut y, None)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            unfused::forward(h, &cfg, &x, &b, &mut y, &mut m8, &mut pre)
        })?;
        ctx.push(
            Row::new(fwd, &case, nn, fused)
                .with_unfused(unf)
                .held(0, nn * (kind.size() as u64 + 1))
                .note(format!(
                    "p={P}; backward recomputes x + bias and the mask (unfused keeps h and a 1-byte mask)"
                )),
        );
    }
    if ctx.wants(bwd, &case) {
        // The baseline's backward reads the h and mask its forward wrote.
        unfused::forward(h, &cfg, &x, &b, &mut y, &mut m8, &mut pre)?;
        let bytes = bad::fused_backward_bytes(kind, nn) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let pre = Preact::X {
                x: x.as_view(),
                bias: Some(b.as_view()),
            };
            bad::backward(h, &cfg, &dy, pre, &mut dx, Some(dbias.as_view_mut()))
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            unfused::backward(h, &cfg, &dy, &m8, &pre, &mut dx, Some(dbias.as_view_mut()))
        })?;
        ctx.push(
            Row::new(bwd, &case, nn, fused)
                .with_unfused(unf)
                .note("with dbias (deterministic two-stage); h recomputed from x"),
        );
    }
    Ok(())
}
