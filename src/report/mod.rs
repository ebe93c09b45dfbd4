//! The benchmark report behind `fusedreg-bench`: one row per (op, case) comparing the fused
//! kernel with the unfused way of doing the same work, rendered as a table, a JSON file and an
//! SVG plot.
//!
//! Throughput is always computed from the *minimal* bytes an op must move (each input read once,
//! each output written once; the formulas live beside each op), so a variant that moves more
//! bytes than necessary shows as slower, not as "more GB/s". Each figure is also given as a
//! fraction of the device-to-device copy bandwidth measured in the same run.
//!
//! ```
//! use fusedreg::report::{Measurement, Report, Row};
//! let mut r = Report::new_cpu(true);
//! r.rows.push(Row::new("example", "f32 2^10", 1024, Measurement::new(0.5, 8192.0)));
//! assert!(r.table().contains("example"));
//! let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
//! assert_eq!(json["schema"], fusedreg::report::SCHEMA);
//! ```

pub mod models;
mod svg;
mod table;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::DeviceInfo;
use crate::timing::CopyBandwidth;

/// Identifies the JSON layout; bump it when a field changes meaning.
pub const SCHEMA: &str = "fusedreg-bench/1";

/// One timed variant (fused or unfused) of a case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Median time per step in milliseconds.
    pub ms: f64,
    /// Minimal bytes the op must move per step (the throughput numerator).
    pub bytes: f64,
    /// `bytes / time`, GB/s.
    pub gbps: f64,
    /// `gbps` over the copy bandwidth measured in the same run (GPU runs only).
    pub frac_copy: Option<f64>,
    /// Kernel launches per step.
    pub launches_per_step: Option<u64>,
    /// Host wall time to enqueue one step, microseconds.
    pub host_us_per_step: Option<f64>,
}

impl Measurement {
    /// A measurement of `ms` per step moving `bytes` (at least) per step.
    pub fn new(ms: f64, bytes: f64) -> Self {
        Measurement {
            ms,
            bytes,
            gbps: crate::timing::gb_per_s(bytes, ms),
            frac_copy: None,
            launches_per_step: None,
            host_us_per_step: None,
        }
    }

    /// Times `step` on the GPU (median of CUDA-event samples, see [`crate::timing::time_gpu`])
    /// and records launches per step and the host time to enqueue one step.
    pub fn gpu(
        handle: &crate::Handle,
        plan: crate::timing::TimingPlan,
        bytes: f64,
        mut step: impl FnMut() -> crate::Result<()>,
    ) -> crate::Result<Self> {
        let samples = crate::timing::time_gpu(handle, plan, &mut step)?;
        // Host cost of enqueueing: a few steps back to back, without waiting for the GPU.
        handle.synchronize()?;
        const HOST_STEPS: u32 = 8;
        let launches0 = handle.launch_count();
        let t = std::time::Instant::now();
        for _ in 0..HOST_STEPS {
            step()?;
        }
        let host = t.elapsed().as_secs_f64() / f64::from(HOST_STEPS);
        let launches = (handle.launch_count() - launches0) / u64::from(HOST_STEPS);
        handle.synchronize()?;
        Ok(Self::new(samples.median(), bytes)
            .launches(launches)
            .host_us(host * 1e6))
    }

    /// Times `step` on the CPU with the wall clock (median of `plan.samples` runs after
    /// `plan.warmup`).
    pub fn cpu(plan: crate::timing::TimingPlan, bytes: f64, mut step: impl FnMut()) -> Self {
        for _ in 0..plan.warmup {
            step();
        }
        let mut ms: Vec<f64> = (0..plan.samples.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                step();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        Self::new(ms[ms.len() / 2], bytes)
    }

    /// Adds the launches per step.
    pub fn launches(mut self, n: u64) -> Self {
        self.launches_per_step = Some(n);
        self
    }

    /// Adds the host time per step.
    pub fn host_us(mut self, us: f64) -> Self {
        self.host_us_per_step = Some(us);
        self
    }
}

/// One (op, case) line of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// Op stem and direction, e.g. `dropout_residual fwd`.
    pub op: String,
    /// Dtype and size, e.g. `bf16 2^26`.
    pub case: String,
    /// Elements (or parameters) per step.
    pub elements: u64,
    /// The fused kernel(s).
    pub fused: Measurement,
    /// The unfused baseline, when there is one.
    pub unfused: Option<Measurement>,
    /// `unfused.ms / fused.ms`.
    pub speedup: Option<f64>,
    /// Device memory the fused variant keeps between forward and backward (e.g. masks).
    pub fused_held_bytes: Option<u64>,
    /// The same for the unfused variant.
    pub unfused_held_bytes: Option<u64>,
    /// Anything the reader should know (e.g. "PyTorch-eager style, 3 kernels").
    pub note: String,
}

impl Row {
    /// A row with only the fused measurement.
    pub fn new(op: &str, case: &str, elements: u64, fused: Measurement) -> Self {
        Row {
            op: op.into(),
            case: case.into(),
            elements,
            fused,
            unfused: None,
            speedup: None,
            fused_held_bytes: None,
            unfused_held_bytes: None,
            note: String::new(),
        }
    }

    /// Adds the unfused baseline and the speedup.
    pub fn with_unfused(mut self, unfused: Measurement) -> Self {
        self.speedup = Some(unfused.ms / self.fused.ms);
        self.unfused = Some(unfused);
        self
    }

