//! `kernels/dropout_add_norm.cu`: forward (LayerNorm and RMSNorm; residual, in place or none;
//! bias, beta, a given row scale or a drop path per row or per sample; the row cached in shared
//! memory or not; a capped grid), the norm-only forward of the unfused baseline, the backward
//! (d_s, d_residual; slab partials in shared or global memory) and the column sums (dgamma,
//! dbeta, dbias), for x of every dtype with the stream in x's dtype or f32, hidden sizes around the
//! group (8), the vector, the 32..256-thread row partials and the warp, views at any element, p
//! from 0 to 1 keyed at 32, 16 or 8 bits per element, and data with `±inf` and NaNs at every position class. `dropout_add_norm::cpu`
//! must give the same bits.

use fusedreg::dropout_add_norm::{cpu, Config, Norm};
use fusedreg::dropping::MaskResolution;
use fusedreg::{Dtype, DtypeKind};

use crate::by_dtype;
use crate::harness::*;

#[derive(Debug)]
pub struct Case {
    dtype: DtypeKind,
    f32_stream: bool,
    rows: usize,
    cols: usize,
    rms: bool,
    eps: f32,
    layer_scale: f32,
    p: f64,
    /// The keying resolution (every kernel of the op implements all three).
    resolution: MaskResolution,
    seed: u64,
    call: u64,
    /// (p_path, call, rows per sample)
    path: Option<(f64, u64, usize)>,
    in_place: bool,
    max_grid: u64,
    smem: (bool, bool),
    want: (bool, bool, bool),
    offs: [u64; 12],
    x: Data<u32>,
    residual: Option<Data<u32>>,
    bias: Option<Data<u32>>,
    gamma: Data<u32>,
    beta: Option<Data<u32>>,
    rowscale: Option<Data<f32>>,
    d_out: Data<u32>,
    d_s: Option<Data<u32>>,
}

