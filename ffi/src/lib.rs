//! # fusedreg's C ABI
//!
//! Every op's forward and backward over raw pointers, plus the AdamW optimizer as an opaque
//! object, for C, C++ and Python (`python/` loads this library through ctypes). The header
//! `ffi/include/fusedreg.h` is generated from this crate by cbindgen
//! (`cargo run -p fusedreg-ffi --features gen-header --bin gen-header`) and checked into the
//! repository; CI regenerates it and fails on any difference.
//!
//! ## Conventions
//!
//! * **Status codes.** Every function returns an [`FrStatus`] (`FR_OK` = 0). On failure,
//!   [`fr_last_error`] returns this thread's message (what was wrong and what to do) until the
//!   thread's next call. No panic crosses the boundary: a panic is caught and reported as
//!   `FR_ERR_PANIC` with its message.
//! * **Tensors** are [`FrTensor`] descriptors: a data pointer, an element count and a dtype. An
//!   optional tensor is a null `const FrTensor*`. Every tensor is contiguous (the caller makes it
//!   so); shapes come from the options (`rows`, `cols`).
//! * **Where it runs** is an [`FrExec`]: `device < 0` runs the CPU reference on host pointers
//!   (synchronously); `device >= 0` launches the kernels on that CUDA device's *primary context*
//!   (the one PyTorch and the CUDA runtime use) on the caller's `CUstream` (`stream`, null = the
//!   legacy default stream). GPU calls never wait for the device; pointers must be device
//!   pointers of that context.
//! * **Options** are one [`FrOptions`] struct for every op (each op reads the fields it needs);
//!   start from [`fr_options_default`].
//! * **Scratch.** Ops that need device scratch (column-sum partials, reduction buffers) take a
//!   last `workspace` argument: a `FR_U8` buffer of at least [`fr_workspace_size`] bytes,
//!   16-byte aligned, used as given (never grown or freed), so the caller's allocator owns all
//!   the call's device memory. Null keeps the library's own stream-ordered allocation
//!   (`cuMemAllocAsync` on the caller's stream, freed the same way after the kernels that use
//!   it): no host synchronisation either way.
//!
//! ## Safety
//!
//! Every function is `unsafe` in the C sense: pointers must be valid for the lengths given, host
//! pointers for CPU calls and device pointers for GPU calls, and outputs must not overlap inputs
//! except where a function says so.

#![warn(missing_docs)]
// The extern "C" functions take raw pointers by design; their contracts are in the docs above.
#![allow(clippy::missing_safety_doc)]
// A C entry point takes every buffer of its op as its own argument (the header is the contract).
#![allow(clippy::too_many_arguments)]

mod adamw;
mod exec;
mod ops;
mod options;
mod stochastic_depth;
mod tensor;
mod workspace;

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub use adamw::*;
pub use exec::FrExec;
pub use ops::*;
pub use options::*;
pub use stochastic_depth::*;
pub use tensor::*;
pub use workspace::*;

/// A status code: `FR_OK` (0) or one of the `FR_ERR_*` codes.
pub type FrStatus = i32;
/// Success.
pub const FR_OK: FrStatus = 0;
/// An argument is out of range or inconsistent (bad probability, dtype, null pointer, ...).
pub const FR_ERR_INVALID_ARGUMENT: FrStatus = 1;
/// A length disagrees with the shape in the options.
pub const FR_ERR_SHAPE: FrStatus = 2;
/// No CUDA driver (libcuda) could be loaded.
pub const FR_ERR_NO_DRIVER: FrStatus = 3;
/// No CUDA device with that ordinal.
pub const FR_ERR_NO_DEVICE: FrStatus = 4;
/// The library was built without its CUDA kernels (no nvcc at build time).
pub const FR_ERR_KERNELS_NOT_BUILT: FrStatus = 5;
/// The CUDA driver reported an error (launch, module load, allocation).
pub const FR_ERR_CUDA: FrStatus = 6;
/// A panic inside the library was caught at the boundary (a bug: please report the message).
pub const FR_ERR_PANIC: FrStatus = 7;
/// Host memory for the CPU reference's scratch or a decoded state could not be allocated.
pub const FR_ERR_HOST_ALLOC: FrStatus = 8;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error on its way to the boundary: a status and the message [`fr_last_error`] returns.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub status: FrStatus,
    pub message: String,
}

