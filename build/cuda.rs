//! The kernel build shared by the build scripts of the library (`build.rs`, `kernels/`) and of
//! the tools crate (`tools/build.rs`, `tools/kernels/`): both include this file with `#[path]`,
//! so there is one nvcc invocation, one arch policy and one generated module table.
//!
//! * SASS for each arch in `FUSEDREG_CUDA_ARCHS` (default `80,90`) plus PTX for the highest one,
//!   so newer GPUs JIT the PTX. No `a`-suffixed arch, no fast math, `--fmad=false` (every fused
//!   multiply-add is written out as `__fmaf_rn` so the CPU references can match bit for bit).
//!   The code-generation flags live in `build/nvcc-flags.txt`, which `scripts/sass-budget` reads
//!   too, so the instruction budget counts the SASS the build embeds.
//! * nvcc is looked up through `NVCC`, `CUDA_HOME`/`CUDA_PATH`, the project's own toolkit folder
//!   (`.cuda/`, installed by `scripts/install-cuda.sh`), then `PATH`. nvidia-smi is never called.
//! * Everything is written under `OUT_DIR`; the generated `kernel_modules.rs` embeds the fatbins
//!   with `include_bytes!`, so a binary needs no files at run time. Each build's fatbins are also
//!   kept in `<target>/fusedreg-kernels/<key>/` (the key: compiler, arch list, flags, every source
//!   and header): cargo gives each feature set and profile its own `OUT_DIR`, so without this a
//!   `cargo test` after `cargo clippy` and a `--features candle` build compiled every kernel
//!   again (minutes each on two cores); with it they copy the same files.
//! * Without nvcc the crate still builds (GPU entry points return `Error::KernelsNotBuilt`), unless
//!   `FUSEDREG_REQUIRE_KERNELS=1`, which turns a missing compiler or a failed kernel into an error.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "80,90";
/// The code-generation flags, shared with `scripts/sass-budget` (one list, no second copy).
const NVCC_FLAGS: &str = include_str!("nvcc-flags.txt");
const TOOLKIT_DIR: &str = ".cuda";
const WATCHED_ENV: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "FUSEDREG_CUDA_ARCHS",
    "FUSEDREG_REQUIRE_KERNELS",
    "FUSEDREG_NVCC_FLAGS",
];

struct Built {
    stem: String,
    fatbin: PathBuf,
    entries: Vec<String>,
}

/// What one crate's build script compiles.
pub struct KernelBuild<'a> {
    /// The crate, for messages (`fusedreg`, `fusedreg-tools`).
    pub label: &'a str,
    /// The folder whose `*.cu` files are compiled, one module per file.
    pub kernels_dir: PathBuf,
    /// Extra `-I` folders (the kernels folder itself always comes first).
    pub include: Vec<PathBuf>,
    /// The repository root: where `.cuda/` (the project's own toolkit) lives.
    pub root: PathBuf,
    /// The `cfg` set when the kernels were built (e.g. `fusedreg_kernels_built`).
    pub cfg: &'a str,
}

