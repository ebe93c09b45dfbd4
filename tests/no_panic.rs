//! No panic through the public API (issue #25): every public CPU entry point, config builder,
//! keying and plan function, state restore and bytes function, driven with arbitrary arguments
//! (sizes from 0 to `usize::MAX`, every special float, any seed, index and step, lengths that
//! match the config or not, random and corrupted state bytes) must return a value or an
//! [`fusedreg::Error`], never panic and never abort on an allocation. The documented panics
//! (`# Panics` sections: `Layout::chunks`, `Layout::chunk`, `StateView::{fill_into, m, v,
//! master}`, as slice indexing) are not driven out of range. The GPU entry points check their
//! arguments against a device first; the ops' bad-input tests
//! (`tests/<op>.rs`, `tests/bad_input.rs`, `tests/gpu/bad_input.rs`) cover them.
//!
//! A hand-rolled generator over `rand` (already a dev-dependency) rather than `proptest`: the
//! interesting inputs are a short list of boundary values mixed with random ones, every failure
//! prints its seed, iteration and arguments (enough to replay it without shrinking), and no new
//! dependency enters the lockfile. `FUSEDREG_NOPANIC_SEED` (a number) and
//! `FUSEDREG_NOPANIC_ITERS` change the seed and the count (default: a fixed seed, 400 per entry
//! point group, about a second).

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fusedreg::half::{bf16, f16};
use fusedreg::{
    adamw, bias_act_dropout as bad, cross_entropy as xe, dropout, dropout_add_norm as dan,
    dropping, fmath, global_norm, multi_tensor, philox, stochastic_depth as sd, DtypeKind, Math,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Gen(StdRng);

impl Gen {
    fn size(&mut self) -> usize {
        const S: [usize; 16] = [
            0,
            1,
            2,
            3,
            7,
            8,
            31,
            33,
            64,
            1000,
            1 << 31,
            1 << 32,
            1 << 40,
            1 << 62,
            usize::MAX / 2,
            usize::MAX,
        ];
        if self.0.random_bool(0.7) {
            S[self.0.random_range(0..S.len())]
        } else {
            self.0.random_range(0..100)
        }
    }
    /// A size small enough to allocate data for.
    fn small(&mut self) -> usize {
        self.0.random_range(0..24)
    }
    fn u64(&mut self) -> u64 {
        match self.0.random_range(0..4) {
            0 => 0,
            1 => u64::MAX,
            _ => self.0.random(),
        }
    }
    fn f64(&mut self) -> f64 {
        const S: [f64; 14] = [
            0.0,
            -0.0,
            1.0,
            0.5,
            1.0 - 1e-12,
            1e-300,
            -1.0,
            2.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
            4.9e-324,
        ];
        if self.0.random_bool(0.6) {
            S[self.0.random_range(0..S.len())]
        } else {
            self.0.random_range(-2.0..2.0)
        }
    }
    fn f32(&mut self) -> f32 {
        self.f64() as f32
    }
    fn bool(&mut self) -> bool {
        self.0.random()
    }
    fn vec<T>(&mut self, n: usize, mut f: impl FnMut(&mut Self) -> T) -> Vec<T> {
        (0..n).map(|_| f(self)).collect()
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.vec(n, |g| g.f32())
    }
    fn halfs(&mut self, n: usize) -> Vec<f16> {
        self.vec(n, |g| f16::from_f32(g.f32()))
    }
    fn vec_with<T>(
        &mut self,
        n: impl FnOnce(&mut Self) -> usize,
        f: impl FnMut(&mut Self) -> T,
    ) -> Vec<T> {
        let n = n(self);
        self.vec(n, f)
    }
    fn halfs_for(&mut self, want: usize) -> Vec<f16> {
        let n = self.len(want);
        self.halfs(n)
    }
    fn f32s_for(&mut self, want: usize) -> Vec<f32> {
        let n = self.len(want);
        self.f32s(n)
    }
    /// `want` half of the time (so the call gets past its length checks), else a small length.
    fn len(&mut self, want: usize) -> usize {
        if want <= 4096 && self.bool() {
            want
        } else {
            self.small()
        }
    }
    fn dtype(&mut self) -> DtypeKind {
        [DtypeKind::F32, DtypeKind::F16, DtypeKind::Bf16][self.0.random_range(0..3)]
    }
}

fn iters() -> usize {
    std::env::var("FUSEDREG_NOPANIC_ITERS").map_or(400, |s| s.parse().expect("a count"))
}

fn seed() -> u64 {
    std::env::var("FUSEDREG_NOPANIC_SEED").map_or(0x2512_0625, |s| s.parse().expect("a number"))
}

/// Runs `body` on `iters()` generated argument sets; a panic fails with the seed, the iteration
/// and the arguments `body` recorded.
fn drive(name: &str, mut body: impl FnMut(&mut Gen, &mut Vec<String>)) {
    let seed = seed();
    let mut g = Gen(StdRng::seed_from_u64(seed ^ name.len() as u64));
    for k in 0..iters() {
        let mut args = vec![];
        let r = catch_unwind(AssertUnwindSafe(|| body(&mut g, &mut args)));
        if r.is_err() {
            panic!(
                "{name}: panicked at iteration {k} (FUSEDREG_NOPANIC_SEED={seed}) with {}",
                args.join(", ")
            );
        }
    }
}

/// Records an argument for the failure message and returns it.
fn arg<T: Debug>(args: &mut Vec<String>, name: &str, v: T) -> T {
    args.push(format!("{name} = {v:?}"));
    v
}

macro_rules! a {
    ($args:ident, $e:expr) => {
        arg($args, stringify!($e), $e)
    };
}

#[test]
fn dropping_keying_and_helpers() {
    drive("dropping", |g, args| {
        let (p, seed, call, i) = (g.f64(), g.u64(), g.u64(), g.u64());
        let (rows, cols, n) = (g.size(), g.size(), g.size());
        a!(args, (p, seed, call, i, rows, cols, n));
        if let Ok(r) = dropping::DropRate::new(p) {
            let _ = (r.threshold(), r.scale(), r.keeps(i as u32));
            for res in [
                dropping::MaskResolution::Bits32,
                dropping::MaskResolution::Bits16,
            ] {
                let _ = (r.threshold_at(res), r.effective_p_at(res));
            }
        }
        if let Ok(k) = dropping::Keying::new("op", p, seed, call) {
            let _ = k.keeps(i);
            let _ = k.with_resolution(dropping::MaskResolution::Bits16).keeps(i);
        }
        let _ = dropping::mask_words(n);
        let _ = dropping::slab_rows(rows, cols, g.dtype());
        let _ = dropping::slab_count(rows, cols, g.dtype());
        let mut mask = vec![0u32; g.small()];
        let at = a!(args, g.size());
        let _ = dropping::mask_bit(&mask, at);
        let _ = dropping::set_mask_bit(&mut mask, at);
        if let Ok(path) = dropping::DropPath::new(g.f64(), call) {
            let rps = a!(args, g.size());
            if let Ok(path) = path.per_sample(rps) {
                let _ = path.row_scale(seed, i);
            }
        }
        for cfg in [
            dropping::Config::new(rows, cols, p, seed, call),
            dropping::Config::flat(n, p, seed, call),
        ]
        .into_iter()
        .flatten()
        {
            let _ = cfg.keeps(fusedreg::DtypeKind::F32, i);
            let _ = cfg.keeps(fusedreg::DtypeKind::Bf16, i);
            let _ = cfg
                .with_resolution(dropping::MaskResolution::Bits16)
                .keeps(fusedreg::DtypeKind::F32, i);
        }
        let _ = philox::mask_word(seed, call, i);
        let _ = philox::block(seed, call, i);
    });
}

#[test]
fn dropout_cpu() {
    drive("dropout", |g, args| {
        let (rows, cols) = if g.bool() {
            (g.small(), g.small())
        } else {
            (g.size(), g.size())
        };
        let (p, seed, call) = (g.f64(), g.u64(), g.u64());
        a!(args, (rows, cols, p));
        let Ok(mut cfg) = dropping::Config::new(rows, cols, p, seed, call) else {
            return;
        };
        if g.bool() {
            if let Ok(path) = dropping::DropPath::new(g.f64(), call) {
                cfg = cfg.with_drop_path(path);
            }
        }
        if g.bool() {
            cfg = cfg.with_resolution(dropping::MaskResolution::Bits16);
        }
        let n = rows.saturating_mul(cols);
        let x = g.halfs_for(n);
        let mut y = g.halfs_for(n);
        let r = g.halfs_for(n);
        let bias = g.halfs_for(cols);
        let rowscale = g.f32s_for(rows);
        let mut mask = vec![0u32; g.len(dropping::mask_words(n))];
        let mut rs_out = g.f32s_for(rows);
        let (lx, ly, lb) = (x.len(), y.len(), bias.len());
        a!(args, (lx, ly, lb, mask.len()));
        let opts = dropout::cpu::ForwardOptions {
            bias: g.bool().then_some(&bias[..]),
            residual: g.bool().then_some(&r[..]),
            rowscale: g.bool().then_some(&rowscale[..]),
            mask_out: g.bool().then_some(&mut mask[..]),
            rowscale_out: g.bool().then_some(&mut rs_out[..]),
            redundancy: None,
        };
        let _ = dropout::cpu::forward(&cfg, &x, &mut y, opts);
        let with_r = dropout::cpu::ForwardOptions {
            residual: Some(&r[..]),
            ..Default::default()
        };
        let _ = dropout::cpu::forward(&cfg, &x, &mut y, with_r);
        let with_r = dropout::cpu::ForwardOptions {
            residual: g.bool().then_some(&r[..]),
            ..Default::default()
        };
        let _ = dropout::cpu::forward_inplace(&cfg, &x, &mut y, with_r);
        let mut db = g.halfs_for(cols);
        let opts = dropout::cpu::BackwardOptions {
            rowscale: g.bool().then_some(&rowscale[..]),
            mask: g.bool().then_some(&mask[..]),
            dbias: g.bool().then_some(&mut db[..]),
        };
        let mut dx = g.halfs_for(n);
        let _ = dropout::cpu::backward(&cfg, &x, &mut dx, opts);
        let mut bytes = vec![0u8; g.len(n)];
        let ro = g.bool().then_some(&r[..]);
        let _ = dropout::unfused::forward_cpu(&cfg, &x, None, ro, &mut y, &mut bytes);
        let _ = dropout::unfused::backward_cpu(&cfg, &x, &bytes, &mut dx, Some(&mut db));
        let (dt, n64) = (g.dtype(), g.u64());
        for b in [false, true] {
            let _ = dropout::fused_forward_bytes(dt, n64, b, !b);
            let _ = dropout::fused_backward_bytes(dt, n64, b);
            let _ = dropout::unfused_forward_bytes(dt, n64, b, !b);
            let _ = dropout::unfused_backward_bytes(dt, n64, b);
        }
    });
}

#[test]
fn bias_act_dropout_cpu() {
    let acts = [
        bad::Activation::GeluErf,
        bad::Activation::GeluTanh,
        bad::Activation::Silu,
        bad::Activation::Relu,
    ];
    drive("bias_act_dropout", |g, args| {
        let act = acts[g.0.random_range(0..4)];
        let h = g.f32();
        let _ = (
            act.forward(h),
            act.grad(h),
            act.forward_f64(h.into()),
            act.grad_f64(h.into()),
        );
        let (rows, cols) = if g.bool() {
            (g.small(), g.small())
        } else {
            (g.size(), g.size())
        };
        let (p, seed, call) = (g.f64(), g.u64(), g.u64());
        a!(args, (rows, cols, act, p));
        let Ok(mut cfg) = bad::Config::new(rows, cols, act, p, seed, call) else {
            return;
        };
        cfg = cfg.with_math(if g.bool() { Math::Fast } else { Math::Exact });
        if g.bool() {
            cfg = cfg.with_resolution(dropping::MaskResolution::Bits16);
        }
        let _ = cfg.keeps(fusedreg::DtypeKind::Bf16, g.u64());
        let n = rows.saturating_mul(cols);
        let x = g.f32s_for(n);
        let bias = g.f32s_for(cols);
        let mut y = g.f32s_for(n);
        let mut h = g.f32s_for(n);
        let dy = g.f32s_for(n);
        let mut dx = g.f32s_for(n);
        let mut db = g.f32s_for(cols);
        a!(
            args,
            (x.len(), bias.len(), y.len(), h.len(), dx.len(), db.len())
        );
        let b = g.bool().then_some(&bias[..]);
        let _ = bad::cpu::forward(&cfg, &x, b, &mut y, g.bool().then_some(&mut h[..]));
        let pre = if g.bool() {
            bad::Preact::H(&h[..])
        } else {
            bad::Preact::X { x: &x[..], bias: b }
        };
        let _ = bad::cpu::backward(&cfg, &dy, pre, &mut dx, g.bool().then_some(&mut db[..]));
        let mut m = vec![0u8; g.len(n)];
        let _ = bad::unfused::forward_cpu(&cfg, &x, &bias, &mut y, &mut m, &mut h);
        let _ = bad::unfused::backward_cpu(&cfg, &dy, &m, &h, &mut dx, Some(&mut db));
        let (dt, n64, f) = (g.dtype(), g.u64(), g.bool());
        let _ = bad::fused_forward_bytes(dt, n64, f);
        let _ = bad::fused_backward_bytes(dt, n64);
        let _ = bad::unfused_forward_bytes(dt, n64, f);
        let _ = bad::unfused_backward_bytes(dt, n64, f);
    });
}

#[test]
fn dropout_add_norm_cpu() {
    drive("dropout_add_norm", |g, args| {
        let _ = dan::layer_norm_scaling(a!(args, g.size()));
        let (rows, cols) = if g.bool() {
            (g.small(), g.small())
        } else {
            (g.size(), g.size())
        };
        let norm = if g.bool() {
            dan::Norm::LayerNorm
        } else {
            dan::Norm::RmsNorm
        };
        let eps = g.f32();
        a!(args, (rows, cols, norm, eps));
        let Ok(mut cfg) = dan::Config::new(rows, cols, norm, eps) else {
            return;
        };
        if let Ok(c) = cfg.with_dropout(g.f64(), g.u64(), g.u64()) {
            cfg = c;
        }
        if let Ok(c) = cfg.with_layer_scale(g.f32()) {
            cfg = c;
        }
        if let Ok(c) = cfg.with_layer_norm_scaling(g.size()) {
            cfg = c;
        }
        if let Ok(path) = dropping::DropPath::new(g.f64(), g.u64()) {
            if g.bool() {
                cfg = cfg.with_drop_path(path);
            }
        }
        let _ = cfg.keeps(fusedreg::DtypeKind::Bf16, g.u64());
        let n = rows.saturating_mul(cols);
        let x = g.f32s_for(n);
        let gamma = g.f32s_for(cols);
        let r = g.f32s_for(n);
        let (mut out, mut s) = (g.f32s_for(n), g.f32s_for(n));
        let (mut mean, mut rstd) = (g.f32s_for(rows), g.f32s_for(rows));
        a!(args, (x.len(), gamma.len(), out.len(), mean.len()));
        let mut fa = dan::cpu::ForwardArgs::<f32, f32>::new(&x, &gamma);
        fa.residual = g.bool().then_some(&r[..]);
        let fo = dan::cpu::ForwardOut {
            out: &mut out,
            s: &mut s,
            mean: &mut mean,
            rstd: &mut rstd,
        };
        let _ = dan::cpu::forward(&cfg, fa, fo);
        let (mut dx, mut dg) = (g.f32s_for(n), g.f32s_for(cols));
        let ba = dan::cpu::BackwardArgs::new(&x, &s, &gamma, &mean, &rstd);
        let _ = dan::cpu::backward(&cfg, ba, dan::cpu::BackwardOut::new(&mut dx, &mut dg));
        let (a, b, n64, f) = (g.dtype(), g.dtype(), g.u64(), g.bool());
        let _ = dan::fused_forward_bytes(a, b, n64, f);
        let _ = dan::unfused_forward_bytes(a, n64);
        let _ = dan::unfused_backward_bytes(a, n64);
    });
}

#[test]
fn cross_entropy_cpu() {
    drive("cross_entropy", |g, args| {
        let (rows, vocab) = if g.bool() {
            (g.small(), g.small())
        } else {
            (g.size(), g.size())
        };
        let (alpha, lambda, ignore) = (g.f64(), g.f64(), g.u64() as i64);
        a!(args, (rows, vocab, alpha, lambda, ignore));
        let Ok(mut cfg) = xe::Config::new(rows, vocab) else {
            return;
        };
        if let Ok(c) = cfg.label_smoothing(alpha) {
            cfg = c;
        }
        if let Ok(c) = cfg.z_loss(lambda) {
            cfg = c;
        }
        let red = [xe::Reduction::None, xe::Reduction::Sum, xe::Reduction::Mean];
        cfg = cfg
            .ignore_index(ignore)
            .reduction(red[g.0.random_range(0..3)])
            .with_math(if g.bool() { Math::Fast } else { Math::Exact });
        let n = rows.saturating_mul(vocab);
        let logits = g.halfs_for(n);
        let targets: Vec<i64> = g.vec_with(
            |g| g.len(rows),
            |g| match g.0.random_range(0..3) {
                0 => g.u64() as i64,
                _ => g.0.random_range(-2..(vocab.min(1000) as i64 + 2)),
            },
        );
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        let up = g.f32s_for(rows);
        let upo = g.bool().then_some(&up[..]);
        let mut grad = g.halfs_for(n);
        a!(args, (logits.len(), targets.len(), grad.len()));
        let _ = xe::cpu::forward(&cfg, &logits, &targets);
        let _ = xe::cpu::forward_backward(&cfg, &logits, &targets, upo, &mut grad);
        let _ = xe::cpu::forward_backward(&cfg, &logits, &t32, upo, &mut grad);
        let mut inplace = logits.clone();
        let _ = xe::cpu::forward_backward_inplace(&cfg, &mut inplace, &targets, upo);
        let _ = xe::unfused::forward_backward_cpu(&cfg, &logits, &targets, upo, &mut grad);
        let sfu = xe::fast_model::EmuSfu;
        let _ = xe::fast_model::forward_backward(&cfg, &logits, &targets, upo, &mut grad, &sfu);
    });
}

#[test]
fn global_norm_adamw_and_state() {
    drive("adamw", |g, args| {
        let (max_norm, loss_scale, lr) = (g.bool().then(|| g.f32()), g.f32(), g.f32());
        a!(args, (max_norm, loss_scale, lr));
        let _ = global_norm::check_max_norm(max_norm);
        let _ = global_norm::check_loss_scale(loss_scale);
        let grads: Vec<Vec<bf16>> = g.vec_with(
            |g| g.0.random_range(0..4),
            |g| g.vec_with(|g| g.small(), |g| bf16::from_f32(g.f32())),
        );
        let refs: Vec<&[bf16]> = grads.iter().map(|v| &v[..]).collect();
        let norm = global_norm::cpu::global_norm(&refs, max_norm, loss_scale);
        let _ = global_norm::cpu::finalize(g.f64(), max_norm, loss_scale);
        // Tensor lengths: small, at the chunk boundary, or past what a set holds (an error).
        // Not the lengths in between: a legal layout of up to MAX_CHUNKS chunks allocates its
        // 8-byte-per-chunk table (128 MiB at the limit), which is the caller's request.
        let lens: Vec<u64> = g.vec_with(
            |g| g.0.random_range(0..4),
            |g| match g.0.random_range(0..4) {
                0 => g.0.random_range(0..1 << 20),
                1 => multi_tensor::CHUNK + g.0.random_range(0..3) - 1,
                2 => multi_tensor::MAX_CHUNKS * multi_tensor::CHUNK + 1,
                _ => u64::MAX >> g.0.random_range(0..2),
            },
        );
        let _ = multi_tensor::Layout::new(a!(args, &lens));

        let _ = adamw::check_lr(lr);
        let _ = adamw::cpu::bias_corrections(g.f32(), g.f32(), g.0.random());
        let mut cfg = adamw::AdamWConfig::default();
        if g.bool() {
            (cfg.lr, cfg.beta1, cfg.beta2, cfg.eps) = (g.f32(), g.f32(), g.f32(), g.f32());
        }
        a!(args, &cfg);
        let _ = cfg.validate();
        let mut ts = vec![];
        for _ in 0..g.0.random_range(0..3) {
            let (pn, gn) = (g.small(), g.small());
            let p: Vec<f16> = g.halfs(pn);
            let gr: Vec<f16> = if g.bool() { g.halfs(pn) } else { g.halfs(gn) };
            if let Ok(t) = adamw::cpu::CpuTensor::new(p, gr, g.f32()) {
                ts.push(t);
            }
        }
        let mut inputs = match &norm {
            Ok(v) if g.bool() => adamw::cpu::StepInputs::from_norm(lr, v),
            _ => adamw::cpu::StepInputs::new(lr),
        };
        inputs.grad_scale = if g.bool() { g.f32() } else { inputs.grad_scale };
        let skip: Vec<bool> = g.vec_with(|g| g.0.random_range(0..4), |g| g.bool());
        let _ = adamw::cpu::step(&mut ts, &cfg, &inputs, &skip);
        // State: the real bytes, then truncated, corrupted and random ones.
        let mut bytes = adamw::cpu::save_state(&ts).unwrap_or_default();
        match g.0.random_range(0..4) {
            0 => {}
            1 => bytes.truncate(g.0.random_range(0..=bytes.len())),
            2 if !bytes.is_empty() => {
                let i = g.0.random_range(0..bytes.len());
                bytes[i] ^= 1 << g.0.random_range(0..8);
            }
            _ => bytes = g.vec_with(|g| g.0.random_range(0..200), |g| g.0.random()),
        }
        let _ = adamw::cpu::restore_state(&mut ts, &bytes);
        if let Ok(h) = adamw::state::peek(&bytes) {
            let _ = adamw::state::decode(&bytes, &h);
        }
        let (n64, dt) = (g.u64(), g.dtype());
        let _ = adamw::min_bytes(n64, dt, DtypeKind::F32);
        let _ = adamw::clip_step_min_bytes(n64, dt, DtypeKind::Bf16);
        let _ = adamw::unfused_clip_step_min_bytes(n64, dt, DtypeKind::F16);
        let ranks: Vec<usize> = g.vec_with(|g| g.small(), |g| g.size());
        let _ = adamw::weight_decay_by_rank(&ranks, g.f32());
    });
}

#[test]
fn stochastic_depth_and_fmath() {
    drive("stochastic_depth", |g, args| {
        let x = g.f32();
        let _ = (
            fmath::exp(x),
            fmath::ln(x),
            fmath::erf(x),
            fmath::tanh(x),
            fmath::sigmoid(x),
        );
        let schedule = match g.0.random_range(0..4) {
            0 => sd::Schedule::linear(g.f64()),
            1 => sd::Schedule::Linspace { rate: g.f64() },
            2 => sd::Schedule::Constant(g.f64()),
            _ => sd::Schedule::Custom(g.vec_with(|g| g.small(), |g| g.f64())),
        };
        let blocks = g.size();
        a!(args, (&schedule, blocks));
        let _ = schedule.probabilities(blocks);
        let mode = if g.bool() {
            sd::Mode::Batch
        } else {
            sd::Mode::Row
        };
        if let Ok(s) = sd::StochasticDepth::new(schedule, blocks, g.u64(), mode) {
            let plan = s.plan(g.u64());
            let b = a!(args, g.size());
            let _ = (
                plan.runs(b),
                plan.residual_scale(b),
                plan.block(b),
                plan.running(),
            );
            let owners: Vec<Option<usize>> =
                g.vec_with(|g| g.small(), |g| g.bool().then(|| g.size()));
            let _ = plan.skip_flags(&owners);
            let _ = s.eval_plan().runs(b);
        }
    });
}
