//! The static instruction budget in the report: every kernel `scripts/sass-budget` counts, with
//! its count (SASS instructions per element on the report's case, sm_90), the budget, the
//! predicted %copy on an H200 and an H100, and beside them a measured %copy: from this run on a
//! GPU, otherwise the last one recorded in the repository (`benches/results/*/report.json`),
//! labelled as recorded with its device, commit and date.
//!
//! Both files are embedded at build time (`benches/sass-budget.json`, the record CI checks, and
//! the recorded reports), so the binary needs no files at run time and the lines always describe
//! the commit it was built from.
//!
//! ```
//! use fusedreg_tools::report::budget::{record, recorded_runs};
//! let rec = record().expect("the embedded record parses");
//! assert!(rec.kernels.len() >= 10);
//! assert!(rec.kernels.values().all(|k| k.per_elem > 0.0 && k.budget > 0.0));
//! // The recorded GPU runs carry their device, commit and date.
//! assert!(recorded_runs().iter().all(|r| r.device.is_some()));
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Report;

/// `benches/sass-budget.json` as written by `scripts/sass-budget --update`.
pub const RECORD_JSON: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../benches/sass-budget.json"
));

/// The GPU reports kept in the repository, newest device first.
const RECORDED_JSON: &[&str] = &[
    include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/results/h200/report.json"
    )),
    include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../benches/results/h100/report.json"
    )),
];

/// The record of the static counts.
#[derive(Clone, Debug, Deserialize)]
pub struct Record {
    /// The commit whose kernels were counted.
    pub commit: String,
    /// The nvcc that compiled them.
    pub nvcc: String,
    /// Per kernel id.
    pub kernels: BTreeMap<String, RecordKernel>,
}

/// The report row a counted kernel predicts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowKey {
    /// `Row::op`, e.g. `dropout fwd`.
    pub op: String,
    /// `Row::case`, e.g. `bf16 [16384,4096] bias`.
    pub case: String,
}

/// One counted kernel of the record.
#[derive(Clone, Debug, Deserialize)]
pub struct RecordKernel {
    /// What it is, e.g. `dropout fwd bf16, bias, 32-bit keys`.
    pub label: String,
    /// The report row it predicts (none for paths the report does not time).
    pub row: Option<RowKey>,
    /// Minimal bytes per element of the op.
    pub bytes_per_elem: f64,
    /// SASS instructions per element, every lane on the same path.
    pub per_elem: f64,
    /// The same where lanes diverge on real data (both sides of per-element branches).
    pub worst_per_elem: f64,
    /// 6.25 x bytes: 0.90 of copy on an H200.
    pub budget: f64,
    /// Predicted %copy on an H200 (low, high), as fractions.
    pub h200_predicted: [f64; 2],
    /// Predicted %copy on an H100 (low, high), as fractions.
    pub h100_predicted: [f64; 2],
    /// Registers per thread (one value, or one per kernel of a multi-kernel entry).
    pub registers: serde_json::Value,
}

/// A %copy beside a prediction, and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Fused %copy as a fraction.
    pub frac_copy: f64,
    /// `this run`, or `recorded` (a GPU report kept in the repository).
    pub source: String,
    /// The GPU.
    pub device: String,
    /// The commit that GPU ran.
    pub commit: String,
    /// Its date (UTC).
    pub date: String,
}

/// One line of the report's budget table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetLine {
    /// The record's id, e.g. `dropout.fwd.bf16`.
    pub id: String,
    /// What it is.
    pub label: String,
    /// The report row it predicts.
    pub row: Option<RowKey>,
    /// Minimal bytes per element.
    pub bytes_per_elem: f64,
    /// Static SASS instructions per element (uniform path).
    pub instr_per_elem: f64,
    /// The same with diverging lanes.
    pub worst_per_elem: f64,
    /// The budget, instructions per element.
    pub budget: f64,
    /// Predicted %copy on an H200, (low, high) fractions: a prediction, not a measurement.
    pub predicted_h200: [f64; 2],
    /// Predicted %copy on an H100.
    pub predicted_h100: [f64; 2],
    /// Measured in this run (GPU mode) or the last recorded GPU figure.
    pub measured: Vec<Measured>,
}

/// The embedded record.
///
/// # Errors
///
/// A message when the embedded JSON does not parse (a hand-edited record).
///
/// # Examples
///
/// ```
/// let rec = fusedreg_tools::report::budget::record().unwrap();
/// assert!(rec.nvcc.contains("13.0"));
/// ```
pub fn record() -> Result<Record, String> {
    serde_json::from_str(RECORD_JSON).map_err(|e| format!("benches/sass-budget.json: {e}"))
}

/// The GPU reports kept in the repository (parsed; ones that do not parse are skipped).
///
/// # Examples
///
/// ```
/// let runs = fusedreg_tools::report::budget::recorded_runs();
/// assert!(runs.iter().all(|r| r.mode == "gpu"));
/// ```
pub fn recorded_runs() -> Vec<Report> {
    RECORDED_JSON
        .iter()
        .filter_map(|s| serde_json::from_str::<Report>(s).ok())
        .filter(|r| r.mode == "gpu" && r.device.is_some())
        .collect()
}

fn frac_of(report: &Report, key: &RowKey) -> Option<f64> {
    report
        .rows
        .iter()
        .find(|r| r.op == key.op && r.case == key.case)
        .and_then(|r| r.fused.frac_copy)
}

