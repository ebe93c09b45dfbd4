//! Fused multi-tensor AdamW (decoupled weight decay) over a
//! [`TensorSet`] in one launch per step for any number of tensors,
//! every per-step scalar read from device memory, bit-exact with the CPU reference [`cpu`].
//!
//! # The formula and its exact operation order
//!
//! PyTorch's fused AdamW formula, in f32 with f32 hyperparameters, `t` counted from 1:
//!
//! ```text
//! p <- p - lr*wd*p                        (decoupled decay, on the old p)
//! m <- b1*m + (1-b1)*g
//! v <- b2*v + (1-b2)*g*g
//! p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! pinned to these operations (`fma` is one fused multiply-add with a single rounding:
//! `__fmaf_rn` in the kernel, [`f32::mul_add`] on the CPU; every other step is one IEEE f32
//! operation; the kernels are compiled with `--fmad=false` so nothing else is fused):
//!
//! ```text
//! per tensor and step:
//!   t         = step count + 1                      (u32)
//!   bc1       = f32(1 - b1^t)                       (f64: b1^t by squaring, 1 - x; one rounding)
//!   bc2_sqrt  = f32(sqrt(1 - b2^t))                 (f64 sqrt; one rounding)
//!   neg_step  = -(lr / bc1)
//!   neg_lr_wd = -(lr * wd)
//!   omb1 = 1 - b1,  omb2 = 1 - b2
//! per element:
//!   g     = grad * grad_scale                       (grad widened to f32 exactly)
//!   p     = fma(neg_lr_wd, p, p)
//!   m     = fma(b1, m, omb1 * g)
//!   v     = fma(b2, v, (omb2 * g) * g)
//!   denom = sqrt(v) / bc2_sqrt + eps
//!   p     = fma(neg_step, m / denom, p)
//! ```
//!
//! `b^t` is not `powf` (CUDA's and libm's last bits differ): it is binary exponentiation with
//! IEEE f64 multiplies ([`cpu::pow_by_squaring`]), identical on both sides, then `1 - b^t` (and
//! its square root) in f64, rounded once to f32. Division and square root are correctly rounded
//! on both sides. The results are therefore bit-identical between the kernel and [`cpu::step`],
//! on any GPU, for any launch configuration or alignment.
//!
//! Defaults are PyTorch's ([`AdamWConfig::default`]): lr 1e-3, betas (0.9, 0.999), eps 1e-8, and
//! [`DEFAULT_WEIGHT_DECAY`] = 1e-2 per tensor (set 0 for biases and norm weights). Every scalar
//! stays f32 whatever the parameter dtype (candle rounds them to bf16, where 0.999 becomes 1).
//!
//! # Dtypes
//!
//! | params | grads | master | m, v |
//! | --- | --- | --- | --- |
//! | f32 | f32, f16 or bf16 | none (updated in place) | f32 or bf16 |
//! | f16 or bf16 | f32, f16 or bf16 | f32 (default) or none | f32 or bf16 |
//!
//! Kernels `adamw_p<dt>_g<dt>` exist for all nine pairs, in four families by state layout
//! (suffix none, `_mbf16`, `_nomaster`, `_mbf16_nomaster`; see [`StateOptions`]). With 16-bit
//! parameters and f32 master weights, the master is the truth: the kernel reads the master (not
//! the parameter), updates it and writes the parameter as its rounded copy. Without master
//! weights the kernel reads the 16-bit parameter, widens it exactly, updates it in f32 and writes
//! it back rounded. Either way the rounding is to nearest even ([`Rounding::NearestEven`], the
//! default) or stochastic ([`Rounding::Stochastic`]): the 16-bit random
//! [`cpu::rounding_random`]`(seed, call, i)` (halfword `i % 8` of Philox block `i / 8`: one
//! Philox evaluation per 8 elements) for element `i` of tensor `k` at its step `t`, with
//! `call = (t << 32) | k` ([`cpu::rounding_call`]), rounds up to the next 16-bit value with
//! probability `|x - lo| / ulp` (see [`cpu::round_stochastic`]): exactly unbiased for bf16 (the
//! 16 bits truncation discards are the fraction; no division) and normal f16, deterministic for
//! a given seed and step, identical on CPU and GPU. (Before 2026-12-06 each element took a
//! 32-bit Philox word: the same rule, a different random stream.)
//!
//! # Lean state ([`StateOptions`] in [`AdamWConfig::state`])
//!
//! * **bf16 moments** ([`MomentDtype::Bf16`]): `m` and `v` are stored as bf16. Where the
//!   rounding happens is pinned: the stored bf16 values are widened exactly to f32, the whole
//!   update above runs in f32 unchanged (the parameter update uses the f32 `m` and `v` of this
//!   step), and only then are `m` and `v` rounded to bf16, nearest even, for storage. So a
//!   bf16-moment step equals the f32-moment step from the same moments followed by rounding the
//!   stored moments (tested on the CPU and the GPU bit for bit).
//! * **No master weights** ([`MasterWeights::None`], 16-bit parameters): llm.c's scheme; use it
//!   with [`Rounding::Stochastic`] (updates below half an ulp survive on average; with nearest
//!   even they are lost).
//!
//! Bytes per parameter and step ([`min_bytes_with`]), and resident state
//! ([`state_bytes_per_param`], moments plus master, parameters and gradients not counted):
//!
//! | params | grads | moments | master | step bytes | state bytes |
//! | --- | --- | --- | --- | --- | --- |
//! | f32 | f32 | f32 | — | 28 | 8 |
//! | f32 | f32 | bf16 | — | 20 | 4 |
//! | bf16 | bf16 | f32 | f32 (default) | 28 | 12 |
//! | bf16 | bf16 | bf16 | f32 | 20 | 8 |
//! | bf16 | bf16 | f32 | none | 22 | 8 |
//! | bf16 | bf16 | bf16 | none | **14** (PyTorch's fused AdamW on bf16 params) | 4 |
//! | bf16 | f32 | bf16 | none | 16 | 4 |
//!
//! # State
//!
//! [`AdamW`] owns the state; the [`TensorSet`] knows only parameters, gradients and the chunk
//! tables. [`AdamW::new`] allocates each tensor's `m`, `v` (f32, zeroed), master weights (16-bit
//! parameters; copied from the parameters), per-tensor weight decay, skip flags and step counts,
//! and uploads its own per-tensor table (`AdamWTensor` in `kernels/adamw.cu`: the addresses of
//! m, v and master and the weight decay), which its kernel reads beside the engine's tables.
//! Step counts are kept per chunk (65,536 elements; each block advances only its own, so no two
//! blocks race and no second launch is needed); the chunks of a tensor always advance together,
//! and a zero-size tensor has no chunk and so a step count of 0. [`AdamW::step_counts`] reads
//! them per tensor.
//!
//! Step counts **saturate** at `u32::MAX`, on the CPU and the GPU alike: a tensor whose count is
//! `u32::MAX` (reachable only through a restored state or a [`cpu::CpuTensor`] built that way)
//! steps with `t = u32::MAX` again, and its count stays there. The bias corrections are exactly 1
//! in f32 long before that (`b^t` underflows), so the update is the same as one step earlier;
//! only the stochastic-rounding stream (keyed by `t`) then repeats from step to step. (A wrapping
//! counter would restart at `t = 0`, where `1 - b^0 = 0` and every parameter becomes NaN.)
//!
//! [`AdamW::save_state`] / [`AdamW::restore_state`] write and read the state as bytes
//! (little-endian, version 2; see [`state`]):
//!
//! ```text
//! magic "FRADAMW\0" | u32 version | u8 param dtype (0 f32, 1 f16, 2 bf16) | u8 has master |
//! u8 moment dtype (0 f32, 2 bf16) | u8 0 | u64 tensor count T | u64 len[T] | u32 step[T] |
//! m[sum len] | v[sum len] (f32, or bf16 bits) | f32 master[sum len] (when it has one)
//! ```
//!
//! Version 1 (before the lean layouts: byte 14 was reserved and 0, master weights exactly for
//! 16-bit parameters) still restores into an optimizer with the default layout. Restoring checks
//! the magic, version, dtype, layout, tensor count and every length (an [`Error`] naming the
//! first difference), and training resumes bit for bit. [`cpu::save_state`] and
//! [`cpu::restore_state`] use the same format.
//!
//! # Device-side scalars: no host sync, CUDA-graph friendly
//!
//! * `lr`: an f32 in device memory owned by [`AdamW`]; [`AdamW::set_lr`] enqueues a 4-byte copy,
//!   or write it on the device at [`AdamW::lr_device_ptr`] (a scheduler kernel).
//! * `grad_scale` and the non-finite flag: written by [`GlobalNorm`](crate::global_norm::GlobalNorm)
//!   (clip coefficient / loss scale). When the flag is set the kernel changes nothing at all —
//!   parameters, moments, master weights and step counts keep their bits. Loss scaling without
//!   clipping: a `GlobalNorm` with `max_norm = None` and its loss scale set gives
//!   `grad_scale = 1 / loss_scale` and the found-inf flag a dynamic loss scaler needs.
//! * Per-tensor skip flags ([`AdamW::set_skip`], a tiny asynchronous copy, or written on the
//!   device at [`AdamW::skip_device_ptr`]): a skipped tensor (the block of a dropped stochastic
//!   depth layer) gets no decay, no moment update and no step, and adds 0 to the norm of
//!   [`AdamW::clip_and_step`].
//! * Step counts: on the device, as above.
//!
//! [`AdamW::clip_and_step`] is the whole step: norm partials, reduce + finalize, AdamW — 3
//! launches, zero host syncs, gradients read twice in all (once by the norm, once by AdamW).
//!
//! [`unfused`] is the baseline: one launch per tensor per pass and a host sync for the norm.
//!
//! ```
//! use fusedreg::adamw::{cpu, AdamWConfig};
//! // One f32 tensor, one step on the CPU reference.
//! let mut t = vec![cpu::CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.5; 4], 0.01).unwrap()];
//! let cfg = AdamWConfig::default();
//! cpu::step(&mut t, &cfg, &cpu::StepInputs::new(cfg.lr), &[]).unwrap();
//! assert_eq!(t[0].step, 1);
//! // First step: m/bc1 = g, sqrt(v)/bc2_sqrt = |g|, so p moves by about lr.
//! assert!((t[0].param[0] - (1.0 - 1e-5 - 1e-3)).abs() < 1e-6);
//! ```

