//! Deterministic global gradient norm, clip coefficient and scale pass over a
//! [`TensorSet`](crate::multi_tensor::TensorSet).
//!
//! ```text
//! sumsq      = sum over every gradient element of x^2            (device f64 scalar)
//! norm       = sqrt(sumsq) / loss_scale                           (f32)
//! coef       = min(1, max_norm / (norm + 1e-6))                   (f32; 1 without clipping)
//! grad_scale = coef / loss_scale                                  (f32; what AdamW multiplies by)
//! nonfinite  = norm is NaN or infinite                            (u32 flag)
//! ```
//!
//! All five values are written to device memory ([`NormValues`]); nothing is read back unless
//! the caller asks ([`GlobalNorm::read`] blocks, [`GlobalNorm::copy_to_host_async`] does not), so
//! a training step never waits on the host. [`crate::adamw::AdamW`] reads `grad_scale` and
//! `nonfinite` from there: when the flag is set, the whole update is skipped on the device.
//!
//! # Stages and the data-parallel hook
//!
//! * A, [`GlobalNorm::partials`]: one launch over the set; every chunk writes its f32 sum of
//!   squares to device memory.
//! * B, [`GlobalNorm::reduce`]: one block sums the partials in f64 into `sumsq`
//!   ([`GlobalNorm::per_tensor`] gives per-tensor sums and norms from the same partials).
//! * C, [`GlobalNorm::finalize`]: `sumsq` -> norm, coef, grad_scale, flag.
//!
//! [`GlobalNorm::compute`] runs A and then B+C in one launch (2 launches in all). A
//! data-parallel or sharded caller runs A and B, all-reduces the f64 at
//! [`GlobalNorm::sumsq_device_ptr`] across ranks (e.g. `ncclAllReduce(.., 1, ncclFloat64,
//! ncclSum, ..)` on the handle's stream), then runs C.
//!
//! # Determinism: the exact order
//!
//! The order of every addition depends only on the chunk layout and two constants, never on the
//! grid, the SM count, the GPU model or pointer alignment, so the result is identical run after
//! run and GPU after GPU, and [`cpu`] reproduces it bit for bit:
//!
//! 1. Within a chunk of `len` elements, with `W = 16 / sizeof(grad)` (4 for f32, 8 for f16/bf16)
//!    and [`cpu::NORM_THREADS`] = 512: thread `t`, lane `j` accumulates in f32
//!    `acc[j] = fma(x, x, acc[j])` over `x = grad[(k * 512 + t) * W + j]` for `k = 0, 1, ...`
//!    (elements past `len` skipped); lanes fold pairwise (`acc[j] += acc[j + s]`,
//!    `s = W/2, ..., 1`); each warp folds its 32 thread sums by shuffle-down (offsets 16, 8, 4,
//!    2, 1), and the 16 warp sums fold the same way (8, 4, 2, 1). Misaligned gradients load the
//!    same elements one at a time instead of 16 bytes at a time: same arithmetic.
//! 2. The global sum: thread `i` of [`cpu::REDUCE_THREADS`] = 1024 adds partials `i, i + 1024,
//!    ...` in f64, then a tree `sh[i] += sh[i + s]` for `s = 512, ..., 1`.
//! 3. Per tensor: lane `l` of a warp adds the tensor's partials `l, l + 32, ...` in f64, then a
//!    shuffle-down fold (16, ..., 1).
//!
//! Squares are accumulated in f32 within a chunk (like PyTorch's f32 norms): a gradient element
//! above about 1.8e19 overflows to infinity and sets the non-finite flag. Per-tensor norms are
//! f32 for every gradient dtype (PyTorch rounds them to bf16 for bf16 gradients).
//!
//! # Scale pass
//!
//! [`GlobalNorm::scale_grads`] multiplies every gradient by `grad_scale` read from device memory
//! (the clip coefficient, divided by the loss scale if one is set), for callers who clip but use
//! their own optimizer. It writes nothing when the flag is set or when `grad_scale` is exactly 1.
//!
//! ```
//! use fusedreg::global_norm::cpu;
//! // CPU reference: the same partials, reduction and finalize as the kernels.
//! let a = vec![3.0f32; 10];
//! let b = vec![4.0f32; 10];
//! let v = cpu::global_norm(&[&a[..], &b[..]], Some(1.0), 1.0).unwrap();
//! assert_eq!(v.sumsq, 250.0);
//! assert!((v.norm - 250f32.sqrt()).abs() < 1e-5);
//! assert!((v.coef - 1.0 / 250f32.sqrt()).abs() < 1e-6);
//! assert_eq!(v.nonfinite, 0);
//! ```

use cudarc::driver::ValidAsZeroBits;

use crate::dtype::DtypeKind;
use crate::error::{Error, Result};
use crate::runtime::device_params;

pub mod cpu;
pub mod gpu;

pub use gpu::GlobalNorm;

