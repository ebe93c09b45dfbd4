//! The benchmark report: the minimal-bytes formulas against REFERENCE.md, the JSON schema, and
//! the `fusedreg-bench` binary run end to end on the CPU.

use fusedreg::adamw::{clip_step_min_bytes, min_bytes};
use fusedreg::dropout::fused_forward_bytes;
use fusedreg::global_norm::{norm_min_bytes, scale_min_bytes};
use fusedreg::DtypeKind::{Bf16, F32};
use fusedreg_tools::report::{Measurement, Report, Row, SCHEMA};

/// Bytes per element (per parameter) of every op, as tabulated in REFERENCE.md §2 and §5.
#[test]
fn bytes_per_element_match_the_reference_tables() {
    let n = 1 << 20;
    let per = |b: u64| b as f64 / n as f64;
    // §2 (dropout + residual) is checked where the formulas live, in dropout's unit tests; here
    // one row of it, and §5.
    assert_eq!(per(fused_forward_bytes(Bf16, n, true, false)), 6.0);
    // §5: AdamW 28 B/param in both layouts; norm 2 / 4; in-place scale 4 / 8.
    assert_eq!(per(min_bytes(n, F32, F32)), 28.0);
    assert_eq!(per(min_bytes(n, Bf16, Bf16)), 28.0);
    assert_eq!(per(norm_min_bytes(n, Bf16)), 2.0);
    assert_eq!(per(norm_min_bytes(n, F32)), 4.0);
    assert_eq!(per(scale_min_bytes(n, Bf16)), 4.0);
    assert_eq!(per(scale_min_bytes(n, F32)), 8.0);
    // The fused clip + step reads the gradients once more than AdamW alone.
    assert_eq!(per(clip_step_min_bytes(n, F32, F32)), 32.0);
}

/// The minimal bytes the GPU-only rows of the newer ops divide by (their doc tables): a wrong
/// formula would misstate every GB/s and fraction of copy in the report.
#[test]
fn bytes_of_the_gpu_only_rows() {
    use fusedreg::adamw::{min_bytes_with, MasterWeights, MomentDtype, StateOptions};
    use fusedreg::{
        bias_act_dropout as bad, cross_entropy as xe, dropout, dropout_add_norm as dan,
    };
    let n = 1 << 20;
    let per = |b: u64| b as f64 / n as f64;
    // dropout: read x, write y (read dy, write dx); bf16 4, f32 8.
    assert_eq!(
        per(dropout::fused_forward_bytes(Bf16, n, false, false)),
        4.0
    );
    assert_eq!(per(dropout::fused_backward_bytes(F32, n, false)), 8.0);
    // bias_act_dropout: forward 2 s; backward reads dy and x, writes dx: 3 s.
    assert_eq!(per(bad::fused_forward_bytes(Bf16, n, false)), 4.0);
    assert_eq!(per(bad::fused_backward_bytes(Bf16, n)), 6.0);
    assert_eq!(per(bad::fused_backward_bytes(F32, n)), 12.0);
    // dropout_add_norm prenorm with a residual: 8 + 10 = 18 B per bf16 element.
    assert_eq!(per(dan::fused_forward_bytes(Bf16, Bf16, n, true)), 8.0);
    assert_eq!(
        per(dan::fused_backward_bytes(Bf16, Bf16, n, true, true)),
        10.0
    );
    assert_eq!(per(dan::fused_forward_bytes(F32, F32, n, true)), 16.0);
    // cross_entropy fwd+bwd: 3 s per logit plus, per row, the i64 target and the f32 row loss.
    assert_eq!(xe::fused_bytes(Bf16, 8, n, 8, true), 8 * (6 * n + 12));
    // AdamW lean layouts on bf16 params and grads: bf16 moments with master 20, without 14.
    let lean = |master| StateOptions {
        moments: MomentDtype::Bf16,
        master,
    };
    assert_eq!(
        per(min_bytes_with(n, Bf16, Bf16, lean(MasterWeights::F32))),
        20.0
    );
    assert_eq!(
        per(min_bytes_with(n, Bf16, Bf16, lean(MasterWeights::None))),
        14.0
    );
}

#[test]
fn json_round_trips_and_names_its_schema() {
    let mut r = Report::new_cpu(true);
    r.no_device_reason = Some("test".into());
    r.push(
        Row::new(
            "op",
            "f32 2^10",
            1024,
            Measurement::new(0.5, 8192.0).launches(1),
        )
        .with_unfused(Measurement::new(1.0, 8192.0).launches(3))
        .held(0, 1024)
        .note("n"),
    );
    let text = r.to_json();
    let back: Report = serde_json::from_str(&text).unwrap();
    assert_eq!(back, r);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["schema"], SCHEMA);
    for key in [
        "crate_version",
        "commit",
        "date_utc",
        "mode",
        "quick",
        "kernels",
        "device",
        "copy",
        "rows",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    let row = &v["rows"][0];
    assert_eq!(row["speedup"], 2.0);
    for key in [
        "ms",
        "bytes",
        "gbps",
        "frac_copy",
        "launches_per_step",
        "host_us_per_step",
    ] {
        assert!(row["fused"].get(key).is_some(), "row.fused missing {key}");
    }
    assert!(r.to_svg().starts_with("<svg"));
}