impl Case {
    fn stream(&self) -> DtypeKind {
        if self.f32_stream {
            DtypeKind::F32
        } else {
            self.dtype
        }
    }
    fn config(&self) -> Config {
        let norm = if self.rms {
            Norm::RmsNorm
        } else {
            Norm::LayerNorm
        };
        let mut c = Config::new(self.rows, self.cols, norm, self.eps)
            .and_then(|c| c.with_dropout(self.p, self.seed, self.call))
            .map(|c| c.with_resolution(self.resolution))
            .and_then(|c| c.with_layer_scale(self.layer_scale))
            .expect("a valid config");
        if let Some(path) = self.path {
            c = c.with_drop_path(drop_path(path));
        }
        c
    }
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let dtype = g.pick(&DTYPES);
        let f32_stream = dtype != DtypeKind::F32 && g.chance(1, 3);
        let stream = if f32_stream { DtypeKind::F32 } else { dtype };
        // At most 4096 columns: the emulation's shared-memory array holds 3 * 4096 floats.
        let cols = size(g, &[8, 32 * 8, 256 * 8, 64], 4096).max(1);
        let rows = size(g, &[4], (30_000 / cols).clamp(1, 40));
        let n = rows * cols;
        let sp = Specials(g.pick(&[0, 0, 1, 4]));
        let mut x = value_bits(g, dtype, n, 3.0, sp);
        let residual = g.chance(3, 4).then(|| value_bits(g, stream, n, 3.0, sp));
        let mut d_out = value_bits(g, dtype, n, 1.0, sp);
        if g.bool() {
            plant(g, dtype, &mut x.0, cols, &[8, 64, 256]);
            plant(g, dtype, &mut d_out.0, cols, &[8, 64, 256]);
        }
        let rs = g.below(4);
        let rps = if rows > 0 && g.bool() {
            g.range(1, rows as u64) as usize
        } else {
            1
        };
        let in_place = residual.is_some() && g.chance(1, 3);
        Case {
            dtype,
            f32_stream,
            rows,
            cols,
            rms: g.bool(),
            eps: g.pick(&[1e-5, 1e-6, 1e-12]),
            layer_scale: g.pick(&[
                1.0,
                0.5,
                std::f32::consts::FRAC_1_SQRT_2,
                1.0 / 3.0f32.sqrt(),
            ]),
            p: g.pick(&[0.0, 0.1, 0.5, 1.0, 0.3]),
            resolution: g.pick(&[
                MaskResolution::Bits32,
                MaskResolution::Bits16,
                MaskResolution::Bits8,
            ]),
            seed: g.u64(),
            call: g.u64(),
            path: (rs >= 2).then(|| (g.pick(&[0.3, 0.0, 1.0]), g.u64(), rps)),
            in_place,
            max_grid: g.range(1, 4),
            smem: (g.bool(), g.bool()),
            want: (residual.is_some() && g.bool(), g.bool(), g.bool()),
            offs: [0; 12].map(|_| offset(g, 9)),
            x,
            residual,
            bias: g
                .bool()
                .then(|| value_bits(g, dtype, cols, 0.5, Specials::NONE)),
            gamma: value_bits(g, dtype, cols, 1.5, Specials(sp.0 / 4)),
            beta: g
                .bool()
                .then(|| value_bits(g, dtype, cols, 0.5, Specials::NONE)),
            rowscale: (rs == 1).then(|| {
                Data(
                    (0..rows)
                        .map(|_| g.pick(&[0.0, 1.0, 1.25, 0.5, 2.0]))
                        .collect(),
                )
            }),
            d_out,
            d_s: g.bool().then(|| value_bits(g, stream, n, 1.0, sp)),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        let cfg = c.config();
        let st = c.stream();
        let opt = |d: &Option<Data<u32>>| d.as_ref().map_or(&[][..], |v| &v[..]).to_vec();
        w.u64("dtype", dtype_code(c.dtype));
        w.flag("f32_stream", c.f32_stream);
        w.u64("rows", c.rows as u64);
        w.u64("cols", c.cols as u64);
        w.u64("seed", c.seed);
        w.u64("call", c.call);
        // The threshold and scale at the config's resolution, and its kernel flag
        // (drop::FLAG_KEY16 = 8, FLAG_KEY8 = 16).
        w.u64("threshold", cfg.keying(c.dtype).threshold());
        w.f32("scale", cfg.scale(c.dtype));
        w.u64(
            "key_flags",
            match cfg.resolution_for(c.dtype) {
                MaskResolution::Bits32 => 0,
                MaskResolution::Bits16 => 8,
                MaskResolution::Bits8 => 16,
            },
        );
        let path = cfg.drop_path();
        w.drop_path(path);
        w.flag("drop_path", path.is_some());
        w.flag("rms", c.rms);
        w.flag("in_place", c.in_place);
        w.f32("eps", cfg.eps());
        w.f32("layer_scale", cfg.layer_scale());
        w.u64("max_grid", c.max_grid);
        w.flag("fwd_smem", c.smem.0);
        w.flag("bwd_smem", c.smem.1);
        w.view_bits("x", c.dtype, &c.x, c.offs[0]);
        w.view_bits("residual", st, &opt(&c.residual), c.offs[1]);
        w.view_bits("bias", c.dtype, &opt(&c.bias), c.offs[2]);
        w.view_bits("gamma", c.dtype, &c.gamma, c.offs[3]);
        w.view_bits("beta", c.dtype, &opt(&c.beta), c.offs[4]);
        w.view(
            "rowscale",
            c.rowscale.as_ref().map_or(&[][..], |v| &v[..]),
            c.offs[5],
        );
        w.view_bits("d_out", c.dtype, &c.d_out, c.offs[6]);
        w.view_bits("d_s", st, &opt(&c.d_s), c.offs[7]);
        w.flag("d_residual", c.want.0);
        w.flag("dbeta", c.want.1);
        w.flag("dbias", c.want.2);
        w.u64("out_off", c.offs[8]);
        w.u64("s_off", c.offs[9]);
        w.u64("dx_off", c.offs[10]);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.dtype, T => if c.f32_stream { check::<T, f32>(c, r) } else { check::<T, T>(c, r) })
    }
}

