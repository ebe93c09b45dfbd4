//! The plain-text table printed by `fusedreg-bench`.

use std::fmt::Write as _;

use super::{Measurement, Report};

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

fn pct(m: &Measurement) -> String {
    match m.frac_copy {
        Some(f) if m.bytes > 0.0 => format!("{:.0}%", 100.0 * f),
        _ => "-".into(),
    }
}

/// GB/s, or "-" for a compute-bound row that counts no bytes.
fn gbps(m: &Measurement) -> String {
    if m.bytes > 0.0 {
        format!("{:.0}", m.gbps)
    } else {
        "-".into()
    }
}

fn bytes(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(0) => "0".into(),
        Some(b) if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        Some(b) if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        Some(b) => format!("{:.1}K", b as f64 / 1024.0),
    }
}

/// Host microseconds to enqueue a step (measured without waiting for the GPU, so a step
/// whose launches overrun the driver's queue shows the GPU time instead).
fn us(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    })
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub(super) fn render(r: &Report) -> String {
    let mut s = String::new();
    writeln!(
        s,
        "fusedreg {} (commit {}), {}",
        r.crate_version, r.commit, r.date_utc
    )
    .unwrap();
    writeln!(s, "kernels: {}", r.kernels).unwrap();
    match (&r.device, &r.copy) {
        (Some(d), Some(c)) => {
            writeln!(
                s,
                "device: {} (sm {}, {} SMs, {} MiB L2, {} GiB, driver CUDA {})",
                d.name,
                d.compute_capability,
                d.sm_count,
                d.l2_bytes >> 20,
                d.total_memory >> 30,
                d.driver_cuda_version
            )
            .unwrap();
            writeln!(
                s,
                "copy bandwidth ({} MiB, read + write): memcpy {:.0} GB/s, copy kernel {:.0} GB/s; %copy below is relative to {:.0} GB/s",
                c.bytes >> 20,
                c.memcpy_gbps,
                c.kernel_gbps,
                c.reference_gbps
            )
            .unwrap();
        }
        _ => {
            writeln!(
                s,
                "NO CUDA DEVICE FOUND ({}): timing the CPU reference implementations instead",
                r.no_device_reason.as_deref().unwrap_or("no device")
            )
            .unwrap();
        }
    }
    if r.quick {
        writeln!(s, "(--quick: fewer samples and smaller sizes)").unwrap();
    }
    let header = [
        "op",
        "case",
        "fused ms",
        "GB/s",
        "%copy",
        "unfused ms",
        "GB/s",
        "%copy",
        "speedup",
        "launches f/u",
        "held f/u",
        "note",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for row in &r.rows {
        let f = &row.fused;
        let u = row.unfused.as_ref();
        lines.push(vec![
            row.op.clone(),
            row.case.clone(),
            ms(f.ms),
            gbps(f),
            pct(f),
            u.map_or("-".into(), |u| ms(u.ms)),
            u.map_or("-".into(), gbps),
            u.map_or("-".into(), pct),
            row.speedup.map_or("-".into(), |x| format!("{x:.2}x")),
            format!(
                "{}/{}",
                opt(f.launches_per_step),
                opt(u.and_then(|u| u.launches_per_step))
            ),
            format!(
                "{}/{}",
                us(f.host_us_per_step),
                us(u.and_then(|u| u.host_us_per_step))
            ),
            format!(
                "{}/{}",
                bytes(row.fused_held_bytes),
                bytes(row.unfused_held_bytes)
            ),
            row.note.clone(),
        ]);
    }
    write_columns(&mut s, &lines, 2);
    if !r.budget.is_empty() {
        let (commit, nvcc): (String, String) = super::budget::record()
            .map(|rec| (rec.commit.chars().take(7).collect(), rec.nvcc))
            .unwrap_or_else(|_| ("?".into(), "?".into()));
        s.push_str(&super::budget::render(&r.budget, &commit, &nvcc));
    }
    s
}

/// Appends `rows` (the first is the header, underlined) as space-padded columns: the first
/// `left` columns and the last left-aligned, the others (numbers) right-aligned.
pub(super) fn write_columns(s: &mut String, rows: &[Vec<String>], left: usize) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for c in 0..cols {
            let w = widths[c];
            if c < left || c == cols - 1 {
                write!(line, "{:<w$}  ", r[c]).unwrap();
            } else {
                write!(line, "{:>w$}  ", r[c]).unwrap();
            }
        }
        writeln!(s, "{}", line.trim_end()).unwrap();
        if i == 0 {
            writeln!(
                s,
                "{}",
                "-".repeat(widths.iter().sum::<usize>() + 2 * (cols - 1))
            )
            .unwrap();
        }
    }
}
