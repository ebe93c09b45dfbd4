//! CPU reference of AdamW: the kernel's exact operations in the same order (see the
//! [module docs](super)), so the kernel is tested against it bit for bit.
//!
//! ```
//! use fusedreg::adamw::{cpu, AdamWConfig, Rounding};
//! use half::bf16;
//! // bf16 params with f32 master weights, stochastic rounding, one skipped tensor.
//! let mk = |x: f32| cpu::CpuTensor::<bf16, bf16>::new(vec![bf16::from_f32(x); 8],
//!                                                     vec![bf16::from_f32(0.1); 8], 0.01).unwrap();
//! let mut ts = vec![mk(1.0), mk(2.0)];
//! let cfg = AdamWConfig { rounding: Rounding::Stochastic { seed: 7 }, ..Default::default() };
//! cpu::step(&mut ts, &cfg, &cpu::StepInputs::new(cfg.lr), &[false, true]).unwrap();
//! assert_eq!((ts[0].step, ts[1].step), (1, 0));
//! assert!(ts[0].master.as_ref().unwrap()[0] < 1.0);
//! assert_eq!(ts[1].master.as_ref().unwrap()[0], 2.0);
//! ```

use super::{check_lr, state, AdamWConfig, MomentDtype, Rounding, StateOptions, OP};
use crate::dtype::{Dtype, DtypeKind};
use crate::error::{check_len, Error, Result};

/// `b^e` by binary exponentiation with IEEE f64 multiplies: the kernel's `pow_by_squaring`,
/// bit for bit (no `powf`, whose last bits differ between CUDA and libm).
///
/// ```
/// use fusedreg::adamw::cpu::pow_by_squaring;
/// assert_eq!(pow_by_squaring(0.5, 10), 1.0 / 1024.0);
/// assert_eq!(pow_by_squaring(0.9, 0), 1.0);
/// ```
pub fn pow_by_squaring(mut b: f64, mut e: u32) -> f64 {
    let mut r = 1.0f64;
    while e != 0 {
        if e & 1 != 0 {
            r *= b;
        }
        e >>= 1;
        if e != 0 {
            b *= b;
        }
    }
    r
}

/// The bias corrections of step `t` (counted from 1): `(f32(1 - b1^t), f32(sqrt(1 - b2^t)))`,
/// each computed in f64 and rounded once.
///
/// ```
/// use fusedreg::adamw::cpu::bias_corrections;
/// let (bc1, bc2_sqrt) = bias_corrections(0.9, 0.999, 1);
/// assert!((bc1 - 0.1).abs() < 1e-7);
/// assert!((bc2_sqrt - 0.001f32.sqrt()).abs() < 1e-6);
/// // Late in training both corrections are exactly 1.
/// assert_eq!(bias_corrections(0.9, 0.999, 100_000), (1.0, 1.0));
/// ```
pub fn bias_corrections(beta1: f32, beta2: f32, t: u32) -> (f32, f32) {
    let bc1 = (1.0 - pow_by_squaring(f64::from(beta1), t)) as f32;
    let bc2_sqrt = (1.0 - pow_by_squaring(f64::from(beta2), t)).sqrt() as f32;
    (bc1, bc2_sqrt)
}

/// The per-tensor, per-step constants of the update, computed as the kernel computes them.
///
/// ```
/// use fusedreg::adamw::{cpu::StepConsts, AdamWConfig};
/// let k = StepConsts::new(&AdamWConfig::default(), 1e-3, 0.01, 1, 1.0);
/// assert_eq!((k.b1, k.omb1), (0.9, 1.0 - 0.9f32));
/// assert_eq!(k.neg_lr_wd, -(1e-3f32 * 0.01));
/// assert!((k.neg_step + 1e-2).abs() < 1e-8); // -(lr / (1 - 0.9))
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConsts {
    /// beta1.
    pub b1: f32,
    /// `1 - beta1`.
    pub omb1: f32,
    /// beta2.
    pub b2: f32,
    /// `1 - beta2`.
    pub omb2: f32,
    /// eps.
    pub eps: f32,
    /// The gradient multiplier (clip coefficient / loss scale).
    pub grad_scale: f32,
    /// `-(lr * weight_decay)`.
    pub neg_lr_wd: f32,
    /// `-(lr / bc1)`.
    pub neg_step: f32,
    /// `f32(sqrt(1 - beta2^t))`.
    pub bc2_sqrt: f32,
}

