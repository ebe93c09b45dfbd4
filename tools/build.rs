//! Compiles the tools' own kernels (`tools/kernels/*.cu`: the copy reference and the trainer's
//! kernels) with the library's kernel build (`../build/cuda.rs`, shared, not copied), and embeds
//! the git commit the tools were built from, for the report's provenance.

#[path = "../build/cuda.rs"]
mod cuda;

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    cuda::build_kernels(&cuda::KernelBuild {
        label: "fusedreg-tools",
        kernels_dir: manifest.join("kernels"),
        include: vec![root.join("kernels")],
        root: root.clone(),
        cfg: "fusedreg_kernels_built",
    });
    embed_commit(&root);
}

/// Sets `FUSEDREG_BUILD_COMMIT` for `env!`: `git rev-parse --short=12 HEAD` of the checkout being
/// built, with `-dirty` when tracked files differ from it, or "unknown" outside a git checkout.
/// Read at build time, so a binary run from any folder reports the commit it was built from.
fn embed_commit(root: &Path) {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(h) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{h}-dirty")
            } else {
                h
            }
        }
        None => "unknown".into(),
    };
    println!("cargo:rustc-env=FUSEDREG_BUILD_COMMIT={commit}");
    // Rerun when the commit or the dirty state can have changed: HEAD, the branch it points at,
    // packed refs and the index (the kernel build above reuses its fatbins when the kernels did
    // not change, so a new commit costs no nvcc run). Edits not yet staged or committed since the
    // last run do not rerun it; `scripts/gpu-kit.sh` records the state at packing time instead.
    if let (Some(git_dir), Some(common)) = (
        git(&["rev-parse", "--absolute-git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) {
        let (git_dir, common) = (PathBuf::from(git_dir), PathBuf::from(common));
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!("cargo:rerun-if-changed={}", git_dir.join("index").display());
        println!(
            "cargo:rerun-if-changed={}",
            common.join("packed-refs").display()
        );
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={}", common.join(r).display());
        }
    }
}
