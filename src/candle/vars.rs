//! candle Vars as fusedreg's multi-tensor inputs, for any optimizer built on fusedreg's engines
//! ([`AdamW`](super::AdamW) is one): a stable order ([`vars_by_name`]), the checks every such
//! optimizer makes on its Vars and their gradients, and (feature `candle-cuda`) [`VarSet`], the
//! Vars registered by address in a [`TensorSet`](crate::multi_tensor::TensorSet) so that the
//! engines update them in place.

use candle_core::{DType, Result, Tensor, Var};

use crate::error::Error;

/// The Vars of a `VarMap` sorted by name: an order that is the same in every process (unlike
/// `VarMap::all_vars()`, which follows a `HashMap`), as [`AdamW::load_state`](super::AdamW::load_state)
/// needs.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// # fn main() -> candle_core::Result<()> {
/// let map = VarMap::new();
/// let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
/// let _b = vb.get_with_hints(3, "b", candle_nn::Init::Const(0.0))?;
/// let _a = vb.get_with_hints((2, 3), "a", candle_nn::Init::Const(1.0))?;
/// let vars = fusedreg::candle::vars_by_name(&map);
/// assert_eq!(vars.iter().map(|v| v.dims().to_vec()).collect::<Vec<_>>(), [vec![2, 3], vec![3]]);
/// # Ok(()) }
/// ```
pub fn vars_by_name(varmap: &candle_nn::VarMap) -> Vec<Var> {
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.into_iter().map(|(_, v)| v.clone()).collect()
}

/// Checks the Vars of one optimizer against the first: a float dtype with kernels, one dtype,
/// one device, contiguous, and no Var listed twice.
pub(crate) fn check_vars(op: &'static str, vars: &[Var]) -> Result<()> {
    let Some(first) = vars.first() else {
        return Ok(());
    };
    let err = |msg: String| -> candle_core::Error { Error::invalid(op, msg).into() };
    let mut seen = std::collections::HashMap::new();
    for (i, v) in vars.iter().enumerate() {
        if !matches!(v.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(err(format!(
                "Var {i} has dtype {:?}: use f32, f16 or bf16",
                v.dtype()
            )));
        }
        if v.dtype() != first.dtype() {
            return Err(err(format!(
                "Var {i} has dtype {:?}, Var 0 {:?}: one optimizer updates one dtype (use one per \
                 dtype)",
                v.dtype(),
                first.dtype()
            )));
        }
        if !v.device().same_device(first.device()) {
            return Err(err(format!(
                "Var {i} is on {:?}, Var 0 on {:?}: all Vars of one optimizer share a device",
                v.device().location(),
                first.device().location()
            )));
        }
        if !v.is_contiguous() {
            return Err(err(format!("Var {i} is not contiguous")));
        }
        // The same Var twice (e.g. tied weights listed twice) would be updated twice per step,
        // and on CUDA by two racing blocks: refused.
        if let Some(j) = seen.insert(v.id(), i) {
            return Err(err(format!(
                "Vars {j} and {i} are the same Var: list each parameter once (tied weights are \
                 one Var whose gradient already sums both uses)"
            )));
        }
    }
    Ok(())
}

/// Var `i`'s gradient: same dtype, shape and device as the Var, made contiguous.
pub(crate) fn check_grad(op: &'static str, i: usize, v: &Var, g: &Tensor) -> Result<Tensor> {
    if g.dtype() != v.dtype() || g.dims() != v.dims() || !g.device().same_device(v.device()) {
        return Err(Error::invalid(
            op,
            format!(
                "the gradient of Var {i} is {:?} {:?} on {:?}, the Var {:?} {:?} on {:?}",
                g.dtype(),
                g.dims(),
                g.device().location(),
                v.dtype(),
                v.dims(),
                v.device().location()
            ),
        )
        .into());
    }
    g.contiguous()
}

#[cfg(feature = "candle-cuda")]
pub(crate) use cuda::VarSet;

#[cfg(feature = "candle-cuda")]
mod cuda {
    use candle_core::backprop::GradStore;
    use candle_core::{CudaDevice, DType, Result, Storage, Tensor, Var};
    use cudarc::driver::DevicePtr;

    use super::check_grad;
    use crate::candle::shell::{cuda_handle, dispatch, Elem};
    use crate::error::Error;
    use crate::multi_tensor::{RawTensor, TensorSet};
    use crate::{Dtype, DtypeKind};

