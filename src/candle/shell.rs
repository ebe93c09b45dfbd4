//! The custom-op shell every adapter op runs in.
//!
//! An op is one or two [`Pass`]es (its forward, and the backward its forward's [`Pass::bwd`]
//! applies): each says only what it computes, on the CPU device with fusedreg's CPU reference and
//! on the CUDA device with fusedreg's kernels. [`Op`] does the rest for every op: the candle
//! custom-op traits for 1 to 3 inputs, the copy of strided inputs, the dtype dispatch, the checks
//! that a pass never reads strided storage or storage of another dtype than it asked for
//! ([`Inputs`]), the handle on candle's own stream, and the packing of several gradients into one
//! output ([`split_parts!`], [`unpack`]). The forward's argument checks that every op shares are
//! here too ([`check_tensor`], [`rows_cols`], [`check_per_column`], [`check_same_shape`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use candle_core::{Result, WithDType};

use crate::error::Error;

/// The element types both sides have: f32, f16 and bf16.
#[cfg(not(feature = "candle-cuda"))]
pub(crate) trait Elem: crate::Dtype + WithDType {}
#[cfg(not(feature = "candle-cuda"))]
impl<T: crate::Dtype + WithDType> Elem for T {}

/// The element types both sides have: f32, f16 and bf16.
#[cfg(feature = "candle-cuda")]
pub(crate) trait Elem: crate::Dtype + WithDType + candle_core::cuda::CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: crate::Dtype + WithDType + candle_core::cuda::CudaDType> Elem for T {}

/// What a pass reads besides its elements: candle's types, with the CUDA bound when CUDA is on.
#[cfg(not(feature = "candle-cuda"))]
pub(crate) trait Any: WithDType {}
#[cfg(not(feature = "candle-cuda"))]
impl<T: WithDType> Any for T {}

/// What a pass reads besides its elements: candle's types, with the CUDA bound when CUDA is on.
#[cfg(feature = "candle-cuda")]
pub(crate) trait Any: WithDType + candle_core::cuda::CudaDType {}
#[cfg(feature = "candle-cuda")]
impl<T: WithDType + candle_core::cuda::CudaDType> Any for T {}

/// Calls `$f::<T>($args)` with `T` the element type of `$dtype`, or returns an error naming
/// `$op` for any other dtype (for the code outside [`Op`]: the optimizer).
#[cfg(feature = "candle-cuda")]
macro_rules! dispatch {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err($crate::candle::shell::unsupported($op, other)),
        }
    };
}
#[cfg(feature = "candle-cuda")]
pub(crate) use dispatch;

pub(crate) fn unsupported(op: &'static str, dtype: DType) -> candle_core::Error {
    Error::invalid(
        op,
        format!("dtype {dtype:?} is not supported: use f32, f16 or bf16"),
    )
    .into()
}

