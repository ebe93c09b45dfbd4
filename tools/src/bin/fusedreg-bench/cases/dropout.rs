//! Rows for dropout, forward and backward, against the PyTorch-eager way (bias add, dropout with
//! a byte mask, the residual add; masked scale and a separate bias-gradient column sum), at its
//! two sites: with a residual (`dropout_residual fwd/bwd`, the exit of a residual sub-block,
//! flat and `[16384, 4096]` with bias, with the 1-bit mask, the per-sample drop path and on the
//! CPU) and without one (`dropout fwd/bwd`, the embedding / attention site, with bias, and 16-bit
//! keying). The row labels name the site and are the ones recorded in benches/RESULTS.md.
//!
//! Every timed input is random (a constant fill sends every lane down one branch). Both variants
//! of a row are divided by the fused op's minimal bytes (the mask-regenerating floor of
//! REFERENCE.md §2), so their GB/s compare like their times.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use fusedreg::dropout::{
    self as dp, cpu, unfused, unfused::Unfused, BackwardOptions, Config, DropPath, ForwardOptions,
    MaskResolution, Workspace,
};
use fusedreg::{Dtype, DtypeKind, Handle, Result};
use fusedreg_tools::report::{Measurement, Row};
use fusedreg_tools::timing::{filled, random, random_values};
use half::bf16;

use super::{COLS, P, ROWS};
use crate::Ctx;

super::case!(run);

pub fn run(ctx: &mut Ctx) -> Result<()> {
    match ctx.handle.clone() {
        Some(h) => {
            let big = (ROWS, COLS);
            shape::<bf16>(ctx, &h, Site::residual(big, true))?;
            shape::<f32>(ctx, &h, Site::residual(big, true))?;
            let flat: &[u32] = if ctx.quick { &[26] } else { &[24, 26, 28] };
            for &log in flat {
                shape::<bf16>(ctx, &h, Site::residual((1, 1 << log), false))?;
                shape::<f32>(ctx, &h, Site::residual((1, 1 << log), false))?;
            }
            drop_path(ctx, &h)?;
            shape::<bf16>(ctx, &h, Site::plain(big, MaskResolution::Bits32))?;
            shape::<f32>(ctx, &h, Site::plain(big, MaskResolution::Bits32))?;
            if !ctx.quick {
                shape::<bf16>(ctx, &h, Site::plain(big, MaskResolution::Bits16))?;
            }
        }
        None => {
            cpu_shape::<bf16>(ctx, 256, 1024)?;
            cpu_shape::<f32>(ctx, 256, 1024)?;
        }
    }
    Ok(())
}

/// One row pair's setting.
#[derive(Clone, Copy)]
struct Site {
    rows: usize,
    cols: usize,
    bias: bool,
    residual: bool,
    res: MaskResolution,
}

impl Site {
    fn residual((rows, cols): (usize, usize), bias: bool) -> Self {
        Site {
            rows,
            cols,
            bias,
            residual: true,
            res: MaskResolution::Bits32,
        }
    }

    fn plain((rows, cols): (usize, usize), res: MaskResolution) -> Self {
        Site {
            rows,
            cols,
            bias: true,
            residual: false,
            res,
        }
    }

    /// The row labels: the residual site keeps its recorded name.
    fn ops(&self) -> (&'static str, &'static str) {
        if self.residual {
            ("dropout_residual fwd", "dropout_residual bwd")
        } else {
            ("dropout fwd", "dropout bwd")
        }
    }

    fn case<T: Dtype>(&self) -> String {
        let shape = if self.rows == 1 {
            format!("2^{}", self.cols.trailing_zeros())
        } else {
            format!("[{},{}]", self.rows, self.cols)
        };
        let keys = if self.res == MaskResolution::Bits16 {
            " 16-bit keys"
        } else {
            ""
        };
        let bias = if self.bias { " bias" } else { "" };
        format!("{} {shape}{bias}{keys}", T::KIND.name())
    }
}

/// The forward's options: bias, residual, 1-bit mask output.
fn fwd_opts<'a, T>(
    bias: Option<CudaView<'a, T>>,
    residual: Option<CudaView<'a, T>>,
    mask_out: Option<CudaViewMut<'a, u32>>,
) -> ForwardOptions<'a, T> {
    ForwardOptions {
        bias,
        residual,
        mask_out,
        ..Default::default()
    }
}