impl StepConsts {
    /// The constants of step `t` (the new step count) of a tensor with `weight_decay`.
    ///
    /// ```
    /// use fusedreg::adamw::{cpu::{bias_corrections, StepConsts}, AdamWConfig};
    /// let cfg = AdamWConfig::default();
    /// let k = StepConsts::new(&cfg, 5e-4, 0.0, 10, 0.5);
    /// let (bc1, bc2_sqrt) = bias_corrections(cfg.beta1, cfg.beta2, 10);
    /// assert_eq!((k.neg_step, k.bc2_sqrt), (-(5e-4 / bc1), bc2_sqrt));
    /// assert_eq!((k.grad_scale, k.neg_lr_wd), (0.5, 0.0));
    /// ```
    pub fn new(config: &AdamWConfig, lr: f32, weight_decay: f32, t: u32, grad_scale: f32) -> Self {
        let (bc1, bc2_sqrt) = bias_corrections(config.beta1, config.beta2, t);
        StepConsts {
            b1: config.beta1,
            omb1: 1.0 - config.beta1,
            b2: config.beta2,
            omb2: 1.0 - config.beta2,
            eps: config.eps,
            grad_scale,
            neg_lr_wd: -(lr * weight_decay),
            neg_step: -(lr / bc1),
            bc2_sqrt,
        }
    }
}

/// One element's update, the kernel's `AdamWOp::update` operation for operation.
///
/// ```
/// use fusedreg::adamw::{cpu::{update, StepConsts}, AdamWConfig};
/// let k = StepConsts::new(&AdamWConfig::default(), 1e-3, 0.0, 1, 1.0);
/// let (mut p, mut m, mut v) = (1.0f32, 0.0f32, 0.0f32);
/// update(&k, &mut p, 0.5, &mut m, &mut v);
/// assert_eq!(m, (1.0 - 0.9f32) * 0.5);
/// // The first step moves p by about lr against the gradient's sign.
/// assert!((p - (1.0 - 1e-3)).abs() < 1e-6);
/// ```
#[inline]
pub fn update(k: &StepConsts, p: &mut f32, grad: f32, m: &mut f32, v: &mut f32) {
    let g = grad * k.grad_scale;
    *p = k.neg_lr_wd.mul_add(*p, *p);
    *m = k.b1.mul_add(*m, k.omb1 * g);
    *v = k.b2.mul_add(*v, (k.omb2 * g) * g);
    let denom = v.sqrt() / k.bc2_sqrt + k.eps;
    *p = k.neg_step.mul_add(*m / denom, *p);
}

/// The Philox call id of stochastic rounding for tensor `tensor` at its step `t`:
/// `(t << 32) | tensor`.
///
/// ```
/// use fusedreg::adamw::cpu::rounding_call;
/// assert_eq!(rounding_call(1, 0), 1 << 32);
/// assert_eq!(rounding_call(3, 5), (3 << 32) | 5);
/// // Every (step, tensor) pair has its own Philox call id.
/// assert_ne!(rounding_call(1, 2), rounding_call(2, 1));
/// ```
pub fn rounding_call(t: u32, tensor: usize) -> u64 {
    (u64::from(t) << 32) | (tensor as u64 & 0xffff_ffff)
}

fn to_bits16<T: Dtype>(x: T) -> u16 {
    bytemuck::cast::<T, u16>(x)
}

fn from_bits16<T: Dtype>(b: u16) -> T {
    bytemuck::cast::<u16, T>(b)
}

/// Rounds toward zero to a 16-bit type (finite `x`): the device's `__float2half_rz` /
/// `__float2bfloat16_rz`.
fn round_toward_zero<T: Dtype>(x: f32) -> T {
    match T::KIND {
        // bf16 is the top half of an f32: truncation is rounding toward zero.
        DtypeKind::Bf16 => from_bits16((x.to_bits() >> 16) as u16),
        _ => {
            // Nearest even is one of the two neighbours; step back when it is the far one.
            let rn = T::from_f32_rn(x);
            if rn.to_f32().abs() > x.abs() {
                from_bits16(to_bits16(rn) - 1)
            } else {
                rn
            }
        }
    }
}