/// One pass of an adapter op (its forward, or its backward) as [`Op`] runs it: what it computes
/// from its inputs on each device, with `T` the element type of the first input.
pub(crate) trait Pass: Send + Sync + Sized + 'static {
    /// The name in errors and in candle's graph.
    const NAME: &'static str;

    /// The output on candle's CPU device (fusedreg's CPU reference).
    fn cpu<T: Elem>(&self, ins: &CpuInputs<'_>) -> Result<CpuOut>;

    /// The output on candle's CUDA device: fusedreg's kernels on `h`, the handle on candle's
    /// stream of the inputs' device ([`cuda_handle`]).
    #[cfg(feature = "candle-cuda")]
    fn cuda<T: Elem>(&self, h: &crate::Handle, ins: &CudaInputs<'_>) -> Result<CudaOut>;

    /// The gradients of the inputs (in order; `None` where there is none, missing ones at the
    /// end count as `None`) from `grad`, the gradient of the output `out`. A pass applied with
    /// [`Op::apply_no_bwd`] (a backward pass) never gets here.
    fn bwd(&self, ins: &[&Tensor], out: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let _ = (ins, out, grad);
        Err(candle_core::Error::BackwardNotSupported { op: Self::NAME })
    }
}

/// A pass's inputs on candle's CPU device.
pub(crate) type CpuInputs<'a> = Inputs<'a, CpuStorage>;
/// A pass's output on candle's CPU device: the storage and its shape.
pub(crate) type CpuOut = (CpuStorage, Shape);
/// A pass's inputs on candle's CUDA device.
#[cfg(feature = "candle-cuda")]
pub(crate) type CudaInputs<'a> = Inputs<'a, candle_core::CudaStorage>;
/// A pass's output on candle's CUDA device: the storage and its shape.
#[cfg(feature = "candle-cuda")]
pub(crate) type CudaOut = (candle_core::CudaStorage, Shape);

/// A [`Pass`] as a candle custom op of 1, 2 or 3 inputs.
pub(crate) struct Op<P>(pub P);

impl<P: Pass> Op<P> {
    /// Applies the pass to `ins` (1 to 3 tensors; a strided one is copied first, and gradients
    /// flow through the copy), as a node of candle's graph whose backward is [`Pass::bwd`].
    pub fn apply(self, ins: &[&Tensor]) -> Result<Tensor> {
        match contiguous(ins)?.as_slice() {
            [a] => a.apply_op1(self),
            [a, b] => a.apply_op2(b, self),
            [a, b, c] => a.apply_op3(b, c, self),
            _ => Err(arity(P::NAME, ins.len())),
        }
    }

    /// [`apply`](Self::apply) without a node in the graph: for backward passes (no second
    /// derivatives through the adapter's ops).
    pub fn apply_no_bwd(&self, ins: &[&Tensor]) -> Result<Tensor> {
        match contiguous(ins)?.as_slice() {
            [a] => a.apply_op1_no_bwd(self),
            [a, b] => a.apply_op2_no_bwd(b, self),
            [a, b, c] => a.apply_op3_no_bwd(b, c, self),
            _ => Err(arity(P::NAME, ins.len())),
        }
    }

    fn cpu(&self, all: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let ins = Inputs { op: P::NAME, all };
        match all[0].0.dtype() {
            DType::F32 => self.0.cpu::<f32>(&ins),
            DType::F16 => self.0.cpu::<half::f16>(&ins),
            DType::BF16 => self.0.cpu::<half::bf16>(&ins),
            other => Err(unsupported(P::NAME, other)),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda(
        &self,
        all: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ins = Inputs { op: P::NAME, all };
        let h = ins.handle()?;
        match all[0].0.dtype() {
            DType::F32 => self.0.cuda::<f32>(&h, &ins),
            DType::F16 => self.0.cuda::<half::f16>(&h, &ins),
            DType::BF16 => self.0.cuda::<half::bf16>(&h, &ins),
            other => Err(unsupported(P::NAME, other)),
        }
    }

    /// The `N` input gradients of [`Pass::bwd`].
    fn grads<const N: usize>(
        &self,
        ins: [&Tensor; N],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let mut got = self.0.bwd(&ins, out, grad)?.into_iter();
        let grads = std::array::from_fn(|_| got.next().flatten());
        if got.any(|g| g.is_some()) {
            return Err(Error::invalid(P::NAME, "more gradients than inputs").into());
        }
        Ok(grads)
    }
}

fn contiguous(ins: &[&Tensor]) -> Result<Vec<Tensor>> {
    ins.iter().map(|t| t.contiguous()).collect()
}

fn arity(op: &'static str, n: usize) -> candle_core::Error {
    Error::invalid(op, format!("{n} inputs: a custom op takes 1 to 3")).into()
}

/// `CustomOp1..3` for [`Op`]: each arity hands its storages to the arity-free `cpu` / `cuda`
/// and its gradients to `grads`, so a pass never sees how many inputs candle's trait spells out.
macro_rules! custom_op {
    ($trait:ident: $(($s:ident, $l:ident, $a:ident, $g:ident)),+) => {
        impl<P: Pass> $trait for Op<P> {
            fn name(&self) -> &'static str {
                P::NAME
            }

            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Result<(CpuStorage, Shape)> {
                self.cpu(&[$(($s, $l)),+])
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &Layout),+
            ) -> Result<(candle_core::CudaStorage, Shape)> {
                self.cuda(&[$(($s, $l)),+])
            }

            #[allow(unused_parens)] // one input: `(Option<Tensor>)`, candle's `Option<Tensor>`
            fn bwd(
                &self,
                $($a: &Tensor,)+
                out: &Tensor,
                grad: &Tensor,
            ) -> Result<($(custom_op!(@grad $g)),+)> {
                let [$($g),+] = self.grads([$($a),+], out, grad)?;
                Ok(($($g),+))
            }
        }
    };
    (@grad $g:ident) => {
        Option<Tensor>
    };
}

custom_op!(CustomOp1: (s1, l1, a1, g1));
custom_op!(CustomOp2: (s1, l1, a1, g1), (s2, l2, a2, g2));
custom_op!(CustomOp3: (s1, l1, a1, g1), (s2, l2, a2, g2), (s3, l3, a3, g3));

/// The inputs of a pass on one device: each one's storage and layout. Every read goes through
/// here, so no pass reads strided data or data of another dtype than it names.
pub(crate) struct Inputs<'a, S> {
    op: &'static str,
    all: &'a [(&'a S, &'a Layout)],
}

