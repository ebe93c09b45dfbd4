//! GPU tests of the tools: the trainer's kernels and cuBLAS layers against their CPU references,
//! and the GPU model against the CPU model.
//!
//! The same libtest-mimic harness and helpers as the library's GPU tests (`tests/gpu/`, shared by
//! path, not copied): without a CUDA device every test is reported as *ignored* with the reason;
//! with `FUSEDREG_REQUIRE_GPU=1` that becomes a failure, which is how the GPU machines run it.

mod bad_input;
#[path = "../../../tests/common/mod.rs"]
mod common;
#[allow(dead_code)] // the library's own harness trials are registered by the library's suite
#[path = "../../../tests/gpu/harness.rs"]
mod harness;
mod mlp;
mod mlp_prenorm;
#[path = "../../../tests/gpu/prelude.rs"]
mod prelude;

use libtest_mimic::Arguments;

fn main() {
    let args = Arguments::from_args();
    let mut trials = mlp::trials();
    trials.extend(mlp_prenorm::trials());
    trials.extend(bad_input::trials());
    libtest_mimic::run(&args, trials).exit();
}