fn check<T: Dtype, S: Dtype>(c: &Case, r: &mut Reader) -> Result<(), String> {
    let cfg = c.config();
    let (rows, cols, n) = (c.rows, c.cols, c.rows * c.cols);
    let e = |e: fusedreg::Error| format!("CPU: {e}");
    let (zt, zs) = (T::from_f32_rn(0.0), S::from_f32_rn(0.0));
    let x: Vec<T> = typed(&c.x);
    let residual: Option<Vec<S>> = c.residual.as_ref().map(|v| typed(v));
    let bias: Option<Vec<T>> = c.bias.as_ref().map(|v| typed(v));
    let gamma: Vec<T> = typed(&c.gamma);
    let beta: Option<Vec<T>> = c.beta.as_ref().map(|v| typed(v));
    let d_out: Vec<T> = typed(&c.d_out);
    let d_s: Option<Vec<S>> = c.d_s.as_ref().map(|v| typed(v));
    let rowscale = c.rowscale.as_ref().map(|v| &v[..]);

    let mut d = Diffs::default();
    let (mut out, mut s, mut mean, mut rstd) =
        (vec![zt; n], vec![zs; n], vec![0f32; rows], vec![0f32; rows]);
    let args = cpu::ForwardArgs {
        x: &x,
        residual: None,
        gamma: &gamma,
        beta: beta.as_deref(),
        bias: bias.as_deref(),
        rowscale,
        redundancy: None,
    };
    if c.in_place {
        s.copy_from_slice(residual.as_ref().unwrap());
        let o = cpu::ForwardOut {
            out: &mut out,
            s: &mut s,
            mean: &mut mean,
            rstd: &mut rstd,
        };
        cpu::forward_inplace(&cfg, args, o).map_err(e)?;
    } else {
        let o = cpu::ForwardOut {
            out: &mut out,
            s: &mut s,
            mean: &mut mean,
            rstd: &mut rstd,
        };
        cpu::forward(
            &cfg,
            cpu::ForwardArgs {
                residual: residual.as_deref(),
                ..args
            },
            o,
        )
        .map_err(e)?;
    }
    d.bits("out", &r.vec::<T>("out", n)?, &out);
    d.bits("s", &r.vec::<S>("s", n)?, &s);
    d.bits("mean", &r.vec::<f32>("mean", rows)?, &mean);
    d.bits("rstd", &r.vec::<f32>("rstd", rows)?, &rstd);

    // Norm only: the norm of the stream, i.e. the forward with everything dropped (p = 1) and the
    // stream as residual.
    let norm_cfg = Config::new(rows, cols, cfg.norm(), cfg.eps())
        .and_then(|k| k.with_dropout(1.0, 0, 0))
        .and_then(|k| k.with_layer_scale(cfg.layer_scale()))
        .map_err(e)?;
    let (mut o2, mut s2, mut m2, mut r2) =
        (vec![zt; n], vec![zs; n], vec![0f32; rows], vec![0f32; rows]);
    let a2 = cpu::ForwardArgs {
        x: &x,
        residual: Some(&s[..]),
        gamma: &gamma,
        beta: beta.as_deref(),
        bias: None,
        rowscale: None,
        redundancy: None,
    };
    cpu::forward(
        &norm_cfg,
        a2,
        cpu::ForwardOut {
            out: &mut o2,
            s: &mut s2,
            mean: &mut m2,
            rstd: &mut r2,
        },
    )
    .map_err(e)?;
    d.bits("norm-only out", &r.vec::<T>("norm_only_out", n)?, &o2);
    d.bits(
        "norm-only mean",
        &r.vec::<f32>("norm_only_mean", rows)?,
        &m2,
    );
    d.bits(
        "norm-only rstd",
        &r.vec::<f32>("norm_only_rstd", rows)?,
        &r2,
    );

    let (want_dres, want_dbeta, want_dbias) = c.want;
    let (mut dx, mut dres, mut dgamma, mut dbeta, mut dbias) = (
        vec![zt; n],
        vec![zs; n],
        vec![zt; cols],
        vec![zt; cols],
        vec![zt; cols],
    );
    let args = cpu::BackwardArgs {
        d_out: &d_out,
        d_s: d_s.as_deref(),
        s: &s,
        gamma: &gamma,
        mean: &mean,
        rstd: &rstd,
        rowscale,
    };
    let outs = cpu::BackwardOut {
        dx: &mut dx,
        d_residual: want_dres.then_some(&mut dres[..]),
        dgamma: &mut dgamma,
        dbeta: want_dbeta.then_some(&mut dbeta[..]),
        dbias: want_dbias.then_some(&mut dbias[..]),
    };
    cpu::backward(&cfg, args, outs).map_err(e)?;
    d.bits("dx", &r.vec::<T>("dx", n)?, &dx);
    let n_dres = if want_dres { n } else { 0 };
    d.bits(
        "d_residual",
        &r.vec::<S>("d_residual", n_dres)?,
        &dres[..n_dres],
    );
    d.bits("dgamma", &r.vec::<T>("dgamma", cols)?, &dgamma);
    let nb = if want_dbeta { cols } else { 0 };
    d.bits("dbeta", &r.vec::<T>("dbeta", nb)?, &dbeta[..nb]);
    let nb = if want_dbias { cols } else { 0 };
    d.bits("dbias", &r.vec::<T>("dbias", nb)?, &dbias[..nb]);
    d.into_result()
}