/// The 16-bit random number stochastic rounding uses for element `index` of `(seed, call)`:
/// halfword `index % 8` of Philox block `index / 8` (the low half of word `(index % 8) / 2` for
/// even `index`, the high half for odd), so one Philox evaluation serves 8 elements (the
/// dropping ops' 16-bit keying uses the same order).
///
/// ```
/// use fusedreg::adamw::cpu::rounding_random;
/// use fusedreg::philox::block;
/// let b = block(42, 7, 2); // elements 16..24
/// assert_eq!(rounding_random(42, 7, 16), (b[0] & 0xffff) as u16);
/// assert_eq!(rounding_random(42, 7, 19), (b[1] >> 16) as u16);
/// ```
pub fn rounding_random(seed: u64, call: u64, index: u64) -> u16 {
    let w = crate::philox::block(seed, call, index >> 3)[((index & 7) >> 1) as usize];
    if index & 1 == 1 {
        (w >> 16) as u16
    } else {
        w as u16
    }
}

/// Stochastic rounding of `x` to a 16-bit type with the 16-bit random `r`, bit-identical to
/// the kernel: `lo` = `x` rounded toward zero, `hi` the next value away from zero; `hi` when
/// `r < 2^16 x (|x| - |lo|) / (|hi| - |lo|)`, else `lo`, so the expected value is `x`. NaN,
/// infinities and values beyond the largest finite 16-bit number (for bf16: `|x|` at or above
/// `0x7f7f0000`'s binade piece, where `hi` would be infinite) round to nearest even.
///
/// bf16 is the top half of an f32: `hi` when `r` is below the 16 bits that truncation discards,
/// added to the top half in sign-magnitude (a carry into the exponent included); the fraction
/// is exact, so the rounding is exactly unbiased. f16 computes the fraction by an IEEE
/// division (exact in f32) as `floor(2^32 x fraction)` and takes `hi` when `r << 16` is below
/// it: exact for normal f16 (13 discarded bits), quantised to 2^-16 of an ulp for f16
/// subnormals.
///
/// ```
/// use fusedreg::adamw::cpu::round_stochastic;
/// use half::bf16;
/// let x = 1.0 + 2f32.powi(-9); // a quarter of the way from 1 to the next bf16 (1 + 2^-7)
/// assert_eq!(round_stochastic::<bf16>(x, 0).to_f32(), 1.0 + 2f32.powi(-7));
/// assert_eq!(round_stochastic::<bf16>(x, 0x3fff).to_f32(), 1.0 + 2f32.powi(-7));
/// assert_eq!(round_stochastic::<bf16>(x, 0x4000).to_f32(), 1.0); // r >= 2^16 / 4
/// assert_eq!(round_stochastic::<bf16>(1.5, 12345).to_f32(), 1.5);
/// ```
pub fn round_stochastic<T: Dtype>(x: f32, r: u16) -> T {
    match T::KIND {
        DtypeKind::F32 => T::from_f32_rn(x),
        DtypeKind::Bf16 => from_bits16(round_stochastic_bf16_bits(x, r)),
        _ => round_by_fraction(x, u32::from(r) << 16),
    }
}

/// bf16 stochastic rounding on the f32's bits (the kernel's `round_stochastic<__nv_bfloat16>`).
fn round_stochastic_bf16_bits(x: f32, r: u16) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_0000 >= 0x7f7f_0000 {
        // NaN, infinities, and the top piece of the largest binade (hi would be infinite).
        return to_bits16(<half::bf16 as Dtype>::from_f32_rn(x));
    }
    let carry = if u32::from(r) < (u & 0xffff) {
        0x1_0000
    } else {
        0
    };
    ((u + carry) >> 16) as u16
}

