//! One shared handle for all GPU tests, and the rule for when a test is ignored.

use std::sync::OnceLock;

use fusedreg::Handle;
use libtest_mimic::{Completion, Failed, Trial};

/// What a GPU test body (and its helpers, `TestResult<T>`) returns: `?` works on every error
/// type; `Err` names what differs.
pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// A GPU test body: every file's bodies return [`TestResult`] (`Box<dyn Error>`); the error type
/// stays generic for a body whose errors are another displayable type.
pub type GpuTest<E = Box<dyn std::error::Error>> = fn(&Handle) -> Result<(), E>;

/// The device check, done once. The handle it keeps alive also keeps the loaded kernel modules
/// cached for the per-test handles (they share one cache per CUDA context).
fn anchor() -> &'static Result<Handle, String> {
    static H: OnceLock<Result<Handle, String>> = OnceLock::new();
    H.get_or_init(|| Handle::new(0).map_err(|e| e.to_string()))
}

/// Each test gets its own handle: its own stream and its own launch counter, so tests that
/// count launches are not disturbed by tests running in parallel.
fn handle() -> Result<Handle, String> {
    anchor().as_ref().map_err(Clone::clone)?;
    Handle::new(0).map_err(|e| e.to_string())
}

fn gpu_required() -> bool {
    std::env::var("FUSEDREG_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Wraps a GPU test: ignored (with the reason) when there is no usable device, failed instead
/// when `FUSEDREG_REQUIRE_GPU=1`.
pub fn gpu_trial<E: std::fmt::Display + 'static>(name: &str, test: GpuTest<E>) -> Trial {
    Trial::ignorable_test(name, move || match handle() {
        Ok(h) => test(&h)
            .map(|()| Completion::Completed)
            .map_err(|e| Failed::from(e.to_string())),
        Err(reason) if gpu_required() => {
            Err(format!("FUSEDREG_REQUIRE_GPU=1 but no GPU: {reason}").into())
        }
        Err(reason) => Ok(Completion::ignored_with(format!("needs a GPU: {reason}"))),
    })
}

/// Builds the trial list of a module from `(name, fn)` pairs.
pub fn trials_of<E: std::fmt::Display + 'static>(
    module: &str,
    tests: &[(&str, GpuTest<E>)],
) -> Vec<Trial> {
    tests
        .iter()
        .map(|(n, t)| gpu_trial(&format!("{module}::{n}"), *t))
        .collect()
}

pub fn trials() -> Vec<Trial> {
    trials_of("harness", &[("every_kernel_loads", every_kernel_loads)])
}

/// Loads every kernel the Rust side can launch into the device's context.
fn every_kernel_loads(h: &Handle) -> TestResult {
    let n = h.load_all_kernels()?;
    if n == 0 {
        return Err("no kernels were loaded".into());
    }
    let info = h.device_info()?;
    eprintln!(
        "loaded {n} kernels on {} (sm_{}{})",
        info.name, info.compute_capability.0, info.compute_capability.1
    );
    Ok(())
}

/// An empty pinned host buffer, or `None` where none can exist: with driver 580 the driver
/// returns a null pointer for a zero-byte pinned allocation and cudarc 0.19's `alloc_pinned`
/// asserts on it (the panic issue 17 item 6 reported). The entry points that take a pinned buffer
/// still check its length, for a cudarc that returns an empty slice instead.
pub fn empty_pinned<T: cudarc::driver::DeviceRepr>(
    h: &Handle,
) -> Option<cudarc::driver::PinnedHostSlice<T>> {
    let ctx = h.context().clone();
    // SAFETY: nothing is ever read from an empty buffer.
    let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
        ctx.alloc_pinned::<T>(0)
    }));
    match made {
        Ok(Ok(empty)) => Some(empty),
        Ok(Err(err)) => {
            eprintln!("alloc_pinned(0) refused by the driver ({err}): no empty buffer to pass");
            None
        }
        Err(_) => {
            eprintln!("alloc_pinned(0) panicked inside cudarc: no empty buffer can exist");
            None
        }
    }
}