impl<'a, S: BackendStorage> Inputs<'a, S> {
    /// How many inputs the pass was applied to.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    /// The shape of input `i`.
    pub fn shape(&self, i: usize) -> Shape {
        self.all[i].1.shape().clone()
    }

    /// Input `i`'s storage and its contiguous element range, checked to hold `want` elements.
    fn range(&self, i: usize, what: &str, want: DType) -> Result<(&'a S, usize, usize)> {
        let (s, l) = self.all[i];
        if s.dtype() != want {
            return Err(Error::invalid(
                self.op,
                format!("`{what}` has dtype {:?}, expected {want:?}", s.dtype()),
            )
            .into());
        }
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            Error::invalid(
                self.op,
                format!(
                    "`{what}` is not contiguous (shape {:?}, stride {:?}); call .contiguous() first",
                    l.dims(),
                    l.stride()
                ),
            )
        })?;
        Ok((s, start, end))
    }
}

impl<'a> Inputs<'a, CpuStorage> {
    /// The elements of input `i` (`what` names it in errors).
    pub fn slice<T: Any>(&self, i: usize, what: &str) -> Result<&'a [T]> {
        let (s, start, end) = self.range(i, what, T::DTYPE)?;
        Ok(&T::cpu_storage_as_slice(s)?[start..end])
    }

    /// [`slice`](Self::slice) of input `i` when the pass has one (an optional last input).
    pub fn opt_slice<T: Any>(&self, i: usize, what: &str) -> Result<Option<&'a [T]>> {
        (i < self.len()).then(|| self.slice(i, what)).transpose()
    }
}

/// A CPU output of `shape` from its elements.
pub(crate) fn cpu_out<T: WithDType>(v: Vec<T>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(v), shape.into())
}

#[cfg(feature = "candle-cuda")]
impl<'a> Inputs<'a, candle_core::CudaStorage> {
    /// The elements of input `i`, a view into candle's buffer.
    pub fn view<T: Any>(&self, i: usize, what: &str) -> Result<cudarc::driver::CudaView<'a, T>> {
        let (s, start, end) = self.range(i, what, T::DTYPE)?;
        Ok(s.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// [`view`](Self::view) of input `i` when the pass has one (an optional last input).
    pub fn opt_view<T: Any>(
        &self,
        i: usize,
        what: &str,
    ) -> Result<Option<cudarc::driver::CudaView<'a, T>>> {
        (i < self.len()).then(|| self.view(i, what)).transpose()
    }