/// Compiles every kernel of `spec` into `OUT_DIR` and writes `OUT_DIR/kernel_modules.rs`
/// (`MODULES`, `NOT_BUILT_REASON`, `ARCHS`, `NVCC_VERSION`; the includer defines
/// `EmbeddedModule { stem, fatbin, entries }`).
pub fn build_kernels(spec: &KernelBuild) {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let label = spec.label;
    let mut include = vec![spec.kernels_dir.clone()];
    include.extend(spec.include.iter().cloned());

    for dir in &include {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    for var in WATCHED_ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // The install script writes this stamp, so installing the toolkit triggers a rebuild.
    println!(
        "cargo:rerun-if-changed={}",
        spec.root.join(TOOLKIT_DIR).join("INSTALLED").display()
    );

    println!("cargo::rustc-check-cfg=cfg({})", spec.cfg);
    let require = env::var("FUSEDREG_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let key_file = out.join("kernel_build.key");
    let mut key = None;
    let result = find_nvcc(&spec.root).and_then(|nvcc| {
        let archs = parse_archs()?;
        let sources = kernel_sources(&spec.kernels_dir)?;
        let version = nvcc_version(&nvcc)?;
        // A build script may rerun for reasons other than the kernels (the tools crate's reruns
        // when the commit changes): the same sources, compiler and flags reuse the fatbins.
        let k = build_key(&nvcc, &version, &archs, &include);
        if fs::read_to_string(&key_file).is_ok_and(|old| old == k)
            && out.join("kernel_modules.rs").is_file()
        {
            return Err(String::new());
        }
        let shared = shared_dir(&out, &spec.kernels_dir, &k);
        key = Some(k);
        let cached = shared
            .as_deref()
            .and_then(|d| load_shared(d, &sources, &out));
        let built = match cached {
            Some(built) => built,
            None => {
                let built = compile_all(&nvcc, &archs, &sources, &include, &out)?;
                if let Some(d) = &shared {
                    store_shared(d, &built, &out);
                }
                built
            }
        };
        Ok((built, archs, version))
    });
    if matches!(&result, Err(reason) if reason.is_empty()) {
        println!("cargo:rustc-cfg={}", spec.cfg);
        return;
    }
    let _ = fs::remove_file(&key_file);
    let generated = match result {
        Ok((built, archs, version)) => {
            println!("cargo:rustc-cfg={}", spec.cfg);
            generate(&built, &archs, &version, None)
        }
        Err(reason) => {
            if require {
                panic!(
                    "FUSEDREG_REQUIRE_KERNELS=1 but the CUDA kernels of {label} could not be \
                     built: {reason}"
                );
            }
            println!(
                "cargo:warning={label}: CUDA kernels not built ({reason}). The CPU references \
                 work; GPU entry points return Error::KernelsNotBuilt. Run scripts/install-cuda.sh \
                 (installs a pinned CUDA 13.0 nvcc into .cuda/) or set NVCC/CUDA_HOME, then rebuild."
            );
            generate(&[], &[], "", Some(&reason))
        }
    };
    fs::write(out.join("kernel_modules.rs"), generated).expect("write kernel_modules.rs");
    if let Some(k) = key {
        fs::write(&key_file, k).expect("write kernel_build.key");
    }
}

/// Everything the fatbins depend on: compiler, arch list, extra flags and every source and header
/// under the include folders (path and contents).
fn build_key(nvcc: &Path, version: &str, archs: &[u32], include: &[PathBuf]) -> String {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = include.to_vec();
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &files {
        f.hash(&mut h);
        fs::read(f).unwrap_or_default().hash(&mut h);
    }
    format!(
        "{} | {version} | {archs:?} | {:?} | {:?} | {:016x}",
        nvcc.display(),
        nvcc_flags().collect::<Vec<_>>(),
        env::var("FUSEDREG_NVCC_FLAGS").ok(),
        h.finish()
    )
}

/// `<target>/fusedreg-kernels/<hash of key and kernels folder>` when `out` is a cargo build
/// script's `OUT_DIR` (`<target>/<profile>/build/<pkg>-<hash>/out`); else none (no sharing).
fn shared_dir(out: &Path, kernels_dir: &Path, key: &str) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    let build = out.ancestors().nth(2)?;
    if build.file_name()? != "build" {
        return None;
    }
    let target = out.ancestors().nth(4)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, kernels_dir).hash(&mut h);
    Some(
        target
            .join("fusedreg-kernels")
            .join(format!("{:016x}", h.finish())),
    )
}

/// The fatbins, resource reports and entry lists of a finished build of the same key, copied
/// into `out`; none when absent or incomplete (then the caller compiles).
fn load_shared(dir: &Path, sources: &[PathBuf], out: &Path) -> Option<Vec<Built>> {
    let list = fs::read_to_string(dir.join("entries.txt")).ok()?;
    let mut built = Vec::new();
    for line in list.lines() {
        let (stem, entries) = line.split_once('\t')?;
        let fatbin = out.join(format!("{stem}.fatbin"));
        fs::copy(dir.join(format!("{stem}.fatbin")), &fatbin).ok()?;
        let report = format!("{stem}.resources.txt");
        let _ = fs::copy(dir.join(&report), out.join(&report));
        let entries = entries.split(',').filter(|e| !e.is_empty());
        built.push(Built {
            stem: stem.to_string(),
            fatbin,
            entries: entries.map(str::to_string).collect(),
        });
    }
    let stems = |b: &Built| b.stem.clone();
    let want: Vec<String> = sources
        .iter()
        .map(|s| s.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    (built.iter().map(stems).collect::<Vec<_>>() == want).then_some(built)
}

/// Keeps a finished build for [`load_shared`]: written into a temporary folder and renamed, so
/// a concurrent build script of the same key sees all of it or nothing. Best effort: a failure
/// only costs the next build its compile.
fn store_shared(dir: &Path, built: &[Built], out: &Path) {
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(&tmp)?;
        let mut list = String::new();
        for b in built {
            fs::copy(&b.fatbin, tmp.join(format!("{}.fatbin", b.stem)))?;
            let report = format!("{}.resources.txt", b.stem);
            let _ = fs::copy(out.join(&report), tmp.join(&report));
            list.push_str(&format!("{}\t{}\n", b.stem, b.entries.join(",")));
        }
        fs::write(tmp.join("entries.txt"), list)?;
        fs::rename(&tmp, dir)
    };
    if write().is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
}

fn find_nvcc(root: &Path) -> Result<PathBuf, String> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    if let Ok(p) = env::var("NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("NVCC={} does not exist", p.display()))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin").join(exe);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let local = root.join(TOOLKIT_DIR).join("nvidia/cu13/bin").join(exe);
    if local.is_file() {
        return Ok(local);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join(exe);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err("nvcc not found via NVCC, CUDA_HOME, CUDA_PATH, .cuda/ or PATH".into())
}