impl FfiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        FfiError {
            status: FR_ERR_INVALID_ARGUMENT,
            message: msg.into(),
        }
    }

    pub fn shape(msg: impl Into<String>) -> Self {
        FfiError {
            status: FR_ERR_SHAPE,
            message: msg.into(),
        }
    }
}

impl From<fusedreg::Error> for FfiError {
    fn from(e: fusedreg::Error) -> Self {
        use fusedreg::Error as E;
        let status = match &e {
            E::NoDriver => FR_ERR_NO_DRIVER,
            E::NoDevice { .. } => FR_ERR_NO_DEVICE,
            E::KernelsNotBuilt { .. } => FR_ERR_KERNELS_NOT_BUILT,
            E::ShapeMismatch { .. } => FR_ERR_SHAPE,
            E::InvalidArgument { .. } => FR_ERR_INVALID_ARGUMENT,
            E::HostAlloc { .. } => FR_ERR_HOST_ALLOC,
            _ => FR_ERR_CUDA,
        };
        FfiError {
            status,
            message: e.to_string(),
        }
    }
}

pub(crate) type FfiResult<T = ()> = Result<T, FfiError>;

fn set_last_error(msg: &str) {
    // Interior NULs would cut the C string short: show them instead.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` at the boundary: clears the thread's message, converts an error or a panic into a
/// status code and a message. Nothing unwinds into the caller.
pub(crate) fn boundary(f: impl FnOnce() -> FfiResult) -> FrStatus {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FR_OK,
        Ok(Err(e)) => {
            set_last_error(&e.message);
            e.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            set_last_error(&format!(
                "internal error (a panic in fusedreg, caught at the C boundary): {what}"
            ));
            FR_ERR_PANIC
        }
    }
}

/// This thread's message for the last failed call: what was wrong and what to do. An empty
/// string after a successful call. The pointer stays valid until the thread's next fusedreg call.
#[no_mangle]
pub extern "C" fn fr_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The ABI version: bumped on every incompatible change of a struct or a signature. Python
/// checks it against the version it was written for. 2: `fr_dropout_add_norm_forward` takes a
/// Block Influence site (`stats`). 3: so does `fr_dropout_forward` (its last argument). 4: the
/// ops with device scratch take a caller-supplied `workspace` (their last argument; see
/// [`fr_workspace_size`]), and the `FR_U8` dtype.
pub const FR_ABI_VERSION: u32 = 4;

/// [`FR_ABI_VERSION`] of the loaded library.
#[no_mangle]
pub extern "C" fn fr_abi_version() -> u32 {
    FR_ABI_VERSION
}

/// 1 when the library holds its CUDA kernels (built with nvcc), 0 otherwise.
#[no_mangle]
pub extern "C" fn fr_kernels_built() -> i32 {
    i32::from(fusedreg::kernels_built())
}

/// 1 when libcuda can be loaded, 0 otherwise (never fails, never initialises CUDA).
#[no_mangle]
pub extern "C" fn fr_driver_present() -> i32 {
    i32::from(fusedreg::driver_present())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: fr_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(fr_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn errors_and_panics_become_status_codes() {
        assert_eq!(boundary(|| Ok(())), FR_OK);
        assert_eq!(last(), "");
        assert_eq!(
            boundary(|| Err(FfiError::invalid("p = 2 must lie in [0, 1]"))),
            FR_ERR_INVALID_ARGUMENT
        );
        assert_eq!(last(), "p = 2 must lie in [0, 1]");
        let s = boundary(|| panic!("boom"));
        assert_eq!(s, FR_ERR_PANIC);
        assert!(last().contains("boom"), "{}", last());
        assert_eq!(boundary(|| Ok(())), FR_OK);
        assert_eq!(last(), "", "a successful call clears the message");
    }
}