/// Stochastic rounding with the fraction computed by division: `hi` when
/// `word < floor(2^32 * (|x| - |lo|) / (|hi| - |lo|))` (every step exact in f32). The f16 path
/// (with `word = r << 16`), and for bf16 the formulation the bit rule replaced (the tests
/// prove the two agree bit for bit).
fn round_by_fraction<T: Dtype>(x: f32, word: u32) -> T {
    if !x.is_finite() {
        return T::from_f32_rn(x);
    }
    let lo: T = round_toward_zero(x);
    let lo_f = lo.to_f32();
    if lo_f == x {
        return lo;
    }
    let hi: T = from_bits16(to_bits16(lo).wrapping_add(1));
    let hi_f = hi.to_f32();
    if hi_f.is_infinite() {
        return T::from_f32_rn(x);
    }
    let d = x.abs() - lo_f.abs();
    let ulp = hi_f.abs() - lo_f.abs();
    let frac = ((d / ulp) * 4_294_967_296.0) as u32;
    if word < frac {
        hi
    } else {
        lo
    }
}

/// One tensor of the CPU reference, with its state.
///
/// ```
/// use fusedreg::adamw::cpu::CpuTensor;
/// use half::f16;
/// // f16 parameters, f32 gradients: the master weights start as the widened parameters.
/// let t = CpuTensor::<f16, f32>::new(vec![f16::from_f32(0.5); 3], vec![0.0; 3], 0.0).unwrap();
/// assert_eq!(t.master, Some(vec![0.5; 3]));
/// assert_eq!((t.step, t.m.clone(), t.v.clone()), (0, vec![0.0; 3], vec![0.0; 3]));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor<P: Dtype, G: Dtype> {
    /// Parameters (for 16-bit types, the rounded copy of `master`).
    pub param: Vec<P>,
    /// Gradients.
    pub grad: Vec<G>,
    /// First moment (with bf16 moments: bf16 values, held as f32).
    pub m: Vec<f32>,
    /// Second moment (likewise).
    pub v: Vec<f32>,
    /// f32 master weights (16-bit parameters with [`MasterWeights::F32`](super::MasterWeights::F32) only).
    pub master: Option<Vec<f32>>,
    /// Steps taken (the kernel's per-chunk counters; stays 0 for a zero-size tensor).
    pub step: u32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// The state layout; [`step`] refuses a config whose [`AdamWConfig::state`] differs.
    pub options: StateOptions,
}

impl<P: Dtype, G: Dtype> CpuTensor<P, G> {
    /// A tensor with zero moments, step 0, and (for 16-bit params) master weights widened from
    /// the parameters, as a freshly built set has. Errors on mismatched lengths or a negative
    /// or non-finite weight decay.
    ///
    /// ```
    /// use fusedreg::adamw::cpu::CpuTensor;
    /// let t = CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.1; 4], 0.01).unwrap();
    /// assert_eq!((t.len(), t.master.is_none()), (4, true));
    /// assert!(CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.1; 3], 0.01).is_err());
    /// assert!(CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.1; 4], -0.01).is_err());
    /// ```
    pub fn new(param: Vec<P>, grad: Vec<G>, weight_decay: f32) -> Result<Self> {
        Self::with_state(param, grad, weight_decay, StateOptions::default())
    }

    /// [`CpuTensor::new`] with a state layout: bf16 moments and/or no master weights, as
    /// [`AdamW::new`](super::AdamW::new) allocates them for [`AdamWConfig::state`].
    ///
    /// ```
    /// use fusedreg::adamw::{cpu::CpuTensor, MasterWeights, MomentDtype, StateOptions};
    /// use half::bf16;
    /// let lean = StateOptions { moments: MomentDtype::Bf16, master: MasterWeights::None };
    /// let t = CpuTensor::<bf16, bf16>::with_state(vec![bf16::ONE; 4], vec![bf16::ONE; 4], 0.0, lean)
    ///     .unwrap();
    /// assert!(t.master.is_none());
    /// ```
    pub fn with_state(
        param: Vec<P>,
        grad: Vec<G>,
        weight_decay: f32,
        options: StateOptions,
    ) -> Result<Self> {
        check_len(OP, "grad", grad.len(), param.len())?;
        if !weight_decay.is_finite() || weight_decay < 0.0 {
            return Err(Error::invalid(
                OP,
                format!("weight_decay = {weight_decay} must be finite and >= 0"),
            ));
        }
        let n = param.len();
        let master = options
            .has_master(P::KIND)
            .then(|| param.iter().map(|x| x.to_f32()).collect());
        Ok(CpuTensor {
            param,
            grad,
            m: vec![0.0; n],
            v: vec![0.0; n],
            master,
            step: 0,
            weight_decay,
            options,
        })
    }