    /// candle's device of the first input (candle checks that all share it).
    pub fn device(&self) -> &'a candle_core::CudaDevice {
        &self.all[0].0.device
    }

    /// fusedreg's handle on candle's stream of this device ([`cuda_handle`]).
    pub fn handle(&self) -> Result<crate::Handle> {
        cuda_handle(self.device())
    }

    /// An uninitialised device buffer of `len` elements on candle's stream (stream-ordered, no
    /// host sync). At least one element is allocated, as the driver refuses zero-byte
    /// allocations; the output's shape says how many are used.
    ///
    /// # Safety
    ///
    /// The caller writes every element the output's shape covers before anything reads it.
    pub unsafe fn alloc<T: Any + cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        // SAFETY: forwarded to the caller.
        unsafe { self.device().alloc::<T>(len.max(1)) }
    }

    /// A CUDA output of `shape` in `buf`.
    pub fn out<T: Any>(
        &self,
        buf: cudarc::driver::CudaSlice<T>,
        shape: impl Into<Shape>,
    ) -> (candle_core::CudaStorage, Shape) {
        let storage = candle_core::CudaStorage::wrap_cuda_slice(buf, self.device().clone());
        (storage, shape.into())
    }
}

/// Cuts a packed output buffer (a `&mut [T]` or a CUDA view) into consecutive mutable parts of
/// the given lengths, as `let` bindings in the caller's scope; what follows the last part is
/// left alone (CUDA buffers have at least one element). A part of length 0 is an absent output.
macro_rules! split_parts {
    ($buf:expr => $($name:ident: $len:expr),+ $(,)?) => {
        #[allow(unused_mut)]
        let mut rest = $buf;
        $(
            #[allow(unused_mut)]
            let (mut $name, mut rest) = rest.split_at_mut($len);
        )+
        let _ = &mut rest;
    };
}
pub(crate) use split_parts;

/// The length of a buffer packing parts of `lens` elements, or an error on overflow.
pub(crate) fn packed_len(op: &'static str, lens: &[usize]) -> Result<usize> {
    lens.iter()
        .try_fold(0usize, |acc, &n| acc.checked_add(n))
        .ok_or_else(|| Error::shape(op, "the packed output's size overflows").into())
}

/// The parts of a packed output (a flat tensor written by [`split_parts!`]) as views of the
/// given shapes, in order; `None` for an absent part (it takes no elements). No copy.
pub(crate) fn unpack<const N: usize>(
    packed: &Tensor,
    shapes: [Option<Shape>; N],
) -> Result<[Option<Tensor>; N]> {
    let flat = packed.flatten_all()?;
    let mut at = 0;
    let mut out = std::array::from_fn(|_| None);
    for (slot, shape) in out.iter_mut().zip(shapes) {
        if let Some(s) = shape {
            let n = s.elem_count();
            *slot = Some(flat.narrow(0, at, n)?.reshape(s)?);
            at += n;
        }
    }
    Ok(out)
}

/// Checks that `t` has a dtype with kernels and the dtype and device of `first` (the op's first
/// argument); `what` names it in the error.
pub(crate) fn check_tensor(op: &'static str, what: &str, t: &Tensor, first: &Tensor) -> Result<()> {
    if !matches!(first.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(unsupported(op, first.dtype()));
    }
    if t.dtype() != first.dtype() {
        return Err(Error::invalid(
            op,
            format!(
                "`{what}` has dtype {:?}, expected {:?} (all arguments share one dtype)",
                t.dtype(),
                first.dtype()
            ),
        )
        .into());
    }
    check_device(op, what, t, first)
}

/// Checks that `t` is on the device of `first` (the op's first argument).
pub(crate) fn check_device(op: &'static str, what: &str, t: &Tensor, first: &Tensor) -> Result<()> {
    if t.device().same_device(first.device()) {
        return Ok(());
    }
    Err(Error::invalid(
        op,
        format!(
            "`{what}` is on {:?}, the first argument on {:?}",
            t.device().location(),
            first.device().location()
        ),
    )
    .into())
}