device_params! {
    /// The norm's results as they lie in device memory (`NormResult` in `kernels/global_norm.cu`).
    ///
    /// ```
    /// use fusedreg::global_norm::cpu;
    /// // Gradients carrying a loss scale of 2 (true norm sqrt(500) / 2 = 11.18..), clipped to 1.
    /// let g = vec![6.0f32, 8.0, 12.0, 16.0];
    /// let v = cpu::global_norm(&[&g[..]], Some(1.0), 2.0).unwrap();
    /// assert_eq!(v.sumsq, 500.0);
    /// assert_eq!(v.norm, (500f64.sqrt() / 2.0) as f32);
    /// assert_eq!(v.coef, 1.0 / (v.norm + 1e-6));
    /// assert_eq!(v.grad_scale, v.coef / 2.0);
    /// assert_eq!(v.nonfinite, 0);
    /// ```
    #[derive(Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    pub struct NormValues(24) {
        /// Sum of squares of the (loss-scaled) gradients: the value to all-reduce across ranks.
        pub sumsq: f64,
        /// `sqrt(sumsq) / loss_scale` rounded to f32: the gradient norm.
        pub norm: f32,
        /// `min(1, max_norm / (norm + 1e-6))`, or 1 without clipping.
        pub coef: f32,
        /// `coef / loss_scale`: the factor the optimizer applies to the gradients.
        pub grad_scale: f32,
        /// 1 when `norm` is NaN or infinite (the step must be skipped), else 0.
        pub nonfinite: u32,
    }
}
// SAFETY: integers and floats only.
unsafe impl ValidAsZeroBits for NormValues {}

impl NormValues {
    /// False when the norm is NaN or infinite.
    ///
    /// ```
    /// use fusedreg::global_norm::cpu::finalize;
    /// assert!(finalize(4.0, Some(1.0), 1.0).is_finite());
    /// assert!(!finalize(f64::INFINITY, Some(1.0), 1.0).is_finite());
    /// ```
    pub fn is_finite(&self) -> bool {
        self.nonfinite == 0
    }
}

pub(crate) const OP: &str = "global_norm";

/// Checks a clipping threshold: finite and > 0 (`None` means no clipping).
///
/// ```
/// use fusedreg::global_norm::check_max_norm;
/// assert!(check_max_norm(Some(1.0)).is_ok());
/// assert!(check_max_norm(None).is_ok());
/// assert!(check_max_norm(Some(0.0)).unwrap_err().to_string().contains("max_norm"));
/// assert!(check_max_norm(Some(f32::INFINITY)).is_err());
/// ```
pub fn check_max_norm(max_norm: Option<f32>) -> Result<()> {
    match max_norm {
        Some(m) if !(m.is_finite() && m > 0.0) => Err(Error::invalid(
            OP,
            format!(
                "max_norm = {m} must be finite and > 0; pass None to compute the norm without \
                 clipping"
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a loss scale: finite and > 0.
///
/// ```
/// use fusedreg::global_norm::check_loss_scale;
/// assert!(check_loss_scale(65536.0).is_ok());
/// assert!(check_loss_scale(0.0).is_err());
/// assert!(check_loss_scale(f32::NAN).unwrap_err().to_string().contains("loss_scale"));
/// ```
pub fn check_loss_scale(scale: f32) -> Result<()> {
    if scale.is_finite() && scale > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            OP,
            format!("loss_scale = {scale} must be finite and > 0 (1 means no loss scaling)"),
        ))
    }
}

/// Minimal device-memory bytes of the global norm: every gradient read once
/// (2 B per element for f16/bf16, 4 B for f32). Saturates at `u64::MAX` (element counts near
/// 2^62 and above), never wraps.
///
/// ```
/// use fusedreg::{global_norm::norm_min_bytes, DtypeKind};
/// assert_eq!(norm_min_bytes(1000, DtypeKind::Bf16), 2000);
/// assert_eq!(norm_min_bytes(u64::MAX / 2, DtypeKind::F32), u64::MAX); // saturates
/// assert_eq!(norm_min_bytes(1000, DtypeKind::F32), 4000);
/// ```
pub fn norm_min_bytes(elements: u64, grad: DtypeKind) -> u64 {
    elements.saturating_mul(grad.size() as u64)
}

/// Minimal bytes of scaling the gradients in place (unfused clipping): read and write each
/// once (4 B per element for f16/bf16, 8 B for f32). Saturates at `u64::MAX`, never wraps.
///
/// ```
/// use fusedreg::{global_norm::scale_min_bytes, DtypeKind};
/// assert_eq!(scale_min_bytes(1000, DtypeKind::Bf16), 4000);
/// assert_eq!(scale_min_bytes(1 << 62, DtypeKind::Bf16), u64::MAX); // saturates
/// ```
pub fn scale_min_bytes(elements: u64, grad: DtypeKind) -> u64 {
    elements.saturating_mul(2 * grad.size() as u64)
}
