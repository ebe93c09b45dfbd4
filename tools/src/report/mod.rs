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
//! use fusedreg_tools::report::{Measurement, Report, Row};
//! let mut r = Report::new_cpu(true);
//! r.rows.push(Row::new("example", "f32 2^10", 1024, Measurement::new(0.5, 8192.0)));
//! assert!(r.table().contains("example"));
//! let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
//! assert_eq!(json["schema"], fusedreg_tools::report::SCHEMA);
//! ```

pub mod budget;
pub mod models;
mod svg;
mod table;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::timing::CopyBandwidth;
use fusedreg::DeviceInfo;

/// Identifies the JSON layout; bump it when a field changes meaning.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::{Report, SCHEMA};
/// assert_eq!(SCHEMA, "fusedreg-bench/1");
/// assert_eq!(Report::new_cpu(false).schema, SCHEMA); // a reader checks it before the rest
/// ```
pub const SCHEMA: &str = "fusedreg-bench/1";

/// One timed variant (fused or unfused) of a case.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::Measurement;
/// let m = Measurement::new(0.25, 1e9).launches(3).host_us(12.5);
/// assert!((m.gbps - 4000.0).abs() < 1e-9); // 1 GB in 0.25 ms
/// assert_eq!((m.launches_per_step, m.host_us_per_step), (Some(3), Some(12.5)));
/// assert_eq!(m.frac_copy, None); // filled in by `Report::push` in GPU mode
/// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Measurement;
    /// // 2^26 bf16 elements, read x and residual, write y: 6 bytes each, in 0.15 ms.
    /// let m = Measurement::new(0.15, 6.0 * (1u64 << 26) as f64);
    /// assert!((m.gbps - 2684.35456).abs() < 1e-6);
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn main() -> fusedreg::Result<()> {
    /// use fusedreg::Error;
    /// use fusedreg_tools::{report::Measurement, timing::{filled, TimingPlan}};
    /// let h = fusedreg::Handle::new(0)?;
    /// let mut buf = filled::<f32>(&h, 1 << 20, 1)?;
    /// let bytes = 4.0 * (1 << 20) as f64; // each byte written once
    /// let m = Measurement::gpu(&h, TimingPlan::quick(), bytes, || {
    ///     h.stream().memset_zeros(&mut buf).map_err(Error::driver("memset"))
    /// })?;
    /// assert_eq!(m.launches_per_step, Some(0)); // a memset is not a kernel launch
    /// # Ok(()) }
    /// ```
    pub fn gpu(
        handle: &fusedreg::Handle,
        plan: crate::timing::TimingPlan,
        bytes: f64,
        mut step: impl FnMut() -> fusedreg::Result<()>,
    ) -> fusedreg::Result<Self> {
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::{report::Measurement, timing::TimingPlan};
    /// let mut v = vec![1.0f32; 4096];
    /// let bytes = 2.0 * 4.0 * v.len() as f64; // read and write each element
    /// let m = Measurement::cpu(TimingPlan::quick(), bytes, || v.iter_mut().for_each(|x| *x *= 0.5));
    /// assert!(m.ms >= 0.0 && m.bytes == bytes);
    /// assert_eq!(m.launches_per_step, None);
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Measurement;
    /// let unfused = Measurement::new(0.9, 1e8).launches(3); // bias add, dropout, residual add
    /// assert_eq!(unfused.launches_per_step, Some(3));
    /// ```
    pub fn launches(mut self, n: u64) -> Self {
        self.launches_per_step = Some(n);
        self
    }

    /// Adds the host time per step.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Measurement;
    /// let m = Measurement::new(0.4, 1e8).host_us(7.5);
    /// assert_eq!(m.host_us_per_step, Some(7.5));
    /// ```
    pub fn host_us(mut self, us: f64) -> Self {
        self.host_us_per_step = Some(us);
        self
    }
}

/// One (op, case) line of the report.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::{Measurement, Row};
/// let row = Row::new("dropout_residual fwd", "bf16 2^26", 1 << 26, Measurement::new(0.5, 4e8))
///     .with_unfused(Measurement::new(1.5, 4e8))
///     .held(8 << 20, 64 << 20)
///     .note("1-bit mask vs byte mask");
/// assert_eq!(row.speedup, Some(3.0));
/// assert_eq!(row.unfused_held_bytes, Some(64 << 20));
/// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Row};
    /// let row = Row::new("global_norm", "f32 gpt2-124m", 124_439_808, Measurement::new(0.2, 5e8));
    /// assert_eq!((row.op.as_str(), row.case.as_str()), ("global_norm", "f32 gpt2-124m"));
    /// assert!(row.unfused.is_none() && row.speedup.is_none() && row.note.is_empty());
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Row};
    /// let row = Row::new("adamw", "f32 2^24", 1 << 24, Measurement::new(0.5, 1e8))
    ///     .with_unfused(Measurement::new(1.0, 1e8));
    /// assert_eq!(row.speedup, Some(2.0)); // unfused ms / fused ms
    /// ```
    pub fn with_unfused(mut self, unfused: Measurement) -> Self {
        self.speedup = Some(unfused.ms / self.fused.ms);
        self.unfused = Some(unfused);
        self
    }

    /// Records memory held between passes by each variant.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Row};
    /// let n: u64 = 1 << 24;
    /// // A 1-bit mask against a byte mask between forward and backward.
    /// let row = Row::new("dropout_residual", "f32 2^24", n, Measurement::new(0.1, 1e8)).held(n / 8, n);
    /// assert_eq!((row.fused_held_bytes, row.unfused_held_bytes), (Some(n / 8), Some(n)));
    /// ```
    pub fn held(mut self, fused: u64, unfused: u64) -> Self {
        self.fused_held_bytes = Some(fused);
        self.unfused_held_bytes = Some(unfused);
        self
    }

    /// Sets the note.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Row};
    /// let row = Row::new("x", "f32", 1, Measurement::new(1.0, 4.0)).note("PyTorch-eager style");
    /// assert_eq!(row.note, "PyTorch-eager style");
    /// ```
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// The device part of the report.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::DeviceJson;
/// # let device = fusedreg::DeviceInfo {
/// #     ordinal: 0, name: "NVIDIA H100 80GB HBM3".into(), compute_capability: (9, 0),
/// #     sm_count: 132, l2_bytes: 50 << 20, total_memory: 80 << 30, driver_version: 13000,
/// # };
/// let d = DeviceJson::from(&device);
/// assert_eq!(d.compute_capability, "9.0");
/// assert_eq!(d.driver_cuda_version, "13.0"); // from the driver's 13000
/// ```
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
///
/// # Examples
///
/// ```
/// use fusedreg_tools::{report::CopyJson, timing::CopyBandwidth};
/// let c = CopyBandwidth { bytes: 1 << 28, memcpy_gbps: 2900.0, kernel_gbps: 3000.0 };
/// let json = CopyJson::from(&c);
/// assert_eq!(json.reference_gbps, 3000.0); // the better of the two
/// ```
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
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::{Measurement, Report, Row};
/// let mut r = Report::new_cpu(true);
/// r.push(Row::new("example", "f32 2^12", 4096, Measurement::new(0.01, 32768.0)));
/// assert_eq!((r.mode.as_str(), r.quick, r.rows.len()), ("cpu", true, 1));
/// assert!(r.device.is_none() && r.copy.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// Crate version.
    pub crate_version: String,
    /// Git commit of the build (see [`commit`]), or "unknown".
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
    /// Every kernel of the instruction-budget record (`scripts/sass-budget`) with its static
    /// count, the predicted %copy and the measured one (this run's, or recorded); filled by
    /// [`Report::attach_budget`]. Absent from reports written before it existed.
    #[serde(default)]
    pub budget: Vec<budget::BudgetLine>,
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
            budget: Vec::new(),
        }
    }

    /// Fills [`Report::budget`] from the embedded record: every counted kernel, with this run's
    /// %copy for the rows it timed on a GPU and the recorded GPU figures otherwise. Called by
    /// `fusedreg-bench` after its cases, so the report lists every op with or without a device.
    ///
    /// # Errors
    ///
    /// A message when the embedded record does not parse.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Report;
    /// let mut r = Report::new_cpu(true);
    /// r.attach_budget().unwrap();
    /// assert!(r.budget.iter().any(|l| l.id.starts_with("dropout_add_norm")));
    /// assert!(r.table().contains("instruction budget"));
    /// ```
    pub fn attach_budget(&mut self) -> Result<(), String> {
        self.budget = budget::lines(self)?;
        Ok(())
    }

    /// A GPU-mode report on `device` with the copy reference measured in this run.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::{report::Report, timing::CopyBandwidth};
    /// # let device = fusedreg::DeviceInfo {
    /// #     ordinal: 0, name: "NVIDIA H100 80GB HBM3".into(), compute_capability: (9, 0),
    /// #     sm_count: 132, l2_bytes: 50 << 20, total_memory: 80 << 30, driver_version: 13000,
    /// # };
    /// // In the bench: `handle.device_info()?` and `timing::copy_bandwidth(..)?`.
    /// let copy = CopyBandwidth { bytes: 256 << 20, memcpy_gbps: 2900.0, kernel_gbps: 3000.0 };
    /// let r = Report::new_gpu(false, &device, &copy);
    /// assert_eq!(r.mode, "gpu");
    /// assert_eq!(r.device.unwrap().name, "NVIDIA H100 80GB HBM3");
    /// ```
    pub fn new_gpu(quick: bool, device: &DeviceInfo, copy: &CopyBandwidth) -> Self {
        let mut r = Self::base("gpu", quick);
        r.device = Some(device.into());
        r.copy = Some(copy.into());
        r
    }

    /// A CPU-mode report (no device).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Report;
    /// let mut r = Report::new_cpu(false);
    /// r.no_device_reason = Some("no CUDA driver".into());
    /// assert_eq!(r.mode, "cpu");
    /// assert!(r.table().contains("NO CUDA DEVICE FOUND (no CUDA driver)"));
    /// ```
    pub fn new_cpu(quick: bool) -> Self {
        Self::base("cpu", quick)
    }

    /// Adds a row, filling in the fractions of the copy bandwidth.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Report, Row};
    /// use fusedreg_tools::timing::CopyBandwidth;
    /// # let device = fusedreg::DeviceInfo {
    /// #     ordinal: 0, name: "NVIDIA H100 80GB HBM3".into(), compute_capability: (9, 0),
    /// #     sm_count: 132, l2_bytes: 50 << 20, total_memory: 80 << 30, driver_version: 13000,
    /// # };
    /// let copy = CopyBandwidth { bytes: 256 << 20, memcpy_gbps: 2900.0, kernel_gbps: 3000.0 };
    /// let mut r = Report::new_gpu(false, &device, &copy);
    /// r.push(Row::new("op", "f32", 1 << 20, Measurement::new(1.0, 1.5e9))); // 1500 GB/s
    /// let frac = r.rows[0].fused.frac_copy.unwrap();
    /// assert!((frac - 0.5).abs() < 1e-12);
    /// ```
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
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Report, Row};
    /// let mut r = Report::new_cpu(true);
    /// r.push(Row::new("example", "f32 2^10", 1024, Measurement::new(0.5, 8192.0)));
    /// let back: Report = serde_json::from_str(&r.to_json()).unwrap();
    /// assert_eq!(back.rows[0].op, "example");
    /// assert_eq!(back.commit, r.commit);
    /// ```
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The readable table printed on stdout.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Report, Row};
    /// let mut r = Report::new_cpu(false);
    /// r.push(Row::new("adamw", "f32 2^20", 1 << 20, Measurement::new(0.5, 1e8))
    ///     .with_unfused(Measurement::new(1.0, 1e8)));
    /// let table = r.table();
    /// let line = table.lines().find(|l| l.starts_with("adamw")).unwrap();
    /// assert!(line.contains("2.00x")); // the speedup column
    /// ```
    pub fn table(&self) -> String {
        table::render(self)
    }

    /// An SVG bar chart: each row's fused and unfused throughput as a fraction of the copy
    /// bandwidth (GB/s in CPU mode).
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::{Measurement, Report, Row};
    /// let mut r = Report::new_cpu(false);
    /// r.push(Row::new("a<b", "f32", 1024, Measurement::new(0.5, 8192.0)));
    /// let svg = r.to_svg();
    /// assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    /// assert!(svg.contains("a&lt;b f32")); // labels are escaped
    /// ```
    pub fn to_svg(&self) -> String {
        svg::render(self)
    }

    /// Writes `report.json`, `report.svg` and `report.txt` into `dir`, returning their paths.
    ///
    /// # Examples
    ///
    /// ```
    /// use fusedreg_tools::report::Report;
    /// let dir = std::env::temp_dir().join(format!("fusedreg-doc-{}", std::process::id()));
    /// let files = Report::new_cpu(true).write_files(&dir).unwrap();
    /// assert_eq!(files.len(), 3);
    /// assert!(files.iter().all(|p| p.is_file()));
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// ```
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
    if fusedreg::kernels_built() {
        let archs: Vec<String> = fusedreg::compiled_archs()
            .iter()
            .map(|a| format!("sm_{a}"))
            .collect();
        format!("{} + PTX, {}", archs.join("/"), fusedreg::nvcc_version())
    } else {
        "not built".into()
    }
}

/// `FUSEDREG_COMMIT` when set at run time (the GPU kit sets it), else the commit the tools were
/// built from: `git rev-parse --short=12 HEAD` (+ "-dirty") of the checkout, read by
/// `tools/build.rs` at build time, so the report does not depend on the folder it runs from.
/// "unknown" when built outside a git checkout.
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::{commit, BUILD_COMMIT};
/// if std::env::var_os("FUSEDREG_COMMIT").is_none() {
///     assert_eq!(commit(), BUILD_COMMIT); // whatever the current directory is
/// }
/// ```
pub fn commit() -> String {
    match std::env::var("FUSEDREG_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => BUILD_COMMIT.to_string(),
    }
}

/// The commit embedded at build time (see [`commit`]).
///
/// # Examples
///
/// ```
/// // Built from a git checkout: 12 hex digits, maybe "-dirty"; "unknown" otherwise.
/// let c = fusedreg_tools::report::BUILD_COMMIT;
/// let hex = c.trim_end_matches("-dirty");
/// assert!(c == "unknown" || (hex.len() == 12 && hex.chars().all(|x| x.is_ascii_hexdigit())));
/// ```
pub const BUILD_COMMIT: &str = env!("FUSEDREG_BUILD_COMMIT");

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