/// Random activations in [-2, 2), seeded per buffer.
fn rand<T: Dtype>(h: &Handle, n: usize, seed: u64) -> Result<CudaSlice<T>> {
    random::<T>(h, n, seed, -2.0, 2.0)
}

fn shape<T: Dtype>(ctx: &mut Ctx, h: &Handle, site: Site) -> Result<()> {
    let case = site.case::<T>();
    let (fwd, bwd) = site.ops();
    let (rows, cols, bias) = (site.rows, site.cols, site.bias);
    let n = rows * cols;
    let kind = T::KIND;
    // x, r, y, dy, dx, the baseline's temporaries t and d, its byte mask, the bitmask.
    let need = n * (7 * kind.size() + 1) + n / 8;
    if !super::starts(
        ctx,
        h,
        fwd.trim_end_matches(" fwd"),
        &[fwd, bwd],
        &case,
        need,
    ) {
        return Ok(());
    }
    let cfg = Config::new(rows, cols, P, 42, 7)?.with_resolution(site.res);
    // The baseline keys at 32 bits only (PyTorch has no 16-bit keying either).
    let base_cfg = Config::new(rows, cols, P, 42, 7)?;
    let x = rand::<T>(h, n, 1)?;
    let r = rand::<T>(h, n, 2)?;
    let dy = rand::<T>(h, n, 3)?;
    let b = rand::<T>(h, cols, 4)?;
    let mut y = filled::<T>(h, n, 0)?;
    let mut dx = filled::<T>(h, n, 0)?;
    let mut m8 = filled::<u8>(h, n, 1)?;
    let mut dbias = filled::<T>(h, cols, 0)?;
    let mut ws = Workspace::new();
    let mut base = Unfused::<T>::new(h);
    let plan = ctx.plan;
    let nn = n as u64;
    let mask_bytes = nn; // the unfused path keeps one byte per element until backward
    let bitmask_rows = bias && kind == DtypeKind::Bf16 && site.residual;
    let keys = if site.res == MaskResolution::Bits16 {
        "; 16-bit keys (half the Philox work), baseline at 32"
    } else {
        ""
    };
    let rv = || site.residual.then(|| r.as_view());
    let bv = || bias.then(|| b.as_view());

    if ctx.wants(fwd, &case) {
        let bytes = dp::fused_forward_bytes(kind, nn, site.residual, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            dp::forward(h, &cfg, &x, &mut y, fwd_opts(bv(), rv(), None))
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.forward(&base_cfg, &x, bv(), rv(), &mut y, &mut m8)
        })?;
        let what = if site.residual {
            "1-byte mask"
        } else {
            "bias add + 1-byte mask"
        };
        ctx.push(
            Row::new(fwd, &case, nn, fused)
                .with_unfused(unf)
                .held(0, mask_bytes)
                .note(format!(
                    "p={P}; mask regenerated in backward (unfused: {what}){keys}"
                )),
        );
        if bitmask_rows {
            let mut mask = filled::<u32>(h, cfg.mask_words(), 0)?;
            let bytes_bm = dp::fused_forward_bytes(kind, nn, true, true) as f64;
            let fused = Measurement::gpu(h, plan, bytes_bm, || {
                dp::forward(
                    h,
                    &cfg,
                    &x,
                    &mut y,
                    fwd_opts(bv(), rv(), Some(mask.as_view_mut())),
                )
            })?;
            let unf = Measurement::gpu(h, plan, bytes_bm, || {
                base.forward(&base_cfg, &x, Some(b.as_view()), rv(), &mut y, &mut m8)
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
        let bytes = dp::fused_backward_bytes(kind, nn, false) as f64;
        let fused = Measurement::gpu(h, plan, bytes, || {
            let opts = BackwardOptions {
                dbias: bias.then(|| dbias.as_view_mut()),
                workspace: Some(&mut ws),
                ..Default::default()
            };
            dp::backward(h, &cfg, &dy, &mut dx, opts)
        })?;
        let unf = Measurement::gpu(h, plan, bytes, || {
            base.backward(
                &base_cfg,
                &dy,
                &m8,
                &mut dx,
                bias.then(|| dbias.as_view_mut()),
            )
        })?;
        let note = if bias {
            "with dbias (deterministic two-stage; unfused: masked scale + column sum)"
        } else {
            "no dbias"
        };
        ctx.push(
            Row::new(bwd, &case, nn, fused)
                .with_unfused(unf)
                .note(format!("{note}{keys}")),
        );
        if bitmask_rows {
            // The backward that reads the 1-bit mask written by the forward instead of
            // regenerating it: n/8 more bytes, no Philox work.
            let mut mask = filled::<u32>(h, cfg.mask_words(), 0)?;
            dp::forward(
                h,
                &cfg,
                &x,
                &mut y,
                fwd_opts(bv(), rv(), Some(mask.as_view_mut())),
            )?;
            let bytes_bm = dp::fused_backward_bytes(kind, nn, true) as f64;
            let fused = Measurement::gpu(h, plan, bytes_bm, || {
                let opts = BackwardOptions {
                    mask: Some(mask.as_view()),
                    dbias: Some(dbias.as_view_mut()),
                    workspace: Some(&mut ws),
                    ..Default::default()
                };
                dp::backward(h, &cfg, &dy, &mut dx, opts)
            })?;
            let unf = Measurement::gpu(h, plan, bytes_bm, || {
                base.backward(&base_cfg, &dy, &m8, &mut dx, Some(dbias.as_view_mut()))
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
    let (rows, cols) = (ROWS, COLS);
    let op = "dropout_residual fwd";
    let case = "bf16 [16384,4096] bias +drop path";
    if !ctx.wants(op, case) {
        return Ok(());
    }
    ctx.progress(op, case);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, P, 42, 7)?;
    let path_cfg = cfg.with_drop_path(DropPath::new(0.1, 8)?);
    let x = rand::<bf16>(h, n, 1)?;
    let r = rand::<bf16>(h, n, 2)?;
    let b = rand::<bf16>(h, cols, 4)?;
    let mut y = filled::<bf16>(h, n, 0)?;
    let bytes = dp::fused_forward_bytes(DtypeKind::Bf16, n as u64, true, false) as f64;
    let mut time = |cfg: &Config| {
        Measurement::gpu(h, ctx.plan, bytes, || {
            let opts = ForwardOptions {
                bias: Some(b.as_view()),
                residual: Some(r.as_view()),
                ..Default::default()
            };
            dp::forward(h, cfg, &x, &mut y, opts)
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

/// The CPU reference with a residual (the rows a machine without a GPU reports).
fn cpu_shape<T: Dtype>(ctx: &mut Ctx, rows: usize, cols: usize) -> Result<()> {
    let site = Site::residual((rows, cols), true);
    let case = site.case::<T>();
    let (fwd, bwd) = site.ops();
    ctx.progress("dropout_residual (CPU)", &case);
    let n = rows * cols;
    let cfg = Config::new(rows, cols, P, 42, 7)?;
    let x = random_values::<T>(n, 1, -2.0, 2.0);
    let r = random_values::<T>(n, 2, -2.0, 2.0);
    let dy = random_values::<T>(n, 3, -2.0, 2.0);
    let b = random_values::<T>(cols, 4, -2.0, 2.0);
    let (mut y, mut dx, mut db, mut m8) = (
        vec![T::default(); n],
        vec![T::default(); n],
        vec![T::default(); cols],
        vec![0u8; n],
    );
    let plan = ctx.plan;
    let kind = T::KIND;
    let nn = n as u64;
    let bytes = dp::fused_forward_bytes(kind, nn, true, false) as f64;
    let fused = Measurement::cpu(plan, bytes, || {
        let opts = cpu::ForwardOptions {
            bias: Some(&b),
            residual: Some(&r),
            ..Default::default()
        };
        cpu::forward(&cfg, &x, &mut y, opts).expect("cpu forward")
    });
    let unf = Measurement::cpu(plan, bytes, || {
        unfused::forward_cpu(&cfg, &x, Some(&b), Some(&r), &mut y, &mut m8).expect("cpu unfused")
    });
    ctx.push(
        Row::new(fwd, &case, nn, fused)
            .with_unfused(unf)
            .note("CPU reference"),
    );
    let bytes = dp::fused_backward_bytes(kind, nn, false) as f64;
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
        Row::new(bwd, &case, nn, fused)
            .with_unfused(unf)
            .note("CPU reference"),
    );
    Ok(())
}
