//! GPU timing shared by the `fusedreg-bench` report and the criterion benches: one
//! implementation, so both measure the same way.
//!
//! Each sample brackets a batch of calls with CUDA events (created with timing enabled) on the
//! handle's stream and divides by the batch size, so host launch gaps between calls are hidden
//! when the GPU is the bottleneck. Warm-up calls run first (module load, first-touch of memory).
//! Report the median.

use cudarc::driver::{result, sys, CudaEvent, DeviceRepr};

use crate::kernels::{self, grid_for, Kernel};
use fusedreg::{Error, Handle, Result};

/// Per-call times of a timed run, in milliseconds.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::timing::Samples;
/// let s = Samples { ms: vec![0.25, 0.125, 1.0], batch: 64 };
/// assert_eq!((s.min(), s.median(), s.max()), (0.125, 0.25, 1.0));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// One entry per sample (each the mean over a batch of calls).
    pub ms: Vec<f64>,
    /// Calls per sample.
    pub batch: usize,
}

impl Samples {
    /// The median per-call time in ms (NaN when empty).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::timing::Samples;
    /// let odd = Samples { ms: vec![3.0, 1.0, 2.0], batch: 1 };
    /// assert_eq!(odd.median(), 2.0);
    /// let even = Samples { ms: vec![4.0, 1.0, 2.0, 3.0], batch: 1 };
    /// assert_eq!(even.median(), 2.5); // mean of the middle two
    /// assert!(Samples::default().median().is_nan());
    /// ```
    pub fn median(&self) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
        }
    }

    /// The fastest sample in ms.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::timing::Samples;
    /// let s = Samples { ms: vec![0.5, 0.25, 0.75], batch: 8 };
    /// assert_eq!(s.min(), 0.25);
    /// ```
    pub fn min(&self) -> f64 {
        self.ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The slowest sample in ms.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::timing::Samples;
    /// let s = Samples { ms: vec![0.5, 0.25, 0.75], batch: 8 };
    /// assert_eq!(s.max(), 0.75);
    /// ```
    pub fn max(&self) -> f64 {
        self.ms.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// How a timed run is shaped.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::timing::TimingPlan;
/// let plan = TimingPlan { samples: 11, ..TimingPlan::default() };
/// assert_eq!((plan.warmup, plan.samples, plan.min_sample_ms), (3, 11, 1.0));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TimingPlan {
    /// Calls before timing starts.
    pub warmup: usize,
    /// Number of samples.
    pub samples: usize,
    /// Smallest wall time of one sample's batch, in ms; the batch size is chosen to reach it.
    pub min_sample_ms: f64,
}

impl Default for TimingPlan {
    fn default() -> Self {
        TimingPlan {
            warmup: 3,
            samples: 25,
            min_sample_ms: 1.0,
        }
    }
}

impl TimingPlan {
    /// A shorter plan for `--quick` runs.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::timing::TimingPlan;
    /// let (quick, full) = (TimingPlan::quick(), TimingPlan::default());
    /// assert!(quick.samples < full.samples && quick.min_sample_ms < full.min_sample_ms);
    /// ```
    pub fn quick() -> Self {
        TimingPlan {
            warmup: 2,
            samples: 7,
            min_sample_ms: 0.5,
        }
    }
}

fn timing_event(handle: &Handle) -> Result<CudaEvent> {
    handle
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(Error::driver("cuEventCreate"))
}

/// Times `f` on the handle's stream: warm-up, then `plan.samples` batches bracketed by events.
///
/// `f` must only enqueue work on `handle.stream()`; it must not synchronize.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg_tools::timing::{time_gpu, TimingPlan};
/// let h = fusedreg::Handle::new(0)?;
/// let s = time_gpu(&h, TimingPlan::default(), || Ok(()))?;
/// println!("{:.3} ms", s.median());
/// # Ok(()) }
/// ```
pub fn time_gpu(
    handle: &Handle,
    plan: TimingPlan,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Samples> {
    let timer = BatchTimer::new(handle)?;
    for _ in 0..plan.warmup {
        f()?;
    }
    handle.synchronize()?;
    // Calibrate the batch so one sample lasts at least `min_sample_ms`.
    let one = timer.time(1, &mut f)?.max(1e-4);
    let batch = ((plan.min_sample_ms / one).ceil() as usize).clamp(1, 10_000);
    let mut ms = Vec::with_capacity(plan.samples);
    for _ in 0..plan.samples.max(1) {
        ms.push(timer.time(batch, &mut f)? / batch as f64);
    }
    Ok(Samples { ms, batch })
}

/// A pair of timing events on the handle's stream: the one measuring primitive behind
/// [`time_gpu`] and the criterion benches (`iter_custom`).
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{Error, Handle};
/// use fusedreg_tools::timing::{filled, BatchTimer};
/// let h = Handle::new(0)?;
/// let mut buf = filled::<f32>(&h, 1 << 18, 1)?;
/// let timer = BatchTimer::new(&h)?;
/// let ms = timer.time(100, &mut || {
///     h.stream().memset_zeros(&mut buf).map_err(Error::driver("memset"))
/// })?;
/// println!("{:.4} ms per memset", ms / 100.0);
/// # Ok(()) }
/// ```
pub struct BatchTimer<'h> {
    handle: &'h Handle,
    start: CudaEvent,
    stop: CudaEvent,
}

impl<'h> BatchTimer<'h> {
    /// Creates the two events (with timing enabled).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// let h = fusedreg::Handle::new(0)?;
    /// let timer = fusedreg_tools::timing::BatchTimer::new(&h)?; // reuse it for every sample
    /// let empty = timer.time(1, &mut || Ok(()))?;
    /// assert!(empty >= 0.0);
    /// # Ok(()) }
    /// ```
    pub fn new(handle: &'h Handle) -> Result<Self> {
        Ok(BatchTimer {
            handle,
            start: timing_event(handle)?,
            stop: timing_event(handle)?,
        })
    }

    /// Runs `f` `n` times between the two events and returns the elapsed GPU time in ms.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::timing::{filled, BatchTimer};
    /// let h = Handle::new(0)?;
    /// let (src, mut dst) = (filled::<u8>(&h, 1 << 20, 7)?, filled::<u8>(&h, 1 << 20, 0)?);
    /// let timer = BatchTimer::new(&h)?;
    /// let mut copy = || h.stream().memcpy_dtod(&src, &mut dst).map_err(Error::driver("dtod"));
    /// let per_call = timer.time(50, &mut copy)? / 50.0;
    /// println!("{per_call:.4} ms per 1 MiB copy");
    /// # Ok(()) }
    /// ```
    pub fn time(&self, n: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let stream = self.handle.stream();
        self.start
            .record(stream)
            .map_err(Error::driver("cuEventRecord"))?;
        for _ in 0..n {
            f()?;
        }
        self.stop
            .record(stream)
            .map_err(Error::driver("cuEventRecord"))?;
        let ms = self
            .start
            .elapsed_ms(&self.stop)
            .map_err(Error::driver("cuEventElapsedTime"))?;
        Ok(f64::from(ms))
    }

    /// [`BatchTimer::time`] as a `Duration`, for criterion's `iter_custom`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::{Error, Handle};
    /// use fusedreg_tools::timing::{filled, BatchTimer};
    /// let h = Handle::new(0)?;
    /// let mut buf = filled::<f32>(&h, 1 << 18, 1)?;
    /// let timer = BatchTimer::new(&h)?;
    /// // In a criterion bench: `b.iter_custom(|iters| timer.duration(iters, &mut step).unwrap())`.
    /// let mut step = || h.stream().memset_zeros(&mut buf).map_err(Error::driver("memset"));
    /// let d: std::time::Duration = timer.duration(20, &mut step)?;
    /// println!("{d:?} for 20 memsets");
    /// # Ok(()) }
    /// ```
    pub fn duration(
        &self,
        n: u64,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<std::time::Duration> {
        let ms = self.time(n as usize, f)?;
        Ok(std::time::Duration::from_secs_f64(ms * 1e-3))
    }
}

/// A device buffer of `n` elements with every byte set to `byte` (no host transfer), for
/// benchmarks' outputs and scratch: fast to make at any size, and not zeros. Timed *inputs* come
/// from [`random`] instead (a constant fill hides branch divergence). An `n` whose byte size overflows `usize`
/// is an [`Error::InvalidArgument`], checked before anything is allocated.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::{half::bf16, Error};
/// use fusedreg_tools::timing::filled;
/// let h = fusedreg::Handle::new(0)?;
/// let x = filled::<bf16>(&h, 1 << 20, 0x3f)?; // every element is bf16::from_bits(0x3f3f)
/// assert_eq!(x.len(), 1 << 20);
/// let first = h.stream().clone_dtoh(&x.slice(0..1)).map_err(Error::driver("dtoh"))?;
/// assert_eq!(first[0], bf16::from_bits(0x3f3f));
/// # Ok(()) }
/// ```
pub fn filled<T: DeviceRepr>(
    handle: &Handle,
    n: usize,
    byte: u8,
) -> Result<cudarc::driver::CudaSlice<T>> {
    let op = "filled";
    // Checked before the allocation, which would multiply (and overflow) the same way.
    let bytes = filled_bytes::<T>(n)?;
    let s = handle.stream();
    // SAFETY: every byte is written by the memset below before anything reads it.
    let mut buf = unsafe { s.alloc::<T>(n) }.map_err(Error::driver(op))?;
    let (p, _g) = handle.write_ptr(op, "buffer", &mut buf)?;
    // SAFETY: p is a live allocation of n elements on this stream's context.
    unsafe { result::memset_d8_async(p, byte, bytes, s.cu_stream()) }.map_err(Error::driver(op))?;
    drop(_g);
    Ok(buf)
}

/// `n` pseudo-random values uniform in `[lo, hi)`, rounded to `T`: value `i` is a pure function
/// of `(seed, i)` (splitmix64), so the same call gives the same bits on any machine and thread
/// count. Benchmarks use it for every timed input: a constant fill sends every lane down the same
/// branch and hides the divergence real data causes.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::timing::random_values;
/// let v = random_values::<f32>(1000, 7, -2.0, 2.0);
/// assert!(v.iter().all(|x| (-2.0..2.0).contains(x)));
/// assert_eq!(v, random_values::<f32>(1000, 7, -2.0, 2.0)); // deterministic
/// assert_ne!(v, random_values::<f32>(1000, 8, -2.0, 2.0)); // the seed matters
/// assert!(v.iter().any(|&x| x < 0.0) && v.iter().any(|&x| x > 0.0)); // both signs
/// ```
pub fn random_values<T: fusedreg::Dtype>(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<T> {
    let mut out = vec![T::default(); n];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(16);
    let chunk = n.div_ceil(threads.max(1)).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let first = (c * chunk) as u64;
                for (k, v) in part.iter_mut().enumerate() {
                    let u = splitmix64(seed ^ splitmix64(first + k as u64));
                    // 24 random bits: a uniform f32 in [0, 1).
                    let unit = (u >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
                    *v = T::from_f32_rn(lo + (hi - lo) * unit);
                }
            });
        }
    });
    // Rounding to T can reach `hi` itself; pull such values back inside the range.
    for v in out.iter_mut() {
        if v.to_f32() >= hi {
            *v = T::from_f32_rn(lo);
        }
    }
    out
}

