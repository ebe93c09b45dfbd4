//! [`DeviceScalar`]: one value in device memory that kernels read at run time (a learning rate,
//! a loss scale), so the host never synchronises to pass it and a captured CUDA graph sees every
//! new value.

use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};

use super::Handle;
use crate::error::{Error, Result};

/// One `T` in device memory, owned, with a stable address for the lifetime of the value.
///
/// [`DeviceScalar::set`] enqueues a `size_of::<T>()`-byte copy on the handle's stream (stream
/// ordered, no host synchronisation); a kernel of your own may also write it at
/// [`DeviceScalar::device_ptr`]. Used by [`crate::adamw::AdamW`] (the learning rate) and
/// [`crate::global_norm::GlobalNorm`] (the loss scale).
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::DeviceScalar;
/// let h = fusedreg::Handle::new(0)?;
/// let mut lr = DeviceScalar::new(&h, "example", 1e-3f32)?;
/// lr.set(5e-4)?; // an asynchronous 4-byte copy
/// assert_eq!(lr.read()?, 5e-4); // synchronises
/// println!("kernels read it at {:#x}", lr.device_ptr());
/// # Ok(()) }
/// ```
pub struct DeviceScalar<T: DeviceRepr> {
    handle: Handle,
    op: &'static str,
    buf: CudaSlice<T>,
    ptr: u64,
}

impl<T: DeviceRepr> std::fmt::Debug for DeviceScalar<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceScalar")
            .field("op", &self.op)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .finish()
    }
}

impl<T: DeviceRepr + Copy + Default> DeviceScalar<T> {
    /// Allocates the scalar and enqueues the copy of `value`. `op` names the owner in errors.
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let scale = fusedreg::DeviceScalar::new(&h, "my_op", 1.0f32)?;
    /// # drop(scale);
    /// # Ok(()) }
    /// ```
    pub fn new(handle: &Handle, op: &'static str, value: T) -> Result<Self> {
        let buf = handle
            .stream()
            .clone_htod(&[value])
            .map_err(Error::driver(op))?;
        let ptr = {
            let (p, _g) = buf.device_ptr(handle.stream());
            p
        };
        Ok(DeviceScalar {
            handle: handle.clone(),
            op,
            buf,
            ptr,
        })
    }

    /// Enqueues the copy of a new value (stream ordered: launches enqueued before it read the
    /// old value, later ones the new).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let mut s = fusedreg::DeviceScalar::new(&h, "my_op", 1.0f32)?;
    /// s.set(0.5)?;
    /// # Ok(()) }
    /// ```
    pub fn set(&mut self, value: T) -> Result<()> {
        self.handle
            .stream()
            .memcpy_htod(&[value], &mut self.buf)
            .map_err(Error::driver(self.op))
    }

    /// Reads the value back (synchronises the stream).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = fusedreg::DeviceScalar::new(&h, "my_op", 7u32)?;
    /// assert_eq!(s.read()?, 7);
    /// # Ok(()) }
    /// ```
    pub fn read(&self) -> Result<T> {
        let v = self.handle.to_host(self.op, &self.buf)?;
        Ok(v.first().copied().unwrap_or_default())
    }

    /// The device address kernels read (stable for the scalar's lifetime).
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let s = fusedreg::DeviceScalar::new(&h, "my_op", 1.0f32)?;
    /// assert_ne!(s.device_ptr(), 0);
    /// # Ok(()) }
    /// ```
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}
