//! Rows for the pre-norm entry `s = residual + dropout(x); out = norm(s)`, forward and prenorm
//! backward (the stream gradient `d_s` flows in, `d_residual` out), against the unfused way:
//! `dropout` with its residual writing `s`, then a separate norm kernel reading it back (and the reverse
//! in backward). The baseline's first kernel is itself fused, so the rows measure what fusing the
//! norm adds. Both variants of a row are divided by the fused op's minimal bytes. Inputs are
//! random (uniform, seeded). GPU rows only.

use fusedreg::dropout_add_norm::{
    self as dan, unfused, BackwardArgs, BackwardOut, Config, ForwardArgs, ForwardOut, Norm,
    Workspace,
};
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
    shape::<bf16>(ctx, &h, Norm::LayerNorm)?;
    shape::<f32>(ctx, &h, Norm::LayerNorm)?;
    if !ctx.quick {
        shape::<bf16>(ctx, &h, Norm::RmsNorm)?;
    }
    Ok(())
}

fn shape<T: Dtype>(ctx: &mut Ctx, h: &Handle, norm: Norm) -> Result<()> {
    let (name, ln) = match norm {
        Norm::LayerNorm => ("layernorm", true),
        Norm::RmsNorm => ("rmsnorm", false),
    };
    let case = format!("{} [{ROWS},{COLS}] {name} prenorm", T::KIND.name());
    let (fwd, bwd) = ("dropout_add_norm fwd", "dropout_add_norm bwd");
    let n = ROWS * COLS;
    let kind = T::KIND;
    // x, residual, out, s, d_out, d_s, dx, d_residual.
    if !super::starts(
        ctx,
        h,
        "dropout_add_norm",
        &[fwd, bwd],
        &case,
        n * 8 * kind.size(),
    ) {
        return Ok(());
    }
    // 32-bit keys named, not the dtype's default (16-bit at bf16 since 2026-12-07): these rows
    // keep the meaning of their recorded GPU figures and of the sass-budget entries they carry.
    let cfg = Config::new(ROWS, COLS, norm, 1e-5)?
        .with_dropout(P, 42, 7)?
        .with_resolution(MaskResolution::Bits32);
    let x = random::<T>(h, n, 0xda01, -1.0, 1.0)?;
    let r = random::<T>(h, n, 0xda02, -2.0, 2.0)?;
    let d_out = random::<T>(h, n, 0xda03, -1.0, 1.0)?;
    let d_s = random::<T>(h, n, 0xda04, -1.0, 1.0)?;
    let gamma = random::<T>(h, COLS, 0xda05, 0.5, 1.5)?;
    let beta = random::<T>(h, COLS, 0xda06, -0.5, 0.5)?;
    let mut out = filled::<T>(h, n, 0)?;
    let mut s = filled::<T>(h, n, 0)?;
    let mut mean = filled::<f32>(h, ROWS, 0)?;
    let mut rstd = filled::<f32>(h, ROWS, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut d_res = filled::<T>(h, n, 0)?;
    let mut dgamma = filled::<T>(h, COLS, 0)?;
    let mut dbeta = filled::<T>(h, COLS, 0)?;
    let mut ws = Workspace::new();
    let plan = ctx.plan;
    let nn = n as u64;
    let args = || ForwardArgs {
        residual: Some(r.as_view()),
        beta: ln.then(|| beta.as_view()),
        ..ForwardArgs::new(x.as_view(), gamma.as_view())
    };
    let mut forward = |fused: bool| {
        let outs = ForwardOut {
            out: out.as_view_mut(),
            s: s.as_view_mut(),
            mean: mean.as_view_mut(),
            rstd: rstd.as_view_mut(),
        };
        if fused {
            dan::forward(h, &cfg, args(), outs)
        } else {
            unfused::forward(h, &cfg, args(), outs)
        }
    };

    if ctx.wants(fwd, &case) {
        let bytes = dan::fused_forward_bytes(kind, kind, nn, true) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || forward(true))?;
        let unf = Measurement::gpu(h, plan, bytes, || forward(false))?;
        ctx.push(
            Row::new(fwd, &case, nn, fused)
                .with_unfused(unf)
                .note(format!(
                    "p={P}, residual, eps 1e-5; unfused: dropout + residual then the norm"
                )),
        );
    }
    if ctx.wants(bwd, &case) {
        // The backward reads the forward's s and row statistics.
        forward(true)?;
        let bytes = dan::fused_backward_bytes(kind, kind, nn, true, true) as f64;
        let mut backward = |fused: bool| {
            let args = BackwardArgs {
                d_s: Some(d_s.as_view()),
                workspace: Some(&mut ws),
                ..BackwardArgs::new(
                    d_out.as_view(),
                    s.as_view(),
                    gamma.as_view(),
                    mean.as_view(),
                    rstd.as_view(),
                )
            };
            let outs = BackwardOut {
                d_residual: Some(d_res.as_view_mut()),
                dbeta: ln.then(|| dbeta.as_view_mut()),
                ..BackwardOut::new(dx.as_view_mut(), dgamma.as_view_mut())
            };
            if fused {
                dan::backward(h, &cfg, args, outs)
            } else {
                unfused::backward(h, &cfg, args, outs)
            }
        };
        let fused = Measurement::gpu(h, plan, bytes, || backward(true))?;
        let unf = Measurement::gpu(h, plan, bytes, || backward(false))?;
        ctx.push(
            Row::new(bwd, &case, nn, fused)
                .with_unfused(unf)
                .note(if ln {
                    "d_s in, d_residual out; dgamma, dbeta deterministic (slab partials)"
                } else {
                    "d_s in, d_residual out; dgamma deterministic (slab partials)"
                }),
        );
    }
    Ok(())
}
