//! `kernels/dropout.cu`: the forward (bias; a residual, separate or in place, or none; a row scale given or a drop path per row or per sample, the 1-bit mask, the generated
//! row scale, 32- or 16-bit keying), the backward regenerated and from the mask with dbias, and
//! the unfused baseline's byte-mask dropout and masked scale, for every dtype, shapes around the
//! vector width, the mask word, the column tile, the row slabs and the flat width, views at any
//! element, p from 0 to 1, any launch tuning (block, grid cap, unroll, forced scalar path, slab
//! rows, flat width: the bits must not depend on it), and data with `±inf` and NaNs at every
//! position class. `dropout::cpu` and `dropout::unfused::{forward_cpu, backward_cpu}` must give
//! the same bits. (The residual form was `kernels/dropout_residual.cu` until the two merged.)

use fusedreg::dropping::{mask_words, slab_rows, Config, MaskResolution};
use fusedreg::{dropout, Dtype, DtypeKind};

use crate::by_dtype;
use crate::harness::*;

#[derive(Debug)]
pub struct Tuning {
    block: u64,
    max_grid_x: u64,
    unroll: bool,
    force_scalar: bool,
    slab_rows: u64,
    flat_width: u64,
}

#[derive(Debug)]
pub struct Case {
    dtype: DtypeKind,
    rows: usize,
    cols: usize,
    p: f64,
    seed: u64,
    call: u64,
    resolution: MaskResolution,
    path: Option<(f64, u64, usize)>,
    mask_out: bool,
    rowscale_out: bool,
    dbias: bool,
    residual_form: bool,
    in_place: bool,
    tuning: Tuning,
    offs: [u64; 6],
    x: Data<u32>,
    bias: Option<Data<u32>>,
    residual: Data<u32>,
    rowscale: Option<Data<f32>>,
    dy: Data<u32>,
}

impl Case {
    fn config(&self) -> Config {
        let mut c = Config::new(self.rows, self.cols, self.p, self.seed, self.call)
            .expect("a valid config");
        if let Some(path) = self.path {
            c = c.with_drop_path(drop_path(path));
        }
        c.with_resolution(self.resolution)
    }
}

fn generate(g: &mut Rng) -> Case {
    let residual = g.bool();
    let dtype = g.pick(&DTYPES);
    let vw = 16 / dtype.size();
    let rows_first = g.chance(1, 4);
    let (rows, cols) = if rows_first {
        (1, size(g, &[32, 256 * vw, 1024 * vw], 9000))
    } else {
        let cols = size(g, &[vw, 8, 32, 64 * vw], 1100);
        (
            size(g, &[4, 8, 16], (20_000 / cols.max(1)).clamp(1, 80)),
            cols,
        )
    };
    let n = rows * cols;
    let sp = Specials::any(g);
    let mut x = value_bits(g, dtype, n, 4.0, sp);
    let mut dy = value_bits(g, dtype, n, 2.0, sp);
    if g.bool() {
        plant(g, dtype, &mut x.0, cols, &[vw, 8, 32]);
        plant(g, dtype, &mut dy.0, cols, &[vw, 8, 32]);
    }
    let rs = if rows > 1 { g.below(4) } else { 0 };
    let dbias = g.chance(1, 2);
    let path = (rs >= 2).then(|| {
        let rps = if g.bool() {
            g.range(1, rows as u64) as usize
        } else {
            1
        };
        (g.pick(&[0.3, 0.0, 1.0, 0.7]), g.u64(), rps)
    });
    Case {
        dtype,
        rows,
        cols,
        p: g.pick(&[0.0, 1.0, 0.1, 0.5, 1e-9, 1.0 - 1e-9]),
        seed: g.u64(),
        call: g.u64(),
        // 16-bit keying a third of the time, 8-bit a sixth.
        resolution: g.pick(&[
            MaskResolution::Bits32,
            MaskResolution::Bits32,
            MaskResolution::Bits32,
            MaskResolution::Bits16,
            MaskResolution::Bits16,
            MaskResolution::Bits8,
        ]),
        mask_out: g.chance(2, 3),
        rowscale_out: path.is_some() && g.bool(),
        path,
        dbias,
        residual_form: residual,
        in_place: residual && g.chance(1, 3),
        tuning: Tuning {
            block: if dbias {
                g.pick(&[128, 256])
            } else {
                32 * g.range(1, 8)
            },
            max_grid_x: g.pick(&[1, 2, 3, 1 << 30]),
            unroll: g.bool(),
            force_scalar: g.chance(1, 4),
            slab_rows: g.pick(&[0, 0, 1, 3, 5]),
            flat_width: g.pick(&[0, 0, 32, 96, 256]),
        },
        offs: [0; 6].map(|_| offset(g, 9)),
        x,
        bias: (rows > 1 && g.bool()).then(|| value_bits(g, dtype, cols, 1.0, Specials(sp.0 / 4))),
        residual: if residual {
            value_bits(g, dtype, n, 4.0, sp)
        } else {
            Data(vec![])
        },
        rowscale: (rs == 1).then(|| {
            Data(
                (0..rows)
                    .map(|_| g.pick(&[0.0, 1.0, 1.25, 0.5, 2.0, -1.5, f32::NAN]))
                    .collect(),
            )
        }),
        dy,
    }
}