/// The main job on the CPU: it prints the no-device line and the table, and writes the files.
/// (`FUSEDREG_BENCH_BIN` points at the binary when the test runs outside cargo, as in the GPU
/// run kit.)
#[test]
fn bench_binary_runs_on_the_cpu_and_writes_its_files() {
    let dir = std::env::temp_dir().join(format!("fusedreg-report-{}", std::process::id()));
    let bin = std::env::var("FUSEDREG_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fusedreg-bench").to_string());
    let out = std::process::Command::new(bin)
        .args(["--cpu", "--quick", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("NO CUDA DEVICE FOUND"), "{stdout}");
    let shows = |what: &str, ops: &[&str]| {
        for op in ops {
            assert!(stdout.contains(op), "no {op} {what} in\n{stdout}");
        }
    };
    let rows = [
        "dropout_residual fwd",
        "dropout_residual bwd",
        "global_norm",
        "adamw",
        "clip+adamw",
        "train step",
    ];
    shows("row", &rows);
    // Without a device every op still appears, with its static count and prediction, and the
    // GPU figures it shows are labelled as recorded (never as measured here).
    assert!(stdout.contains("instruction budget"), "{stdout}");
    let budget_lines = [
        "dropout fwd",
        "bias_act_dropout fwd",
        "dropout_add_norm fwd",
        "cross_entropy",
    ];
    shows("budget line", &budget_lines);
    assert!(!stdout.contains(" here"), "{stdout}");
    assert!(stdout.contains("recorded (H200"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["schema"], SCHEMA);
    assert_eq!(json["mode"], "cpu");
    let rows = json["rows"].as_array().unwrap();
    assert!(rows.len() >= 6);
    for row in rows {
        assert!(row["fused"]["ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(std::fs::read_to_string(dir.join("report.svg"))
        .unwrap()
        .contains("</svg>"));
    assert!(dir.join("report.txt").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Provenance (issue 11): the report records the commit the binary was built from, not the commit
/// of whatever git repository the current directory is in. Run from a fresh repository with a
/// commit of its own, the binary must still report `BUILD_COMMIT`.
#[test]
fn report_commit_is_the_build_commit_wherever_it_runs() {
    let base = std::env::temp_dir().join(format!("fusedreg-provenance-{}", std::process::id()));
    let repo = base.join("other-repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .current_dir(&repo)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Without git on the machine the folder is still "another folder"; with it, a foreign commit.
    let foreign = git(&["init", "-q"])
        .and_then(|_| git(&["commit", "-q", "--allow-empty", "-m", "x"]))
        .and_then(|_| git(&["rev-parse", "--short=12", "HEAD"]));
    let bin = std::env::var("FUSEDREG_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fusedreg-bench").to_string());
    let out = std::process::Command::new(bin)
        .current_dir(&repo)
        .env_remove("FUSEDREG_COMMIT")
        .args(["--cpu", "--quick", "--filter", "global_norm", "--out"])
        .arg(base.join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join("out").join("report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["commit"], fusedreg_tools::report::BUILD_COMMIT);
    if let Some(f) = foreign {
        assert!(
            !json["commit"].as_str().unwrap().starts_with(&f),
            "took the cwd's commit {f}"
        );
    }
    std::fs::remove_dir_all(&base).ok();
}

/// Provenance (issue 11): `benches/compare_torch.py --out DIR` writes `DIR/torch.json` when DIR
/// does not exist yet (it crashed after the whole run). Checked without torch: the script's
/// writer is called with a stand-in `torch` module. Skipped when python3 is missing.
#[test]
fn compare_torch_creates_its_out_dir() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../benches/compare_torch.py");
    let dir = std::env::temp_dir()
        .join(format!("fusedreg-torch-out-{}", std::process::id()))
        .join("not/yet/there");
    let code = format!(
        "import importlib.util, sys, types\n\
         sys.modules['torch'] = types.ModuleType('torch')\n\
         spec = importlib.util.spec_from_file_location('compare_torch', {script:?})\n\
         m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n\
         print(m.write_json({dir:?}, {{'rows': []}}))\n",
        dir = dir.display().to_string()
    );
    let Ok(out) = std::process::Command::new("python3")
        .args(["-c", &code])
        .output()
    else {
        eprintln!("python3 not found: skipped");
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = std::fs::read_to_string(dir.join("torch.json")).unwrap();
    assert!(json.contains("\"rows\""), "{json}");
    std::fs::remove_dir_all(dir.parent().unwrap().parent().unwrap().parent().unwrap()).ok();
}

/// Every op of the report has a line in the instruction-budget record, and the bytes per element
/// the record's predictions use are the ops' own minimal-bytes formulas (a wrong `bytes` in
/// benches/sass-budget.toml would misstate every budget and prediction).
#[test]
fn budget_record_covers_every_op_with_its_bytes() {
    use fusedreg::adamw::{min_bytes, min_bytes_with, MasterWeights, MomentDtype, StateOptions};
    use fusedreg::{
        bias_act_dropout as bad, cross_entropy as xe, dropout, dropout_add_norm as dan,
    };
    use fusedreg_tools::report::budget;
    let rec = budget::record().unwrap();
    let n: u64 = 1 << 20;
    let per = |b: u64| b as f64 / n as f64;
    let lean = StateOptions {
        moments: MomentDtype::Bf16,
        master: MasterWeights::None,
    };
    for (id, k) in &rec.kernels {
        // dropout.fwd.res.*: the forward with a residual.
        let res = id.split('.').nth(2) == Some("res");
        // dropout.{fwd,bwd}[.res].{bf16,f32}[.keyN]: the dtype is named in the id.
        let dt = if id.split('.').any(|p| p == "f32") {
            F32
        } else {
            Bf16
        };
        let want = match id.split('.').take(2).collect::<Vec<_>>()[..] {
            ["dropout", "fwd"] => per(dropout::fused_forward_bytes(dt, n, res, false)),
            ["dropout", "bwd"] => per(dropout::fused_backward_bytes(dt, n, false)),
            // The record written before the merge of dropout_residual into dropout (issue 22)
            // names the residual forward so until `scripts/sass-budget --update` rewrites it.
            ["dropout_residual", "fwd"] => per(dropout::fused_forward_bytes(Bf16, n, true, false)),
            ["bias_act_dropout", "fwd"] => per(bad::fused_forward_bytes(Bf16, n, false)),
            ["bias_act_dropout", "bwd"] => per(bad::fused_backward_bytes(Bf16, n)),
            // dropout_add_norm.[generic.]{fwd,bwd}.{bf16,f32}.<norm>: x and the stream in one
            // dtype; .bf16_sf32.: bf16 x, an f32 stream (residual_in_f32).
            ["dropout_add_norm", _] => {
                let parts: Vec<&str> = id.split('.').collect();
                let (t, s) = if parts.contains(&"f32") {
                    (F32, F32)
                } else if parts.contains(&"bf16_sf32") {
                    (Bf16, F32)
                } else {
                    (Bf16, Bf16)
                };
                if parts.contains(&"bwd") {
                    per(dan::fused_backward_bytes(t, s, n, true, true))
                } else {
                    per(dan::fused_forward_bytes(t, s, n, true))
                }
            }
            // Per logit: the per-row target and loss left out.
            ["cross_entropy", _] => (xe::fused_bytes(Bf16, 1, n, 8, true) - 12) as f64 / n as f64,
            ["adamw", "bf16"] => per(min_bytes_with(n, Bf16, Bf16, lean)),
            ["adamw", "f32"] => per(min_bytes(n, F32, F32)),
            _ => panic!("{id}: no bytes formula known to this test; add one"),
        };
        assert_eq!(k.bytes_per_elem, want, "{id}");
        assert_eq!(k.budget, 6.25 * want, "{id}");
        assert!(k.per_elem > 0.0 && k.worst_per_elem >= k.per_elem, "{id}");
    }
    let ops: Vec<&str> = rec
        .kernels
        .values()
        .filter_map(|k| k.row.as_ref().map(|r| r.op.as_str()))
        .collect();
    for op in [
        "dropout fwd",
        "dropout bwd",
        "bias_act_dropout fwd",
        "bias_act_dropout bwd",
        "dropout_add_norm fwd",
        "dropout_add_norm bwd",
        "cross_entropy",
        "adamw",
    ] {
        assert!(ops.contains(&op), "no budget line predicts a `{op}` row");
    }
}

/// The record was counted with the build's own flags (build/nvcc-flags.txt, which build/cuda.rs
/// compiles with): a flag change without `scripts/sass-budget --update` fails here on the CPU.
#[test]
fn budget_record_uses_the_build_flags() {
    let flags_file = include_str!("../../build/nvcc-flags.txt");
    let flags: Vec<&str> = flags_file
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    let rec: serde_json::Value =
        serde_json::from_str(fusedreg_tools::report::budget::RECORD_JSON).unwrap();
    let recorded: Vec<&str> = rec["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(recorded, flags);
}
