//! The `exp` and `ln` of the pinned arithmetic. The kernel uses the same functions
//! (`fr_exp`, `fr_log` of `kernels/common/fmath.cuh`, mirrored by `crate::fmath`), so the CPU
//! reference and the kernel agree bit for bit.

/// `e^x` in f32, the kernel's `fr_exp`.
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    x.exp()
}

/// `ln x` in f32, the kernel's `fr_log`.
#[inline]
pub(crate) fn ln(x: f32) -> f32 {
    x.ln()
}
