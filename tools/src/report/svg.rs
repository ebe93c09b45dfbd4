//! The SVG plot: for each row, the fused and unfused throughput as a fraction of the copy
//! bandwidth measured in the same run (GB/s on a linear scale in CPU mode).

use std::fmt::Write as _;

use super::Report;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn render(r: &Report) -> String {
    let gpu = r.copy.is_some();
    // Compute-bound rows (no byte count) have no bandwidth to plot.
    let rows: Vec<&super::Row> = r.rows.iter().filter(|row| row.fused.bytes > 0.0).collect();
    // Each bar's value and the axis maximum.
    let value = |m: &super::Measurement| {
        if gpu {
            m.frac_copy.unwrap_or(0.0)
        } else {
            m.gbps
        }
    };
    let mut max = if gpu { 1.0f64 } else { 0.0 };
    for row in &rows {
        max = max.max(value(&row.fused));
        if let Some(u) = &row.unfused {
            max = max.max(value(u));
        }
    }
    let max = if max > 0.0 { max * 1.05 } else { 1.0 };
    let (label_w, plot_w, bar_h, gap) = (330.0, 560.0, 11.0, 10.0);
    let row_h = 2.0 * bar_h + gap;
    let top = 70.0;
    let height = top + row_h * rows.len() as f64 + 40.0;
    let width = label_w + plot_w + 90.0;
    let x = |v: f64| label_w + plot_w * (v / max);

    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    )
    .unwrap();
    writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    let title = match (&r.device, &r.copy) {
        (Some(d), Some(c)) => format!(
            "fusedreg {} on {}: throughput as a fraction of device copy ({:.0} GB/s)",
            r.commit, d.name, c.reference_gbps
        ),
        _ => format!(
            "fusedreg {}: CPU implementations (no CUDA device), GB/s",
            r.commit
        ),
    };
    writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">{}</text>"#,
        escape(&title)
    )
    .unwrap();
    writeln!(
        s,
        r##"<rect x="10" y="32" width="12" height="10" fill="#1f77b4"/><text x="26" y="41">fused</text><rect x="80" y="32" width="12" height="10" fill="#ff7f0e"/><text x="96" y="41">unfused</text>"##
    )
    .unwrap();
    // Grid lines at 25% steps of the axis.
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let gx = x(v);
        writeln!(
            s,
            r##"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="#ccc"/><text x="{gx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top - 8.0,
            height - 30.0,
            height - 16.0,
            if gpu { format!("{:.0}%", 100.0 * v) } else { format!("{v:.1}") }
        )
        .unwrap();
    }
    if gpu {
        let one = x(1.0);
        writeln!(
            s,
            r##"<line x1="{one:.1}" y1="{:.1}" x2="{one:.1}" y2="{:.1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
            top - 8.0,
            height - 30.0
        )
        .unwrap();
    }
    for (i, row) in rows.iter().enumerate() {
        let y0 = top + row_h * i as f64;
        writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y0 + bar_h + 4.0,
            escape(&format!("{} {}", row.op, row.case))
        )
        .unwrap();
        let bars = [
            Some((&row.fused, "#1f77b4")),
            row.unfused.as_ref().map(|u| (u, "#ff7f0e")),
        ];
        for (j, (m, color)) in bars.iter().flatten().enumerate() {
            let v = value(m);
            let y = y0 + bar_h * j as f64;
            writeln!(
                s,
                r#"<rect x="{label_w}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                (x(v) - label_w).max(0.5),
                bar_h - 1.0,
                x(v) + 4.0,
                y + bar_h - 2.0,
                if gpu { format!("{:.0}%", 100.0 * v) } else { format!("{v:.2}") }
            )
            .unwrap();
        }
    }
    writeln!(s, "</svg>").unwrap();
    s
}
