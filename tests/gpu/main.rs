//! GPU tests: every kernel against its CPU reference.
//!
//! A libtest-mimic harness. Without a CUDA device (or without built kernels) every test is
//! reported as *ignored* with the reason; with `FUSEDREG_REQUIRE_GPU=1` that becomes a failure,
//! which is how the GPU machines run this suite.

mod adamw;
mod bad_input;
mod bias_act_dropout;
#[cfg(feature = "candle-cuda")]
mod candle;
#[path = "../common/mod.rs"]
mod common;
mod cross_entropy;
mod dropout;
mod dropout_add_norm;
mod dropout_redundancy;
mod fmath;
mod global_norm;
mod harness;
mod philox;
mod prelude;
mod redundancy;
mod workspace;

use libtest_mimic::Arguments;

fn main() {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    trials.extend(harness::trials());
    trials.extend(philox::trials());
    trials.extend(global_norm::trials());
    trials.extend(adamw::trials());
    trials.extend(bad_input::trials());
    trials.extend(cross_entropy::trials());
    trials.extend(fmath::trials());
    trials.extend(bias_act_dropout::trials());
    trials.extend(dropout::trials());
    trials.extend(dropout_add_norm::trials());
    trials.extend(redundancy::trials());
    trials.extend(dropout_redundancy::trials());
    trials.extend(workspace::trials());
    #[cfg(feature = "candle-cuda")]
    trials.extend(candle::trials());
    libtest_mimic::run(&args, trials).exit();
}
