//! Caller-supplied workspaces: `fr_workspace_size` and the checks of a `workspace` argument.
//!
//! The ops with device scratch (`fr_dropout_backward`, `fr_bias_act_dropout_backward`,
//! `fr_dropout_add_norm_backward`, `fr_cross_entropy_forward` / `_backward`) take a last
//! `const FrTensor *workspace`: null keeps the stream-ordered allocation of the scratch per call;
//! otherwise a `FR_U8` buffer of at least `fr_workspace_size` bytes, 16-byte aligned, used as
//! given (never grown, never freed), so the caller's allocator owns all device memory of the
//! call. CPU calls need none; a workspace passed to one is checked the same way and unused.

use std::sync::Arc;

use fusedreg::cudarc::driver::CudaStream;
use fusedreg::workspace as ws;

use crate::tensor::{dtype_name, float_kind, Borrowed, FrDtype, FrTensor, FR_U8};
use crate::{boundary, FfiError, FfiResult, FrOptions, FrStatus};

/// `fr_workspace_size` op: `fr_dropout_backward` (with `dbias`; without, it needs none).
pub const FR_OP_DROPOUT_BACKWARD: u32 = 1;
/// `fr_workspace_size` op: `fr_bias_act_dropout_backward` (with `dbias`; without, none).
pub const FR_OP_BIAS_ACT_DROPOUT_BACKWARD: u32 = 2;
/// `fr_workspace_size` op: `fr_dropout_add_norm_backward`.
pub const FR_OP_DROPOUT_ADD_NORM_BACKWARD: u32 = 3;
/// `fr_workspace_size` op: `fr_cross_entropy_forward` and `fr_cross_entropy_backward` (the
/// size covers the loss a backward computes when its `loss` is null).
pub const FR_OP_CROSS_ENTROPY: u32 = 4;

/// Alignment of a workspace's data pointer, in bytes.
pub const FR_WORKSPACE_ALIGN: u32 = 16;

/// Writes to `*bytes` the size in bytes of the `workspace` an op needs for a call with these
/// options (`rows`, `cols`; cross-entropy's `reduction`) and element dtype (`dtype`: the dtype
/// of the op's main tensor, a float code): a function of those alone, so cache it per shape.
/// 0 means the op needs none (an empty problem): pass null or any workspace. For the dropping
/// backwards it is the size with `dbias` (a call without `dbias` needs none).
///
/// ```c
/// FrOptions o = fr_options_default();
/// o.rows = 4096; o.cols = 1024;
/// int64_t n;
/// if (fr_workspace_size(FR_OP_DROPOUT_BACKWARD, &o, FR_BF16, &n) != FR_OK) { /* fr_last_error() */ }
/// ```
#[no_mangle]
pub unsafe extern "C" fn fr_workspace_size(
    op: u32,
    options: *const FrOptions,
    dtype: FrDtype,
    bytes: *mut i64,
) -> FrStatus {
    const NAME: &str = "workspace_size";
    boundary(|| {
        let o = FrOptions::read(NAME, options)?;
        if bytes.is_null() {
            return Err(FfiError::invalid(format!(
                "{NAME}: `bytes` is required (null pointer)"
            )));
        }
        let n = size_of_op(op, o, dtype)?;
        let n = i64::try_from(n)
            .map_err(|_| FfiError::shape(format!("{NAME}: {n} bytes do not fit an int64")))?;
        // SAFETY: non-null (checked); the caller passes a writable int64.
        unsafe { *bytes = n };
        Ok(())
    })
}

