//! Writes `ffi/include/fusedreg.h` from the crate's `extern "C"` items (cbindgen), or with
//! `--check` fails when the checked-in header differs from what the sources generate (CI's drift
//! check). Run: `cargo run -p fusedreg-ffi --features gen-header --bin gen-header [-- --check]`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("include/fusedreg.h");
    let config = match cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gen-header: ffi/cbindgen.toml: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bindings = match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gen-header: cbindgen failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    if std::env::args().any(|a| a == "--check") {
        let current = std::fs::read(&header).unwrap_or_default();
        if current != fresh {
            eprintln!(
                "gen-header: {} is out of date with the sources of ffi/: run \
                 `cargo run -p fusedreg-ffi --features gen-header --bin gen-header` and commit it",
                header.display()
            );
            return ExitCode::FAILURE;
        }
        println!("gen-header: {} is up to date", header.display());
    } else {
        if let Err(e) = std::fs::write(&header, &fresh) {
            eprintln!("gen-header: writing {}: {e}", header.display());
            return ExitCode::FAILURE;
        }
        println!("gen-header: wrote {}", header.display());
    }
    ExitCode::SUCCESS
}
