//! GPU tests: every kernel against its CPU reference.
//!
//! A libtest-mimic harness. Without a CUDA device (or without built kernels) every test is
//! reported as *ignored* with the reason; with `FUSEDREG_REQUIRE_GPU=1` that becomes a failure,
//! which is how the GPU machines run this suite.
//!
//! Every file of this folder is a module (`automod`), and each test file registers its own
//! `trials` in [`TRIALS`] (`#[linkme::distributed_slice(crate::TRIALS)]`), so a new op's file
//! needs no line here. The suite runs sorted by test name. (A new file is picked up the next time
//! this crate compiles, which adding an op's library code triggers.)

automod::dir!("tests/gpu");
#[cfg(feature = "candle-cuda")]
mod candle;
#[path = "../common/mod.rs"]
mod common;

use libtest_mimic::{Arguments, Trial};

/// The trials of every test file (the shared `harness.rs` is added in [`main`]: the tools'
/// suite includes it too, without its trials).
#[linkme::distributed_slice]
pub static TRIALS: [fn() -> Vec<Trial>];

fn main() {
    let args = Arguments::from_args();
    let mut trials = harness::trials();
    trials.extend(TRIALS.iter().flat_map(|trials| trials()));
    trials.sort_by(|a, b| a.name().cmp(b.name()));
    libtest_mimic::run(&args, trials).exit();
}
