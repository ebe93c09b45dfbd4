//! `fusedreg-bench`, the main job: every op, fused against unfused, on the same device in one
//! run, with throughput as a fraction of the copy bandwidth measured in that run. Without a
//! device it times the CPU implementations instead, under a line that says so. Either way it
//! ends with every kernel's static instruction count and predicted %copy (the record of
//! `scripts/sass-budget`), beside the %copy measured in this run or, without a device, the last
//! one recorded in the repository.
//!
//! ```text
//! cargo run --release --bin fusedreg-bench -- [--quick] [--out DIR] [--filter TEXT] [--cpu]
//! ```

mod cases;

use std::path::PathBuf;
use std::process::ExitCode;

use fusedreg::Handle;
use fusedreg_tools::report::{Report, Row};
use fusedreg_tools::timing::{copy_bandwidth, TimingPlan};

const USAGE: &str = "usage: fusedreg-bench [--quick] [--out DIR] [--filter TEXT] [--cpu]
  --quick        fewer samples and smaller sizes (finishes within a minute)
  --out DIR      where report.json, report.svg and report.txt go (default: results)
  --filter TEXT  only cases whose op or case name contains TEXT
  --cpu          time the CPU implementations even if a GPU is present";

struct Options {
    quick: bool,
    out: PathBuf,
    filter: Option<String>,
    force_cpu: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        out: PathBuf::from("results"),
        filter: None,
        force_cpu: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--cpu" => o.force_cpu = true,
            "--out" => o.out = args.next().ok_or("--out needs a directory")?.into(),
            "--filter" => o.filter = Some(args.next().ok_or("--filter needs a text")?),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(o)
}

/// What every op's case list gets: the device (or none), the timing plan and the report.
pub struct Ctx {
    /// The GPU, or `None` in CPU mode.
    pub handle: Option<Handle>,
    /// Samples and warm-up.
    pub plan: TimingPlan,
    /// `--quick`.
    pub quick: bool,
    /// Rows so far.
    pub report: Report,
    filter: Option<String>,
    done: usize,
}

impl Ctx {
    /// Whether a case is selected by `--filter`.
    pub fn wants(&self, op: &str, case: &str) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| op.contains(f.as_str()) || case.contains(f.as_str()))
    }

    /// Shows progress on stderr before a case runs.
    pub fn progress(&self, op: &str, case: &str) {
        eprint!("\r\x1b[K[{}] {op} {case} ...", self.done + 1);
    }

    /// Adds a finished row.
    pub fn push(&mut self, row: Row) {
        self.done += 1;
        self.report.push(row);
    }
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nerror: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Options) -> fusedreg::Result<()> {
    let plan = if opts.quick {
        TimingPlan::quick()
    } else {
        TimingPlan::default()
    };
    let device = if opts.force_cpu {
        Err("--cpu given".to_string())
    } else {
        Handle::new(0).map_err(|e| e.to_string())
    };
    let (handle, report) = match device {
        Ok(h) => {
            let info = h.device_info()?;
            eprint!("measuring copy bandwidth ...");
            let copy = copy_bandwidth(&h, if opts.quick { 256 << 20 } else { 1 << 30 }, plan)?;
            (Some(h), Report::new_gpu(opts.quick, &info, &copy))
        }
        Err(reason) => {
            let mut r = Report::new_cpu(opts.quick);
            r.no_device_reason = Some(reason);
            (None, r)
        }
    };
    let mut ctx = Ctx {
        handle,
        plan,
        quick: opts.quick,
        report,
        filter: opts.filter,
        done: 0,
    };
    cases::run_all(&mut ctx)?;
    eprintln!("\r\x1b[K{} cases done", ctx.done);
    // Every op's static instruction count and predicted %copy, beside this run's measurement
    // (GPU) or the last one recorded in the repository (labelled so).
    if let Err(e) = ctx.report.attach_budget() {
        eprintln!("instruction budget not shown: {e}");
    }
    print!("{}", ctx.report.table());
    match ctx.report.write_files(&opts.out) {
        Ok(files) => {
            for f in files {
                println!("wrote {}", f.display());
            }
        }
        Err(e) => eprintln!("could not write results to {}: {e}", opts.out.display()),
    }
    Ok(())
}