/// [`random_values`] uploaded to a new device buffer (for benchmarks; see there).
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::half::bf16;
/// use fusedreg_tools::timing::random;
/// let h = fusedreg::Handle::new(0)?;
/// let x = random::<bf16>(&h, 1 << 20, 42, -4.0, 4.0)?; // activations of both signs
/// assert_eq!(x.len(), 1 << 20);
/// # Ok(()) }
/// ```
pub fn random<T: fusedreg::Dtype>(
    handle: &Handle,
    n: usize,
    seed: u64,
    lo: f32,
    hi: f32,
) -> Result<cudarc::driver::CudaSlice<T>> {
    filled_bytes::<T>(n)?;
    let host = random_values::<T>(n, seed, lo, hi);
    handle
        .stream()
        .clone_htod(&host)
        .map_err(Error::driver("random"))
}

/// The splitmix64 finaliser (Steele, Lea, Flood 2014): a bijection of u64 with good avalanche.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Bytes per second from bytes moved and milliseconds.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::timing::gb_per_s;
/// // Reading and writing 2^26 f32 (512 MiB in all) in 0.2 ms:
/// let gbps = gb_per_s(2.0 * 4.0 * (1u64 << 26) as f64, 0.2);
/// assert!((gbps - 2684.35456).abs() < 1e-6);
/// ```
pub fn gb_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Device-to-device copy bandwidth, counting bytes read plus bytes written.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::timing::{gb_per_s, CopyBandwidth};
/// let copy = CopyBandwidth { bytes: 256 << 20, memcpy_gbps: 2900.0, kernel_gbps: 3000.0 };
/// // A kernel moving 1.5 GB in 0.6 ms, as a fraction of the copy: 2500 / 3000.
/// let frac = gb_per_s(1.5e9, 0.6) / copy.reference_gbps();
/// assert!((frac - 2500.0 / 3000.0).abs() < 1e-9);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CopyBandwidth {
    /// Bytes copied per call (each is read once and written once).
    pub bytes: u64,
    /// `cuMemcpyDtoDAsync`, GB/s (read + write).
    pub memcpy_gbps: f64,
    /// A plain 16-byte-vector copy kernel, GB/s (read + write).
    pub kernel_gbps: f64,
}

