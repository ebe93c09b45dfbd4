//! Rows for the fused bias + dropout + residual add, forward and backward, against the
//! PyTorch-eager way (bias add, dropout with a byte mask, residual add; masked scale and a
//! separate bias-gradient reduction), plus the cost of the per-sample drop path.
//!
//! Both variants of a row are divided by the same minimal bytes (the fused, mask-regenerating
//! floor of REFERENCE.md §2), so their GB/s compare like their times.

use fusedreg::dropout_residual::{
    self as dr, cpu, unfused, unfused::Unfused, BackwardOptions, Config, DropPath, ForwardOptions,
    Workspace,
};
use fusedreg::{Dtype, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::filled;
use half::bf16;

use crate::Ctx;

const P: f64 = 0.1;

pub fn run(ctx: &mut Ctx) -> Result<()> {
    match ctx.handle.clone() {
        Some(h) => {
            shape::<bf16>(ctx, &h, 16_384, 4096, true)?;
            shape::<f32>(ctx, &h, 16_384, 4096, true)?;
            let flat: &[u32] = if ctx.quick { &[26] } else { &[24, 26, 28] };
            for &log in flat {
                shape::<bf16>(ctx, &h, 1, 1 << log, false)?;
                shape::<f32>(ctx, &h, 1, 1 << log, false)?;
            }
            drop_path(ctx, &h)?;
        }
        None => {
            cpu_shape::<bf16>(ctx, 256, 1024)?;
            cpu_shape::<f32>(ctx, 256, 1024)?;
        }
    }
    Ok(())
}

fn case_name<T: Dtype>(rows: usize, cols: usize, bias: bool) -> String {
    let shape = if rows == 1 {
        format!("2^{}", cols.trailing_zeros())
    } else {
        format!("[{rows},{cols}]")
    };
    format!(
        "{} {shape}{}",
        T::KIND.name(),
        if bias { " bias" } else { "" }
    )
}

fn shape<T: Dtype>(ctx: &mut Ctx, h: &Handle, rows: usize, cols: usize, bias: bool) -> Result<()> {
    let case = case_name::<T>(rows, cols, bias);
    let (fwd, bwd) = ("dropout_residual fwd", "dropout_residual bwd");
    if !ctx.wants(fwd, &case) && !ctx.wants(bwd, &case) {
        return Ok(());
    }
    let n = rows * cols;
    let kind = T::KIND;
    let need = n * (7 * kind.size() + 1) + n / 8;
    let free = h.context().mem_get_info().map(|(f, _)| f).unwrap_or(0);
    if need as f64 > 0.8 * free as f64 {
        eprintln!("\nskipping {case}: needs {need} bytes of device memory");
        return Ok(());
    }
    ctx.progress("dropout_residual", &case);
    let cfg = Config::new(rows, cols, P, 42, 7)?;
    let x = filled::<T>(h, n, 0x3c)?;
    let r = filled::<T>(h, n, 0x3b)?;
    let dy = filled::<T>(h, n, 0x3d)?;
    let b = filled::<T>(h, cols, 0x3a)?;
    let mut y = filled::<T>(h, n, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut m8 = filled::<u8>(h, n, 1)?;
    let mut dbias = filled::<T>(h, cols, 0)?;
    let mut ws = Workspace::new();
    let mut base = Unfused::<T>::new(h);
    let plan = ctx.plan;
    let nn = n as u64;
    let mask_bytes = nn; // the unfused path keeps one byte per element until backward

    if ctx.wants(fwd, &case) {
        let bytes = dr::fused_forward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let opts = ForwardOptions {
                bias: bias.then(|| b.as_view()),
                ..Default::default()
            };
            dr::forward(h, &cfg, &x, &r, &mut y, opts)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.forward(&cfg, &x, bias.then(|| b.as_view()), &r, &mut y, &mut m8)
        })?;
        ctx.push(
            Row::new(fwd, &case, nn, fused)
                .with_unfused(unf)
                .held(0, mask_bytes)
                .note(format!(
                    "p={P}; mask regenerated in backward (unfused: 1-byte mask)"
                )),
        );
        if bias && kind == fusedreg::DtypeKind::Bf16 {
            let mut mask = filled::<u32>(h, cfg.mask_words(), 0)?;
            let bytes_bm = dr::fused_forward_bytes(kind, nn, true) as f64;
            let fused = Measurement::gpu(h, plan, bytes_bm, || {
                let opts = ForwardOptions {
                    bias: Some(b.as_view()),
                    mask_out: Some(mask.as_view_mut()),
                    ..Default::default()
                };
                dr::forward(h, &cfg, &x, &r, &mut y, opts)
            })?;
            let unf = Measurement::gpu(h, plan, bytes_bm, || {
                base.forward(&cfg, &x, Some(b.as_view()), &r, &mut y, &mut m8)
            })?;
            ctx.push(
                Row::new(fwd, &format!("{case} +bitmask"), nn, fused)
                    .with_unfused(unf)
                    .held(4 * cfg.mask_words() as u64, mask_bytes)
                    .note("writes the 1-bit mask for backward"),
            );
        }
    }
    if ctx.wants(bwd, &case) {
        let bytes = dr::fused_backward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let opts = BackwardOptions {
                dbias: bias.then(|| dbias.as_view_mut()),
                workspace: Some(&mut ws),
                ..Default::default()
            };
            dr::backward(h, &cfg, &dy, &mut dx, opts)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.backward(&cfg, &dy, &m8, &mut dx, bias.then(|| dbias.as_view_mut()))
        })?;
        ctx.push(
            Row::new(bwd, &case, nn, fused)
                .with_unfused(unf)
                .note(if bias {
                    "with dbias (deterministic two-stage)"
                } else {
                    "no dbias"
                }),
        );
        if bias && kind == fusedreg::DtypeKind::Bf16 {
            // The backward that reads the 1-bit mask written by the forward instead of
            // regenerating it: n/8 more bytes, no Philox work.
            let mut mask = filled::<u32>(h, cfg.mask_words(), 0)?;
            let opts = ForwardOptions {
                bias: Some(b.as_view()),
                mask_out: Some(mask.as_view_mut()),
                ..Default::default()
            };
            dr::forward(h, &cfg, &x, &r, &mut y, opts)?;
            let bytes_bm = dr::fused_backward_bytes(kind, nn, true) as f64;
            let fused = Measurement::gpu(h, plan, bytes_bm, || {
                let opts = BackwardOptions {
                    mask: Some(mask.as_view()),
                    dbias: Some(dbias.as_view_mut()),
                    workspace: Some(&mut ws),
                    ..Default::default()
                };
                dr::backward(h, &cfg, &dy, &mut dx, opts)
            })?;
            let unf = Measurement::gpu(h, plan, bytes_bm, || {
                base.backward(&cfg, &dy, &m8, &mut dx, Some(dbias.as_view_mut()))
            })?;
            ctx.push(
                Row::new(bwd, &format!("{case} +bitmask"), nn, fused)
                    .with_unfused(unf)
                    .note("reads the forward's 1-bit mask (no Philox); with dbias"),
            );
        }
    }
    Ok(())
}

