//! What every adapter op needs: the dtype dispatch, contiguous slices of candle's CPU and CUDA
//! storage, output allocation, and the fusedreg [`Handle`](crate::Handle) of a candle CUDA device.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor, WithDType};

use super::wrap;
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

/// Calls `$f::<T>($args)` with `T` the element type of `$dtype`, or returns an error naming
/// `$op` for any other dtype.
macro_rules! dispatch {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => Err($crate::candle::storage::unsupported($op, other)),
        }
    };
}
pub(crate) use dispatch;

pub(crate) fn unsupported(op: &'static str, dtype: DType) -> candle_core::Error {
    wrap(Error::invalid(
        op,
        format!("dtype {dtype:?} is not supported: use f32, f16 or bf16"),
    ))
}

/// Checks that `t` has a dtype with kernels and the dtype `dtype` (the first argument's).
pub(crate) fn check_tensor(
    op: &'static str,
    what: &str,
    t: &Tensor,
    first: &Tensor,
) -> candle_core::Result<()> {
    if !matches!(first.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(unsupported(op, first.dtype()));
    }
    if t.dtype() != first.dtype() {
        return Err(wrap(Error::invalid(
            op,
            format!(
                "`{what}` has dtype {:?}, expected {:?} (all arguments share one dtype)",
                t.dtype(),
                first.dtype()
            ),
        )));
    }
    if !t.device().same_device(first.device()) {
        return Err(wrap(Error::invalid(
            op,
            format!(
                "`{what}` is on {:?}, the first argument on {:?}",
                t.device().location(),
                first.device().location()
            ),
        )));
    }
    Ok(())
}

/// `(rows, cols)` of a tensor seen as `[rows, cols]` with `cols` its last dimension. Errors on a
/// scalar and when the leading dimensions' product overflows (possible only when `cols` is 0).
pub(crate) fn rows_cols(
    op: &'static str,
    what: &str,
    t: &Tensor,
) -> candle_core::Result<(usize, usize)> {
    let dims = t.dims();
    let Some((&cols, lead)) = dims.split_last() else {
        return Err(wrap(Error::shape(
            op,
            format!(
                "`{what}` is a scalar; it needs at least one dimension (the last is the columns)"
            ),
        )));
    };
    let rows = lead
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            wrap(Error::shape(
                op,
                format!("`{what}` {dims:?}: too many rows"),
            ))
        })?;
    Ok((rows, cols))
}

/// The contiguous range of a layout, or an error: the custom ops never read strided data.
fn range(op: &'static str, what: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| {
        wrap(Error::invalid(
            op,
            format!(
                "`{what}` is not contiguous (shape {:?}, stride {:?}); call .contiguous() first",
                l.dims(),
                l.stride()
            ),
        ))
    })
}

fn dtype_check(op: &'static str, what: &str, got: DType, want: DType) -> candle_core::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(wrap(Error::invalid(
            op,
            format!("`{what}` has dtype {got:?}, expected {want:?}"),
        )))
    }
}

/// The elements of a contiguous CPU tensor.
pub(crate) fn cpu_slice<'a, T: Elem>(
    op: &'static str,
    what: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    dtype_check(op, what, s.dtype(), T::DTYPE)?;
    let (start, end) = range(op, what, l)?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// A CPU output of `shape` from its elements.
pub(crate) fn cpu_out<T: Elem>(v: Vec<T>, shape: Shape) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(v), shape)
}

/// The elements of a contiguous CUDA tensor, as a view into candle's buffer.
#[cfg(feature = "candle-cuda")]
pub(crate) fn cuda_view<'a, T: Elem>(
    op: &'static str,
    what: &str,
    s: &'a candle_core::CudaStorage,
    l: &Layout,
) -> candle_core::Result<cudarc::driver::CudaView<'a, T>> {
    dtype_check(op, what, s.dtype(), T::DTYPE)?;
    let (start, end) = range(op, what, l)?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// An uninitialised device buffer of `len` elements on candle's stream (stream-ordered, no host
/// sync). At least one element is allocated, as the driver refuses zero-byte allocations; the
/// output's shape says how many are used.
///
/// # Safety
///
/// The caller writes every element the output's shape covers before anything reads it.
#[cfg(feature = "candle-cuda")]
pub(crate) unsafe fn cuda_alloc<T: Elem>(
    dev: &candle_core::CudaDevice,
    len: usize,
) -> candle_core::Result<cudarc::driver::CudaSlice<T>> {
    // SAFETY: forwarded to the caller.
    unsafe { dev.alloc::<T>(len.max(1)) }
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
pub fn cuda_handle(dev: &candle_core::CudaDevice) -> candle_core::Result<crate::Handle> {
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