use crate::dtype::DtypeKind;
use crate::error::{check_finite, Error, Result};

pub mod cpu;
pub mod gpu;
pub mod state;
pub mod unfused;

pub use gpu::AdamW;

#[allow(unused_imports)] // for the docs above
use crate::multi_tensor::TensorSet;

pub(crate) const OP: &str = "adamw";

/// PyTorch's default weight decay for AdamW (per tensor; 0 for biases and norm weights).
///
/// ```
/// use fusedreg::adamw::{cpu::CpuTensor, DEFAULT_WEIGHT_DECAY};
/// assert_eq!(DEFAULT_WEIGHT_DECAY, 0.01);
/// // A weight matrix is decayed, its bias is not.
/// let w = CpuTensor::<f32, f32>::new(vec![1.0; 6], vec![0.0; 6], DEFAULT_WEIGHT_DECAY).unwrap();
/// let b = CpuTensor::<f32, f32>::new(vec![0.0; 2], vec![0.0; 2], 0.0).unwrap();
/// assert_eq!((w.weight_decay, b.weight_decay), (0.01, 0.0));
/// ```
pub const DEFAULT_WEIGHT_DECAY: f32 = 1e-2;

/// How 16-bit parameters are written from their f32 master weights.
///
/// ```
/// use fusedreg::adamw::{cpu::round_stochastic, AdamWConfig, Rounding};
/// use half::bf16;
/// assert_eq!(Rounding::default(), Rounding::NearestEven);
/// let cfg = AdamWConfig { rounding: Rounding::Stochastic { seed: 7 }, ..Default::default() };
/// assert!(cfg.validate().is_ok());
/// // 1 + 2^-9 lies between the bf16 values 1 and 1 + 2^-7: nearest even gives 1, stochastic
/// // rounding gives either neighbour, depending on the random word.
/// let x = 1.0 + 2f32.powi(-9);
/// assert_eq!(bf16::from_f32(x).to_f32(), 1.0);
/// assert_eq!(round_stochastic::<bf16>(x, 0).to_f32(), 1.0 + 2f32.powi(-7));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    #[default]
    NearestEven,
    /// Stochastic rounding keyed by Philox: deterministic per (seed, step, tensor, element).
    Stochastic {
        /// The Philox key.
        seed: u64,
    },
}