fn write(c: &Case, w: &mut Writer) {
    let cfg = c.config();
    let opt = |d: &Option<Data<u32>>| d.as_ref().map_or(&[][..], |v| &v[..]).to_vec();
    w.u64("dtype", dtype_code(c.dtype));
    w.u64("rows", c.rows as u64);
    w.u64("cols", c.cols as u64);
    w.u64("dbias_slab_rows", slab_rows(c.rows, c.cols, c.dtype) as u64);
    w.u64("seed", c.seed);
    w.u64("call", c.call);
    w.u64(
        "threshold",
        cfg.rate().threshold_at(cfg.resolution_for(c.dtype)),
    );
    w.f32("scale", cfg.scale(c.dtype));
    let path = cfg.drop_path();
    w.flag("drop_path", path.is_some());
    w.drop_path(path);
    w.flag("key16", c.resolution == MaskResolution::Bits16);
    w.flag("key8", c.resolution == MaskResolution::Bits8);
    let t = &c.tuning;
    w.u64("block", t.block);
    w.u64("max_grid_x", t.max_grid_x);
    w.flag("unroll", t.unroll);
    w.flag("force_scalar", t.force_scalar);
    w.u64("tuning_slab_rows", t.slab_rows);
    w.u64("flat_width", t.flat_width);
    w.view_bits("x", c.dtype, &c.x, c.offs[0]);
    w.view_bits("bias", c.dtype, &opt(&c.bias), c.offs[1]);
    w.view_bits("dy", c.dtype, &c.dy, c.offs[2]);
    w.view_bits("residual", c.dtype, &c.residual, c.offs[3]);
    w.flag("has_residual", c.residual_form);
    w.flag("in_place", c.in_place);
    w.view(
        "rowscale",
        c.rowscale.as_ref().map_or(&[][..], |v| &v[..]),
        0,
    );
    w.flag("mask_out", c.mask_out);
    w.flag("rowscale_out", c.rowscale_out);
    w.flag("dbias", c.dbias);
    w.u64("y_off", c.offs[4]);
    w.u64("dx_off", c.offs[5]);
}

fn check<T: Dtype>(c: &Case, r: &mut Reader) -> Result<(), String> {
    let cfg = c.config();
    let (rows, cols, n) = (c.rows, c.cols, c.rows * c.cols);
    let e = |e: fusedreg::Error| format!("CPU: {e}");
    let zero = T::from_f32_rn(0.0);
    let (x, dy): (Vec<T>, Vec<T>) = (typed(&c.x), typed(&c.dy));
    let bias: Option<Vec<T>> = c.bias.as_ref().map(|b| typed(b));
    let rowscale = c.rowscale.as_ref().map(|v| &v[..]);
    let words = mask_words(n);

    let mut y = vec![zero; n];
    let mut mask = vec![0u32; words];
    // The driver's fill (-7): an empty tensor writes nothing on either side.
    let mut rs_out = vec![-7f32; rows];
    let res: Vec<T> = typed(&c.residual);
    let opts = dropout::cpu::ForwardOptions {
        bias: bias.as_deref(),
        residual: (c.residual_form && !c.in_place).then_some(&res[..]),
        rowscale,
        mask_out: c.mask_out.then_some(&mut mask[..]),
        rowscale_out: c.rowscale_out.then_some(&mut rs_out[..]),
        redundancy: None,
    };
    if c.in_place {
        y = res.clone();
        dropout::cpu::forward_inplace(&cfg, &x, &mut y, opts).map_err(e)?;
    } else {
        dropout::cpu::forward(&cfg, &x, &mut y, opts).map_err(e)?;
    }
    let mut d = Diffs::default();
    d.bits("y", &r.vec::<T>("y", n)?, &y);
    d.eq(
        "mask",
        &r.vec::<u32>("mask", if c.mask_out { words } else { 0 })?,
        &mask[..if c.mask_out { words } else { 0 }],
    );
    let nrs = if c.rowscale_out { rows } else { 0 };
    d.bits(
        "rowscale_out",
        &r.vec::<f32>("rowscale_out", nrs)?,
        &rs_out[..nrs],
    );

    for from_mask in [false, true] {
        if from_mask && !c.mask_out {
            break;
        }
        let (mut dx, mut db) = (vec![zero; n], vec![zero; cols]);
        let opts = dropout::cpu::BackwardOptions {
            rowscale,
            mask: from_mask.then_some(&mask[..]),
            dbias: c.dbias.then_some(&mut db[..]),
        };
        dropout::cpu::backward(&cfg, &dy, &mut dx, opts).map_err(e)?;
        let what = if from_mask { " (from the mask)" } else { "" };
        d.bits(&format!("dx{what}"), &r.vec::<T>("dx", n)?, &dx);
        let nb = if c.dbias { cols } else { 0 };
        d.bits(
            &format!("dbias{what}"),
            &r.vec::<T>("dbias", nb)?,
            &db[..nb],
        );
    }

    if n > 0
        && c.rowscale.is_none()
        && c.path.is_none()
        && c.resolution == MaskResolution::Bits32
        && c.bias.is_none()
    {
        let plain = Config::new(rows, cols, c.p, c.seed, c.call).map_err(e)?;
        let (mut uy, mut um, mut udx) = (vec![zero; n], vec![0u8; n], vec![zero; n]);
        let ur = c.residual_form.then_some(&res[..]);
        dropout::unfused::forward_cpu(&plain, &x, None, ur, &mut uy, &mut um).map_err(e)?;
        dropout::unfused::backward_cpu(&plain, &dy, &um, &mut udx, None).map_err(e)?;
        d.bits("unfused y", &r.vec::<T>("unfused_y", n)?, &uy);
        d.eq("unfused mask", &r.vec::<u8>("unfused_mask", n)?, &um);
        d.bits("unfused dx", &r.vec::<T>("unfused_dx", n)?, &udx);
    }
    d.into_result()
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        generate(g)
    }
    fn write(c: &Case, w: &mut Writer) {
        write(c, w)
    }
    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.dtype, T => check::<T>(c, r))
    }
}
