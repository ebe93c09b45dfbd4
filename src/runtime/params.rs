//! Kernel parameter blocks: the one way the host declares the by-value struct a kernel takes.

/// Declares kernel parameter blocks: each a `#[repr(C)]`, `Clone + Copy` struct whose fields
/// mirror the kernel's struct in order, its size asserted at compile time (the kernel
/// `static_assert`s the same number), and its [`cudarc::driver::DeviceRepr`] impl.
///
/// ```ignore
/// device_params! {
///     /// Mirrors `ScaleParams` in the kernel.
///     #[derive(Debug, Default)]
///     struct ScaleParams(24) {
///         x: u64,
///         n: u64,
///         scale: f32,
///         vec: u32,
///     }
/// }
/// ```
macro_rules! device_params {
    ($(
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($size:literal) {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    )+) => {$(
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty ),*
        }
        const _: () = assert!(::std::mem::size_of::<$name>() == $size);
        // SAFETY: `#[repr(C)]` plain old data (integers, floats, device addresses as u64), laid
        // out as the kernel's struct, whose size is asserted on both sides: the kernel reads
        // exactly these bytes, and no field is a host reference.
        unsafe impl ::cudarc::driver::DeviceRepr for $name {}
    )+};
}
pub(crate) use device_params;
