//! Compiles every `kernels/*.cu` into a fatbin embedded in the library (see `build/cuda.rs`,
//! shared with the tools crate's build script).

#[path = "build/cuda.rs"]
mod cuda;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    cuda::build_kernels(&cuda::KernelBuild {
        label: "fusedreg",
        kernels_dir: manifest.join("kernels"),
        include: Vec::new(),
        root: manifest,
        cfg: "fusedreg_kernels_built",
    });
}