impl CopyBandwidth {
    /// The reference the reports divide by: the better of the two copies.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::timing::CopyBandwidth;
    /// let c = CopyBandwidth { bytes: 1 << 28, memcpy_gbps: 2950.0, kernel_gbps: 3010.0 };
    /// assert_eq!(c.reference_gbps(), 3010.0);
    /// ```
    pub fn reference_gbps(&self) -> f64 {
        self.memcpy_gbps.max(self.kernel_gbps)
    }
}

crate::kernels::kernel_params! {
    struct CopyParams(24) { src: u64, dst: u64, n: u64 }
}

/// Measures the copy bandwidth of `bytes` (rounded up to 16) with the driver's memcpy and with a
/// copy kernel. Use a size well above the L2 cache (256 MiB or more) for a DRAM figure. A size
/// that does not fit the address space once rounded up (e.g. `u64::MAX`) is an
/// [`Error::InvalidArgument`], checked before anything is allocated.
///
/// # Examples
///
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg_tools::timing::{copy_bandwidth, TimingPlan};
/// let h = fusedreg::Handle::new(0)?;
/// // 4 MiB + 1 byte: an L2-resident size, for a quick check; rounded up to 16 bytes.
/// let c = copy_bandwidth(&h, (4 << 20) + 1, TimingPlan::quick())?;
/// assert_eq!(c.bytes, (4 << 20) + 16);
/// println!("memcpy {:.0} GB/s, kernel {:.0} GB/s", c.memcpy_gbps, c.kernel_gbps);
/// # Ok(()) }
/// ```
pub fn copy_bandwidth(handle: &Handle, bytes: u64, plan: TimingPlan) -> Result<CopyBandwidth> {
    let op = "copy_bandwidth";
    let (n16, bytes) = copy_size(bytes)?;
    let s = handle.stream();
    // SAFETY: both buffers are fully written (memset) before anything reads them.
    let mut src = unsafe { s.alloc::<u8>(bytes as usize) }.map_err(Error::driver(op))?;
    let mut dst = unsafe { s.alloc::<u8>(bytes as usize) }.map_err(Error::driver(op))?;
    let (src_ptr, _g1) = handle.write_ptr(op, "src", &mut src)?;
    let (dst_ptr, _g2) = handle.write_ptr(op, "dst", &mut dst)?;
    // Non-zero data: never time on zeros.
    for (p, v) in [(src_ptr, 0x5a), (dst_ptr, 0xc3)] {
        // SAFETY: p is a live allocation of `bytes` bytes on this stream's context.
        unsafe { result::memset_d8_async(p, v, bytes as usize, s.cu_stream()) }
            .map_err(Error::driver(op))?;
    }
    let memcpy = time_gpu(handle, plan, || {
        // SAFETY: both ranges are live, `bytes` long and do not overlap.
        unsafe { result::memcpy_dtod_async(dst_ptr, src_ptr, bytes as usize, s.cu_stream()) }
            .map_err(Error::driver(op))
    })?;
    let p = CopyParams {
        src: src_ptr,
        dst: dst_ptr,
        n: n16,
    };
    // One vector per thread over the whole buffer: on an H100 this beats a persistent
    // grid-stride grid by about 6% (benches/NOTES.md).
    let grid = grid_for(n16, kernels::BLOCK);
    let kernel = time_gpu(handle, plan, || {
        kernels::launch(handle, Kernel::CopyU128, (grid, 1, 1), &p)
    })?;
    let moved = 2.0 * bytes as f64;
    Ok(CopyBandwidth {
        bytes,
        memcpy_gbps: gb_per_s(moved, memcpy.median()),
        kernel_gbps: gb_per_s(moved, kernel.median()),
    })
}