/// The storage type of the moments `m` and `v`.
///
/// ```
/// use fusedreg::adamw::MomentDtype;
/// assert_eq!(MomentDtype::default(), MomentDtype::F32);
/// assert_eq!(MomentDtype::Bf16.size(), 2);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum MomentDtype {
    /// f32 moments (PyTorch's and Apex's default): 8 bytes of state per parameter.
    #[default]
    F32,
    /// bf16 moments: 4 bytes per parameter. Updated in f32 exactly as f32 moments are; only the
    /// stored values are rounded to bf16 (nearest even) after each update (see the module docs).
    Bf16,
}

impl MomentDtype {
    /// Bytes per element of one moment.
    ///
    /// ```
    /// use fusedreg::adamw::MomentDtype;
    /// assert_eq!((MomentDtype::F32.size(), MomentDtype::Bf16.size()), (4, 2));
    /// ```
    pub fn size(self) -> usize {
        match self {
            MomentDtype::F32 => 4,
            MomentDtype::Bf16 => 2,
        }
    }

    /// As a [`DtypeKind`].
    ///
    /// ```
    /// use fusedreg::{adamw::MomentDtype, DtypeKind};
    /// assert_eq!(MomentDtype::Bf16.kind(), DtypeKind::Bf16);
    /// ```
    pub fn kind(self) -> DtypeKind {
        match self {
            MomentDtype::F32 => DtypeKind::F32,
            MomentDtype::Bf16 => DtypeKind::Bf16,
        }
    }
}

