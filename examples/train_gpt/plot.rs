//! A self-contained SVG line plot of the loss curves (no plotting crate).

use std::fmt::Write;

/// One curve: a label, a colour, dashed or not, and `(step, loss)` points.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// Width and height of the picture, and the plot area's margins.
const W: f64 = 820.0;
const H: f64 = 540.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 130.0;

/// A "nice" tick step (1, 2 or 5 times a power of ten) for about `n` ticks over `range`.
fn tick_step(range: f64, n: f64) -> f64 {
    let raw = (range / n).max(f64::MIN_POSITIVE);
    let pow = 10f64.powf(raw.log10().floor());
    let m = raw / pow;
    pow * if m < 1.5 {
        1.0
    } else if m < 3.5 {
        2.0
    } else if m < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document: `title`, `notes` lines under the plot, step on x, loss on y.
pub fn svg(title: &str, notes: &[String], series: &[Series]) -> String {
    svg_axes(title, ("step", "loss (nats per byte)"), notes, series)
}

/// [`svg`] with the axes' labels `(x, y)`.
pub fn svg_axes(
    title: &str,
    (xlabel, ylabel): (&str, &str),
    notes: &[String],
    series: &[Series],
) -> String {
    let finite = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in finite {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let ystep = tick_step(y1 - y0 + 2.0 * pad, 6.0);
    let (y0, y1) = (
        ((y0 - pad) / ystep).floor() * ystep,
        ((y1 + pad) / ystep).ceil() * ystep,
    );
    let xstep = tick_step(x1 - x0, 8.0);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| TOP + (y1 - y) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Grid and ticks.
    let mut y = y0;
    while y <= y1 + ystep * 1e-6 {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            trim(y, ystep)
        );
        y += ystep;
    }
    let mut x = (x0 / xstep).ceil() * xstep;
    while x <= x1 + xstep * 1e-6 {
        let xx = px(x);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            trim(x, xstep)
        );
        x += xstep;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        TOP + ph + 32.0,
        escape(xlabel)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(ylabel)
    );
    // Curves.
    for ser in series {
        let pts: Vec<String> = ser
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let width = if ser.dashed { 2.2 } else { 1.2 };
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="{width}"{dash} points="{}"/>"#,
            ser.color,
            pts.join(" ")
        );
    }
    // Legend (top right, inside the plot).
    for (i, ser) in series.iter().enumerate() {
        let ly = TOP + 16.0 + 18.0 * i as f64;
        let lx = LEFT + pw - 230.0;
        let dash = if ser.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 4.0,
            lx + 30.0,
            ly - 4.0,
            ser.color,
            lx + 36.0,
            ly,
            escape(&ser.label)
        );
    }
    for (i, note) in notes.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" font-size="11" font-family="monospace" xml:space="preserve">{}</text>"#,
            TOP + ph + 52.0 + 14.0 * i as f64,
            escape(note)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A tick label with as many decimals as the tick step needs.
fn trim(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}