/// Checks an optional per-column argument (a bias, gamma, beta): `[cols]`, and the dtype and
/// device of `x`.
pub(crate) fn check_per_column(
    op: &'static str,
    what: &str,
    t: Option<&Tensor>,
    x: &Tensor,
    cols: usize,
) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    check_tensor(op, what, t, x)?;
    if t.dims() != [cols] {
        return Err(Error::shape(
            op,
            format!(
                "{what} is {:?}, expected [{cols}] (one per column)",
                t.dims()
            ),
        )
        .into());
    }
    Ok(())
}

/// Checks an optional argument that has `x`'s shape (a residual), dtype and device.
pub(crate) fn check_same_shape(
    op: &'static str,
    what: &str,
    t: Option<&Tensor>,
    x: &Tensor,
) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    check_tensor(op, what, t, x)?;
    if t.dims() != x.dims() {
        return Err(Error::shape(
            op,
            format!("{what} {:?} and x {:?} differ", t.dims(), x.dims()),
        )
        .into());
    }
    Ok(())
}

/// `(rows, cols)` of a tensor seen as `[rows, cols]` with `cols` its last dimension. Errors on a
/// scalar and when the leading dimensions' product overflows (possible only when `cols` is 0).
pub(crate) fn rows_cols(op: &'static str, what: &str, t: &Tensor) -> Result<(usize, usize)> {
    let dims = t.dims();
    let Some((&cols, lead)) = dims.split_last() else {
        return Err(Error::shape(
            op,
            format!(
                "`{what}` is a scalar; it needs at least one dimension (the last is the columns)"
            ),
        )
        .into());
    };
    let rows = lead
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape(op, format!("`{what}` {dims:?}: too many rows")))?;
    Ok((rows, cols))
}

/// Asserts that `r` is an error whose message contains `what` (the unit tests' checks that the
/// custom ops refuse bad storage themselves).
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_fails_with<T>(r: Result<T>, what: &str) {
    match r {
        Ok(_) => panic!("expected an error containing {what:?}, got Ok"),
        Err(e) => assert!(e.to_string().contains(what), "{e}"),
    }
}

/// The fusedreg [`Handle`](crate::Handle) of a candle CUDA device: candle's own stream
/// ([`CudaDevice::cuda_stream`](candle_core::CudaDevice::cuda_stream)) and context, with fusedreg's
/// kernels loaded once. Handles are cached per device for the life of the process (each keeps the
/// device's context and fusedreg's modules loaded), so this is cheap after the first call; the
/// adapter's ops use it, and its [`launch_count`](crate::Handle::launch_count) counts their
/// kernels.
///
/// Errors: [`Error::KernelsNotBuilt`](crate::Error::KernelsNotBuilt) when fusedreg was built
/// without nvcc; a module the driver cannot load.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> candle_core::Result<()> {
/// let dev = candle_core::CudaDevice::new_with_stream(0)?;
/// let h = fusedreg::candle::cuda_handle(&dev)?;
/// assert!(std::sync::Arc::ptr_eq(h.stream(), &dev.cuda_stream())); // launches go there
/// # Ok(()) }
/// ```
#[cfg(feature = "candle-cuda")]
pub fn cuda_handle(dev: &candle_core::CudaDevice) -> Result<crate::Handle> {
    use std::sync::Mutex;
    type Cache = Vec<(candle_core::cuda::DeviceId, crate::Handle)>;
    static HANDLES: Mutex<Cache> = Mutex::new(Vec::new());
    // A panic while holding the lock cannot leave the list half-updated (push is the only write).
    let mut cache = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = cache.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(h.clone());
    }
    let h = crate::Handle::from_stream(dev.cuda_stream())?;
    cache.push((dev.id(), h.clone()));
    Ok(h)
}
