//! Transitional: the `Result<_, String>` helpers that `tests/gpu/dropout.rs` and
//! `tests/gpu/dropout_residual.rs` still use. Those two files are being merged into one written
//! against [`crate::prelude`]; delete this module (and its `mod` line) when that lands. Every
//! other file uses the prelude.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};

pub use crate::prelude::poison;

/// A test result whose error is a message.
pub type R<T> = Result<T, String>;

/// Any displayable error as a test failure message.
pub fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// [`crate::prelude::upload`] with a message error.
pub fn upload<T: DeviceRepr + Copy>(
    s: &Arc<CudaStream>,
    data: &[T],
    off: usize,
    sentinel: T,
) -> R<CudaSlice<T>> {
    crate::prelude::upload(s, data, off, sentinel).map_err(e2s)
}

/// [`crate::prelude::download`] with a message error.
pub fn download<T: DeviceRepr + bytemuck::Pod>(
    s: &Arc<CudaStream>,
    buf: &CudaSlice<T>,
    off: usize,
    sentinel: T,
    what: &str,
) -> R<Vec<T>> {
    crate::prelude::download(s, buf, off, sentinel, what).map_err(e2s)
}