fn short_commit(c: &str) -> String {
    c.chars().take(7).collect()
}

/// The budget lines for `report`: its own measurements in GPU mode, the recorded ones otherwise
/// (and for rows this run did not time).
///
/// # Examples
///
/// ```
/// use fusedreg_tools::report::{budget, Report};
/// let lines = budget::lines(&Report::new_cpu(true)).unwrap();
/// assert!(lines.iter().all(|l| l.measured.iter().all(|m| m.source == "recorded")));
/// // A row the H200 run timed carries its figure, labelled with device, commit and date.
/// let ce = lines.iter().find(|l| l.id.starts_with("cross_entropy")).unwrap();
/// assert!(ce.measured.iter().any(|m| m.device.contains("H200") && m.commit.len() == 7));
/// ```
pub fn lines(report: &Report) -> Result<Vec<BudgetLine>, String> {
    let rec = record()?;
    let recorded = recorded_runs();
    let mut out = Vec::new();
    for (id, k) in &rec.kernels {
        let mut measured = Vec::new();
        if let Some(key) = &k.row {
            let here = (report.mode == "gpu")
                .then(|| frac_of(report, key))
                .flatten();
            if let (Some(f), Some(d)) = (here, &report.device) {
                measured.push(Measured {
                    frac_copy: f,
                    source: "this run".into(),
                    device: d.name.clone(),
                    commit: short_commit(&report.commit),
                    date: report.date_utc.chars().take(10).collect(),
                });
            } else {
                for run in &recorded {
                    if let (Some(f), Some(d)) = (frac_of(run, key), &run.device) {
                        measured.push(Measured {
                            frac_copy: f,
                            source: "recorded".into(),
                            device: d.name.clone(),
                            commit: short_commit(&run.commit),
                            date: run.date_utc.chars().take(10).collect(),
                        });
                    }
                }
            }
        }
        out.push(BudgetLine {
            id: id.clone(),
            label: k.label.clone(),
            row: k.row.clone(),
            bytes_per_elem: k.bytes_per_elem,
            instr_per_elem: k.per_elem,
            worst_per_elem: k.worst_per_elem,
            budget: k.budget,
            predicted_h200: k.h200_predicted,
            predicted_h100: k.h100_predicted,
            measured,
        });
    }
    // Report order: the order the ops appear in the report, then the record's.
    let pos = |l: &BudgetLine| {
        l.row
            .as_ref()
            .and_then(|k| {
                report
                    .rows
                    .iter()
                    .position(|r| r.op == k.op && r.case == k.case)
            })
            .unwrap_or(usize::MAX)
    };
    out.sort_by_key(|l| (pos(l), op_order(&l.id)));
    Ok(out)
}

/// The order of the report's case modules, for lines without a row in this run.
fn op_order(id: &str) -> usize {
    const ORDER: &[&str] = &[
        "dropout_residual",
        "dropout.",
        "bias_act_dropout",
        "dropout_add_norm",
        "cross_entropy",
        "adamw",
    ];
    ORDER
        .iter()
        .position(|p| id.starts_with(p))
        .unwrap_or(ORDER.len())
}

fn pct(f: f64) -> String {
    format!("{:.0}%", 100.0 * f)
}

fn range(p: [f64; 2]) -> String {
    if p[0] >= 1.0 {
        "100%".into()
    } else {
        format!("{}-{}", pct(p[0]), pct(p[1]))
    }
}

/// The budget table printed under the report's rows.
pub(super) fn render(lines: &[BudgetLine], commit: &str, nvcc: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    writeln!(
        s,
        "\ninstruction budget (scripts/sass-budget; static SASS count, sm_90, {nvcc}, record of {commit}):\n\
         instr/elem on one thread's path through the case (worst: lanes diverging); budget 6.25 x B/elem;\n\
         pred = PREDICTED %copy (0.63-0.78 of the issue-bound ceiling); measured = this run, or RECORDED on a GPU earlier"
    )
    .unwrap();
    let header = [
        "kernel",
        "B/elem",
        "instr/elem",
        "budget",
        "pred H200",
        "pred H100",
        "measured %copy",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for l in lines {
        let mut per = format!("{:.1}", l.instr_per_elem);
        if l.worst_per_elem != l.instr_per_elem {
            write!(per, " ({:.1} worst)", l.worst_per_elem).unwrap();
        }
        let over = if l.instr_per_elem > l.budget {
            " OVER"
        } else {
            ""
        };
        let measured = if l.measured.is_empty() {
            if l.row.is_some() {
                "- (not timed on a GPU yet)".to_string()
            } else {
                "- (no report row)".to_string()
            }
        } else {
            l.measured
                .iter()
                .map(|m| {
                    let dev = m.device.trim_start_matches("NVIDIA ");
                    let dev = dev.split_whitespace().next().unwrap_or(dev);
                    if m.source == "this run" {
                        format!("{} here", pct(m.frac_copy))
                    } else {
                        format!(
                            "{} recorded ({dev}, {}, {})",
                            pct(m.frac_copy),
                            m.commit,
                            m.date
                        )
                    }
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        rows.push(vec![
            l.label.clone(),
            format!("{}", l.bytes_per_elem),
            per,
            format!("{}{over}", l.budget),
            range(l.predicted_h200),
            range(l.predicted_h100),
            measured,
        ]);
    }
    super::table::write_columns(&mut s, &rows, 1);
    s
}
