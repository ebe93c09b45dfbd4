//! The AdamW optimizer (with global-norm clipping) as an opaque object over the caller's
//! parameter tensors: create once, step every iteration, save/restore its state, destroy.

use fusedreg::adamw::{
    self, cpu as acpu, state::StateHeader, AdamWConfig, MasterWeights, MomentDtype, Rounding,
    StateOptions,
};
use fusedreg::global_norm::{cpu as ncpu, GlobalNorm};
use fusedreg::multi_tensor::{RawTensor, TensorSet};
use fusedreg::{Dtype, DtypeKind};

use crate::tensor::{float_kind, host, host_mut, Elem, FrTensor};
use crate::{boundary, FfiError, FfiResult, FrExec, FrStatus};

const OP: &str = "adamw";

/// Hyperparameters and state layout of an [`FrAdamW`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrAdamWOptions {
    /// Learning rate at creation (each step passes its own).
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)`.
    pub eps: f32,
    /// Global-norm clipping threshold; 0 (or negative) turns clipping off.
    pub max_grad_norm: f32,
    /// 1: bf16 moments (updated in f32, rounded on store); 0: f32 moments.
    pub bf16_moments: u32,
    /// 1: f32 master weights for 16-bit parameters (default); 0: none (stochastic rounding).
    pub master_weights: u32,
    /// 1: stochastic rounding of 16-bit parameters, keyed by `rounding_seed`; 0: nearest even.
    pub stochastic_rounding: u32,
    /// Philox key of the stochastic rounding.
    pub rounding_seed: u64,
}

/// PyTorch's defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8), no clipping, f32 moments, f32
/// master weights for 16-bit parameters, nearest-even rounding.
#[no_mangle]
pub extern "C" fn fr_adamw_options_default() -> FrAdamWOptions {
    let c = AdamWConfig::default();
    FrAdamWOptions {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        max_grad_norm: 0.0,
        bf16_moments: 0,
        master_weights: 1,
        stochastic_rounding: 0,
        rounding_seed: 0,
    }
}

impl FrAdamWOptions {
    fn config(&self) -> FfiResult<(AdamWConfig, Option<f32>)> {
        let state = StateOptions {
            moments: if self.bf16_moments != 0 {
                MomentDtype::Bf16
            } else {
                MomentDtype::F32
            },
            master: if self.master_weights != 0 {
                MasterWeights::F32
            } else {
                MasterWeights::None
            },
        };
        let rounding = if self.stochastic_rounding != 0 {
            Rounding::Stochastic {
                seed: self.rounding_seed,
            }
        } else {
            Rounding::NearestEven
        };
        let c = AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            rounding,
            state,
        };
        c.validate()?;
        let clip = (self.max_grad_norm > 0.0).then_some(self.max_grad_norm);
        if self.max_grad_norm.is_nan() {
            return Err(FfiError::invalid(format!(
                "{OP}: max_grad_norm is NaN; use 0 for no clipping"
            )));
        }
        fusedreg::global_norm::check_max_norm(clip)?;
        Ok((c, clip))
    }
}

/// An AdamW optimizer over a fixed list of parameter tensors (opaque).
pub struct FrAdamW {
    inner: Inner,
    n: usize,
}

enum Inner {
    Cpu(Box<dyn CpuOpt>),
    Gpu(Box<GpuOpt>),
}

/// Creates an optimizer over `n` parameter tensors `params[i]` with gradients `grads[i]` (same
/// length; every parameter of one dtype, every gradient of one dtype) and per-tensor weight
/// decay `weight_decay[i]`. On the CPU the parameters are read and written through their host
/// pointers at every step; on a GPU their addresses are registered once (they must stay
/// allocated while the optimizer lives), gradients may move between steps. `*out` receives the
/// object; free it with [`fr_adamw_destroy`].
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_create(
    options: *const FrAdamWOptions,
    exec: FrExec,
    params: *const FrTensor,
    grads: *const FrTensor,
    weight_decay: *const f32,
    n: i64,
    out: *mut *mut FrAdamW,
) -> FrStatus {
    boundary(|| {
        // SAFETY: the caller passes valid pointers (null checked).
        let o = unsafe { options.as_ref() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: options are required")))?;
        let out = unsafe { out.as_mut() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: `out` is required")))?;
        let (params, grads, wd) = unsafe { lists(params, grads, weight_decay, n)? };
        let (config, clip) = o.config()?;
        for (i, &w) in wd.iter().enumerate() {
            if !w.is_finite() || w < 0.0 {
                return Err(FfiError::invalid(format!(
                    "{OP}: weight_decay[{i}] = {w} must be finite and >= 0"
                )));
            }
        }
        let pk = uniform(params, "params")?;
        let gk = uniform(grads, "grads")?;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.len != g.len {
                return Err(FfiError::invalid(format!(
                    "{OP}: tensor {i}: the gradient has {} elements, the parameter {}",
                    g.len, p.len
                )));
            }
        }
        let inner = match exec.handle()? {
            None => Inner::Cpu(cpu_new(pk, gk, config, clip, params, wd)?),
            Some(h) => Inner::Gpu(Box::new(GpuOpt::new(
                &h, config, clip, params, grads, wd, pk, gk,
            )?)),
        };
        *out = Box::into_raw(Box::new(FrAdamW {
            inner,
            n: params.len(),
        }));
        Ok(())
    })
}

/// One step: `grads[i]` are this step's gradients (the same dtype and lengths as at creation;
/// their addresses may differ from the last step's); `skip[i]` nonzero (or `skip` null: none)
/// leaves tensor `i` untouched this step (a parameter without a gradient, a block dropped by
/// stochastic depth): parameters, moments and step count stay as they were, and its gradient is
/// not read. With clipping, the global norm covers the tensors not skipped. `lr` is this step's
/// learning rate. GPU: launches only (norm, coefficient, update), no host wait.
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_step(
    opt: *mut FrAdamW,
    grads: *const FrTensor,
    skip: *const u8,
    n: i64,
    lr: f32,
) -> FrStatus {
    boundary(|| {
        // SAFETY: the caller passes an object from fr_adamw_create (null checked).
        let opt = unsafe { opt.as_mut() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: the optimizer is null")))?;
        if n < 0 || n as usize != opt.n {
            return Err(FfiError::invalid(format!(
                "{OP}: step got {n} gradients; the optimizer has {} tensors",
                opt.n
            )));
        }
        if grads.is_null() && n > 0 {
            return Err(FfiError::invalid(format!("{OP}: `grads` is null")));
        }
        // SAFETY: n descriptors (and n skip bytes when non-null), as documented.
        let grads = if n == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(grads, opt.n) }
        };
        let skip: Vec<bool> = if skip.is_null() {
            vec![false; opt.n]
        } else {
            unsafe { std::slice::from_raw_parts(skip, opt.n) }
                .iter()
                .map(|&b| b != 0)
                .collect()
        };
        adamw::check_lr(lr)?;
        match &mut opt.inner {
            Inner::Cpu(c) => c.step(grads, &skip, lr),
            Inner::Gpu(g) => g.step(grads, &skip, lr),
        }
    })
}

/// The size in bytes of the saved state ([`fr_adamw_save_state`]).
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_state_size(opt: *const FrAdamW, bytes: *mut i64) -> FrStatus {
    boundary(|| {
        // SAFETY: valid pointers from the caller (null checked).
        let opt = unsafe { opt.as_ref() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: the optimizer is null")))?;
        let bytes = unsafe { bytes.as_mut() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: `bytes` is null")))?;
        let header = match &opt.inner {
            Inner::Cpu(c) => c.header(),
            Inner::Gpu(g) => g.header.clone(),
        };
        *bytes = header.encoded_len() as i64;
        Ok(())
    })
}

/// Writes the state (moments, master weights, step counts; fusedreg's `FRADAMW` format) into
/// `buf` of `len` bytes (at least [`fr_adamw_state_size`]). GPU: waits for the device.
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_save_state(
    opt: *const FrAdamW,
    buf: *mut u8,
    len: i64,
) -> FrStatus {
    boundary(|| {
        // SAFETY: valid pointers from the caller (null checked).
        let opt = unsafe { opt.as_ref() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: the optimizer is null")))?;
        let bytes = match &opt.inner {
            Inner::Cpu(c) => c.save()?,
            Inner::Gpu(g) => g.opt.save_state()?,
        };
        if buf.is_null() || len < bytes.len() as i64 {
            return Err(FfiError::invalid(format!(
                "{OP}: the state needs {} bytes; the buffer has {len}",
                bytes.len()
            )));
        }
        // SAFETY: `buf` holds at least `bytes.len()` bytes (checked).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
        Ok(())
    })
}

/// Restores a state written by [`fr_adamw_save_state`] for the same tensors (every field and
/// length is checked; a mismatch is an error and changes nothing).
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_restore_state(
    opt: *mut FrAdamW,
    buf: *const u8,
    len: i64,
) -> FrStatus {
    boundary(|| {
        // SAFETY: valid pointers from the caller (null checked).
        let opt = unsafe { opt.as_mut() }
            .ok_or_else(|| FfiError::invalid(format!("{OP}: the optimizer is null")))?;
        if buf.is_null() || len < 0 {
            return Err(FfiError::invalid(format!("{OP}: the state buffer is null")));
        }
        let bytes = unsafe { std::slice::from_raw_parts(buf, len as usize) };
        match &mut opt.inner {
            Inner::Cpu(c) => c.restore(bytes),
            Inner::Gpu(g) => Ok(g.opt.restore_state(bytes)?),
        }
    })
}

/// Frees an optimizer (null is accepted). GPU state is freed stream-ordered.
#[no_mangle]
pub unsafe extern "C" fn fr_adamw_destroy(opt: *mut FrAdamW) -> FrStatus {
    boundary(|| {
        if !opt.is_null() {
            // SAFETY: an object from fr_adamw_create, destroyed once (the caller's contract).
            drop(unsafe { Box::from_raw(opt) });
        }
        Ok(())
    })
}

/// The three lists of `fr_adamw_create`.
unsafe fn lists<'a>(
    params: *const FrTensor,
    grads: *const FrTensor,
    wd: *const f32,
    n: i64,
) -> FfiResult<(&'a [FrTensor], &'a [FrTensor], &'a [f32])> {
    if n <= 0 {
        return Err(FfiError::invalid(format!(
            "{OP}: the tensor list is empty (n = {n})"
        )));
    }
    if params.is_null() || grads.is_null() || wd.is_null() {
        return Err(FfiError::invalid(format!(
            "{OP}: params, grads and weight_decay are required"
        )));
    }
    let n = n as usize;
    // SAFETY: the caller passes n elements in each list.
    Ok(unsafe {
        (
            std::slice::from_raw_parts(params, n),
            std::slice::from_raw_parts(grads, n),
            std::slice::from_raw_parts(wd, n),
        )
    })
}

fn uniform(ts: &[FrTensor], what: &str) -> FfiResult<DtypeKind> {
    let k = float_kind(OP, what, ts[0].dtype)?;
    for (i, t) in ts.iter().enumerate() {
        if float_kind(OP, what, t.dtype)? != k {
            return Err(FfiError::invalid(format!(
                "{OP}: {what}[{i}] has dtype {}, {what}[0] {}: one optimizer takes one dtype; \
                 create one per dtype",
                crate::tensor::dtype_name(t.dtype),
                crate::tensor::dtype_name(ts[0].dtype)
            )));
        }
        if t.len < 0 || (t.data.is_null() && t.len > 0) {
            return Err(FfiError::invalid(format!(
                "{OP}: {what}[{i}] is not a valid buffer"
            )));
        }
    }
    Ok(k)
}

// ---------------------------------------------------------------------------------------------
// CPU: the reference step on copies of the caller's buffers.

trait CpuOpt: Send {
    fn step(&mut self, grads: &[FrTensor], skip: &[bool], lr: f32) -> FfiResult;
    fn header(&self) -> StateHeader;
    fn save(&self) -> FfiResult<Vec<u8>>;
    fn restore(&mut self, bytes: &[u8]) -> FfiResult;
}

struct CpuState<P: Dtype, G: Dtype> {
    tensors: Vec<acpu::CpuTensor<P, G>>,
    params: Vec<FrTensor>,
    config: AdamWConfig,
    clip: Option<f32>,
}

// SAFETY: the raw pointers in `params` are the caller's; the C contract makes the caller
// responsible for not using the optimizer from two threads at once.
unsafe impl<P: Dtype, G: Dtype> Send for CpuState<P, G> {}

fn cpu_new(
    pk: DtypeKind,
    gk: DtypeKind,
    config: AdamWConfig,
    clip: Option<f32>,
    params: &[FrTensor],
    wd: &[f32],
) -> FfiResult<Box<dyn CpuOpt>> {
    fn make<P: Dtype + Elem, G: Dtype + Elem>(
        config: AdamWConfig,
        clip: Option<f32>,
        params: &[FrTensor],
        wd: &[f32],
    ) -> FfiResult<Box<dyn CpuOpt>> {
        let mut tensors = Vec::with_capacity(params.len());
        for (i, (p, &w)) in params.iter().zip(wd).enumerate() {
            // SAFETY: host pointers valid for their lengths (the C contract).
            let v = unsafe { host::<P>(OP, &format!("params[{i}]"), p)? }.to_vec();
            let n = v.len();
            tensors.push(acpu::CpuTensor::<P, G>::with_state(
                v,
                vec![G::from_f32_rn(0.0); n],
                w,
                config.state,
            )?);
        }
        Ok(Box::new(CpuState {
            tensors,
            params: params.to_vec(),
            config,
            clip,
        }))
    }
    use half::{bf16, f16};
    match (pk, gk) {
        (DtypeKind::F32, DtypeKind::F32) => make::<f32, f32>(config, clip, params, wd),
        (DtypeKind::F32, DtypeKind::F16) => make::<f32, f16>(config, clip, params, wd),
        (DtypeKind::F32, DtypeKind::Bf16) => make::<f32, bf16>(config, clip, params, wd),
        (DtypeKind::F16, DtypeKind::F32) => make::<f16, f32>(config, clip, params, wd),
        (DtypeKind::F16, DtypeKind::F16) => make::<f16, f16>(config, clip, params, wd),
        (DtypeKind::F16, DtypeKind::Bf16) => make::<f16, bf16>(config, clip, params, wd),
        (DtypeKind::Bf16, DtypeKind::F32) => make::<bf16, f32>(config, clip, params, wd),
        (DtypeKind::Bf16, DtypeKind::F16) => make::<bf16, f16>(config, clip, params, wd),
        (DtypeKind::Bf16, DtypeKind::Bf16) => make::<bf16, bf16>(config, clip, params, wd),
    }
}

impl<P: Dtype + Elem, G: Dtype + Elem> CpuOpt for CpuState<P, G> {
    fn step(&mut self, grads: &[FrTensor], skip: &[bool], lr: f32) -> FfiResult {
        for (i, (t, g)) in self.tensors.iter_mut().zip(grads).enumerate() {
            if skip[i] {
                continue;
            }
            // SAFETY: host pointers valid for their lengths (the C contract).
            let gs = unsafe { host::<G>(OP, &format!("grads[{i}]"), g)? };
            if gs.len() != t.len() {
                return Err(FfiError::invalid(format!(
                    "{OP}: grads[{i}] has {} elements, the parameter {}",
                    gs.len(),
                    t.len()
                )));
            }
            t.grad.copy_from_slice(gs);
            if t.master.is_none() {
                // The caller may have written the parameters (e.g. loaded a checkpoint).
                let ps = unsafe { host::<P>(OP, &format!("params[{i}]"), &self.params[i])? };
                t.param.copy_from_slice(ps);
            }
        }
        let inputs = match self.clip {
            None => acpu::StepInputs::new(lr),
            Some(max) => {
                let grads: Vec<&[G]> = self
                    .tensors
                    .iter()
                    .zip(skip)
                    .filter(|(_, &s)| !s)
                    .map(|(t, _)| &t.grad[..])
                    .collect();
                let norm = ncpu::global_norm(&grads, Some(max), 1.0)?;
                acpu::StepInputs::from_norm(lr, &norm)
            }
        };
        acpu::step(&mut self.tensors, &self.config, &inputs, skip)?;
        for (i, t) in self.tensors.iter().enumerate() {
            if skip[i] {
                continue;
            }
            let ps = unsafe { host_mut::<P>(OP, &format!("params[{i}]"), &self.params[i])? };
            ps.copy_from_slice(&t.param);
        }
        Ok(())
    }

    fn header(&self) -> StateHeader {
        StateHeader {
            param_dtype: P::KIND,
            lens: self.tensors.iter().map(|t| t.len() as u64).collect(),
            options: self.config.state,
        }
    }

    fn save(&self) -> FfiResult<Vec<u8>> {
        Ok(acpu::save_state(&self.tensors)?)
    }

    fn restore(&mut self, bytes: &[u8]) -> FfiResult {
        acpu::restore_state(&mut self.tensors, bytes)?;
        // The master weights (16-bit params) are authoritative: write their rounded copy back.
        for (i, t) in self.tensors.iter().enumerate() {
            if t.master.is_some() {
                let ps = unsafe { host_mut::<P>(OP, &format!("params[{i}]"), &self.params[i])? };
                ps.copy_from_slice(&t.param);
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// GPU: the fused kernels over the caller's device buffers.

struct GpuOpt {
    set: TensorSet,
    opt: adamw::AdamW,
    norm: Option<GlobalNorm>,
    header: StateHeader,
    lr: f32,
    skip: Vec<bool>,
    grads: Vec<u64>,
}

impl GpuOpt {
    #[allow(clippy::too_many_arguments)]
    fn new(
        h: &fusedreg::Handle,
        config: AdamWConfig,
        clip: Option<f32>,
        params: &[FrTensor],
        grads: &[FrTensor],
        wd: &[f32],
        pk: DtypeKind,
        gk: DtypeKind,
    ) -> FfiResult<Self> {
        let mut b = TensorSet::builder(h);
        for (p, g) in params.iter().zip(grads) {
            // SAFETY: the C contract: device buffers of this context that outlive the optimizer.
            unsafe {
                b.push_raw(RawTensor {
                    param: p.data as u64,
                    grad: g.data as u64,
                    len: p.len as u64,
                    param_dtype: pk,
                    grad_dtype: gk,
                })
            }?;
        }
        let set = b.build()?;
        let opt = adamw::AdamW::new(&set, config, wd)?;
        let norm = match clip {
            Some(m) => Some(GlobalNorm::new(&set, Some(m))?),
            None => None,
        };
        Ok(GpuOpt {
            header: StateHeader {
                param_dtype: pk,
                lens: params.iter().map(|p| p.len as u64).collect(),
                options: config.state,
            },
            set,
            opt,
            norm,
            lr: config.lr,
            skip: vec![false; params.len()],
            grads: grads.iter().map(|g| g.data as u64).collect(),
        })
    }

    fn step(&mut self, grads: &[FrTensor], skip: &[bool], lr: f32) -> FfiResult {
        let mut next = self.grads.clone();
        for (i, g) in grads.iter().enumerate() {
            if skip[i] {
                continue; // keep the last registered address: not read this step
            }
            if g.len != self.header.lens[i] as i64 {
                return Err(FfiError::invalid(format!(
                    "{OP}: grads[{i}] has {} elements, the parameter {}",
                    g.len, self.header.lens[i]
                )));
            }
            next[i] = g.data as u64;
        }
        if next != self.grads {
            // SAFETY: the C contract: this step's gradients are live device buffers of the
            // context, ordered with the stream.
            unsafe { self.set.set_grads_raw(&next) }?;
            self.grads = next;
        }
        if skip != self.skip.as_slice() {
            self.opt.set_skip(skip)?;
            self.skip = skip.to_vec();
        }
        if lr != self.lr {
            self.opt.set_lr(lr)?;
            self.lr = lr;
        }
        match &mut self.norm {
            Some(n) => self.opt.clip_and_step(&mut self.set, n)?,
            None => self.opt.step(&mut self.set, None)?,
        }
        Ok(())
    }
}