fn parse_archs() -> Result<Vec<u32>, String> {
    let spec = env::var("FUSEDREG_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.into());
    let mut archs = Vec::new();
    for item in spec.split([',', ';', ' ']).filter(|s| !s.is_empty()) {
        let a: u32 = item.trim_start_matches("sm_").parse().map_err(|_| {
            format!(
                "FUSEDREG_CUDA_ARCHS: `{item}` is not an arch number like 80 or 90 (no `a` suffix)"
            )
        })?;
        if a < 75 {
            return Err(format!(
                "FUSEDREG_CUDA_ARCHS: sm_{a} is older than CUDA 13 supports (>= 75)"
            ));
        }
        archs.push(a);
    }
    archs.sort_unstable();
    archs.dedup();
    if archs.is_empty() {
        return Err("FUSEDREG_CUDA_ARCHS is empty".into());
    }
    Ok(archs)
}

/// The `*.cu` files of `dir` (not its subfolders), sorted.
pub fn kernel_sources(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    Ok(v)
}

fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let o = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

/// Compiles all sources in parallel (one nvcc process per file).
fn compile_all(
    nvcc: &Path,
    archs: &[u32],
    sources: &[PathBuf],
    include: &[PathBuf],
    out: &Path,
) -> Result<Vec<Built>, String> {
    let results: Vec<Result<Built, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(move || compile_one(nvcc, archs, src, include, out)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    results.into_iter().collect()
}

fn compile_one(
    nvcc: &Path,
    archs: &[u32],
    src: &Path,
    include: &[PathBuf],
    out: &Path,
) -> Result<Built, String> {
    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
    let keep = out.join("keep").join(&stem);
    let _ = fs::remove_dir_all(&keep);
    fs::create_dir_all(&keep).map_err(|e| e.to_string())?;
    let fatbin = out.join(format!("{stem}.fatbin"));

    let mut cmd = Command::new(nvcc);
    // Compressed fatbins (the driver inflates them at module load) keep binaries small.
    cmd.arg("-fatbin")
        .args(nvcc_flags())
        .arg("-Xfatbin=-compress-all")
        .args(["--resource-usage", "--keep", "--keep-dir"])
        .arg(&keep);
    for dir in include {
        cmd.arg("-I").arg(dir);
    }
    for a in archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let top = archs.last().unwrap();
    cmd.arg(format!("-gencode=arch=compute_{top},code=compute_{top}"));
    if let Ok(extra) = env::var("FUSEDREG_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("-o").arg(&fatbin).arg(src);

    let o = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The register/spill report per kernel and arch, kept for tuning (see README).
    let _ = fs::write(out.join(format!("{stem}.resources.txt")), &log);
    if !o.status.success() {
        return Err(format!("nvcc failed on {}:\n{log}", src.display()));
    }
    for line in log.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning=fusedreg: {stem}.cu: {line}");
    }

    // Entry points of the module: the kernels present in the PTX of *every* arch, so a kernel
    // dropped by an arch guard is caught by the kernel-name test instead of at first launch.
    let mut per_arch: Vec<Vec<String>> = Vec::new();
    for a in archs {
        let ptx = keep.join(format!("{stem}.compute_{a}.ptx"));
        let text = fs::read_to_string(&ptx)
            .map_err(|e| format!("cannot read kept PTX {}: {e}", ptx.display()))?;
        per_arch.push(ptx_entries(&text));
    }
    let mut entries = per_arch[0].clone();
    entries.retain(|e| per_arch.iter().all(|v| v.contains(e)));
    for (a, v) in archs.iter().zip(&per_arch) {
        for e in v.iter().filter(|e| !entries.contains(e)) {
            println!(
                "cargo:warning=fusedreg: kernel `{e}` exists for sm_{a} only; treated as missing"
            );
        }
    }
    let _ = fs::remove_dir_all(&keep);
    Ok(Built {
        stem,
        fatbin,
        entries,
    })
}

/// The flags of `build/nvcc-flags.txt`: one per line, `#` comments and blank lines skipped.
fn nvcc_flags() -> impl Iterator<Item = &'static str> {
    NVCC_FLAGS
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
}

fn ptx_entries(ptx: &str) -> Vec<String> {
    let mut v: Vec<String> = ptx
        .lines()
        .filter_map(|l| {
            let rest = l.trim().split(".entry ").nth(1)?;
            Some(rest.split(['(', ' ']).next()?.to_string())
        })
        .collect();
    v.sort();
    v
}

fn generate(built: &[Built], archs: &[u32], version: &str, not_built: Option<&str>) -> String {
    let mut s = String::from("// Generated by build.rs: the embedded kernel modules.\n");
    writeln!(s, "pub(crate) static MODULES: &[EmbeddedModule] = &[").unwrap();
    for b in built {
        writeln!(
            s,
            "    EmbeddedModule {{ stem: {:?}, fatbin: include_bytes!({:?}), entries: &{:?} }},",
            b.stem,
            b.fatbin.display().to_string(),
            b.entries
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(
        s,
        "pub(crate) const NOT_BUILT_REASON: Option<&str> = {not_built:?};"
    )
    .unwrap();
    writeln!(s, "pub(crate) const ARCHS: &[u32] = &{archs:?};").unwrap();
    writeln!(s, "pub(crate) const NVCC_VERSION: &str = {version:?};").unwrap();
    s
}
