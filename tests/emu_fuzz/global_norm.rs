//! `kernels/global_norm.cu`: partials, reduce, finalize, per-tensor norms and the scale pass over
//! random gradient sets (0 to 5 tensors of sizes around the 65,536-element chunk and the vector
//! widths, zero-size tensors, gradient views at any element), skip flags, clipping on and off,
//! a loss scale, the device or an immediate coefficient. `global_norm::cpu` composes the same
//! stages bit for bit.

use fusedreg::global_norm::cpu;
use fusedreg::multi_tensor::{Layout, CHUNK};
use fusedreg::{Dtype, DtypeKind};

use crate::by_dtype;
use crate::harness::*;

#[derive(Debug)]
pub struct Case {
    dtype: DtypeKind,
    grads: Vec<(u64, Data<u32>)>,
    skip: Vec<bool>,
    split: u64,
    fused: bool,
    clip: bool,
    device_coef: bool,
    max_norm: f32,
    loss_scale: Option<f32>,
    coef: f32,
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let dtype = g.pick(&DTYPES);
        let count = g.range(1, 5) as usize;
        let sp = Specials(g.pick(&[0, 0, 1, 8]));
        let scale = g.pick(&[1e-3, 1.0, 8.0, 300.0]);
        // At most a few chunks in all: the emulation runs 512 threads per block.
        let mut budget = 3 * CHUNK as usize;
        let grads = (0..count)
            .map(|_| {
                let n = size(
                    g,
                    &[4, 8, 2048, CHUNK as usize],
                    budget.min(CHUNK as usize + 3000),
                );
                budget -= n.min(budget);
                (offset(g, 9), value_bits(g, dtype, n, scale, sp))
            })
            .collect();
        Case {
            dtype,
            grads,
            skip: if g.chance(1, 3) {
                (0..count).map(|_| g.chance(1, 3)).collect()
            } else {
                vec![]
            },
            split: g.below(4),
            fused: g.bool(),
            clip: g.chance(2, 3),
            device_coef: g.chance(3, 4),
            max_norm: g.pick(&[1.0, 0.5, 1e6, 30.0, 1e-3]),
            loss_scale: g.chance(1, 3).then(|| g.pick(&[1024.0, 0.5, 65536.0])),
            coef: g.pick(&[0.75, 1.0, 1e-3, 3.0]),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        w.u64("dtype", dtype_code(c.dtype));
        w.u64("tensors", c.grads.len() as u64);
        for (off, bits) in &c.grads {
            w.view_bits("grad", c.dtype, bits, *off);
        }
        w.flags("skip", &c.skip);
        w.u64("split", c.split);
        w.flag("fused", c.fused);
        w.flag("clip", c.clip);
        w.flag("device_coef", c.device_coef);
        w.f32("max_norm", c.max_norm);
        w.f32("loss_scale", c.loss_scale.unwrap_or(1.0));
        w.f32("coef", c.coef);
        w.flag("has_loss_scale", c.loss_scale.is_some());
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.dtype, G => check::<G>(c, r))
    }
}

fn check<G: Dtype>(c: &Case, r: &mut Reader) -> Result<(), String> {
    let grads: Vec<Vec<G>> = c.grads.iter().map(|(_, b)| typed::<G>(b)).collect();
    let lens: Vec<u64> = grads.iter().map(|g| g.len() as u64).collect();
    let layout = Layout::new(&lens).map_err(|e| e.to_string())?;
    let chunks = layout.num_chunks();

    let partials = r.vec::<f32>("partials", chunks)?;
    let result: cpu_result::Raw = bytemuck::pod_read_unaligned(r.item("result")?);
    let sumsq = r.vec::<f64>("sumsq", grads.len())?;
    let norms = r.vec::<f32>("norms", grads.len())?;
    let mut scaled = Vec::new();
    for g in &grads {
        scaled.push(r.vec::<G>("scaled", g.len())?);
    }

    // The CPU stages; a skipped tensor's chunks add exactly 0.
    let cpu_partials = cpu::partials_with(&layout, |k| {
        let ch = layout.chunk(k);
        if c.skip.get(ch.tensor).copied().unwrap_or(false) {
            return 0.0;
        }
        let s = ch.start as usize;
        cpu::chunk_partial(&grads[ch.tensor][s..s + ch.len])
    });
    let v = cpu::finalize(
        cpu::reduce(&cpu_partials),
        c.clip.then_some(c.max_norm),
        c.loss_scale.unwrap_or(1.0),
    );
    let (cpu_sumsq, cpu_norms) = cpu::per_tensor(&layout, &cpu_partials);
    let mut d = Diffs::default();
    d.bits("partials", &partials, &cpu_partials);
    d.f64s("sumsq", &[result.sumsq], &[v.sumsq]);
    d.bits(
        "norm, coef, grad_scale",
        &[result.norm, result.coef, result.grad_scale],
        &[v.norm, v.coef, v.grad_scale],
    );
    d.eq("nonfinite", &[result.nonfinite], &[v.nonfinite]);
    d.f64s("per-tensor sumsq", &sumsq, &cpu_sumsq);
    d.bits("per-tensor norms", &norms, &cpu_norms);
    // The scale pass: by the device coefficient unless the flag is set, or by the immediate one.
    let coef = if c.device_coef { v.coef } else { c.coef };
    for (t, g) in grads.iter().enumerate() {
        let mut want = g.clone();
        if !(c.device_coef && v.nonfinite != 0) {
            cpu::scale(&mut want, coef);
        }
        d.bits(&format!("scaled grad {t}"), &scaled[t], &want);
    }
    d.into_result()
}

mod cpu_result {
    /// `NormResult` as the kernel writes it (`global_norm::NormValues`' layout).
    #[repr(C)]
    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
    pub struct Raw {
        pub sumsq: f64,
        pub norm: f32,
        pub coef: f32,
        pub grad_scale: f32,
        pub nonfinite: u32,
    }
}
