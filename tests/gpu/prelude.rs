//! What every GPU test file uses (`use crate::prelude::*;`): the result types, the trial list
//! builder, seeded data and bit-for-bit comparisons (from `tests/common`), and device buffers.
//!
//! Test bodies and helpers return [`TestResult`]: `?` works on every error (driver, fusedreg,
//! candle, a comparison's message), so a body says only what it checks.
//!
//! Two kinds of device buffers:
//! * [`upload`] / [`download`]: a view with sentinels around it (a misaligned view, element offset
//!   1, is tested and an out-of-bounds write is caught), for the elementwise ops;
//! * [`to_device`] / [`to_host`]: whole buffers, for the multi-tensor engine, which registers
//!   zero-size tensors without memory.
#![allow(dead_code, unused_imports)] // every test binary uses a different part

use std::sync::Arc;

use rand::rngs::StdRng;

pub use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
pub use fusedreg::{Dtype, Handle};
pub use libtest_mimic::Trial;

pub use crate::common::{bits_eq, close, rng, to_f32, uniform};
pub use crate::harness::{empty_pinned, gpu_trial, trials_of, TestResult};

/// Where a dropping op's row scale comes from in a test case.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rs {
    None,
    /// Caller-supplied, with some rows 0 (each test file picks which).
    Given,
    /// A generated drop path, one draw per row.
    Path,
    /// A generated drop path, one draw per sample of several rows.
    PerSample,
}

impl Rs {
    /// The drop path this source generates (`Path`: p 0.25, a draw per row; `PerSample`: p 0.5,
    /// a draw per `rows_per_sample` rows), or none.
    pub fn drop_path(self, rows_per_sample: usize) -> Option<fusedreg::dropping::DropPath> {
        use fusedreg::dropping::DropPath;
        match self {
            Rs::Path => Some(DropPath::new(0.25, 77).unwrap()),
            Rs::PerSample => Some(
                DropPath::new(0.5, 78)
                    .unwrap()
                    .per_sample(rows_per_sample)
                    .unwrap(),
            ),
            Rs::None | Rs::Given => None,
        }
    }

    /// For `Given` only, a row scale of `rows` drawn from `g` in [0.5, 2), with every
    /// `zero_every`-th row (from row 0) set to 0.
    pub fn given(self, g: &mut StdRng, rows: usize, zero_every: usize) -> Option<Vec<f32>> {
        (self == Rs::Given).then(|| {
            let mut v = uniform::<f32>(g, rows, 0.5, 2.0);
            v.iter_mut().step_by(zero_every).for_each(|s| *s = 0.0);
            v
        })
    }
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
) -> TestResult<CudaSlice<T>> {
    let mut v = vec![sentinel; off];
    v.extend_from_slice(data);
    v.push(sentinel);
    Ok(s.clone_htod(&v)?)
}

/// Reads back the view `off .. off + n` of a buffer made by [`upload`] and checks, byte for
/// byte, that the sentinels around it are untouched.
pub fn download<T: DeviceRepr + bytemuck::Pod>(
    s: &Arc<CudaStream>,
    buf: &CudaSlice<T>,
    off: usize,
    sentinel: T,
    what: &str,
) -> TestResult<Vec<T>> {
    let all = s.clone_dtoh(buf)?;
    let n = all.len() - off - 1;
    for (i, v) in all[..off].iter().chain(&all[off + n..]).enumerate() {
        if bytemuck::bytes_of(v) != bytemuck::bytes_of(&sentinel) {
            return Err(format!("{what}: sentinel {i} around the view was overwritten").into());
        }
    }
    Ok(all[off..off + n].to_vec())
}

/// Uploads `v` whole. Never empty: zero-byte allocations are not portable (register zero-size
/// tensors with `push_empty` / `push_grad_empty`).
pub fn to_device<T: DeviceRepr + Clone>(h: &Handle, v: &[T]) -> TestResult<CudaSlice<T>> {
    if v.is_empty() {
        return Err("upload of an empty vector: use push_empty".into());
    }
    Ok(h.stream().clone_htod(v)?)
}

/// Downloads a whole buffer (nothing to copy for an empty one).
pub fn to_host<T: DeviceRepr + Clone + Default>(
    h: &Handle,
    v: &impl DevicePtr<T>,
) -> TestResult<Vec<T>> {
    if v.len() == 0 {
        Ok(Vec::new())
    } else {
        Ok(h.stream().clone_dtoh(v)?)
    }
}

/// `Ok` when `h` launched `want` kernels since its launch count was `before`.
pub fn launches(h: &Handle, before: u64, want: u64, what: &str) -> TestResult {
    let got = h.launch_count() - before;
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: {got} launches, expected {want}").into())
    }
}

/// `Ok` when `r` is an argument or shape error (bad input refused with an error, not a panic or
/// another kind of failure).
pub fn refused<T>(what: &str, r: fusedreg::Result<T>) -> TestResult {
    use fusedreg::Error;
    match r {
        Err(Error::InvalidArgument { .. } | Error::ShapeMismatch { .. }) => Ok(()),
        Err(other) => Err(format!("{what}: expected a shape/argument error, got {other}").into()),
        Ok(_) => Err(format!("{what}: accepted").into()),
    }
}