    /// Vars checked by [`check_vars`](super::check_vars), registered by device address in a
    /// [`TensorSet`] on candle's stream: an engine stepping the set updates the Vars in place.
    /// Each step points the set's gradients at that step's gradients ([`VarSet::with_grads`]).
    pub(crate) struct VarSet {
        op: &'static str,
        set: TensorSet,
        dtype: DType,
        /// Each Var's device address (valid for the Var's life: the owner keeps the Vars).
        params: Vec<u64>,
    }

    /// The device address of a contiguous CUDA tensor's first element.
    fn address<T: Elem>(t: &Tensor, h: &crate::Handle) -> Result<u64> {
        let err = |msg: &str| -> candle_core::Error { Error::invalid("candle", msg).into() };
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(err("a tensor is not on a CUDA device"));
        };
        let (start, _) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("a tensor is not contiguous"))?;
        let slice = s.as_cuda_slice::<T>()?;
        let (base, _guard) = slice.device_ptr(h.stream());
        Ok(base + (start * std::mem::size_of::<T>()) as u64)
    }

    fn addresses<T: Elem>(ts: &[&Tensor], h: &crate::Handle) -> Result<Vec<u64>> {
        ts.iter()
            .map(|t| {
                if t.elem_count() == 0 {
                    Ok(0)
                } else {
                    address::<T>(t, h)
                }
            })
            .collect()
    }

    fn kind(op: &'static str, dtype: DType) -> Result<DtypeKind> {
        Ok(match dtype {
            DType::F32 => f32::KIND,
            DType::F16 => half::f16::KIND,
            DType::BF16 => half::bf16::KIND,
            other => return Err(crate::candle::shell::unsupported(op, other)),
        })
    }

    impl VarSet {
        /// Registers `vars` (checked, non-empty, on `dev`); `op` names the owner in errors. The
        /// caller keeps the Vars alive as long as the set.
        pub(crate) fn new(op: &'static str, dev: &CudaDevice, vars: &[Var]) -> Result<Self> {
            let h = cuda_handle(dev)?;
            let dtype = vars[0].dtype();
            let k = kind(op, dtype)?;
            let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let params = dispatch!(op, dtype, addresses(&tensors, &h))?;
            let mut b = TensorSet::builder(&h);
            for (v, &p) in vars.iter().zip(&params) {
                let t = RawTensor {
                    param: p,
                    // A placeholder until a step sets the real gradient: every step sets all
                    // gradient addresses before launching, and a Var without one is skipped, so
                    // its gradient is never read.
                    grad: p,
                    len: v.elem_count() as u64,
                    param_dtype: k,
                    grad_dtype: k,
                };
                // SAFETY: `p` is the Var's storage, which lives as long as the Var the owner
                // keeps and never moves (Var::set copies into it); candle's stream is the
                // handle's stream.
                unsafe { b.push_raw(t) }?;
            }
            Ok(VarSet {
                op,
                set: b.build()?,
                dtype,
                params,
            })
        }

        /// The registered set (to build an engine on it).
        pub(crate) fn set(&self) -> &TensorSet {
            &self.set
        }

        /// Points the set's gradients at `grads` of `vars` (the Vars of [`new`](Self::new), in
        /// order) and runs `f` on the set, with `skip` (`user_skip` plus every Var without a
        /// gradient). The gradients are kept alive until `f` has queued its launches (then
        /// freed stream-ordered on candle's stream).
        pub(crate) fn with_grads<R>(
            &mut self,
            vars: &[Var],
            grads: &GradStore,
            user_skip: &[bool],
            f: impl FnOnce(&mut TensorSet, &[bool]) -> Result<R>,
        ) -> Result<R> {
            let h = self.set.handle().clone();
            let mut skip = user_skip.to_vec();
            let mut keep: Vec<Tensor> = Vec::with_capacity(vars.len());
            let mut addrs = self.params.clone();
            for (i, v) in vars.iter().enumerate() {
                if skip[i] {
                    continue;
                }
                match grads.get(v) {
                    None => skip[i] = true,
                    Some(g) => {
                        let g = check_grad(self.op, i, v, g)?;
                        if g.elem_count() > 0 {
                            addrs[i] = dispatch!(self.op, self.dtype, address(&g, &h))?;
                        }
                        keep.push(g);
                    }
                }
            }
            // SAFETY: each address is a contiguous gradient of the Var's dtype and length held
            // in `keep` until after `f` (then freed stream-ordered on candle's stream, the
            // handle's), or, for a skipped Var, the Var's own memory, which the kernels never
            // read as a gradient (skipped tensors are not read at all).
            unsafe { self.set.set_grads_raw(&addrs) }?;
            let r = f(&mut self.set, &skip);
            drop(keep);
            r
        }
    }
}