/// The workspace size of `op` (an `FR_OP_*` code) for `o` and `dtype`.
fn size_of_op(op: u32, o: &FrOptions, dtype: FrDtype) -> FfiResult<usize> {
    let name = match op {
        FR_OP_DROPOUT_BACKWARD => "dropout",
        FR_OP_BIAS_ACT_DROPOUT_BACKWARD => "bias_act_dropout",
        FR_OP_DROPOUT_ADD_NORM_BACKWARD => "dropout_add_norm",
        FR_OP_CROSS_ENTROPY => "cross_entropy",
        _ => {
            return Err(FfiError::invalid(format!(
                "workspace_size: op = {op}; use FR_OP_DROPOUT_BACKWARD (1), \
                 FR_OP_BIAS_ACT_DROPOUT_BACKWARD (2), FR_OP_DROPOUT_ADD_NORM_BACKWARD (3) or \
                 FR_OP_CROSS_ENTROPY (4)"
            )))
        }
    };
    let kind = float_kind(name, "dtype", dtype)?;
    let (rows, cols) = o.shape(name)?;
    Ok(match op {
        FR_OP_DROPOUT_BACKWARD => ws::dropout_backward_size(rows, cols, kind, true)?,
        FR_OP_BIAS_ACT_DROPOUT_BACKWARD => {
            ws::bias_act_dropout_backward_size(rows, cols, kind, true)?
        }
        FR_OP_DROPOUT_ADD_NORM_BACKWARD => ws::dropout_add_norm_backward_size(rows, cols)?,
        _ => {
            let cfg = crate::ops::cross_entropy_config(o)?;
            cross_entropy_layout(rows, cols, cfg.get_reduction())?.total
        }
    })
}

/// Where cross-entropy's parts lie in its ABI workspace: the library's scratch first, then the
/// loss of a backward called without one (f32, `loss_len` of the reduction).
pub(crate) struct XeLayout {
    pub loss_offset: usize,
    pub total: usize,
}

pub(crate) fn cross_entropy_layout(
    rows: usize,
    vocab: usize,
    reduction: fusedreg::cross_entropy::Reduction,
) -> FfiResult<XeLayout> {
    let library = ws::cross_entropy_size(rows, vocab, reduction)?;
    if library == 0 {
        return Ok(XeLayout {
            loss_offset: 0,
            total: 0,
        });
    }
    let loss_offset = library.div_ceil(16) * 16;
    let total = loss_offset + 4 * reduction.loss_len(rows);
    Ok(XeLayout { loss_offset, total })
}

/// The workspace argument of a call (null: none), checked against `need` bytes: dtype `FR_U8`,
/// at least `need` bytes (`FR_ERR_SHAPE`), 16-byte aligned (`FR_ERR_INVALID_ARGUMENT`).
pub(crate) fn arg<'a>(
    op: &str,
    t: *const FrTensor,
    need: usize,
) -> FfiResult<Option<&'a FrTensor>> {
    let Some(w) = crate::tensor::opt(op, "workspace", t)? else {
        return Ok(None);
    };
    if w.dtype != FR_U8 {
        return Err(FfiError::invalid(format!(
            "{op}: `workspace` has dtype {}, expected uint8 (FR_U8)",
            dtype_name(w.dtype)
        )));
    }
    if (w.len as u64) < need as u64 {
        return Err(FfiError::shape(format!(
            "{op}: `workspace` has {} bytes, this call needs {need} (fr_workspace_size); pass \
             at least that many, or null",
            w.len
        )));
    }
    if w.len > 0 && (w.data as usize) % FR_WORKSPACE_ALIGN as usize != 0 {
        return Err(FfiError::invalid(format!(
            "{op}: `workspace` at {:p} is not {FR_WORKSPACE_ALIGN}-byte aligned; pass the start \
             of an allocation",
            w.data
        )));
    }
    Ok(Some(w))
}

