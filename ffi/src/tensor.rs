//! Tensor descriptors and their views: host slices for the CPU references, borrowed device
//! buffers for the kernels.

use std::ffi::c_void;
use std::sync::Arc;

use fusedreg::cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use fusedreg::DtypeKind;

use crate::{FfiError, FfiResult};

/// An element type code.
pub type FrDtype = i32;
/// 32-bit float.
pub const FR_F32: FrDtype = 0;
/// IEEE half.
pub const FR_F16: FrDtype = 1;
/// bfloat16.
pub const FR_BF16: FrDtype = 2;
/// 32-bit signed integer (cross-entropy targets).
pub const FR_I32: FrDtype = 3;
/// 64-bit signed integer (cross-entropy targets).
pub const FR_I64: FrDtype = 4;
/// Bytes (workspaces, see `fr_workspace_size`).
pub const FR_U8: FrDtype = 5;

/// A contiguous buffer: `len` elements of `dtype` starting at `data` (host memory for CPU
/// calls, device memory of the call's context for GPU calls). `data` may be null only when
/// `len` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FrTensor {
    /// First element.
    pub data: *mut c_void,
    /// Number of elements.
    pub len: i64,
    /// One of the `FR_*` dtype codes.
    pub dtype: FrDtype,
}

pub(crate) fn dtype_name(d: FrDtype) -> String {
    match d {
        FR_F32 => "float32".into(),
        FR_F16 => "float16".into(),
        FR_BF16 => "bfloat16".into(),
        FR_I32 => "int32".into(),
        FR_I64 => "int64".into(),
        FR_U8 => "uint8".into(),
        other => format!("unknown dtype code {other}"),
    }
}

/// The float dtype of a code, or an error naming the argument.
pub(crate) fn float_kind(op: &str, what: &str, d: FrDtype) -> FfiResult<DtypeKind> {
    match d {
        FR_F32 => Ok(DtypeKind::F32),
        FR_F16 => Ok(DtypeKind::F16),
        FR_BF16 => Ok(DtypeKind::Bf16),
        other => Err(FfiError::invalid(format!(
            "{op}: `{what}` has dtype {}; use float32, float16 or bfloat16",
            dtype_name(other)
        ))),
    }
}

/// Checks a required tensor pointer and its descriptor; returns the descriptor.
pub(crate) fn req<'a>(op: &str, what: &str, t: *const FrTensor) -> FfiResult<&'a FrTensor> {
    // SAFETY: the caller passes a valid descriptor or null (checked).
    let t = unsafe { t.as_ref() }
        .ok_or_else(|| FfiError::invalid(format!("{op}: `{what}` is required (null pointer)")))?;
    check_desc(op, what, t)?;
    Ok(t)
}

/// An optional tensor (null = absent).
pub(crate) fn opt<'a>(op: &str, what: &str, t: *const FrTensor) -> FfiResult<Option<&'a FrTensor>> {
    if t.is_null() {
        Ok(None)
    } else {
        req(op, what, t).map(Some)
    }
}

fn check_desc(op: &str, what: &str, t: &FrTensor) -> FfiResult {
    if t.len < 0 {
        return Err(FfiError::invalid(format!(
            "{op}: `{what}` has a negative length {}",
            t.len
        )));
    }
    if t.data.is_null() && t.len > 0 {
        return Err(FfiError::invalid(format!(
            "{op}: `{what}` has {} elements but a null data pointer",
            t.len
        )));
    }
    Ok(())
}

/// An element type the ABI carries: the three floats and the two target index types.
pub(crate) trait Elem: Copy + 'static {
    const CODE: FrDtype;
}
impl Elem for f32 {
    const CODE: FrDtype = FR_F32;
}
impl Elem for half::f16 {
    const CODE: FrDtype = FR_F16;
}
impl Elem for half::bf16 {
    const CODE: FrDtype = FR_BF16;
}
impl Elem for i32 {
    const CODE: FrDtype = FR_I32;
}
impl Elem for i64 {
    const CODE: FrDtype = FR_I64;
}
impl Elem for u8 {
    const CODE: FrDtype = FR_U8;
}
/// Counters (the Block Influence accumulators): int64 tensors in the ABI (torch has no general
/// uint64), read as the same bits.
impl Elem for u64 {
    const CODE: FrDtype = FR_I64;
}
/// Flag words: the ABI passes them as int32 (torch has no general uint32), the library reads
/// the same bits as u32.
impl Elem for u32 {
    const CODE: FrDtype = FR_I32;
}

