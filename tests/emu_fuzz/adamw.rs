//! `kernels/adamw.cu`: one step of every (param, grad) dtype pair and state layout over random
//! sets (1 to 4 tensors around the chunk and vector sizes, zero-size ones, views at any element)
//! from a random state (moments, master weights, step counts up to `u32::MAX`), with per-tensor
//! weight decay, skip flags, the non-finite flag, a grad scale, stochastic rounding and split
//! launches; then the init-master kernel. `adamw::cpu::step` must give the same bits.

use fusedreg::adamw::cpu::{self, CpuTensor, StepInputs};
use fusedreg::adamw::{AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions};
use fusedreg::multi_tensor::CHUNK;
use fusedreg::{Dtype, DtypeKind};

use crate::by_dtype;
use crate::harness::*;

#[derive(Debug)]
pub struct Tensor {
    param_off: u64,
    grad_off: u64,
    param: Data<u32>,
    grad: Data<u32>,
    m: Data<f32>,
    v: Data<f32>,
    master: Data<f32>,
    step: u32,
    weight_decay: f32,
}

#[derive(Debug)]
pub struct Case {
    param: DtypeKind,
    grad: DtypeKind,
    /// Bit 0: bf16 moments; bit 1: no master weights (16-bit params).
    layout: u64,
    tensors: Vec<Tensor>,
    skip: Vec<bool>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    grad_scale: Option<f32>,
    flag: Option<u32>,
    stochastic: Option<u64>,
    split: u64,
}

impl Case {
    fn options(&self) -> StateOptions {
        StateOptions {
            moments: if self.layout & 1 != 0 {
                MomentDtype::Bf16
            } else {
                MomentDtype::F32
            },
            master: if self.layout & 2 != 0 {
                MasterWeights::None
            } else {
                MasterWeights::F32
            },
        }
    }
}

/// Restored moments in `[lo, 0.1)` (zero when `fresh`), bf16 values for the bf16 layouts (what
/// such a state holds).
fn moments(g: &mut Rng, n: usize, fresh: bool, lo: f32, layout: u64) -> Data<f32> {
    Data(
        (0..n)
            .map(|_| {
                let x = if fresh { 0.0 } else { g.f32_in(lo, 0.1) };
                if layout & 1 != 0 {
                    half::bf16::from_f32(x).to_f32()
                } else {
                    x
                }
            })
            .collect(),
    )
}

impl Stem for Case {
    fn generate(g: &mut Rng) -> Case {
        let (param, grad) = (g.pick(&DTYPES), g.pick(&DTYPES));
        let layout = if param == DtypeKind::F32 {
            g.below(2)
        } else {
            g.below(4)
        };
        let has_master = param != DtypeKind::F32 && layout & 2 == 0;
        let sp = Specials(g.pick(&[0, 0, 1, 8]));
        let count = g.range(1, 4) as usize;
        let mut budget = 2 * CHUNK as usize;
        let tensors = (0..count)
            .map(|_| {
                let n = size(g, &[4, 8, 64, CHUNK as usize], budget.min(CHUNK as usize + 700));
                budget -= n.min(budget);
                let fresh = g.chance(1, 3);
                let param_bits = value_bits(g, param, n, 1.0, Specials(sp.0 / 2));
                let master = if !has_master {
                    vec![]
                } else if fresh {
                    by_dtype!(param, P => typed::<P>(&param_bits).iter().map(|x| x.to_f32()).collect())
                } else {
                    (0..n).map(|_| value::<f32>(g, 1.0, Specials(sp.0 / 2))).collect()
                };
                Tensor {
                    param_off: offset(g, 5),
                    grad_off: offset(g, 9),
                    param: param_bits,
                    grad: {
                        let scale = g.pick(&[1.0, 1024.0, 1e-4]);
                        value_bits(g, grad, n, scale, sp)
                    },
                    m: moments(g, n, fresh, -0.1, layout),
                    v: moments(g, n, fresh, 0.0, layout),
                    master: Data(master),
                    step: if fresh { 0 } else { g.pick(&[1, 7, 1000, 123_456, u32::MAX - 1, u32::MAX]) },
                    weight_decay: g.pick(&[0.0, 0.01, 0.1]),
                }
            })
            .collect();
        Case {
            param,
            grad,
            layout,
            tensors,
            skip: if g.chance(1, 3) {
                (0..count).map(|_| g.bool()).collect()
            } else {
                vec![]
            },
            lr: g.pick(&[1e-3, 3e-4, 1e-2, 0.0]),
            beta1: g.pick(&[0.9, 0.8, 0.0, 0.99]),
            beta2: g.pick(&[0.999, 0.95, 0.0]),
            eps: g.pick(&[1e-8, 1e-6, 0.0]),
            grad_scale: g.chance(1, 2).then(|| g.pick(&[1.0 / 1024.0, 0.5, 3.0])),
            flag: g.chance(1, 3).then(|| g.pick(&[0, 0, 1])),
            stochastic: g.chance(1, 2).then(|| g.u64()),
            split: g.below(3),
        }
    }