/// The byte size of `n` elements of `T` for [`filled`], checked (an allocation of more than
/// `isize::MAX` bytes cannot exist).
fn filled_bytes<T>(n: usize) -> Result<usize> {
    let size = std::mem::size_of::<T>();
    n.checked_mul(size)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::invalid(
                "filled",
                format!("{n} elements of {size} bytes exceed the address space"),
            )
        })
}

/// `(16-byte vectors, bytes)` of a copy of `bytes` rounded up to 16 (at least one vector), checked
/// before anything is allocated: rounding `u64::MAX` up must not wrap to a 0-byte copy (as it
/// did in builds without overflow checks) and the size must be addressable.
fn copy_size(bytes: u64) -> Result<(u64, u64)> {
    let n16 = bytes.div_ceil(16).max(1);
    n16.checked_mul(16)
        .filter(|&b| usize::try_from(b).is_ok_and(|b| b <= isize::MAX as usize))
        .map(|b| (n16, b))
        .ok_or_else(|| {
            Error::invalid(
                "copy_bandwidth",
                format!("{bytes} bytes rounded up to 16 exceed the address space"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17 item 8: sizes whose byte counts overflow are errors, checked before any
    /// allocation (the old code overflowed in `n * size_of::<T>()` and in `div_ceil(16) * 16`).
    #[test]
    fn sizes_that_overflow_are_refused_before_allocating() {
        assert!(filled_bytes::<f32>(usize::MAX / 4 + 1).is_err());
        assert!(filled_bytes::<f32>(usize::MAX).is_err());
        assert!(filled_bytes::<u8>(isize::MAX as usize + 1).is_err());
        assert_eq!(filled_bytes::<f32>(1 << 20).unwrap(), 4 << 20);
        assert_eq!(filled_bytes::<f32>(0).unwrap(), 0);
        assert!(copy_size(u64::MAX).is_err());
        assert!(copy_size(u64::MAX - 14).is_err());
        assert!(copy_size(isize::MAX as u64 + 1).is_err());
        assert_eq!(copy_size(0).unwrap(), (1, 16));
        assert_eq!(
            copy_size((4 << 20) + 1).unwrap(),
            ((4 << 20) / 16 + 1, (4 << 20) + 16)
        );
    }
}
