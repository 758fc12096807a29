//! One small chart vocabulary for every figure: a [`Figure`] is a grid of [`Panel`]s, each a
//! set of [`Series`] (a line or dots) over shared x and y axes, linear or log y. [`render`]
//! writes it as SVG with `plotters` (labels become SVG `<text>`, so no fonts are needed).

use std::ops::Range;
use std::path::Path;

use plotters::chart::SeriesAnno;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{ReportError, Result};

/// Per-OC results are drawn in blue, per-IC in orange, everywhere.
pub const OC_COLOR: RGBColor = RGBColor(31, 119, 180);
pub const IC_COLOR: RGBColor = RGBColor(255, 127, 14);
/// The two axes' colors for layouts with float minima (darker shades of the same hues).
pub const OC_MIN_COLOR: RGBColor = RGBColor(8, 48, 107);
pub const IC_MIN_COLOR: RGBColor = RGBColor(166, 54, 3);
/// Further series (one per module type).
pub const PALETTE: [RGBColor; 4] =
    [RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    Line,
    /// Filled circles of this radius (pixels).
    Dots(u32),
}

#[derive(Debug, Clone)]
pub struct Series {
    /// Shown in the legend (series with an empty name are left out of it).
    pub name: String,
    pub color: RGBColor,
    pub style: Style,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Default)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    /// Log-scale y; points with y <= 0 cannot be drawn there and are left out.
    pub log_y: bool,
    /// y range to use instead of the data's (to compare panels on one scale).
    pub y_range: Option<(f64, f64)>,
    pub legend: bool,
    /// Draw only the legend of `series` (no axes, no data): for a grid cell left empty.
    pub legend_only: bool,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub panels: Vec<Panel>,
    pub columns: usize,
    /// Pixels of one panel.
    pub panel_size: (u32, u32),
}

impl Panel {
    /// The points that can be drawn (finite; y > 0 on a log scale).
    fn drawable(&self, s: &Series) -> Vec<(f64, f64)> {
        s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && (!self.log_y || *y > 0.0)).collect()
    }

    /// The data's x and y ranges, padded (a log range by a factor), never empty.
    pub fn ranges(&self) -> (Range<f64>, Range<f64>) {
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| self.drawable(s)).collect();
        let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (mut y0, mut y1) =
            self.y_range.unwrap_or_else(|| pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1))));
        if pts.is_empty() && self.y_range.is_none() {
            (x0, x1, y0, y1) = (0.0, 1.0, 1.0, 10.0);
        }
        if x1 <= x0 {
            (x0, x1) = (x0 - 0.5, x1 + 0.5);
        }
        if self.log_y {
            (y0, y1) = (y0 / 1.5, y1 * 1.5);
        } else {
            let pad = if y1 > y0 { 0.05 * (y1 - y0) } else { 0.5 * y1.abs().max(1.0) };
            (y0, y1) = (if y0 >= 0.0 { 0.0 } else { y0 - pad }, y1 + pad);
        }
        (x0..x1, y0..y1)
    }
}

fn chart_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |msg| ReportError::Chart { path: path.to_path_buf(), msg }
}

/// Write `fig` to `path` as SVG.
pub fn render(fig: &Figure, path: &Path) -> Result<()> {
    let err = chart_err(path);
    let cols = fig.columns.max(1);
    let rows = fig.panels.len().div_ceil(cols).max(1);
    let size = (fig.panel_size.0 * cols as u32, fig.panel_size.1 * rows as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    for (area, panel) in root.split_evenly((rows, cols)).iter().zip(&fig.panels) {
        let (x, y) = panel.ranges();
        if panel.legend_only {
            draw_legend(area, panel).map_err(&err)?;
        } else if panel.log_y {
            draw_panel(area, panel, x, y.log_scale()).map_err(&err)?;
        } else {
            draw_panel(area, panel, x, y).map_err(&err)?;
        }
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// A tick label: three significant digits, exponent notation outside `[0.01, 10^4)`.
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// The legend of `panel.series` alone, in the top left of `area`.
fn draw_legend(area: &DrawingArea<SVGBackend, Shift>, panel: &Panel) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let mut chart = ChartBuilder::on(area).margin(30).build_cartesian_2d(0.0..1.0, 0.0..1.0).map_err(e)?;
    for s in &panel.series {
        let none: Vec<(f64, f64)> = Vec::new();
        let drawn = chart.draw_series(LineSeries::new(none, s.color)).map_err(e)?;
        add_legend_entry(drawn, s);
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 13))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(e)
}

/// Name `s` in the legend with a mark that looks like it: a short line, or a dot.
fn add_legend_entry(drawn: &mut SeriesAnno<'_, SVGBackend<'_>>, s: &Series) {
    let color = s.color;
    let drawn = drawn.label(s.name.as_str());
    match s.style {
        Style::Line => drawn.legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))),
        Style::Dots(r) => drawn.legend(move |(x, y)| Circle::new((x + 7, y), r, color.filled())),
    };
}

