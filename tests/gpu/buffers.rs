//! Device buffers for the op tests: uploads with sentinels around a view (so a misaligned
//! view, element offset 1, is tested and an out-of-bounds write is caught), downloads that check
//! those sentinels, and the poison value outputs start from.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use fusedreg::Dtype;

/// A test result: `Err` names what differs (indices, values).
pub type R<T> = Result<T, String>;

/// Any displayable error as a test failure message.
pub fn e2s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// NaN in `T`: what every output starts as, so an element the kernel never writes shows.
pub fn poison<T: Dtype>() -> T {
    T::from_f32_rn(f32::NAN)
}

/// A device buffer `[sentinel; off] ++ data ++ [sentinel]`.
pub fn upload<T: DeviceRepr + Copy>(
    s: &Arc<CudaStream>,
    data: &[T],
    off: usize,
    sentinel: T,
) -> R<CudaSlice<T>> {
    let mut v = vec![sentinel; off];
    v.extend_from_slice(data);
    v.push(sentinel);
    s.clone_htod(&v).map_err(e2s)
}

/// Reads back the view `off .. off + n` of a buffer made by [`upload`] and checks, byte for
/// byte, that the sentinels around it are untouched.
pub fn download<T: DeviceRepr + bytemuck::Pod>(
    s: &Arc<CudaStream>,
    buf: &CudaSlice<T>,
    off: usize,
    sentinel: T,
    what: &str,
) -> R<Vec<T>> {
    let all = s.clone_dtoh(buf).map_err(e2s)?;
    let n = all.len() - off - 1;
    for (i, v) in all[..off].iter().chain(&all[off + n..]).enumerate() {
        if bytemuck::bytes_of(v) != bytemuck::bytes_of(&sentinel) {
            return Err(format!(
                "{what}: sentinel {i} around the view was overwritten"
            ));
        }
    }
    Ok(all[off..off + n].to_vec())
}
