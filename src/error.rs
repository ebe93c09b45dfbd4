//! The crate's error type. Every message says what went wrong and what to do about it.

use cudarc::driver::DriverError;

/// Result alias used throughout the crate.
///
/// # Examples
///
/// ```
/// use fusedreg::{Error, Result};
/// fn checked_p(p: f64) -> Result<f64> {
///     if (0.0..=1.0).contains(&p) { Ok(p) } else { Err(Error::invalid("demo", format!("p = {p}"))) }
/// }
/// assert_eq!(checked_p(0.1).unwrap(), 0.1);
/// assert!(checked_p(1.5).is_err());
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in fusedreg. Bad input to an op (lengths, shapes, sizes,
/// probabilities, hyperparameters, alignment, buffers from another context) is reported here,
/// never by a panic. Plain accessors that take an index (`Layout::chunks`, a state view's
/// `m(i)`) panic on an out-of-range index, as slice indexing does, and say so in their docs.
///
/// # Examples
///
/// ```
/// use fusedreg::Error;
/// let e = Error::invalid("dropout", "p = 1.5 is outside [0, 1]");
/// assert!(e.to_string().contains("p = 1.5"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `libcuda` could not be loaded.
    #[error(
        "no CUDA driver: libcuda.so could not be loaded. Install an NVIDIA driver (>= 580 for \
         CUDA 13.0) or use the CPU reference implementations (the `cpu` module of each op)"
    )]
    NoDriver,

    /// The driver is present but the requested device is not.
    #[error("no CUDA device with ordinal {ordinal}: {found} device(s) visible ({detail}). Check CUDA_VISIBLE_DEVICES and `nvidia-smi`, or use the CPU references")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        found: usize,
        /// The driver's own words.
        detail: String,
    },

    /// The crate was built without nvcc, so no kernels are embedded.
    #[error(
        "fusedreg was built without its CUDA kernels ({reason}). Run scripts/install-cuda.sh \
         or point NVCC / CUDA_HOME at a CUDA 13 toolkit, then rebuild (FUSEDREG_REQUIRE_KERNELS=1 \
         makes a missing compiler a build error)"
    )]
    KernelsNotBuilt {
        /// Why the build script could not build them.
        reason: &'static str,
    },

    /// The embedded module or a kernel in it could not be loaded into the context.
    #[error("loading kernel `{symbol}` from module `{module}` failed: {source}. The embedded fatbin holds code for sm_{archs} and PTX for the newest; a driver older than the toolkit (CUDA 13.0, driver >= 580) cannot load it")]
    ModuleLoad {
        /// The module (kernel file stem).
        module: &'static str,
        /// The kernel symbol.
        symbol: &'static str,
        /// Arch list the module was built for.
        archs: String,
        /// The driver's error.
        source: DriverError,
    },

    /// Buffer lengths or shapes do not agree.
    #[error("{op}: shape mismatch: {detail}")]
    ShapeMismatch {
        /// The operation that refused the input.
        op: &'static str,
        /// Which lengths disagree.
        detail: String,
    },

    /// A scalar argument is out of range, non-finite, or otherwise unusable.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument {
        /// The operation that refused the input.
        op: &'static str,
        /// What is wrong and what is allowed.
        detail: String,
    },

    /// Host memory for a buffer could not be allocated: the sizes were valid, but the machine
    /// would not give that much memory (CPU references' scratch space, decoded state).
    #[error(
        "{op}: cannot allocate {bytes} bytes of host memory for {what}; split the work into \
         smaller tensors or free memory"
    )]
    HostAlloc {
        /// The operation that needed the memory.
        op: &'static str,
        /// What the memory was for.
        what: &'static str,
        /// How many bytes were asked for (saturated at `u64::MAX`).
        bytes: u64,
    },

    /// A CUDA driver call failed.
    #[error("{op}: CUDA driver error: {source}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        source: DriverError,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`] for `op`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Error;
    /// let e = Error::invalid("adamw", "lr = NaN is not finite");
    /// assert!(matches!(e, Error::InvalidArgument { op: "adamw", .. }));
    /// assert_eq!(e.to_string(), "adamw: invalid argument: lr = NaN is not finite");
    /// ```
    pub fn invalid(op: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            detail: detail.into(),
        }
    }

    /// An [`Error::ShapeMismatch`] for `op`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::Error;
    /// let e = Error::shape("global_norm", format!("grad 3 has {} elements, expected {}", 10, 12));
    /// assert!(matches!(e, Error::ShapeMismatch { op: "global_norm", .. }));
    /// assert!(e.to_string().starts_with("global_norm: shape mismatch: grad 3"));
    /// ```
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::ShapeMismatch {
            op,
            detail: detail.into(),
        }
    }

    /// Wraps a driver error raised while doing `op`.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg::cudarc::driver::{sys::CUresult, DriverError};
    /// use fusedreg::Error;
    /// // Typically `.map_err(Error::driver("cuStreamSynchronize"))` on a cudarc call.
    /// let failed: Result<(), DriverError> = Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
    /// let e = failed.map_err(Error::driver("cuMemAlloc")).unwrap_err();
    /// assert!(matches!(e, Error::Driver { op: "cuMemAlloc", .. }));
    /// ```
    pub fn driver(op: &'static str) -> impl FnOnce(DriverError) -> Self {
        move |source| Error::Driver { op, source }
    }
}

/// A vector of `n` copies of `value`, or [`Error::HostAlloc`] when the machine cannot give the
/// memory (instead of the abort of `vec![value; n]`): for scratch space sized by a config.
pub(crate) fn try_vec<T: Clone>(
    op: &'static str,
    what: &'static str,
    n: usize,
    value: T,
) -> Result<Vec<T>> {
    let mut v = Vec::new();
    match v.try_reserve_exact(n) {
        Ok(()) => {
            v.resize(n, value);
            Ok(v)
        }
        Err(_) => Err(Error::HostAlloc {
            op,
            what,
            bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
        }),
    }
}

/// Checks that `len` equals `expected`, naming both buffers in the error. (Public for the
/// workspace's tools crate, not part of the API.)
#[doc(hidden)]
pub fn check_len(op: &'static str, what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} has {len} elements, expected {expected}"),
        ))
    }
}

/// Checks that a scalar is finite (not NaN or infinite).
#[allow(dead_code)] // until the first op with scalar hyperparameters lands
pub(crate) fn check_finite(op: &'static str, what: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(op, format!("{what} = {v} is not finite")))
    }
}