/// One panel on `area`, y along `y` (a linear or a log range).
fn draw_panel<Y>(
    area: &DrawingArea<SVGBackend, Shift>,
    panel: &Panel,
    x: Range<f64>,
    y: Y,
) -> std::result::Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(panel.x_desc.as_str())
        .y_desc(panel.y_desc.as_str())
        .label_style(("sans-serif", 11))
        .axis_desc_style(("sans-serif", 12))
        .light_line_style(WHITE.mix(0.0))
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .draw()
        .map_err(e)?;
    for s in &panel.series {
        let pts = panel.drawable(s);
        let color = s.color;
        let drawn = match s.style {
            Style::Line => chart.draw_series(LineSeries::new(pts, color.stroke_width(1))).map_err(e)?,
            Style::Dots(r) => {
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, r, color.filled()))).map_err(e)?
            }
        };
        if !s.name.is_empty() {
            add_legend_entry(drawn, s);
        }
    }
    if panel.legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 11))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), color: OC_COLOR, style: Style::Line, points }
    }

    #[test]
    fn ranges_cover_the_data_and_leave_out_what_a_log_axis_cannot_show() {
        let p = Panel {
            log_y: true,
            series: vec![line("a", vec![(0.0, 1e-3), (3.0, 0.0), (4.0, 2.0), (5.0, f64::NAN)])],
            ..Panel::default()
        };
        let (x, y) = p.ranges();
        assert_eq!(x, 0.0..4.0);
        assert!(y.start < 1e-3 && y.start > 0.0 && y.end > 2.0, "{y:?}");
        let flat = Panel { series: vec![line("a", vec![(2.0, 5.0)])], ..Panel::default() };
        let (x, y) = flat.ranges();
        assert!(x.start < 2.0 && x.end > 2.0 && y.start == 0.0 && y.end > 5.0, "{x:?} {y:?}");
        let empty = Panel::default().ranges();
        assert!(empty.0.end > empty.0.start && empty.1.end > empty.1.start);
    }

    #[test]
    fn renders_every_series_as_svg() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f.svg");
        let dots = Series {
            name: "chosen".into(),
            color: IC_COLOR,
            style: Style::Dots(3),
            points: vec![(1.0, 0.5), (2.0, 0.25)],
        };
        let panels = vec![
            Panel {
                title: "log".into(),
                log_y: true,
                legend: true,
                series: vec![line("first", vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.1)]), dots],
                ..Panel::default()
            },
            Panel {
                title: "linear".into(),
                series: vec![line("second", vec![(0.0, -1.0), (9.0, 3.0)])],
                ..Panel::default()
            },
        ];
        render(&Figure { panels, columns: 2, panel_size: (300, 200) }, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        // Lines are polylines (width 1; 2 in the legend) and dots circles, in the series' colour
        // (the mesh is black).
        let with = |tag: &str, attrs: &[(&str, &str)]| {
            doc.descendants()
                .filter(|n| n.tag_name().name() == tag && attrs.iter().all(|(k, v)| n.attribute(*k) == Some(*v)))
                .count()
        };
        let (oc, ic) = ("#1F77B4", "#FF7F0E");
        assert_eq!(with("polyline", &[("stroke", oc), ("stroke-width", "1")]), 2, "one per line series");
        assert_eq!(with("polyline", &[("stroke", oc), ("stroke-width", "2")]), 1, "the legend's line");
        assert_eq!(with("circle", &[("fill", ic)]), 3, "one per dot, one in the legend");
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "text")
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for want in ["first", "chosen", "log", "linear", "0.5"] {
            assert!(texts.contains(&want), "no text '{want}' in {texts:?}");
        }
        assert!(!texts.contains(&"second"), "the second panel has no legend");
    }

    #[test]
    fn ticks_are_short() {
        let cases = [
            (0.0, "0"),
            (0.30000000000000004, "0.3"),
            (0.7000000000000001, "0.7"),
            (12.5, "12.5"),
            (1536.0, "1536"),
            (3e-4, "3e-4"),
            (2.5e-5, "2.5e-5"),
            (-0.125, "-0.125"),
            (1e5, "1e5"),
        ];
        for (v, want) in cases {
            assert_eq!(tick(v), want, "{v}");
        }
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("no-such-dir").join("f.svg");
        let e =
            render(&Figure { panels: vec![Panel::default()], columns: 1, panel_size: (100, 100) }, &path).unwrap_err();
        assert!(e.to_string().contains("no-such-dir"), "{e}");
    }
}
