//! Where a call runs: the CPU reference, or a device's primary context and the caller's stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use fusedreg::cudarc::driver::{CudaContext, CudaStream};
use fusedreg::{Error, Handle};

use crate::{FfiError, FfiResult};

/// Where a call runs. `device < 0`: the CPU reference on host pointers, synchronously.
/// `device >= 0`: the kernels on that CUDA device's primary context (PyTorch's), launched on
/// `stream` (a `CUstream` / `cudaStream_t`; null is the legacy default stream), asynchronously.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FrExec {
    /// CUDA device ordinal, or -1 for the CPU.
    pub device: i32,
    /// The `CUstream` to launch on (ignored on the CPU).
    pub stream: *mut c_void,
}

impl FrExec {
    /// The handle of a GPU call, `None` for a CPU call.
    pub(crate) fn handle(&self) -> FfiResult<Option<Handle>> {
        if self.device < 0 {
            return Ok(None);
        }
        handle_for(self.device as usize, self.stream).map(Some)
    }
}

type Key = (usize, usize);

struct Cache {
    contexts: Vec<(usize, Arc<CudaContext>)>,
    handles: Vec<(Key, Handle)>,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    contexts: Vec::new(),
    handles: Vec::new(),
});

/// The cached handle of `(device, stream)`: the device's primary context (retained once for the
/// process) and a borrowed wrapper of the caller's stream (never destroyed by us). The kernels
/// are loaded once per context.
fn handle_for(device: usize, stream: *mut c_void) -> FfiResult<Handle> {
    let key = (device, stream as usize);
    // A panic while the lock is held cannot leave the lists half-updated (push is the only write).
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, h)) = cache.handles.iter().find(|(k, _)| *k == key) {
        return Ok(h.clone());
    }
    if !fusedreg::driver_present() {
        return Err(Error::NoDriver.into());
    }
    let found = fusedreg::device_count()?;
    if device >= found {
        return Err(Error::NoDevice {
            ordinal: device,
            found,
            detail: "ordinal out of range".into(),
        }
        .into());
    }
    let ctx = match cache.contexts.iter().find(|(d, _)| *d == device) {
        Some((_, c)) => c.clone(),
        None => {
            // cuDevicePrimaryCtxRetain: the context PyTorch and the CUDA runtime use.
            let c = CudaContext::new(device).map_err(|e| FfiError {
                status: crate::FR_ERR_CUDA,
                message: format!("cannot retain the primary context of device {device}: {e}"),
            })?;
            // SAFETY: every buffer we see is the caller's, used on the caller's stream; cudarc's
            // per-buffer event tracking would only add host work (and events) to each call.
            unsafe { c.disable_event_tracking() };
            cache.contexts.push((device, c.clone()));
            c
        }
    };
    // SAFETY: the caller owns the stream and keeps it alive while it launches work on it; the
    // wrapper does not destroy it.
    let s: Arc<CudaStream> = unsafe { ctx.wrap_borrowed_stream(stream as _) };
    let h = Handle::from_stream(s)?;
    cache.handles.push((key, h.clone()));
    Ok(h)
}
