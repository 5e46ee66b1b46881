//! A self-contained SVG histogram: one translucent series per runner, shared bins.

use std::fmt::Write;

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];

/// Renders histograms of `series` (name, samples in ms) with `bins` bins.
pub fn histogram(title: &str, x_label: &str, series: &[(String, Vec<f64>)], bins: usize) -> String {
    let (w, h, left, right, top, bottom) = (800.0, 420.0, 60.0, 20.0, 40.0, 50.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    if all.is_empty() {
        svg.push_str("</svg>\n");
        return svg;
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let mut hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let width = (hi - lo) / bins as f64;
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|(_, s)| {
            let mut c = vec![0usize; bins];
            for v in s.iter().filter(|v| v.is_finite()) {
                let i = (((v - lo) / width) as usize).min(bins - 1);
                c[i] += 1;
            }
            c
        })
        .collect();
    let max_count = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    let (pw, ph) = (w - left - right, h - top - bottom);
    let bar_w = pw / bins as f64;
    for (si, c) in counts.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        for (i, &n) in c.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let bh = ph * n as f64 / max_count;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.45" stroke="{color}"/>"#,
                left + i as f64 * bar_w,
                top + ph - bh,
                bar_w,
                bh
            );
        }
    }
    // Axes and ticks.
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        svg,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#,
        top + ph
    );
    for t in 0..=5 {
        let x = left + pw * t as f64 / 5.0;
        let v = lo + (hi - lo) * t as f64 / 5.0;
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{v:.2}</text>"#,
            top + ph + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 10.0,
        esc(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">runs</text>"#,
        top + ph / 2.0,
        top + ph / 2.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
        left - 4.0,
        top + 4.0,
        max_count
    );
    for (si, (name, s)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        let y = top + 14.0 + si as f64 * 16.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}" fill-opacity="0.6"/>"#,
            left + pw - 200.0,
            y - 10.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{y}">{} (n={})</text>"#,
            left + pw - 182.0,
            esc(name),
            s.len()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let svg = histogram(
            "t <1>",
            "ms",
            &[("a".into(), vec![1.0, 2.0, 2.5]), ("b".into(), vec![3.0])],
            10,
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a (n=3)") && svg.contains("b (n=1)"));
        assert!(svg.contains("t &lt;1&gt;"));
        assert_eq!(
            svg.matches("<rect x=").count() - 2,
            4,
            "3 distinct bins + 1, plus 2 legend boxes"
        );
    }
}
