//! What the C ABI test files share: the CPU executor, a tensor descriptor over a Rust buffer,
//! varied input data.

use fusedreg_ffi::{FrDtype, FrExec, FrTensor};

/// Runs an op on the CPU (its reference path).
pub const CPU: FrExec = FrExec {
    device: -1,
    stream: std::ptr::null_mut(),
};

/// A descriptor of `v` (the buffer must outlive the call it is passed to).
pub fn t<T>(v: &mut [T], dtype: FrDtype) -> FrTensor {
    FrTensor {
        data: v.as_mut_ptr().cast(),
        len: v.len() as i64,
        dtype,
    }
}

/// Varied data in [-2, 2) from a small deterministic generator (never a constant fill; it only
/// has to be varied, not Gaussian).
pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}
