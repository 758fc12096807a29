//! Figure (a), after the paper's Fig. 6 / 10: per layer, the RTN output error of each linear
//! quantized per-OC and per-IC, and the dimension the run kept; one panel per module type.

use adadim_calibrate::Method;
use adadim_quantize::Axis;

use crate::plot::{Figure, Panel, Series, Style, IC_COLOR, OC_COLOR};
use crate::run::Run;

/// Grey for the error of the weights kept (GPTQ's, when it ran).
const FINAL_COLOR: plotters::style::RGBColor = plotters::style::RGBColor(110, 110, 110);

/// One linear's errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorRow {
    pub layer: usize,
    /// RTN output errors per-OC and per-IC.
    pub oc: f64,
    pub ic: f64,
    /// The axis kept.
    pub axis: Axis,
    /// Output error of the weights kept.
    pub kept: Option<f64>,
}

/// One module type's numbers across layers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleErrors {
    /// `self_attn.v_proj`.
    pub module: &'static str,
    pub rows: Vec<ErrorRow>,
}

impl ModuleErrors {
    /// Layers that kept per-IC groups.
    pub fn ic_layers(&self) -> Vec<usize> {
        self.rows.iter().filter(|r| r.axis == Axis::Ic).map(|r| r.layer).collect()
    }

    /// The largest `per-OC error / per-IC error` and its layer: how much per-IC saves at best.
    pub fn best_saving(&self) -> Option<(usize, f64)> {
        self.rows
            .iter()
            .map(|r| (r.layer, r.oc / r.ic))
            .filter(|(_, s)| s.is_finite())
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Every module type with both RTN errors reported, in block order (none for a run that did
/// not calibrate).
pub fn module_errors(run: &Run) -> Vec<ModuleErrors> {
    // The run's module types in the order it quantized them (a decoder's or an encoder's).
    let mut modules: Vec<&'static str> = Vec::new();
    for r in &run.linears {
        if !modules.contains(&r.module) {
            modules.push(r.module);
        }
    }
    modules
        .into_iter()
        .map(|module| {
            let rows = run
                .linears
                .iter()
                .filter(|r| r.module == module)
                .filter_map(|r| {
                    Some(ErrorRow {
                        layer: r.layer,
                        oc: r.oc_error?,
                        ic: r.ic_error?,
                        axis: r.axis,
                        kept: r.final_error,
                    })
                })
                .collect();
            ModuleErrors { module, rows }
        })
        .filter(|m| !m.rows.is_empty())
        .collect()
}

/// The figure, or `None` when the run has no errors to show.
pub fn figure(run: &Run) -> Option<Figure> {
    let modules = module_errors(run);
    if modules.is_empty() {
        return None;
    }
    let gptq = run.summary.settings.method == Method::Gptq;
    let mut panels: Vec<Panel> = modules
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let line = |name: &str, color, f: &dyn Fn(&ErrorRow) -> Option<f64>| Series {
                name: name.into(),
                color,
                style: Style::Line,
                points: m.rows.iter().filter_map(|r| Some((r.layer as f64, f(r)?))).collect(),
            };
            let kept = |axis: Axis, color| Series {
                name: format!("kept {}", if axis == Axis::Oc { "per-OC" } else { "per-IC" }),
                color,
                style: Style::Dots(4),
                points: m
                    .rows
                    .iter()
                    .filter(|r| r.axis == axis)
                    .map(|r| (r.layer as f64, if axis == Axis::Oc { r.oc } else { r.ic }))
                    .collect(),
            };
            let mut series =
                vec![line("per-OC RTN", OC_COLOR, &|r| Some(r.oc)), line("per-IC RTN", IC_COLOR, &|r| Some(r.ic))];
            if gptq {
                series.push(line("kept weights (GPTQ)", FINAL_COLOR, &|r| r.kept));
            }
            series.extend([kept(Axis::Oc, OC_COLOR), kept(Axis::Ic, IC_COLOR)]);
            Panel {
                title: format!("{}: {} of {} layers per-IC", m.module, m.ic_layers().len(), m.rows.len()),
                x_desc: "layer".into(),
                y_desc: "output error mean((ΔW x)²)".into(),
                log_y: true,
                y_range: None,
                legend: i == 0 && modules.len().is_multiple_of(2),
                legend_only: false,
                series,
            }
        })
        .collect();
    if modules.len() % 2 == 1 {
        // The grid's empty last cell holds the legend, off the data.
        let series = panels[0].series.clone();
        panels.push(Panel { legend_only: true, series, ..Panel::default() });
    }
    Some(Figure { panels, columns: 2, panel_size: (520, 300) })
}