/// Master weights of 16-bit parameters (no effect on f32 parameters, which are their own
/// truth).
///
/// ```
/// use fusedreg::adamw::MasterWeights;
/// assert_eq!(MasterWeights::default(), MasterWeights::F32);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum MasterWeights {
    /// An f32 copy of every 16-bit parameter is the optimizer's truth; the parameter is its
    /// rounded copy (the default).
    #[default]
    F32,
    /// No copy: the 16-bit parameter is read, updated in f32 and written back rounded (llm.c's
    /// scheme). Use [`Rounding::Stochastic`] with it, or updates smaller than half a 16-bit ulp
    /// are lost every step; with stochastic rounding they survive on average.
    None,
}

/// The optimizer-state layout: moment dtype and master weights. The default is PyTorch's:
/// f32 moments, f32 master weights for 16-bit parameters. See [`min_bytes_with`] for the bytes
/// per parameter of every combination.
///
/// ```
/// use fusedreg::adamw::{AdamWConfig, MasterWeights, MomentDtype, Rounding, StateOptions};
/// // The lean state: bf16 moments, no master (with bf16 params and grads: 14 B per step).
/// let lean = StateOptions { moments: MomentDtype::Bf16, master: MasterWeights::None };
/// let cfg = AdamWConfig {
///     state: lean,
///     rounding: Rounding::Stochastic { seed: 1 },
///     ..Default::default()
/// };
/// assert!(cfg.validate().is_ok());
/// assert_eq!(StateOptions::default(), StateOptions::DEFAULT);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct StateOptions {
    /// Storage type of `m` and `v`.
    pub moments: MomentDtype,
    /// Master weights of 16-bit parameters.
    pub master: MasterWeights,
}

impl StateOptions {
    /// The default layout, spelled out: f32 moments, f32 master weights.
    ///
    /// ```
    /// use fusedreg::adamw::{MasterWeights, MomentDtype, StateOptions};
    /// assert_eq!(StateOptions::DEFAULT.moments, MomentDtype::F32);
    /// assert_eq!(StateOptions::DEFAULT.master, MasterWeights::F32);
    /// ```
    pub const DEFAULT: StateOptions = StateOptions {
        moments: MomentDtype::F32,
        master: MasterWeights::F32,
    };

    /// Whether parameters of dtype `param` have f32 master weights under these options.
    ///
    /// ```
    /// use fusedreg::{adamw::{MasterWeights, StateOptions}, DtypeKind};
    /// let none = StateOptions { master: MasterWeights::None, ..Default::default() };
    /// assert!(StateOptions::default().has_master(DtypeKind::Bf16));
    /// assert!(!StateOptions::default().has_master(DtypeKind::F32));
    /// assert!(!none.has_master(DtypeKind::Bf16));
    /// ```
    pub fn has_master(&self, param: DtypeKind) -> bool {
        param != DtypeKind::F32 && self.master == MasterWeights::F32
    }
}

