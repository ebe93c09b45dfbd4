//! Compiles every `kernels/*.cu` into a fatbin embedded in the library (see `build/cuda.rs`,
//! shared with the tools crate's build script).

#[path = "build/cuda.rs"]
mod cuda;

use std::path::PathBuf;

fn main() {
    check_link_mode();
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    cuda::build_kernels(&cuda::KernelBuild {
        label: "fusedreg",
        kernels_dir: manifest.join("kernels"),
        include: Vec::new(),
        root: manifest,
        cfg: "fusedreg_kernels_built",
    });
}

/// How cudarc reaches libcuda is the application's choice (Cargo.toml, `[features]`). Two
/// forced modes at once make cudarc's build script panic with "this is a bug"; when this script
/// runs first, it says instead what to change.
fn check_link_mode() {
    let on = |f: &str| std::env::var_os(format!("CARGO_FEATURE_{f}")).is_some();
    if on("DYNAMIC_LOADING") && (on("DYNAMIC_LINKING") || on("CANDLE_CUDA")) {
        panic!(
            "fusedreg: the feature `dynamic-loading` cannot be combined with `dynamic-linking` or \
             `candle-cuda` (candle-core's `cuda` feature links libcuda). Drop `dynamic-loading`: \
             with neither feature cudarc loads libcuda at run time unless another crate in the \
             build (candle) asks for linking."
        );
    }
}
