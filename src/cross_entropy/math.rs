//! The `exp` and `ln` of the pinned arithmetic: [`crate::fmath`], bit-exact with `fr_exp` and
//! `fr_log` of `kernels/common/fmath.cuh`, which the kernel uses, so the CPU reference and the
//! kernel agree bit for bit.

pub(crate) use crate::fmath::{exp, ln};