    /// Number of elements.
    ///
    /// ```
    /// use fusedreg::adamw::cpu::CpuTensor;
    /// let t = CpuTensor::<f32, f32>::new(vec![1.0; 5], vec![0.0; 5], 0.0).unwrap();
    /// assert_eq!(t.len(), 5);
    /// ```
    pub fn len(&self) -> usize {
        self.param.len()
    }

    /// True for a zero-size tensor.
    ///
    /// ```
    /// use fusedreg::adamw::cpu::CpuTensor;
    /// let t = CpuTensor::<f32, f32>::new(vec![], vec![], 0.0).unwrap();
    /// assert!(t.is_empty());
    /// assert!(!CpuTensor::<f32, f32>::new(vec![1.0], vec![0.0], 0.0).unwrap().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.param.is_empty()
    }
}

/// The per-step device scalars, as host values.
///
/// ```
/// use fusedreg::adamw::{cpu::{self, CpuTensor, StepInputs}, AdamWConfig};
/// let mut t = vec![CpuTensor::<f32, f32>::new(vec![1.0; 2], vec![4.0; 2], 0.0).unwrap()];
/// // Gradients carry a loss scale of 8: scale them back by 1/8 inside the step.
/// let inputs = StepInputs { grad_scale: 0.125, ..StepInputs::new(1e-3) };
/// cpu::step(&mut t, &AdamWConfig::default(), &inputs, &[]).unwrap();
/// assert_eq!(t[0].m[0], (1.0 - 0.9f32) * 0.5);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInputs {
    /// Learning rate.
    pub lr: f32,
    /// Gradient multiplier (`NormValues::grad_scale`; 1 without clipping or loss scaling).
    pub grad_scale: f32,
    /// The non-finite flag: when true the step changes nothing.
    pub nonfinite: bool,
}

impl StepInputs {
    /// `lr`, no gradient scaling, finite.
    ///
    /// ```
    /// use fusedreg::adamw::cpu::StepInputs;
    /// let i = StepInputs::new(1e-3);
    /// assert_eq!((i.lr, i.grad_scale, i.nonfinite), (1e-3, 1.0, false));
    /// ```
    pub fn new(lr: f32) -> Self {
        StepInputs {
            lr,
            grad_scale: 1.0,
            nonfinite: false,
        }
    }

    /// The inputs a step reads after a global norm: its `grad_scale` and flag.
    ///
    /// ```
    /// use fusedreg::{adamw::cpu::StepInputs, global_norm::cpu::global_norm};
    /// let g = vec![3.0f32, 4.0]; // norm 5
    /// let v = global_norm(&[&g[..]], Some(1.0), 1.0).unwrap();
    /// let i = StepInputs::from_norm(1e-3, &v);
    /// assert_eq!((i.grad_scale, i.nonfinite), (v.coef, false));
    /// let bad = vec![f32::INFINITY, 0.0];
    /// let v = global_norm(&[&bad[..]], Some(1.0), 1.0).unwrap();
    /// assert!(StepInputs::from_norm(1e-3, &v).nonfinite);
    /// ```
    pub fn from_norm(lr: f32, norm: &crate::global_norm::NormValues) -> Self {
        StepInputs {
            lr,
            grad_scale: norm.grad_scale,
            nonfinite: norm.nonfinite != 0,
        }
    }
}