/// The per-sample drop path generated in the fused kernel, against the same kernel without it.
fn drop_path(ctx: &mut Ctx, h: &Handle) -> Result<()> {
    let (rows, cols) = (16_384usize, 4096usize);
    let op = "dropout_residual fwd";
    let case = "bf16 [16384,4096] bias +drop path";
    if !ctx.wants(op, case) {
        return Ok(());
    }
    ctx.progress(op, case);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, P, 42, 7)?;
    let path_cfg = cfg.with_drop_path(DropPath::new(0.1, 8)?);
    let x = filled::<bf16>(h, n, 0x3c)?;
    let r = filled::<bf16>(h, n, 0x3b)?;
    let b = filled::<bf16>(h, cols, 0x3a)?;
    let mut y = filled::<bf16>(h, n, 0)?;
    let bytes = dr::fused_forward_bytes(fusedreg::DtypeKind::Bf16, n as u64, false) as f64;
    let mut time = |cfg: &Config| {
        Measurement::gpu(h, ctx.plan, bytes, || {
            let opts = ForwardOptions {
                bias: Some(b.as_view()),
                ..Default::default()
            };
            dr::forward(h, cfg, &x, &r, &mut y, opts)
        })
    };
    let without = time(&cfg)?;
    let with = time(&path_cfg)?;
    let extra = 100.0 * (with.ms / without.ms - 1.0);
    ctx.push(Row::new(op, case, n as u64, with).note(format!(
        "p_path=0.1 generated in-kernel: {extra:+.1}% time vs {:.4} ms without (dropped rows skip reading x)",
        without.ms
    )));
    Ok(())
}

fn cpu_shape<T: Dtype>(ctx: &mut Ctx, rows: usize, cols: usize) -> Result<()> {
    let case = case_name::<T>(rows, cols, true);
    ctx.progress("dropout_residual (CPU)", &case);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, P, 42, 7)?;
    let v = |k: usize, off: usize| T::from_f32_rn(((k * 7919 + off) % 4001) as f32 / 1000.0 - 2.0);
    let x: Vec<T> = (0..n).map(|k| v(k, 1)).collect();
    let r: Vec<T> = (0..n).map(|k| v(k, 2)).collect();
    let dy: Vec<T> = (0..n).map(|k| v(k, 3)).collect();
    let b: Vec<T> = (0..cols).map(|k| v(k, 4)).collect();
    let (mut y, mut dx, mut db, mut m8) = (
        vec![T::default(); n],
        vec![T::default(); n],
        vec![T::default(); cols],
        vec![0u8; n],
    );
    let plan = ctx.plan;
    let kind = T::KIND;
    let nn = n as u64;
    let bytes = dr::fused_forward_bytes(kind, nn, false) as f64;
    let fused = Measurement::cpu(plan, bytes, || {
        let opts = cpu::ForwardOptions {
            bias: Some(&b),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &r, &mut y, opts).expect("cpu forward")
    });
    let unf = Measurement::cpu(plan, bytes, || {
        unfused::forward_cpu(&cfg, &x, Some(&b), &r, &mut y, &mut m8).expect("cpu unfused")
    });
    ctx.push(
        Row::new("dropout_residual fwd", &case, nn, fused)
            .with_unfused(unf)
            .note("CPU reference"),
    );
    let bytes = dr::fused_backward_bytes(kind, nn, false) as f64;
    let fused = Measurement::cpu(plan, bytes, || {
        let opts = cpu::BackwardOptions {
            dbias: Some(&mut db),
            ..Default::default()
        };
        cpu::backward(&cfg, &dy, &mut dx, opts).expect("cpu backward")
    });
    let unf = Measurement::cpu(plan, bytes, || {
        unfused::backward_cpu(&cfg, &dy, &m8, &mut dx, Some(&mut db)).expect("cpu unfused")
    });
    ctx.push(
        Row::new("dropout_residual bwd", &case, nn, fused)
            .with_unfused(unf)
            .note("CPU reference"),
    );
    Ok(())
}
