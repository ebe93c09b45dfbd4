//! `kernels/bias_act_dropout.cu`: forward (with and without bias and `h_out`), backward from x or
//! from the saved h, with and without dbias, and the unfused baseline's six kernels, for every
//! dtype and activation, both math modes and both keyings, shapes around the vector width, the
//! 64-thread column tile and the 4 row lanes and slabs, views at any element, p from 0 to 1, and
//! data with `±inf`, NaNs, signed zeros and saturating magnitudes at every position class.
//! `bias_act_dropout::cpu` and `unfused::{forward_cpu, backward_cpu}` must give the same bits in
//! `Math::Exact`; in `Math::Fast`, `h` bit for bit and `y`, `dx`, `dbias` within the bounds the
//! module docs state (checked by `tests/common/bias_act_fast.rs`, shared with
//! `tests/bias_act_dropout_emu.rs` and the GPU suite).

use fusedreg::bias_act_dropout::{cpu, unfused, Activation, Config, Preact};
use fusedreg::dropping::{slab_rows, MaskResolution};
use fusedreg::{Dtype, DtypeKind, Math};

use crate::by_dtype;
use crate::harness::*;

#[path = "../common/bias_act_fast.rs"]
mod fastcheck;

#[derive(Debug)]
pub struct Case {
    dtype: DtypeKind,
    rows: usize,
    cols: usize,
    act: Activation,
    p: f64,
    seed: u64,
    call: u64,
    math: Math,
    key: MaskResolution,
    from_h: bool,
    h_out: bool,
    dbias: bool,
    offs: [u64; 6],
    x: Data<u32>,
    bias: Option<Data<u32>>,
    dy: Data<u32>,
}

impl Case {
    fn config(&self) -> Config {
        Config::new(self.rows, self.cols, self.act, self.p, self.seed, self.call)
            .expect("a valid config")
            .with_math(self.math)
            .with_resolution(self.key)
    }
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let dtype = g.pick(&DTYPES);
        let vw = 16 / dtype.size();
        let cols = size(g, &[vw, 8, 64, 64 * vw], 1100);
        let rows = size(g, &[4, 8, 16], (24_000 / cols.max(1)).clamp(1, 70));
        let n = rows * cols;
        let sp = Specials::any(g);
        let scale = g.pick(&[3.0, 6.0, 20.0, 200.0]);
        let mut x = value_bits(g, dtype, n, scale, sp);
        let mut dy = value_bits(g, dtype, n, 2.0, sp);
        if g.bool() {
            plant(g, dtype, &mut x.0, cols, &[vw, 64 * vw]);
            plant(g, dtype, &mut dy.0, cols, &[vw, 64 * vw]);
        }
        let h_out = g.bool();
        Case {
            dtype,
            rows,
            cols,
            act: g.pick(&Activation::ALL),
            p: g.pick(&[0.0, 1.0, 0.1, 0.5, 1e-9, 0.9]),
            seed: g.u64(),
            call: g.u64(),
            math: g.pick(&[Math::Exact, Math::Fast]),
            key: if g.chance(1, 3) {
                g.pick(&[MaskResolution::Bits16, MaskResolution::Bits8])
            } else {
                MaskResolution::Bits32
            },
            from_h: h_out && g.bool(),
            h_out,
            dbias: g.chance(3, 4),
            offs: [0; 6].map(|_| offset(g, 9)),
            x,
            bias: g
                .chance(2, 3)
                .then(|| value_bits(g, dtype, cols, 1.0, Specials(sp.0 / 4))),
            dy,
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        let cfg = c.config();
        w.u64("dtype", dtype_code(c.dtype));
        w.u64("rows", c.rows as u64);
        w.u64("cols", c.cols as u64);
        w.u64(
            "slab_rows",
            slab_rows(c.rows, c.cols, c.dtype).max(1) as u64,
        );
        w.u64("seed", c.seed);
        w.u64("call", c.call);
        let keying = cfg.keying(c.dtype);
        w.u64("threshold", keying.threshold());
        // gpu.rs forward(): the launch constants of Math::Fast at the keying's effective p, and
        // its math code (ReLU has one body) and keying flag (drop::FLAG_KEY16 / FLAG_KEY8).
        w.f32("scale", keying.scale());
        w.f32("keep_frac", (1.0 - keying.effective_p()) as f32);
        w.f32("log2_scale", f64::from(keying.scale()).log2() as f32);
        w.f32("log2_keep", (1.0 - keying.effective_p()).log2() as f32);
        // The emulator's activation codes are the positions in `Activation::ALL`.
        w.u64(
            "act",
            Activation::ALL.iter().position(|&a| a == c.act).unwrap() as u64,
        );
        w.u64("math", u64::from(fast(c)));
        w.u64(
            "flags",
            match c.key {
                MaskResolution::Bits32 => 0,
                MaskResolution::Bits16 => 8,
                MaskResolution::Bits8 => 16,
            },
        );
        w.flag("from_h", c.from_h);
        w.flag("dbias", c.dbias);
        w.view_bits("x", c.dtype, &c.x, c.offs[0]);
        w.view_bits(
            "bias",
            c.dtype,
            c.bias.as_ref().map_or(&[][..], |b| &b[..]),
            c.offs[1],
        );
        w.view_bits("dy", c.dtype, &c.dy, c.offs[2]);
        w.u64("y_off", c.offs[3]);
        w.u64("h_off", c.offs[4]);
        w.u64("dx_off", c.offs[5]);
        w.flag("h_out", c.h_out);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.dtype, T => check::<T>(c, r))
    }
}

