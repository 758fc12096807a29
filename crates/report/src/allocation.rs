//! Figure (d), for `--bpw` runs: per layer, the bits each linear got, its group size (dot size)
//! and dimension (color; a darker shade for float minima); one panel per module type.

use adadim_model::LinearKind;
use adadim_quantize::Axis;

use crate::plot::{Figure, Panel, Series, Style, IC_COLOR, IC_MIN_COLOR, OC_COLOR, OC_MIN_COLOR};
use crate::run::Run;

/// Group sizes drawn, each with its dot radius (smaller groups, more scale bits: larger dots).
const GROUPS: [(usize, u32); 4] = [(32, 7), (64, 5), (128, 4), (256, 3)];

/// The radius for a group size: the nearest drawn one at or above it (whole channels smallest).
fn radius(group: usize) -> u32 {
    GROUPS.iter().find(|(g, _)| group <= *g).map_or(2, |(_, r)| *r)
}

/// Mean bits per weight of the codes, per module type, over the layers (for the page's text).
pub fn mean_bits(run: &Run) -> Vec<(&'static str, f64)> {
    LinearKind::ALL
        .iter()
        .filter_map(|k| {
            let bits: Vec<f64> = run
                .linears
                .iter()
                .filter(|r| r.module == k.module())
                .filter_map(|r| Some(f64::from(r.layout.as_ref()?.bits)))
                .collect();
            (!bits.is_empty()).then(|| (k.short(), bits.iter().sum::<f64>() / bits.len() as f64))
        })
        .collect()
}

/// The figure, or `None` when the run chose no layouts (`--bpw` was not used).
pub fn figure(run: &Run) -> Option<Figure> {
    if run.linears.iter().all(|r| r.layout.is_none()) {
        return None;
    }
    let mut panels: Vec<Panel> = LinearKind::ALL
        .iter()
        .map(|k| {
            let mut series = Vec::new();
            let any_min = run.linears.iter().any(|l| l.layout.as_ref().is_some_and(|lay| lay.min));
            for min in if any_min { vec![false, true] } else { vec![false] } {
                for axis in [Axis::Oc, Axis::Ic] {
                    for (g, r) in GROUPS {
                        let points: Vec<(f64, f64)> = run
                            .linears
                            .iter()
                            .filter(|l| l.module == k.module() && l.axis == axis)
                            .filter_map(|l| {
                                let lay = l.layout.as_ref()?;
                                (radius(lay.group) == r && lay.min == min)
                                    .then_some((l.layer as f64, f64::from(lay.bits)))
                            })
                            .collect();
                        let (name, color) = match (axis, min) {
                            (Axis::Oc, false) => (format!("per-OC g{g}"), OC_COLOR),
                            (Axis::Ic, false) => (format!("per-IC g{g}"), IC_COLOR),
                            (Axis::Oc, true) => (format!("per-OC g{g} float min"), OC_MIN_COLOR),
                            (Axis::Ic, true) => (format!("per-IC g{g} float min"), IC_MIN_COLOR),
                        };
                        series.push(Series { name, color, style: Style::Dots(r), points });
                    }
                }
            }
            Panel {
                title: k.module().to_string(),
                x_desc: "layer".into(),
                y_desc: "bits".into(),
                log_y: false,
                y_range: Some((1.5, 8.5)),
                legend: false,
                legend_only: false,
                series,
            }
        })
        .collect();
    // The grid's empty last cell (7 modules, 2 columns) holds the legend.
    let series = panels[0].series.clone();
    panels.push(Panel { legend_only: true, series, ..Panel::default() });
    Some(Figure { panels, columns: 2, panel_size: (520, 260) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaller_groups_draw_larger_dots() {
        assert!(radius(32) > radius(64) && radius(64) > radius(128) && radius(128) > radius(256));
        assert_eq!(radius(48), radius(64));
        assert_eq!(radius(1536), 2);
    }
}