/// AdamW hyperparameters and the state layout (weight decay is per tensor: see
/// [`AdamW::new`]).
///
/// ```
/// use fusedreg::adamw::AdamWConfig;
/// let cfg = AdamWConfig { lr: 3e-4, beta2: 0.95, ..Default::default() };
/// assert!(cfg.validate().is_ok());
/// assert_eq!((cfg.lr, cfg.beta1, cfg.beta2), (3e-4, 0.9, 0.95));
/// assert!(AdamWConfig { eps: -1e-8, ..cfg }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Initial learning rate (copied to the device; change it with [`AdamW::set_lr`]).
    pub lr: f32,
    /// First-moment decay, in `[0, 1)`.
    pub beta1: f32,
    /// Second-moment decay, in `[0, 1)`.
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)`; finite, `>= 0`.
    pub eps: f32,
    /// Rounding of 16-bit parameters from their updated f32 value (ignored for f32 parameters).
    pub rounding: Rounding,
    /// The optimizer-state layout (moment dtype, master weights); default f32 / f32.
    pub state: StateOptions,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8; round to nearest even.
    ///
    /// ```
    /// use fusedreg::adamw::{AdamWConfig, Rounding};
    /// let c = AdamWConfig::default();
    /// assert_eq!((c.lr, c.beta1, c.beta2, c.eps), (1e-3, 0.9, 0.999, 1e-8));
    /// assert_eq!(c.rounding, Rounding::NearestEven);
    /// ```
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            rounding: Rounding::NearestEven,
            state: StateOptions::DEFAULT,
        }
    }
}

/// Checks one tensor's weight decay: finite and >= 0.
pub(crate) fn check_weight_decay(wd: f32) -> Result<()> {
    if !wd.is_finite() || wd < 0.0 {
        return Err(Error::invalid(
            OP,
            format!("weight_decay = {wd} must be finite and >= 0 (use 0 to disable it)"),
        ));
    }
    Ok(())
}

/// The usual weight-decay grouping: `weight_decay` for tensors of rank >= 2 (weight matrices,
/// embeddings, convolution kernels), 0 for tensors of rank 0 or 1 (biases, norm gains and
/// shifts, scalars). `ranks[i]` is the number of dimensions of tensor `i`; the result is the
/// per-tensor list [`AdamW::new`] takes.
///
/// ```
/// use fusedreg::adamw::weight_decay_by_rank;
/// // An MLP layer: weight [d, d], bias [d], then a LayerNorm gain [d].
/// assert_eq!(weight_decay_by_rank(&[2, 1, 1], 0.1), vec![0.1, 0.0, 0.0]);
/// assert_eq!(weight_decay_by_rank(&[4, 0], 0.01), vec![0.01, 0.0]);
/// ```
pub fn weight_decay_by_rank(ranks: &[usize], weight_decay: f32) -> Vec<f32> {
    ranks
        .iter()
        .map(|&r| if r >= 2 { weight_decay } else { 0.0 })
        .collect()
}

/// Checks a learning rate: finite and `>= 0`.
///
/// ```
/// use fusedreg::adamw::check_lr;
/// assert!(check_lr(1e-3).is_ok());
/// assert!(check_lr(0.0).is_ok()); // a frozen step is allowed
/// assert!(check_lr(-1e-3).unwrap_err().to_string().contains("negative"));
/// assert!(check_lr(f32::NAN).is_err());
/// ```
pub fn check_lr(lr: f32) -> Result<()> {
    check_finite(OP, "lr", f64::from(lr))?;
    if lr < 0.0 {
        return Err(Error::invalid(
            OP,
            format!("lr = {lr} is negative: use a learning rate >= 0"),
        ));
    }
    Ok(())
}

impl AdamWConfig {
    /// Checks every field: lr and eps finite and `>= 0`, betas in `[0, 1)`.
    ///
    /// ```
    /// use fusedreg::adamw::AdamWConfig;
    /// assert!(AdamWConfig::default().validate().is_ok());
    /// let bad = AdamWConfig { beta2: 1.0, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("beta2"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        check_finite(OP, "eps", f64::from(self.eps))?;
        if self.eps < 0.0 {
            return Err(Error::invalid(
                OP,
                format!(
                    "eps = {} is negative: use eps >= 0 (default 1e-8)",
                    self.eps
                ),
            ));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(
                    OP,
                    format!("{name} = {b} must lie in [0, 1) (defaults 0.9 and 0.999)"),
                ));
            }
        }
        Ok(())
    }
}

/// Minimal device-memory bytes of one AdamW step over `params` elements: f32 params read p, g,
/// m, v and write p, m, v; 16-bit params read master, g, m, v and write master, m, v and the
/// 16-bit copy. 28 B per parameter for f32/f32 and for bf16 params + bf16 grads (REFERENCE §5).
///
/// ```
/// use fusedreg::{adamw::min_bytes, DtypeKind::*};
/// assert_eq!(min_bytes(1, F32, F32), 28);
/// assert_eq!(min_bytes(1, Bf16, Bf16), 28);
/// assert_eq!(min_bytes(1, Bf16, F32), 30);
/// ```
pub fn min_bytes(params: u64, param: DtypeKind, grad: DtypeKind) -> u64 {
    min_bytes_with(params, param, grad, StateOptions::default())
}