    /// Records memory held between passes by each variant.
    pub fn held(mut self, fused: u64, unfused: u64) -> Self {
        self.fused_held_bytes = Some(fused);
        self.unfused_held_bytes = Some(unfused);
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// The device part of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceJson {
    /// Name.
    pub name: String,
    /// Compute capability as "9.0".
    pub compute_capability: String,
    /// SM count.
    pub sm_count: u32,
    /// L2 bytes.
    pub l2_bytes: u64,
    /// Global memory bytes.
    pub total_memory: u64,
    /// Driver's CUDA version, e.g. "13.0".
    pub driver_cuda_version: String,
}

impl From<&DeviceInfo> for DeviceJson {
    fn from(d: &DeviceInfo) -> Self {
        DeviceJson {
            name: d.name.clone(),
            compute_capability: format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
            sm_count: d.sm_count,
            l2_bytes: d.l2_bytes,
            total_memory: d.total_memory,
            driver_cuda_version: format!(
                "{}.{}",
                d.driver_version / 1000,
                (d.driver_version % 1000) / 10
            ),
        }
    }
}

/// The copy reference of a GPU run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyJson {
    /// Bytes copied per call.
    pub bytes: u64,
    /// Driver memcpy, GB/s (read + write).
    pub memcpy_gbps: f64,
    /// Copy kernel, GB/s (read + write).
    pub kernel_gbps: f64,
    /// The figure rows are divided by.
    pub reference_gbps: f64,
}

impl From<&CopyBandwidth> for CopyJson {
    fn from(c: &CopyBandwidth) -> Self {
        CopyJson {
            bytes: c.bytes,
            memcpy_gbps: c.memcpy_gbps,
            kernel_gbps: c.kernel_gbps,
            reference_gbps: c.reference_gbps(),
        }
    }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// Crate version.
    pub crate_version: String,
    /// Git commit of the build (from `FUSEDREG_COMMIT` or `git rev-parse`), or "unknown".
    pub commit: String,
    /// UTC time the run started, ISO 8601.
    pub date_utc: String,
    /// "gpu" or "cpu" (no device found: CPU implementations were timed instead).
    pub mode: String,
    /// Whether `--quick` shortened the run.
    pub quick: bool,
    /// How the kernels were built ("sm_80/sm_90 + PTX, nvcc …" or "not built").
    pub kernels: String,
    /// The device, in GPU mode.
    pub device: Option<DeviceJson>,
    /// The copy reference, in GPU mode.
    pub copy: Option<CopyJson>,
    /// Why there is no device, in CPU mode.
    pub no_device_reason: Option<String>,
    /// The rows.
    pub rows: Vec<Row>,
}

impl Report {
    fn base(mode: &str, quick: bool) -> Self {
        Report {
            schema: SCHEMA.into(),
            crate_version: env!("CARGO_PKG_VERSION").into(),
            commit: commit(),
            date_utc: utc_now(),
            mode: mode.into(),
            quick,
            kernels: kernels_description(),
            device: None,
            copy: None,
            no_device_reason: None,
            rows: Vec::new(),
        }
    }

    /// A GPU-mode report on `device` with the copy reference measured in this run.
    pub fn new_gpu(quick: bool, device: &DeviceInfo, copy: &CopyBandwidth) -> Self {
        let mut r = Self::base("gpu", quick);
        r.device = Some(device.into());
        r.copy = Some(copy.into());
        r
    }

    /// A CPU-mode report (no device).
    pub fn new_cpu(quick: bool) -> Self {
        Self::base("cpu", quick)
    }

    /// Adds a row, filling in the fractions of the copy bandwidth.
    pub fn push(&mut self, mut row: Row) {
        if let Some(c) = &self.copy {
            let frac = |m: &mut Measurement| m.frac_copy = Some(m.gbps / c.reference_gbps);
            frac(&mut row.fused);
            if let Some(u) = row.unfused.as_mut() {
                frac(u);
            }
        }
        self.rows.push(row);
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The readable table printed on stdout.
    pub fn table(&self) -> String {
        table::render(self)
    }

    /// An SVG bar chart: each row's fused and unfused throughput as a fraction of the copy
    /// bandwidth (GB/s in CPU mode).
    pub fn to_svg(&self) -> String {
        svg::render(self)
    }

    /// Writes `report.json`, `report.svg` and `report.txt` into `dir`, returning their paths.
    pub fn write_files(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir)?;
        let files = [
            ("report.json", self.to_json()),
            ("report.svg", self.to_svg()),
            ("report.txt", self.table()),
        ];
        let mut out = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text)?;
            out.push(p);
        }
        Ok(out)
    }
}

fn kernels_description() -> String {
    if crate::kernels_built() {
        let archs: Vec<String> = crate::compiled_archs()
            .iter()
            .map(|a| format!("sm_{a}"))
            .collect();
        format!("{} + PTX, {}", archs.join("/"), crate::nvcc_version())
    } else {
        "not built".into()
    }
}

/// `FUSEDREG_COMMIT`, else `git rev-parse --short HEAD` (+ "-dirty"), else "unknown".
fn commit() -> String {
    if let Ok(c) = std::env::var("FUSEDREG_COMMIT") {
        if !c.trim().is_empty() {
            return c.trim().to_string();
        }
    }
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
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
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without a date crate.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_414), (2025, 11, 22));
        assert_eq!(utc_now().len(), 20);
    }
}
