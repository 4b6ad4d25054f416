//! Line charts drawn on the server as inline SVG: no script, and a point's exact value in its
//! `<title>` (a tooltip on hover, read aloud by a screen reader).

use chrono::{DateTime, Utc};
use maud::{Markup, html};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// How a value reads on an axis and in a tooltip.
#[derive(Clone, Copy)]
pub enum Unit {
    Seconds,
    Bytes,
}

impl Unit {
    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Seconds => seconds(value),
            Unit::Bytes => bytes(value),
        }
    }
}

pub fn seconds(value: f64) -> String {
    let s = value.max(0.0);
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} d", s / 86_400.0)
    }
}

pub fn bytes(value: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = value.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One line over time, oldest point first; `label` names it for screen readers and the
/// legend. A single point is drawn as a dot.
pub fn line(label: &str, unit: Unit, points: &[(DateTime<Utc>, f64)]) -> Markup {
    if points.is_empty() {
        return html! { p class="muted" { "No figures yet." } };
    }
    let t0 = points.iter().map(|(t, _)| t.timestamp()).min().unwrap_or(0) as f64;
    let t1 = points.iter().map(|(t, _)| t.timestamp()).max().unwrap_or(0) as f64;
    let max = points.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    // Headroom above the highest point; a flat zero line still gets an axis.
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let span = (t1 - t0).max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |t: &DateTime<Utc>| {
        if t1 > t0 {
            LEFT + (t.timestamp() as f64 - t0) / span * plot_w
        } else {
            LEFT + plot_w / 2.0
        }
    };
    let y = |v: f64| TOP + plot_h - (v / top) * plot_h;
    let polyline: String = points
        .iter()
        .map(|(t, v)| format!("{:.1},{:.1}", x(t), y(*v)))
        .collect::<Vec<_>>()
        .join(" ");
    let first = points
        .first()
        .map(|(t, _)| t.format("%Y-%m-%d").to_string());
    let last = points.last().map(|(t, _)| t.format("%Y-%m-%d").to_string());
    let view_box = format!("0 0 {WIDTH} {HEIGHT}");
    html! {
        svg class="chart" viewBox=(view_box) role="img" aria-label=(label) preserveAspectRatio="xMidYMid meet" {
            title { (label) }
            @for fraction in [0.0, 0.5, 1.0] {
                @let value = top * fraction;
                line class="grid" x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y(value))) y2=(format!("{:.1}", y(value))) {}
                text class="axis" x=(LEFT - 6.0) y=(format!("{:.1}", y(value) + 4.0)) text-anchor="end" { (unit.format(value)) }
            }
            @if let Some(first) = first {
                text class="axis" x=(LEFT) y=(HEIGHT - 8.0) text-anchor="start" { (first) }
            }
            @if let Some(last) = last {
                text class="axis" x=(WIDTH - RIGHT) y=(HEIGHT - 8.0) text-anchor="end" { (last) }
            }
            polyline class="series" points=(polyline) {}
            @for (t, v) in points {
                circle class="point" cx=(format!("{:.1}", x(t))) cy=(format!("{:.1}", y(*v))) r="3.5" {
                    title { (t.format("%Y-%m-%d %H:%M UTC")) ": " (unit.format(*v)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_people_say_them() {
        assert_eq!(seconds(240.0), "4.0 min");
        assert_eq!(seconds(30.0), "30 s");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0), "3.5 MiB");
        assert_eq!(bytes(12.0), "12 B");
    }

    #[test]
    fn a_chart_has_a_point_per_figure_and_escapes_its_label() {
        let t = |h: u32| {
            DateTime::parse_from_rfc3339(&format!("2026-01-0{h}T03:00:00Z"))
                .expect("time")
                .with_timezone(&Utc)
        };
        let svg = line(
            "<b>media</b> RTO",
            Unit::Seconds,
            &[(t(1), 240.0), (t(2), 200.0), (t(3), 260.0)],
        )
        .into_string();
        assert_eq!(svg.matches("<circle").count(), 3, "{svg}");
        assert!(svg.contains("&lt;b&gt;media&lt;/b&gt; RTO"), "{svg}");
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("4.0 min"), "{svg}");
    }
}