/// One AdamW step over every tensor, exactly as one launch of the kernel. `skip` is empty (no
/// tensor skipped) or one flag per tensor. Nothing changes when `inputs.nonfinite`.
///
/// Errors (before anything changes): invalid hyperparameters or `lr`, a non-finite
/// `grad_scale` (unless `nonfinite`), a tensor whose public fields were set to something
/// [`CpuTensor::new`] refuses (weight decay negative or not finite, buffer lengths that differ,
/// 16-bit parameters without master weights). Step counts saturate at `u32::MAX` (see the
/// [module docs](super)).
///
/// ```
/// use fusedreg::adamw::{cpu::{self, CpuTensor, StepInputs}, AdamWConfig};
/// let mk = || CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.5; 4], 0.01).unwrap();
/// let mut ts = vec![mk(), mk()];
/// let cfg = AdamWConfig::default();
/// // Tensor 1 is skipped (its block was dropped): only tensor 0 moves.
/// cpu::step(&mut ts, &cfg, &StepInputs::new(cfg.lr), &[false, true]).unwrap();
/// assert_eq!((ts[0].step, ts[1].step), (1, 0));
/// assert!(ts[0].param[0] < 1.0 && ts[1].param[0] == 1.0);
/// // A non-finite norm changes nothing; a skip list of the wrong length is refused.
/// let inf = StepInputs { nonfinite: true, ..StepInputs::new(cfg.lr) };
/// cpu::step(&mut ts, &cfg, &inf, &[]).unwrap();
/// assert_eq!(ts[0].step, 1);
/// assert!(cpu::step(&mut ts, &cfg, &StepInputs::new(cfg.lr), &[true]).is_err());
/// // A NaN grad scale, or a weight decay set to NaN through the public field, is refused.
/// let nan = StepInputs { grad_scale: f32::NAN, ..StepInputs::new(cfg.lr) };
/// assert!(cpu::step(&mut ts, &cfg, &nan, &[]).is_err());
/// ts[0].weight_decay = f32::NAN;
/// assert!(cpu::step(&mut ts, &cfg, &StepInputs::new(cfg.lr), &[]).is_err());
/// ```
pub fn step<P: Dtype, G: Dtype>(
    tensors: &mut [CpuTensor<P, G>],
    config: &AdamWConfig,
    inputs: &StepInputs,
    skip: &[bool],
) -> Result<()> {
    config.validate()?;
    check_lr(inputs.lr)?;
    if tensors.is_empty() {
        return Err(Error::invalid(OP, "the tensor list is empty"));
    }
    if !skip.is_empty() {
        check_len(OP, "skip", skip.len(), tensors.len())?;
    }
    if !inputs.nonfinite && !inputs.grad_scale.is_finite() {
        return Err(Error::invalid(
            OP,
            format!(
                "grad_scale = {} is not finite: pass nonfinite = true to skip the step (as the \
                 norm's flag does) or a finite scale",
                inputs.grad_scale
            ),
        ));
    }
    for (i, t) in tensors.iter().enumerate() {
        // The fields are public: re-check what `CpuTensor::new` checked.
        super::check_weight_decay(t.weight_decay)
            .map_err(|e| Error::invalid(OP, format!("tensor {i}: {e}")))?;
        check_len(OP, &format!("tensor {i} grad"), t.grad.len(), t.len())?;
        check_len(OP, &format!("tensor {i} m"), t.m.len(), t.len())?;
        check_len(OP, &format!("tensor {i} v"), t.v.len(), t.len())?;
        check_layout::<P, G>(i, t, &config.state)?;
    }
    if inputs.nonfinite {
        return Ok(());
    }
    for (k, t) in tensors.iter_mut().enumerate() {
        if skip.get(k).copied().unwrap_or(false) || t.is_empty() {
            continue;
        }
        // Saturates, as the kernel does: past u32::MAX, t would wrap to 0 and 1 - b^0 = 0.
        let step = t.step.saturating_add(1);
        t.step = step;
        let c = StepConsts::new(config, inputs.lr, t.weight_decay, step, inputs.grad_scale);
        let call = rounding_call(step, k);
        let bf16_moments = config.state.moments == MomentDtype::Bf16;
        for i in 0..t.param.len() {
            let mut p = match &t.master {
                Some(m) => m[i],
                None => t.param[i].to_f32(),
            };
            // bf16 moments are bf16 values: loaded exactly, updated in f32, and only the
            // stored values rounded (nearest even) after the update, as the kernel does.
            let (mut mm, mut vv) = (t.m[i], t.v[i]);
            if bf16_moments {
                (mm, vv) = (round_bf16(mm), round_bf16(vv));
            }
            update(&c, &mut p, t.grad[i].to_f32(), &mut mm, &mut vv);
            if bf16_moments {
                (mm, vv) = (round_bf16(mm), round_bf16(vv));
            }
            (t.m[i], t.v[i]) = (mm, vv);
            if let Some(m) = &mut t.master {
                m[i] = p;
            }
            // 16-bit params: the rounded copy of the master, or (no master) of their own update.
            t.param[i] = match config.rounding {
                Rounding::Stochastic { seed } if P::KIND != DtypeKind::F32 => {
                    round_stochastic(p, rounding_random(seed, call, i as u64))
                }
                _ => P::from_f32_rn(p),
            };
        }
    }
    Ok(())
}