fn check_code<T: Elem>(op: &str, what: &str, t: &FrTensor) -> FfiResult {
    if t.dtype != T::CODE {
        return Err(FfiError::invalid(format!(
            "{op}: `{what}` has dtype {}, expected {}",
            dtype_name(t.dtype),
            dtype_name(T::CODE)
        )));
    }
    if !t.data.is_null() && (t.data as usize) % std::mem::align_of::<T>() != 0 {
        return Err(FfiError::invalid(format!(
            "{op}: `{what}` is not aligned to its element size"
        )));
    }
    Ok(())
}

/// A host tensor as a slice.
///
/// # Safety
///
/// `t.data` must point to `t.len` initialised elements that outlive `'a` and are not written
/// through another pointer meanwhile.
pub(crate) unsafe fn host<'a, T: Elem>(op: &str, what: &str, t: &FrTensor) -> FfiResult<&'a [T]> {
    check_code::<T>(op, what, t)?;
    if t.len == 0 {
        return Ok(&[]);
    }
    // SAFETY: the caller's contract; non-null and aligned were checked.
    Ok(unsafe { std::slice::from_raw_parts(t.data as *const T, t.len as usize) })
}

/// One Block Influence site's caller-owned host words (int64 `[3]`) and a cell holding their
/// value for the CPU reference's meter; the caller writes the cell back into the words.
///
/// # Safety
///
/// As [`host_mut`].
pub(crate) unsafe fn host_site<'a>(
    op: &str,
    t: &FrTensor,
) -> FfiResult<(
    &'a mut [u64],
    std::cell::Cell<fusedreg::redundancy::SiteStats>,
)> {
    use fusedreg::redundancy::{SiteStats, WORDS_PER_SITE};
    // SAFETY: the caller's contract.
    let words = unsafe { host_mut::<u64>(op, "stats", t)? };
    let w: [u64; WORDS_PER_SITE] = words.try_into().map_err(|_| {
        FfiError::shape(format!(
            "{op}: `stats` has {} elements; a Block Influence site is {WORDS_PER_SITE} int64 words",
            words.len()
        ))
    })?;
    Ok((words, std::cell::Cell::new(SiteStats::from_words(w))))
}

/// A host tensor as a mutable slice.
///
/// # Safety
///
/// As [`host`], and no other slice may alias it for `'a`.
pub(crate) unsafe fn host_mut<'a, T: Elem>(
    op: &str,
    what: &str,
    t: &FrTensor,
) -> FfiResult<&'a mut [T]> {
    check_code::<T>(op, what, t)?;
    if t.len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data as *mut T, t.len as usize) })
}

/// Caller-owned device memory seen as a cudarc buffer on the call's stream. The buffer is never
/// freed by us: dropping a `Borrowed` leaks the `CudaSlice` (the caller's allocator owns it).
pub(crate) struct Borrowed<T> {
    slice: Option<CudaSlice<T>>,
}

impl<T> Borrowed<T> {
    /// # Safety
    ///
    /// `t` must describe `t.len` elements of `T` in device memory of `stream`'s context that
    /// stay allocated until the work launched with this view has run.
    pub unsafe fn new(
        op: &str,
        what: &str,
        t: &FrTensor,
        stream: &Arc<CudaStream>,
    ) -> FfiResult<Self>
    where
        T: Elem,
    {
        check_code::<T>(op, what, t)?;
        // SAFETY: the caller's contract; the slice is leaked, never freed (see Drop).
        let slice = unsafe { stream.upgrade_device_ptr::<T>(t.data as u64, t.len as usize) };
        Ok(Borrowed { slice: Some(slice) })
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.slice.as_ref().expect("present until drop").as_view()
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice
            .as_mut()
            .expect("present until drop")
            .as_view_mut()
    }

    pub fn slice(&self) -> &CudaSlice<T> {
        self.slice.as_ref().expect("present until drop")
    }

    pub fn slice_mut(&mut self) -> &mut CudaSlice<T> {
        self.slice.as_mut().expect("present until drop")
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            // The memory is the caller's: forget it without cuMemFree.
            let _ = s.leak();
        }
    }
}

/// The dtype dispatch of a float op: evaluates `$body` with the type alias `$T` set to the
/// element type of the dtype code `$d` (f32, f16 or bf16), or returns an error naming `$what`.
macro_rules! dispatch_float {
    ($op:expr, $what:expr, $d:expr, $T:ident => $body:expr) => {
        match $crate::tensor::float_kind($op, $what, $d)? {
            fusedreg::DtypeKind::F32 => {
                type $T = f32;
                $body
            }
            fusedreg::DtypeKind::F16 => {
                type $T = half::f16;
                $body
            }
            fusedreg::DtypeKind::Bf16 => {
                type $T = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use dispatch_float;
