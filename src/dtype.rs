//! The element types the kernels are instantiated for: `f32`, [`half::f16`] and [`half::bf16`].
//!
//! [`Dtype`] is sealed: the kernels exist for exactly these three types, so using any other type
//! with a GPU entry point is a compile error, not a missing-symbol error at run time.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Which of the three element types a [`Dtype`] is.
///
/// # Examples
///
/// ```
/// use fusedreg::{Dtype, DtypeKind};
/// fn kind_of<T: Dtype>(_: &[T]) -> DtypeKind {
///     T::KIND
/// }
/// assert_eq!(kind_of(&[half::f16::ZERO]), DtypeKind::F16);
/// assert_eq!(kind_of(&[0.0f32]), DtypeKind::F32);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DtypeKind {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DtypeKind {
    /// Lower-case name, also the kernel symbol suffix (`f32`, `f16`, `bf16`).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::DtypeKind;
    /// assert_eq!(DtypeKind::Bf16.name(), "bf16");
    /// assert_eq!(format!("dropout_fwd_vec_{}", DtypeKind::F32.name()), "dropout_fwd_vec_f32");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            DtypeKind::F32 => "f32",
            DtypeKind::F16 => "f16",
            DtypeKind::Bf16 => "bf16",
        }
    }

    /// Size of one element in bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::{Dtype, DtypeKind};
    /// assert_eq!(DtypeKind::F32.size(), 4);
    /// assert_eq!(<half::bf16 as Dtype>::KIND.size(), std::mem::size_of::<half::bf16>());
    /// ```
    pub const fn size(self) -> usize {
        match self {
            DtypeKind::F32 => 4,
            DtypeKind::F16 | DtypeKind::Bf16 => 2,
        }
    }
}

/// An element type with kernels: `f32`, `half::f16` or `half::bf16`.
///
/// Conversions round to nearest even, exactly as the device intrinsics `__float2half_rn` and
/// `__float2bfloat16_rn` do, so CPU references and kernels produce identical bits.
///
/// # Examples
///
/// ```
/// use fusedreg::Dtype;
/// use half::bf16;
/// assert_eq!(<bf16 as Dtype>::KIND.name(), "bf16");
/// assert_eq!(bf16::from_f32_rn(1.0).to_f32(), 1.0);
/// ```
pub trait Dtype:
    sealed::Sealed
    + DeviceRepr
    + ValidAsZeroBits
    + bytemuck::Pod
    + Default
    + PartialEq
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Which type this is.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::{Dtype, DtypeKind};
    /// assert_eq!(f32::KIND, DtypeKind::F32);
    /// assert_eq!(<half::f16 as Dtype>::KIND.name(), "f16");
    /// ```
    const KIND: DtypeKind;
    /// Widens to f32 (exact).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Dtype;
    /// let x = half::bf16::from_f32_rn(0.1);
    /// assert_eq!(Dtype::to_f32(x), 0.10009765625); // the bf16 nearest to 0.1, exactly
    /// assert_eq!(Dtype::to_f32(2.5f32), 2.5);
    /// ```
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type, to nearest even.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Dtype;
    /// use half::f16;
    /// // 1 + 2^-11 lies halfway between the f16 values 1 and 1 + 2^-10: the tie goes to even.
    /// assert_eq!(f16::from_f32_rn(1.0 + 2f32.powi(-11)).to_f32(), 1.0);
    /// assert_eq!(f16::from_f32_rn(65520.0), f16::INFINITY); // past f16::MAX
    /// ```
    fn from_f32_rn(x: f32) -> Self;
}

impl Dtype for f32 {
    const KIND: DtypeKind = DtypeKind::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32_rn(x: f32) -> Self {
        x
    }
}

/// The 16-bit types: `half`'s own conversions (`from_f32` rounds to nearest even).
macro_rules! half_dtype {
    ($t:ident, $kind:ident) => {
        impl Dtype for $t {
            const KIND: DtypeKind = DtypeKind::$kind;
            #[inline]
            fn to_f32(self) -> f32 {
                $t::to_f32(self)
            }
            #[inline]
            fn from_f32_rn(x: f32) -> Self {
                $t::from_f32(x)
            }
        }
    };
}
half_dtype!(f16, F16);
half_dtype!(bf16, Bf16);

/// One value per dtype, chosen at compile time by [`PerDtype::get`]: used for kernel families
/// (`dropout_fwd_vec_f32` / `_f16` / `_bf16`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PerDtype<T> {
    pub f32: T,
    pub f16: T,
    pub bf16: T,
}

impl<T: Copy> PerDtype<T> {
    /// The entry for `D`.
    #[inline]
    pub(crate) fn get<D: Dtype>(&self) -> T {
        match D::KIND {
            DtypeKind::F32 => self.f32,
            DtypeKind::F16 => self.f16,
            DtypeKind::Bf16 => self.bf16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values; ties go to the even mantissa.
        let halfway = 1.0f32 + 2f32.powi(-8);
        assert_eq!(
            bf16::from_f32_rn(halfway).to_bits(),
            bf16::from_f32(1.0).to_bits()
        );
        let above = f32::from_bits(halfway.to_bits() + 1);
        assert_eq!(bf16::from_f32_rn(above).to_f32(), 1.0 + 2f32.powi(-7));
        // f16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
        assert_eq!(f16::from_f32_rn(1.0 + 2f32.powi(-11)).to_f32(), 1.0);
        assert!(f16::from_f32_rn(f32::NAN).to_f32().is_nan());
        assert!(bf16::from_f32_rn(f32::NAN).to_f32().is_nan());
    }
}
