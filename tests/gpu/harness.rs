//! One shared handle for all GPU tests, and the rule for when a test is ignored.

use std::sync::OnceLock;

use fusedreg::Handle;
use libtest_mimic::{Completion, Failed, Trial};

/// A GPU test body: `Err` carries a message naming the mismatching indices.
pub type GpuTest = fn(&Handle) -> Result<(), String>;

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
pub fn gpu_trial(name: &str, test: GpuTest) -> Trial {
    Trial::ignorable_test(name, move || match handle() {
        Ok(h) => test(&h)
            .map(|()| Completion::Completed)
            .map_err(Failed::from),
        Err(reason) if gpu_required() => {
            Err(format!("FUSEDREG_REQUIRE_GPU=1 but no GPU: {reason}").into())
        }
        Err(reason) => Ok(Completion::ignored_with(format!("needs a GPU: {reason}"))),
    })
}

/// Builds the trial list of a module from `(name, fn)` pairs.
pub fn trials_of(module: &str, tests: &[(&str, GpuTest)]) -> Vec<Trial> {
    tests
        .iter()
        .map(|(n, t)| gpu_trial(&format!("{module}::{n}"), *t))
        .collect()
}

pub fn trials() -> Vec<Trial> {
    trials_of("harness", &[("every_kernel_loads", every_kernel_loads)])
}

/// Loads every kernel the Rust side can launch into the device's context.
fn every_kernel_loads(h: &Handle) -> Result<(), String> {
    let n = h.load_all_kernels().map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("no kernels were loaded".into());
    }
    let info = h.device_info().map_err(|e| e.to_string())?;
    eprintln!(
        "loaded {n} kernels on {} (sm_{}{})",
        info.name, info.compute_capability.0, info.compute_capability.1
    );
    Ok(())
}
