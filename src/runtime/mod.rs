//! The GPU handle: a CUDA context and stream, the embedded kernels loaded once per context, and a
//! launch counter.

pub(crate) mod kernels;
pub(crate) mod modules;
mod params;
mod scalar;
pub(crate) mod workspace_view;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, SyncOnDrop,
};

use self::kernels::Kernel;
pub use self::modules::{compiled_archs, kernels_built, nvcc_version};
use self::modules::{Loaded, LIBRARY};
pub(crate) use self::params::device_params;
pub use self::scalar::DeviceScalar;
pub use self::workspace_view::WorkspaceView;
use crate::error::{Error, Result};

/// True when libcuda can be loaded. Probed once: `CudaContext::new` panics without it.
///
/// The probe is our own (a `dlopen` of the names cudarc tries), not cudarc's: cudarc offers its
/// probe only when it loads the driver dynamically, and whether it does is the application's
/// choice (see the crate's `dynamic-loading` / `dynamic-linking` features). When cudarc links
/// libcuda, the library is already loaded and the probe finds it.
///
/// # Examples
///
/// ```
/// // Without a driver every GPU entry point reports it as an error instead of panicking.
/// if !fusedreg::driver_present() {
///     assert!(matches!(fusedreg::device_count(), Err(fusedreg::Error::NoDriver)));
///     assert!(matches!(fusedreg::Handle::new(0), Err(fusedreg::Error::NoDriver)));
/// }
/// ```
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| lib_present("cuda") || lib_present("nvcuda"))
}

