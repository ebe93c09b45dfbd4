//! GPU timing shared by the `fusedreg-bench` report and the criterion benches: one
//! implementation, so both measure the same way.
//!
//! Each sample brackets a batch of calls with CUDA events (created with timing enabled) on the
//! handle's stream and divides by the batch size, so host launch gaps between calls are hidden
//! when the GPU is the bottleneck. Warm-up calls run first (module load, first-touch of memory).
//! Report the median.

use cudarc::driver::{result, sys, CudaEvent, DeviceRepr};

use crate::error::{Error, Result};
use crate::runtime::kernels::Kernel;
use crate::runtime::{grid_for, Handle};

/// Per-call times of a timed run, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    /// One entry per sample (each the mean over a batch of calls).
    pub ms: Vec<f64>,
    /// Calls per sample.
    pub batch: usize,
}

impl Samples {
    /// The median per-call time in ms (NaN when empty).
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
    pub fn min(&self) -> f64 {
        self.ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The slowest sample in ms.
    pub fn max(&self) -> f64 {
        self.ms.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// How a timed run is shaped.
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
/// ```no_run
/// # fn main() -> fusedreg::Result<()> {
/// use fusedreg::timing::{time_gpu, TimingPlan};
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
pub struct BatchTimer<'h> {
    handle: &'h Handle,
    start: CudaEvent,
    stop: CudaEvent,
}

impl<'h> BatchTimer<'h> {
    /// Creates the two events (with timing enabled).
    pub fn new(handle: &'h Handle) -> Result<Self> {
        Ok(BatchTimer {
            handle,
            start: timing_event(handle)?,
            stop: timing_event(handle)?,
        })
    }

    /// Runs `f` `n` times between the two events and returns the elapsed GPU time in ms.
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
/// benchmarks: fast to make at any size, and not zeros.
pub fn filled<T: DeviceRepr>(
    handle: &Handle,
    n: usize,
    byte: u8,
) -> Result<cudarc::driver::CudaSlice<T>> {
    let op = "filled";
    let s = handle.stream();
    // SAFETY: every byte is written by the memset below before anything reads it.
    let mut buf = unsafe { s.alloc::<T>(n) }.map_err(Error::driver(op))?;
    let (p, _g) = handle.write_ptr(op, "buffer", &mut buf)?;
    // SAFETY: p is a live allocation of n elements on this stream's context.
    unsafe { result::memset_d8_async(p, byte, n * std::mem::size_of::<T>(), s.cu_stream()) }
        .map_err(Error::driver(op))?;
    drop(_g);
    Ok(buf)
}

/// Bytes per second from bytes moved and milliseconds.
pub fn gb_per_s(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

/// Device-to-device copy bandwidth, counting bytes read plus bytes written.
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
    pub fn reference_gbps(&self) -> f64 {
        self.memcpy_gbps.max(self.kernel_gbps)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CopyParams {
    src: u64,
    dst: u64,
    n: u64,
}
const _: () = assert!(std::mem::size_of::<CopyParams>() == 24);
// SAFETY: plain old data, layout asserted on both sides.
unsafe impl DeviceRepr for CopyParams {}

/// Measures the copy bandwidth of `bytes` (rounded up to 16) with the driver's memcpy and with a
/// copy kernel. Use a size well above the L2 cache (256 MiB or more) for a DRAM figure.
pub fn copy_bandwidth(handle: &Handle, bytes: u64, plan: TimingPlan) -> Result<CopyBandwidth> {
    let op = "copy_bandwidth";
    let n16 = bytes.div_ceil(16).max(1);
    let bytes = n16 * 16;
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
    let grid = grid_for(n16, 256);
    let kernel = time_gpu(handle, plan, || {
        handle.launch(Kernel::CopyU128, (grid, 1, 1), (256, 1, 1), 0, &p)
    })?;
    let moved = 2.0 * bytes as f64;
    Ok(CopyBandwidth {
        bytes,
        memcpy_gbps: gb_per_s(moved, memcpy.median()),
        kernel_gbps: gb_per_s(moved, kernel.median()),
    })
}