/// A part of a checked workspace, `len` elements of `T` at byte `offset`, as a borrowed device
/// buffer.
///
/// # Safety
///
/// As [`Borrowed::new`]; `offset + len * size_of::<T>()` lies within `w` (the caller's layout).
pub(crate) unsafe fn part<T: crate::tensor::Elem>(
    op: &str,
    w: &FrTensor,
    offset: usize,
    len: usize,
    stream: &Arc<CudaStream>,
) -> FfiResult<Borrowed<T>> {
    debug_assert!(offset + len * std::mem::size_of::<T>() <= w.len as usize);
    let t = FrTensor {
        data: (w.data as usize + offset) as *mut _,
        len: len as i64,
        dtype: T::CODE,
    };
    // SAFETY: the caller's contract.
    unsafe { Borrowed::<T>::new(op, "workspace", &t, stream) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::FR_F32;
    use crate::{fr_options_default, FR_ERR_INVALID_ARGUMENT, FR_ERR_SHAPE, FR_OK};
    use crate::{FR_REDUCTION_MEAN, FR_REDUCTION_NONE};
    use fusedreg::DtypeKind;

    fn size(op: u32, rows: i64, cols: i64, dtype: FrDtype, reduction: u32) -> (FrStatus, i64) {
        let o = FrOptions {
            rows,
            cols,
            reduction,
            ..fr_options_default()
        };
        let mut n = -1;
        // SAFETY: valid pointers.
        let s = unsafe { fr_workspace_size(op, &o, dtype, &mut n) };
        (s, n)
    }

    #[test]
    fn sizes_are_the_library_queries() {
        use crate::tensor::FR_BF16;
        let (s, n) = size(FR_OP_DROPOUT_BACKWARD, 1000, 1024, FR_F32, 0);
        assert_eq!((s, n), (FR_OK, 4 * 1024 * 63));
        let want = ws::bias_act_dropout_backward_size(4096, 4096, DtypeKind::Bf16, true).unwrap();
        let (s, n) = size(FR_OP_BIAS_ACT_DROPOUT_BACKWARD, 4096, 4096, FR_BF16, 0);
        assert_eq!((s, n as usize), (FR_OK, want));
        let (s, n) = size(FR_OP_DROPOUT_ADD_NORM_BACKWARD, 4096, 768, FR_BF16, 0);
        assert_eq!((s, n), (FR_OK, 12 * 768 * 1024));
        // Cross-entropy: the library's scratch (3 f32 -> 16, count 8), then the loss at 32.
        let (s, n) = size(FR_OP_CROSS_ENTROPY, 3, 50_257, FR_F32, FR_REDUCTION_MEAN);
        assert_eq!((s, n), (FR_OK, 32 + 4));
        let (s, n) = size(FR_OP_CROSS_ENTROPY, 3, 50_257, FR_F32, FR_REDUCTION_NONE);
        assert_eq!((s, n), (FR_OK, 16 + 12));
        let (s, n) = size(FR_OP_CROSS_ENTROPY, 0, 50_257, FR_F32, FR_REDUCTION_NONE);
        assert_eq!((s, n), (FR_OK, 0));
    }

    #[test]
    fn bad_queries_are_status_codes() {
        assert_eq!(size(9, 4, 4, FR_F32, 0).0, FR_ERR_INVALID_ARGUMENT);
        assert_eq!(
            size(FR_OP_DROPOUT_BACKWARD, -1, 4, FR_F32, 0).0,
            FR_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            size(FR_OP_DROPOUT_BACKWARD, 4, 4, FR_U8, 0).0,
            FR_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            size(FR_OP_CROSS_ENTROPY, 4, 4, FR_F32, 7).0,
            FR_ERR_INVALID_ARGUMENT
        );
        let o = fr_options_default();
        // SAFETY: a null output pointer is refused before any write.
        let s =
            unsafe { fr_workspace_size(FR_OP_DROPOUT_BACKWARD, &o, FR_F32, std::ptr::null_mut()) };
        assert_eq!(s, FR_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn workspace_arguments_are_checked() {
        let mut buf = vec![0u128; 8]; // 16-byte aligned, 128 bytes
        let base = buf.as_mut_ptr() as *mut std::ffi::c_void;
        let t = |off: usize, len: i64, dtype| FrTensor {
            data: (base as usize + off) as *mut _,
            len,
            dtype,
        };
        assert!(arg("op", std::ptr::null(), 64).unwrap().is_none());
        assert!(arg("op", &t(0, 64, FR_U8), 64).unwrap().is_some());
        let e = arg("op", &t(0, 63, FR_U8), 64).unwrap_err();
        assert_eq!(e.status, FR_ERR_SHAPE);
        assert!(e.message.contains("63 bytes") && e.message.contains("fr_workspace_size"));
        let e = arg("op", &t(0, 64, FR_F32), 64).unwrap_err();
        assert_eq!(e.status, FR_ERR_INVALID_ARGUMENT);
        assert!(e.message.contains("uint8"), "{}", e.message);
        let e = arg("op", &t(8, 64, FR_U8), 64).unwrap_err();
        assert_eq!(e.status, FR_ERR_INVALID_ARGUMENT);
        assert!(e.message.contains("aligned"), "{}", e.message);
    }
}