/// The state of CPU tensors in the [save format](super) (identical bytes to
/// `AdamW::save_state` for the same state). Errors when a tensor's moments or master
/// weights do not match its length (the fields are public).
///
/// ```
/// use fusedreg::adamw::{cpu::{self, CpuTensor}, state};
/// let mut t = vec![CpuTensor::<f32, f32>::new(vec![1.0; 4], vec![0.5; 4], 0.0).unwrap()];
/// let bytes = cpu::save_state(&t).unwrap();
/// assert_eq!(bytes.len() as u64, state::peek(&bytes).unwrap().encoded_len());
/// assert_eq!(bytes.len(), 24 + 12 + 2 * 4 * 4); // header, len + step, m and v
/// t[0].m.pop(); // the moments no longer match the parameters
/// assert!(cpu::save_state(&t).is_err());
/// ```
pub fn save_state<P: Dtype, G: Dtype>(tensors: &[CpuTensor<P, G>]) -> Result<Vec<u8>> {
    let header = state_header(tensors)?;
    let steps: Vec<u32> = tensors.iter().map(|t| t.step).collect();
    Ok(state::encode(
        &header,
        &steps,
        |i| &tensors[i].m[..],
        |i| &tensors[i].v[..],
        |i| tensors[i].master.as_deref().unwrap_or(&[]),
    ))
}

/// Restores state saved by [`save_state`] or `AdamW::save_state` into tensors of the same
/// dtype and lengths: moments, master weights and step counts. The parameters are the model's,
/// not the optimizer's: restore them from the model checkpoint (for 16-bit parameters the next
/// step rewrites them from the master weights anyway). Errors, leaving the tensors unchanged, on
/// any mismatch.
///
/// ```
/// use fusedreg::adamw::{cpu::{self, CpuTensor, StepInputs}, AdamWConfig};
/// let mk = |n| vec![CpuTensor::<f32, f32>::new(vec![1.0; n], vec![0.5; n], 0.01).unwrap()];
/// let (mut a, cfg) = (mk(4), AdamWConfig::default());
/// cpu::step(&mut a, &cfg, &StepInputs::new(cfg.lr), &[]).unwrap();
/// let bytes = cpu::save_state(&a).unwrap();
/// let mut b = mk(4);
/// cpu::restore_state(&mut b, &bytes).unwrap();
/// assert_eq!((b[0].step, &b[0].m, &b[0].v), (1, &a[0].m, &a[0].v));
/// // Other lengths are refused and left as they were.
/// let mut c = mk(5);
/// assert!(cpu::restore_state(&mut c, &bytes).is_err());
/// assert_eq!(c[0].step, 0);
/// ```
pub fn restore_state<P: Dtype, G: Dtype>(
    tensors: &mut [CpuTensor<P, G>],
    bytes: &[u8],
) -> Result<()> {
    let header = state_header(tensors)?;
    let view = state::decode(bytes, &header)?;
    for (i, t) in tensors.iter_mut().enumerate() {
        t.step = if t.is_empty() { 0 } else { view.steps[i] };
        t.m = view.m(i);
        t.v = view.v(i);
        if let Some(master) = view.master(i) {
            t.master = Some(master);
        }
    }
    Ok(())
}