/// Minimal device-memory bytes of one AdamW step with the state layout `state`, per element:
/// with f32 master weights (16-bit params), read master, g, m, v and write master, m, v and the
/// 16-bit parameter: `8 + g + 4 M + P`; otherwise read p, g, m, v and write p, m, v:
/// `2 P + g + 4 M` (`P`, `g`, `M`: bytes of a parameter, gradient, moment). Saturates at
/// `u64::MAX`, never wraps.
///
/// | params | grads | moments | master | bytes |
/// | --- | --- | --- | --- | --- |
/// | f32 | f32 | f32 | — | 28 |
/// | f32 | f32 | bf16 | — | 20 |
/// | bf16 | bf16 | f32 | f32 | 28 |
/// | bf16 | bf16 | bf16 | f32 | 20 |
/// | bf16 | bf16 | f32 | none | 22 |
/// | bf16 | bf16 | bf16 | none | 14 (PyTorch's fused AdamW on bf16 parameters) |
/// | bf16 | f32 | bf16 | none | 16 |
///
/// ```
/// use fusedreg::adamw::{min_bytes_with, MasterWeights, MomentDtype, StateOptions};
/// use fusedreg::DtypeKind::*;
/// let lean = StateOptions { moments: MomentDtype::Bf16, master: MasterWeights::None };
/// assert_eq!(min_bytes_with(1, Bf16, Bf16, lean), 14);
/// assert_eq!(min_bytes_with(1, F32, F32, StateOptions::default()), 28);
/// assert_eq!(min_bytes_with(1, F32, F32, lean), 20); // f32 params have no master anyway
/// ```
pub fn min_bytes_with(params: u64, param: DtypeKind, grad: DtypeKind, state: StateOptions) -> u64 {
    let (p, g, m) = (
        param.size() as u64,
        grad.size() as u64,
        state.moments.size() as u64,
    );
    let per = if state.has_master(param) {
        8 + g + 4 * m + p
    } else {
        2 * p + g + 4 * m
    };
    params.saturating_mul(per)
}

/// Resident optimizer-state bytes per parameter with the layout `state` (moments plus master
/// weights; parameters and gradients not counted): 12 for the default with 16-bit params,
/// 4 for bf16 moments without master.
///
/// ```
/// use fusedreg::adamw::{state_bytes_per_param, MasterWeights, MomentDtype, StateOptions};
/// use fusedreg::DtypeKind::*;
/// let lean = StateOptions { moments: MomentDtype::Bf16, master: MasterWeights::None };
/// assert_eq!(state_bytes_per_param(Bf16, StateOptions::default()), 12);
/// assert_eq!(state_bytes_per_param(Bf16, lean), 4);
/// assert_eq!(state_bytes_per_param(F32, StateOptions::default()), 8);
/// ```
pub fn state_bytes_per_param(param: DtypeKind, state: StateOptions) -> u64 {
    2 * state.moments.size() as u64 + if state.has_master(param) { 4 } else { 0 }
}

/// Minimal bytes of the fused clip-and-step ([`AdamW::clip_and_step`]): the norm reads the
/// gradients once, AdamW as in [`min_bytes`].
///
/// ```
/// use fusedreg::{adamw::clip_step_min_bytes, DtypeKind::*};
/// assert_eq!(clip_step_min_bytes(1, F32, F32), 32);
/// assert_eq!(clip_step_min_bytes(1, Bf16, Bf16), 30);
/// ```
pub fn clip_step_min_bytes(params: u64, param: DtypeKind, grad: DtypeKind) -> u64 {
    crate::global_norm::norm_min_bytes(params, grad).saturating_add(min_bytes(params, param, grad))
}

/// Minimal bytes of the unfused clip-and-step ([`unfused::clip_and_step`]): norm, in-place
/// scale of the gradients, then AdamW.
///
/// ```
/// use fusedreg::{adamw::unfused_clip_step_min_bytes, DtypeKind::*};
/// assert_eq!(unfused_clip_step_min_bytes(1, F32, F32), 40);
/// assert_eq!(unfused_clip_step_min_bytes(1, Bf16, Bf16), 34);
/// ```
pub fn unfused_clip_step_min_bytes(params: u64, param: DtypeKind, grad: DtypeKind) -> u64 {
    clip_step_min_bytes(params, param, grad)
        .saturating_add(crate::global_norm::scale_min_bytes(params, grad))
}