/// Whether the kernels run the `Math::Fast` bodies (ReLU has only the exact one).
fn fast(c: &Case) -> bool {
    c.math == Math::Fast && c.act != Activation::Relu
}

fn check<T: Dtype>(c: &Case, r: &mut Reader) -> Result<(), String> {
    let cfg = c.config();
    let n = c.rows * c.cols;
    let zero = T::from_f32_rn(0.0);
    let y = r.vec::<T>("y", n)?;
    let h = r.vec::<T>("h", if c.h_out { n } else { 0 })?;
    let dx = r.vec::<T>("dx", n)?;
    let dbias = r.vec::<T>("dbias", if c.dbias { c.cols } else { 0 })?;
    let (x, dy): (Vec<T>, Vec<T>) = (typed(&c.x), typed(&c.dy));
    let bias: Option<Vec<T>> = c.bias.as_ref().map(|b| typed(b));
    let e = |e: fusedreg::Error| format!("CPU: {e}");

    let (mut cy, mut ch) = (vec![zero; n], vec![zero; n]);
    cpu::forward(
        &cfg,
        &x,
        bias.as_deref(),
        &mut cy,
        c.h_out.then_some(&mut ch[..]),
    )
    .map_err(e)?;
    let (mut cdx, mut cdb) = (vec![zero; n], vec![zero; c.cols]);
    let pre = if c.from_h {
        Preact::H(&ch[..])
    } else {
        Preact::X {
            x: &x[..],
            bias: bias.as_deref(),
        }
    };
    cpu::backward(&cfg, &dy, pre, &mut cdx, c.dbias.then_some(&mut cdb[..])).map_err(e)?;
    let mut d = Diffs::default();
    if c.h_out {
        d.bits("h", &h, &ch);
    }
    if fast(c) {
        // The f32 pre-activation of each element as the kernels form it (x + bias, or the
        // saved h in a backward from h), then the stated bounds.
        let h_fwd: Vec<f32> = (0..n)
            .map(|i| match &bias {
                Some(b) => x[i].to_f32() + b[i % c.cols].to_f32(),
                None => x[i].to_f32(),
            })
            .collect();
        let h_bwd: Vec<f32> = if c.from_h {
            h.iter().map(|v| v.to_f32()).collect()
        } else {
            h_fwd.clone()
        };
        let mut fails = fastcheck::Failures::default();
        fastcheck::check_forward(&cfg, &h_fwd, &y, &mut fails);
        fastcheck::check_backward(
            &cfg,
            &h_bwd,
            &dy,
            &dx,
            c.dbias.then_some(&dbias[..]),
            &mut fails,
        );
        if let Err(m) = fails.result("Math::Fast") {
            d.note(m);
        }
    } else {
        d.bits("y", &y, &cy);
        d.bits("dx", &dx, &cdx);
        if c.dbias {
            d.bits("dbias", &dbias, &cdb);
        }
    }
    if let (Some(b), true, MaskResolution::Bits32) = (&bias, n > 0, c.key) {
        let uh = r.vec::<T>("unfused_h", n)?;
        let uy = r.vec::<T>("unfused_y", n)?;
        let um = r.vec::<u8>("unfused_mask", n)?;
        let udx = r.vec::<T>("unfused_dx", n)?;
        let udb = r.vec::<T>("unfused_dbias", c.cols)?;
        let (mut wy, mut wm, mut wh) = (vec![zero; n], vec![0u8; n], vec![zero; n]);
        unfused::forward_cpu(&cfg, &x, b, &mut wy, &mut wm, &mut wh).map_err(e)?;
        let (mut wdx, mut wdb) = (vec![zero; n], vec![zero; c.cols]);
        unfused::backward_cpu(&cfg, &dy, &wm, &wh, &mut wdx, Some(&mut wdb)).map_err(e)?;
        d.bits("unfused h", &uh, &wh);
        d.bits("unfused y", &uy, &wy);
        d.eq("unfused mask", &um, &wm);
        d.bits("unfused dx", &udx, &wdx);
        d.bits("unfused dbias", &udb, &wdb);
    }
    d.into_result()
}
