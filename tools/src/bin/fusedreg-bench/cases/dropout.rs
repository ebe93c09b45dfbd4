//! Rows for plain dropout with a bias (`y = dropout(x + bias)`), forward and backward with dbias,
//! against the PyTorch-eager way (bias add, dropout writing a byte mask; masked scale, then a
//! separate column sum), plus the 16-bit keying (one Philox block keys 8 elements, not 4).
//!
//! Both variants of a row are divided by the fused op's minimal bytes, so their GB/s compare like
//! their times. GPU rows only: the CPU reference is the shared one `dropout_residual` times.

use fusedreg::dropout::{
    self as dp, unfused::Unfused, BackwardOptions, Config, ForwardOptions, MaskResolution,
    Workspace,
};
use fusedreg::{Dtype, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::filled;
use half::bf16;

use crate::Ctx;

const P: f64 = 0.1;
const ROWS: usize = 16_384;
const COLS: usize = 4096;

pub fn run(ctx: &mut Ctx) -> Result<()> {
    let Some(h) = ctx.handle.clone() else {
        return Ok(());
    };
    shape::<bf16>(ctx, &h, MaskResolution::Bits32)?;
    shape::<f32>(ctx, &h, MaskResolution::Bits32)?;
    if !ctx.quick {
        shape::<bf16>(ctx, &h, MaskResolution::Bits16)?;
    }
    Ok(())
}

fn shape<T: Dtype>(ctx: &mut Ctx, h: &Handle, res: MaskResolution) -> Result<()> {
    let bits16 = res == MaskResolution::Bits16;
    let case = format!(
        "{} [{ROWS},{COLS}] bias{}",
        T::KIND.name(),
        if bits16 { " 16-bit keys" } else { "" }
    );
    let (fwd, bwd) = ("dropout fwd", "dropout bwd");
    if !ctx.wants(fwd, &case) && !ctx.wants(bwd, &case) {
        return Ok(());
    }
    let n = ROWS * COLS;
    let kind = T::KIND;
    // x, y, dy, dx, the baseline's temporary t, and its byte mask.
    if !super::fits(h, n * (5 * kind.size() + 1), &case) {
        return Ok(());
    }
    ctx.progress("dropout", &case);
    let cfg = Config::new(ROWS, COLS, P, 42, 7)?.with_resolution(res);
    // The baseline keys at 32 bits only (PyTorch has no 16-bit keying either).
    let base_cfg = Config::new(ROWS, COLS, P, 42, 7)?;
    let x = filled::<T>(h, n, 0x3c)?;
    let dy = filled::<T>(h, n, 0x3d)?;
    let b = filled::<T>(h, COLS, 0x3a)?;
    let mut y = filled::<T>(h, n, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut m8 = filled::<u8>(h, n, 1)?;
    let mut dbias = filled::<T>(h, COLS, 0)?;
    let mut ws = Workspace::new();
    let mut base = Unfused::<T>::new(h);
    let plan = ctx.plan;
    let nn = n as u64;
    let keys = if bits16 {
        "; 16-bit keys (half the Philox work), baseline at 32"
    } else {
        ""
    };

    if ctx.wants(fwd, &case) {
        let bytes = dp::fused_forward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let opts = ForwardOptions {
                bias: Some(b.as_view()),
                ..Default::default()
            };
            dp::forward(h, &cfg, &x, &mut y, opts)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.forward(&base_cfg, &x, Some(b.as_view()), &mut y, &mut m8)
        })?;
        ctx.push(
            Row::new(fwd, &case, nn, fused)
                .with_unfused(unf)
                .held(0, nn)
                .note(format!(
                    "p={P}; mask regenerated in backward (unfused: bias add + 1-byte mask){keys}"
                )),
        );
    }
    if ctx.wants(bwd, &case) {
        let bytes = dp::fused_backward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let opts = BackwardOptions {
                dbias: Some(dbias.as_view_mut()),
                workspace: Some(&mut ws),
                ..Default::default()
            };
            dp::backward(h, &cfg, &dy, &mut dx, opts)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.backward(&base_cfg, &dy, &m8, &mut dx, Some(dbias.as_view_mut()))
        })?;
        ctx.push(
            Row::new(bwd, &case, nn, fused)
                .with_unfused(unf)
                .note(format!(
                    "with dbias (deterministic two-stage; unfused: masked scale + column sum){keys}"
                )),
        );
    }
    Ok(())
}