/// f32 -> bf16 (nearest even) -> f32: where bf16 moments are rounded.
fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The state file header of `tensors` (their dtype, lengths and the first one's layout), after
/// checking every tensor's buffers against that layout ([`check_layout`]).
fn state_header<P: Dtype, G: Dtype>(tensors: &[CpuTensor<P, G>]) -> Result<state::StateHeader> {
    let options = tensors
        .first()
        .map_or_else(StateOptions::default, |t| t.options);
    for (i, t) in tensors.iter().enumerate() {
        check_layout::<P, G>(i, t, &options)?;
    }
    Ok(state::StateHeader {
        param_dtype: P::KIND,
        lens: tensors.iter().map(|t| t.len() as u64).collect(),
        options,
    })
}

/// Checks a tensor's buffers against its layout and the config's: lengths, the moment dtype,
/// master weights exactly when the layout has them.
fn check_layout<P: Dtype, G: Dtype>(
    i: usize,
    t: &CpuTensor<P, G>,
    want: &StateOptions,
) -> Result<()> {
    check_len(OP, &format!("tensor {i} grad"), t.grad.len(), t.len())?;
    check_len(OP, &format!("tensor {i} m"), t.m.len(), t.len())?;
    check_len(OP, &format!("tensor {i} v"), t.v.len(), t.len())?;
    if t.options.moments != want.moments
        || t.options.has_master(P::KIND) != want.has_master(P::KIND)
    {
        return Err(Error::invalid(
            OP,
            format!(
                "tensor {i} was made with {:?}, the config asks for {want:?}: build the tensors \
                 with CpuTensor::with_state and the config's StateOptions",
                t.options
            ),
        ));
    }
    match (&t.master, t.options.has_master(P::KIND)) {
        (Some(master), true) => check_len(OP, &format!("tensor {i} master"), master.len(), t.len()),
        (None, false) => Ok(()),
        (None, true) => Err(Error::invalid(
            OP,
            format!("tensor {i}: 16-bit parameters with MasterWeights::F32 need master weights"),
        )),
        (Some(_), false) => Err(Error::invalid(
            OP,
            format!("tensor {i}: master weights present but its layout has none"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The bit rule is the division rule, bit for bit, for every bf16 case: every sign and
    /// exponent (subnormals, infinities and NaN included), every low16, upper mantissa bits
    /// 0x00, 0x7f (the carry into the exponent) and a varying value. Both rules are thresholds
    /// in `r` (hi exactly for `r` below some bound), so agreeing at `r = low16 - 1`, `low16`,
    /// 0 and 0xffff means agreeing at every `r`; the word of the division rule is `r << 16`.
    #[test]
    fn bf16_bit_rule_is_the_division_rule() {
        let mut checked = 0u64;
        for sign_exp in 0u32..512 {
            for upper in [0u32, 0x7f, (sign_exp * 37 + 11) & 0x7f] {
                let top = (sign_exp << 23) | (upper << 16);
                for low in 0u32..0x1_0000 {
                    let x = f32::from_bits(top | low);
                    for r in [low.wrapping_sub(1) & 0xffff, low, 0, 0xffff] {
                        let r = r as u16;
                        let bits = round_stochastic_bf16_bits(x, r);
                        let div: bf16 = round_by_fraction(x, u32::from(r) << 16);
                        let div = to_bits16(div);
                        assert!(
                            bits == div || (x.is_nan() && bf16::from_bits(bits).is_nan()),
                            "x {:#010x} r {r:#06x}: bits {bits:#06x} division {div:#06x}",
                            x.to_bits()
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 512 * 3 * 65536 * 4);
    }

    /// Under the old 32-bit words, the division rule depended only on the word's top 16 bits
    /// for bf16 (the fraction is a multiple of 2^-16): feeding it `r << 16` is feeding it the
    /// top half of a word, for every low half.
    #[test]
    fn bf16_division_rule_ignores_the_low_half_of_the_word() {
        for low in (0u32..0x1_0000).step_by(7) {
            let x = f32::from_bits(0x3f80_0000 | low);
            for r in [low.wrapping_sub(1) & 0xffff, low, 0x1234] {
                let a: bf16 = round_by_fraction(x, r << 16);
                let b: bf16 = round_by_fraction(x, (r << 16) | 0xffff);
                assert_eq!(a, b, "x {:#010x} r {r:#06x}", x.to_bits());
            }
        }
    }

    #[test]
    fn rounding_random_takes_the_halfwords_in_order() {
        for i in 0u64..64 {
            let b = crate::philox::block(9, 3, i / 8);
            let w = b[((i % 8) / 2) as usize];
            let want = if i % 2 == 0 { w & 0xffff } else { w >> 16 };
            assert_eq!(u32::from(rounding_random(9, 3, i)), want, "{i}");
        }
    }
}