    fn write(c: &Case, w: &mut Writer) {
        w.u64("param_dtype", dtype_code(c.param));
        w.u64("grad_dtype", dtype_code(c.grad));
        w.u64("layout", c.layout);
        w.u64("tensors", c.tensors.len() as u64);
        for t in &c.tensors {
            w.view_bits("param", c.param, &t.param, t.param_off);
            w.view_bits("grad", c.grad, &t.grad, t.grad_off);
            w.view("m", &t.m, 0);
            w.view("v", &t.v, 0);
            w.view("master", &t.master, 0);
            w.u64("step", u64::from(t.step));
            w.f32("weight_decay", t.weight_decay);
        }
        w.flags("skip", &c.skip);
        w.f32("lr", c.lr);
        w.f32("beta1", c.beta1);
        w.f32("beta2", c.beta2);
        w.f32("eps", c.eps);
        w.f32("grad_scale", c.grad_scale.unwrap_or(1.0));
        w.flag("has_grad_scale", c.grad_scale.is_some());
        w.flag("has_flag", c.flag.is_some());
        w.u64("flag", u64::from(c.flag.unwrap_or(0)));
        w.flag("stochastic", c.stochastic.is_some());
        w.u64("seed", c.stochastic.unwrap_or(0));
        w.u64("split", c.split);
    }

    fn check(c: &Case, r: &mut Reader) -> Result<(), String> {
        by_dtype!(c.param, P => by_dtype!(c.grad, G => check::<P, G>(c, r)))
    }
}

fn check<P: Dtype, G: Dtype>(c: &Case, r: &mut Reader) -> Result<(), String> {
    let options = c.options();
    let mut ts: Vec<CpuTensor<P, G>> = c
        .tensors
        .iter()
        .map(|t| {
            let mut ct = CpuTensor::<P, G>::with_state(
                typed(&t.param),
                typed(&t.grad),
                t.weight_decay,
                options,
            )
            .expect("a valid tensor");
            ct.m = t.m.0.clone();
            ct.v = t.v.0.clone();
            if let Some(m) = &mut ct.master {
                *m = t.master.0.clone();
            }
            ct.step = t.step;
            ct
        })
        .collect();
    let config = AdamWConfig {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        rounding: c
            .stochastic
            .map_or(Rounding::NearestEven, |seed| Rounding::Stochastic { seed }),
        state: options,
    };
    let inputs = StepInputs {
        lr: c.lr,
        grad_scale: c.grad_scale.unwrap_or(1.0),
        nonfinite: c.flag.unwrap_or(0) != 0,
    };
    cpu::step(&mut ts, &config, &inputs, &c.skip)
        .map_err(|e| format!("the CPU step refused the case: {e}"))?;

    let mut d = Diffs::default();
    let mut want_steps = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        let n = t.len();
        let param = r.vec::<P>("param", n)?;
        let m = r.vec::<f32>("m", n)?;
        let v = r.vec::<f32>("v", n)?;
        let master = r.vec::<f32>("master", t.master.as_ref().map_or(0, Vec::len))?;
        d.bits(&format!("tensor {i} param"), &param, &t.param);
        d.bits(&format!("tensor {i} m"), &m, &t.m);
        d.bits(&format!("tensor {i} v"), &v, &t.v);
        if let Some(cm) = &t.master {
            d.bits(&format!("tensor {i} master"), &master, cm);
        }
        want_steps.extend(std::iter::repeat_n(t.step, n.div_ceil(CHUNK as usize)));
    }
    let steps = r.vec::<u32>("chunk_steps", want_steps.len())?;
    d.eq("chunk steps", &steps, &want_steps);
    // The init-master kernel ran after the step: master = f32 of the updated parameters.
    if P::KIND != DtypeKind::F32 && c.layout & 2 == 0 {
        for (i, t) in ts.iter().enumerate() {
            let got = r.vec::<f32>("init_master", t.len())?;
            let want: Vec<f32> = t.param.iter().map(|x| x.to_f32()).collect();
            d.bits(&format!("tensor {i} init_master"), &got, &want);
        }
    }
    d.into_result()
}