/// Whether a CUDA library (`"cuda"`, `"cublas"`, ...) can be loaded under one of the names cudarc
/// 0.19 tries for CUDA 13 (its `get_lib_name_candidates`, which exists only in its
/// dynamic-loading mode, so it is mirrored here).
pub(crate) fn lib_present(lib: &str) -> bool {
    use std::env::consts::{DLL_PREFIX as P, DLL_SUFFIX as S};
    let w = if cfg!(target_pointer_width = "32") {
        "32"
    } else {
        "64"
    };
    let (major, minor) = (13, 0);
    let names = [
        format!("{P}{lib}{S}"),
        format!("{P}{lib}{w}{S}"),
        format!("{P}{lib}{w}_{major}{S}"),
        format!("{P}{lib}{w}_{major}{minor}{S}"),
        format!("{P}{lib}{w}_{major}{minor}_0{S}"),
        format!("{P}{lib}{w}_{major}0_{minor}{S}"),
        format!("{P}{lib}{w}_10{S}"),
        format!("{P}{lib}{w}_11{S}"),
        format!("{P}{lib}{w}_12{S}"),
        format!("{P}{lib}{w}_{major}0_0{S}"),
        format!("{P}{lib}{w}_9{S}"),
        format!("{P}{lib}{S}.{major}"),
        format!("{P}{lib}{S}.12"),
        format!("{P}{lib}{S}.11"),
        format!("{P}{lib}{S}.10"),
        format!("{P}{lib}{S}.9"),
        format!("{P}{lib}{S}.1"),
    ];
    names.iter().any(|name| {
        // SAFETY: loading a CUDA library runs only its own initialisers; the handle is dropped
        // (dlclose) at once, and a library already loaded stays loaded.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Number of CUDA devices visible to this process.
///
/// # Examples
///
/// ```
/// // Works on any machine: without a driver it is an error, not a panic.
/// match fusedreg::device_count() {
///     Ok(n) => println!("{n} CUDA device(s)"),
///     Err(e) => println!("no GPU: {e}"),
/// }
/// ```
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    result::init().map_err(Error::driver("cuInit"))?;
    let n = result::device::get_count().map_err(Error::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// What the benchmarks and the test report print about a device.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let h = fusedreg::Handle::new(0)?;
/// let info: fusedreg::DeviceInfo = h.device_info()?;
/// let (major, minor) = info.compute_capability;
/// println!("{}: sm_{major}{minor}, {} SMs", info.name, info.sm_count);
/// assert_eq!(info.ordinal, 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors.
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: u64,
    /// Global memory in bytes.
    pub total_memory: u64,
    /// Driver version as reported by `cuDriverGetVersion` (e.g. 13000 for CUDA 13.0).
    pub driver_version: i32,
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    loaded: Arc<Loaded>,
    launches: AtomicU64,
}

/// A CUDA context and stream on which fusedreg launches its kernels.
///
/// Create one per device with [`Handle::new`], or wrap the stream a framework already uses with
/// [`Handle::from_stream`] so our kernels are ordered with its work. The embedded kernel module
/// is loaded once per context (shared by every handle on it) and functions are cached. Cloning is
/// cheap and clones share the launch counter.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// let handle = fusedreg::Handle::new(0)?;
/// println!("{}", handle.device_info()?.name);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("ordinal", &self.inner.ctx.ordinal())
            .field("launches", &self.launch_count())
            .finish()
    }
}

impl Handle {
    /// Opens device `ordinal` (its primary context) with a new non-blocking stream.
    ///
    /// cudarc's per-buffer event tracking is turned off on the context object this creates: all
    /// work submitted through the handle is ordered by its one stream, and tracking would add
    /// host work to every launch. Buffers allocated on [`Handle::stream`] are safe to use; if you
    /// use them on other streams too, order that work yourself.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] when the ordinal does not
    /// exist, [`Error::KernelsNotBuilt`] when the crate was built without nvcc.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// assert_eq!(h.launch_count(), 0);
    /// // An ordinal past the last device is an error, not a panic.
    /// assert!(matches!(fusedreg::Handle::new(1000), Err(fusedreg::Error::NoDevice { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(ordinal: usize) -> Result<Self> {
        let found = device_count()?;
        if ordinal >= found {
            return Err(Error::NoDevice {
                ordinal,
                found,
                detail: "ordinal out of range".into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice {
            ordinal,
            found,
            detail: e.to_string(),
        })?;
        // SAFETY: this context object is private to the handle until `context()` hands it out,
        // and every launch goes through the handle's single stream (see the docs above).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(Error::driver("cuStreamCreate"))?;
        Self::from_stream(stream)
    }

    /// Uses a stream owned by the caller (a framework's current stream, for example): every
    /// kernel is launched on it, so it is ordered with the caller's own work.
    ///
    /// To wrap a raw `CUstream`, use `CudaContext::wrap_borrowed_stream` first.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::cudarc::driver::CudaContext;
    /// use fusedreg::Error;
    /// // The framework's context and stream:
    /// let ctx = CudaContext::new(0).map_err(Error::driver("cuCtxCreate"))?;
    /// let stream = ctx.new_stream().map_err(Error::driver("cuStreamCreate"))?;
    /// let h = fusedreg::Handle::from_stream(stream.clone())?;
    /// assert!(std::sync::Arc::ptr_eq(h.stream(), &stream)); // our kernels run on it
    /// # Ok(()) }
    /// ```
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let ctx = stream.context().clone();
        let loaded = Loaded::for_context(&LIBRARY, &ctx)?;
        Ok(Handle {
            inner: Arc::new(Inner {
                ctx,
                stream,
                loaded,
                launches: AtomicU64::new(0),
            }),
        })
    }

    /// The stream all kernels are launched on.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::Error;
    /// let h = fusedreg::Handle::new(0)?;
    /// // Allocate and copy on the handle's stream, so the transfers are ordered with its kernels.
    /// let x = h.stream().clone_htod(&[1.0f32, 2.0, 3.0]).map_err(Error::driver("htod"))?;
    /// let back = h.stream().clone_dtoh(&x).map_err(Error::driver("dtoh"))?;
    /// assert_eq!(back, vec![1.0, 2.0, 3.0]);
    /// # Ok(()) }
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The CUDA context.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// let h = Handle::new(0)?;
    /// assert_eq!(h.context().ordinal(), 0);
    /// // A second stream on the same context shares the loaded kernels.
    /// let side = h.context().new_stream().map_err(Error::driver("cuStreamCreate"))?;
    /// let h2 = Handle::from_stream(side)?;
    /// # let _ = h2;
    /// # Ok(()) }
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// Waits for all work submitted to the handle's stream.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let buf = h.stream().alloc_zeros::<f32>(1 << 18).map_err(fusedreg::Error::driver("alloc"))?;
    /// h.synchronize()?; // now the memset behind alloc_zeros has finished
    /// # let _ = buf;
    /// # Ok(()) }
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))
    }

    /// Number of kernels this handle (and its clones) has launched. Memory copies and memsets
    /// are not counted. Stochastic depth uses it to prove that dropped blocks launch nothing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let before = h.launch_count();
    /// let words = fusedreg::philox::gpu::mask_words(&h, 42, 7, 0, 1024)?; // one kernel
    /// assert_eq!(h.launch_count(), before + 1);
    /// assert_eq!(h.clone().launch_count(), h.launch_count()); // clones share the counter
    /// # let _ = words;
    /// # Ok(()) }
    /// ```
    pub fn launch_count(&self) -> u64 {
        self.inner.launches.load(Ordering::Relaxed)
    }

    /// Name, compute capability, SM count, L2 size, memory and driver version.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let info = fusedreg::Handle::new(0)?.device_info()?;
    /// println!("{} ({} GiB, L2 {} MiB)", info.name, info.total_memory >> 30, info.l2_bytes >> 20);
    /// println!("driver CUDA {}.{}", info.driver_version / 1000, info.driver_version % 1000 / 10);
    /// assert!(info.sm_count > 0);
    /// # Ok(()) }
    /// ```
    pub fn device_info(&self) -> Result<DeviceInfo> {
        use sys::CUdevice_attribute as A;
        let ctx = &self.inner.ctx;
        let op = "device_info";
        let attr = |a| ctx.attribute(a).map_err(Error::driver(op));
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(Error::driver(op))?;
        Ok(DeviceInfo {
            ordinal: ctx.ordinal(),
            name: ctx.name().map_err(Error::driver(op))?,
            compute_capability: ctx.compute_capability().map_err(Error::driver(op))?,
            sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            l2_bytes: attr(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as u64,
            total_memory: ctx.total_mem().map_err(Error::driver(op))? as u64,
            driver_version,
        })
    }

    /// Loads every kernel of the crate into this context now rather than at first use, so a
    /// module the driver cannot load is reported at start-up. Returns how many were loaded.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let n = h.load_all_kernels()?; // Error::ModuleLoad here, not in the first training step
    /// assert!(n > 0);
    /// # Ok(()) }
    /// ```
    pub fn load_all_kernels(&self) -> Result<usize> {
        self.inner.loaded.load_all()
    }

    pub(crate) fn function(&self, k: Kernel) -> Result<&CudaFunction> {
        self.inner.loaded.function(k.index())
    }

    /// Launches `k` with its single by-value parameter struct. Every fusedreg kernel takes
    /// exactly one `#[repr(C)]` struct whose size is asserted on both sides.
    pub(crate) fn launch<P: DeviceRepr>(
        &self,
        k: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        // SAFETY: `params` is the kernel's one parameter (layout asserted on both sides), and
        // every pointer in it was validated by the op wrapper against the buffer lengths.
        unsafe {
            self.launch_loaded(
                &self.inner.loaded,
                k.index(),
                grid,
                block,
                shared_bytes,
                params,
            )
        }
    }

    /// [`launch`](Self::launch) of a one-dimensional grid-stride kernel over `n` items:
    /// [`grid_for`]`(n, block)` blocks of `block` threads, no shared memory.
    pub(crate) fn launch_strided<P: DeviceRepr>(
        &self,
        k: Kernel,
        n: u64,
        block: u32,
        params: &P,
    ) -> Result<()> {
        self.launch(k, (grid_for(n, block), 1, 1), (block, 1, 1), 0, params)
    }

    /// Launches kernel number `index` of `loaded` (a [`KernelTable`](modules::KernelTable) loaded
    /// into this handle's context) like [`Handle::launch_function`]: the tools crate's kernels
    /// go through the same loader and launch as the library's.
    ///
    /// # Safety
    ///
    /// As [`Handle::launch_function`]: `loaded` is for this handle's context, the kernel takes
    /// one parameter laid out as `P`, and every address in `params` covers what the grid reads
    /// and writes.
    #[doc(hidden)]
    pub unsafe fn launch_loaded<P: DeviceRepr>(
        &self,
        loaded: &Loaded,
        index: usize,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let f = loaded.function(index)?;
        // SAFETY: the caller's contract (see above).
        unsafe { self.launch_function(f, loaded.symbol(index), grid, block, shared_bytes, params) }
    }

    /// Launches a kernel of a module the caller loaded into this handle's context (for example
    /// with `handle.context().load_module(..)`) on the handle's stream, with one by-value
    /// parameter struct, and counts it in [`Handle::launch_count`]. This is how code built on
    /// fusedreg (the `fusedreg-tools` crate's trainer kernels) launches kernels of its own so
    /// that launch counts still cover a whole training step. `name` labels driver errors.
    ///
    /// # Safety
    ///
    /// `f` must belong to this handle's context and take exactly one parameter laid out as `P`;
    /// every device address in `params` must stay valid until the kernel has run, and the grid
    /// must keep the kernel's accesses inside those buffers.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{cudarc::nvrtc::Ptx, Error, Handle};
    /// let h = Handle::new(0)?;
    /// # let fatbin: Vec<u8> = Vec::new();
    /// // A module of your own, e.g. a fatbin embedded with include_bytes!:
    /// let module = h.context().load_module(Ptx::from_binary(fatbin)).map_err(Error::driver("load"))?;
    /// let f = module.load_function("my_kernel").map_err(Error::driver("load"))?;
    /// #[repr(C)]
    /// #[derive(Clone, Copy)]
    /// struct Params { n: u64 }
    /// unsafe impl fusedreg::cudarc::driver::DeviceRepr for Params {}
    /// let before = h.launch_count();
    /// // SAFETY: my_kernel takes one `Params` and touches no memory.
    /// unsafe { h.launch_function(&f, "my_kernel", (1, 1, 1), (32, 1, 1), 0, &Params { n: 0 })? };
    /// assert_eq!(h.launch_count(), before + 1);
    /// # Ok(()) }
    /// ```
    pub unsafe fn launch_function<P: DeviceRepr>(
        &self,
        f: &CudaFunction,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &P,
    ) -> Result<()> {
        let mut args = [params as *const P as *mut std::ffi::c_void];
        self.inner
            .ctx
            .bind_to_thread()
            .map_err(Error::driver(name))?;
        // SAFETY: the caller's contract (see above).
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                grid,
                block,
                shared_bytes,
                self.inner.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(Error::driver(name))?;
        self.inner.launches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn check_context(&self, op: &'static str, what: &str, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() == self.inner.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid(
                op,
                format!("`{what}` was allocated in another CUDA context than the handle's"),
            ))
        }
    }

    /// `slot` with room for at least `len` elements (at least 1), reallocated on the handle's
    /// stream when it is missing or too small (the old buffer is freed first, stream-ordered).
    /// The one grow routine behind every reusable device scratch (the dropping ops'
    /// [`crate::dropping::Workspace`], the unfused baselines' intermediates, cross-entropy's
    /// workspace).
    ///
    /// # Safety
    ///
    /// The memory is uninitialised: the caller's kernels must write every element before any
    /// kernel or copy reads it.
    pub(crate) unsafe fn scratch<'a, E: DeviceRepr>(
        &self,
        op: &'static str,
        slot: &'a mut Option<CudaSlice<E>>,
        len: usize,
    ) -> Result<&'a mut CudaSlice<E>> {
        if !matches!(slot, Some(b) if b.len() >= len) {
            *slot = None;
            // SAFETY: the caller's contract (see above).
            let buf = unsafe { self.inner.stream.alloc::<E>(len.max(1)) };
            *slot = Some(buf.map_err(Error::driver(op))?);
        }
        Ok(slot.as_mut().expect("allocated above"))
    }

    /// The raw address of a buffer the kernel reads, after checking it lives in our context.
    /// The guard must outlive the launch. (Public for the workspace's tools crate, which
    /// launches kernels of its own; not part of the API.)
    #[doc(hidden)]
    pub fn read_ptr<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: &'a impl DevicePtr<T>,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.check_context(op, what, buf.stream())?;
        Ok(buf.device_ptr(&self.inner.stream))
    }

    /// The raw address of a buffer the kernel writes (see [`Handle::read_ptr`]).
    #[doc(hidden)]
    pub fn write_ptr<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: &'a mut impl DevicePtrMut<T>,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.check_context(op, what, buf.stream())?;
        Ok(buf.device_ptr_mut(&self.inner.stream))
    }

    /// A device buffer's contents on the host: a copy on this handle's stream, waited for, with
    /// `op`'s driver error.
    pub(crate) fn to_host<T: DeviceRepr>(
        &self,
        op: &'static str,
        buf: &impl DevicePtr<T>,
    ) -> Result<Vec<T>> {
        self.inner.stream.clone_dtoh(buf).map_err(Error::driver(op))
    }

    /// [`read_ptr`](Self::read_ptr) of an optional buffer: address 0 (the kernels' "absent")
    /// for `None`. The guard must outlive the launch.
    pub(crate) fn read_opt<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: Option<&'a impl DevicePtr<T>>,
    ) -> Result<OptPtr<'a>> {
        Ok(match buf {
            Some(b) => {
                let (p, g) = self.read_ptr(op, what, b)?;
                (p, Some(g))
            }
            None => (0, None),
        })
    }

    /// [`write_ptr`](Self::write_ptr) of an optional buffer (see [`Handle::read_opt`]).
    pub(crate) fn write_opt<'a, T>(
        &'a self,
        op: &'static str,
        what: &str,
        buf: Option<&'a mut impl DevicePtrMut<T>>,
    ) -> Result<OptPtr<'a>> {
        Ok(match buf {
            Some(b) => {
                let (p, g) = self.write_ptr(op, what, b)?;
                (p, Some(g))
            }
            None => (0, None),
        })
    }
}

/// An optional buffer's address (0 when absent) and the guard that keeps it valid until the
/// launch is enqueued.
pub(crate) type OptPtr<'a> = (u64, Option<SyncOnDrop<'a>>);

/// Grid size for a grid-stride loop over `n` items with `block` threads: enough blocks to fill
/// the device several times over, capped so the grid is legal; results never depend on it.
/// (Public for the workspace's tools crate; not part of the API.)
#[doc(hidden)]
pub fn grid_for(n: u64, block: u32) -> u32 {
    n.div_ceil(u64::from(block)).clamp(1, 1 << 20) as u32
}
