//! Figure (b), after the paper's Fig. 8: the RMS magnitude of each input channel of one block's
//! linears over the calibration tokens (where the activation outliers are), and across blocks
//! how far the largest channel stands above the typical one.

use crate::plot::{Figure, Panel, Series, Style, PALETTE};
use crate::run::Run;

/// The four distinct inputs of a block (q/k/v share one, gate/up another), each named by the
/// first linear that reads it.
pub const INPUTS: [(&str, &str); 4] =
    [("q/k/v", "self_attn.q_proj"), ("o", "self_attn.o_proj"), ("gate/up", "mlp.gate_proj"), ("down", "mlp.down_proj")];

/// The `n` largest channels of `rms`, largest first: (channel, RMS).
pub fn top_channels(rms: &[f32], n: usize) -> Vec<(usize, f32)> {
    let mut v: Vec<(usize, f32)> = rms.iter().copied().enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Largest RMS over the median RMS: how much the top outlier channel stands out.
pub fn peak_to_median(rms: &[f32]) -> Option<f64> {
    let mut v: Vec<f32> = rms.to_vec();
    v.sort_by(f32::total_cmp);
    let median = f64::from(*v.get(v.len() / 2)?);
    (median > 0.0).then(|| f64::from(v[v.len() - 1]) / median)
}

/// The input channels of block `layer`, one panel per input; `None` without recorded RMS.
pub fn layer_figure(run: &Run, layer: usize) -> Option<Figure> {
    let panels: Vec<Panel> = INPUTS
        .iter()
        .zip(PALETTE)
        .filter_map(|((name, module), color)| {
            let rms = run.rms(layer, module)?;
            let top = top_channels(rms, 1);
            Some(Panel {
                title: format!(
                    "block {layer}: input of {name} ({} channels; largest {} at {:.3})",
                    rms.len(),
                    top[0].0,
                    top[0].1
                ),
                x_desc: "input channel".into(),
                y_desc: "RMS over calibration tokens".into(),
                series: vec![Series {
                    name: String::new(),
                    color,
                    style: Style::Line,
                    points: rms.iter().enumerate().map(|(i, v)| (i as f64, f64::from(*v))).collect(),
                }],
                ..Panel::default()
            })
        })
        .collect();
    (!panels.is_empty()).then_some(Figure { panels, columns: 1, panel_size: (900, 230) })
}

/// Peak-to-median input RMS of every block, one line per input; `None` without recorded RMS.
pub fn across_layers_figure(run: &Run) -> Option<Figure> {
    let series: Vec<Series> = INPUTS
        .iter()
        .zip(PALETTE)
        .map(|((name, module), color)| Series {
            name: format!("input of {name}"),
            color,
            style: Style::Line,
            points: (0..run.layers()).filter_map(|l| Some((l as f64, peak_to_median(run.rms(l, module)?)?))).collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if series.is_empty() {
        return None;
    }
    let panel = Panel {
        title: "largest input-channel RMS / median input-channel RMS, per block".into(),
        x_desc: "layer".into(),
        y_desc: "peak / median".into(),
        log_y: true,
        legend: true,
        series,
        ..Panel::default()
    };
    Some(Figure { panels: vec![panel], columns: 1, panel_size: (900, 340) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_channels_and_peak_to_median() {
        let rms = [1.0, 9.0, 2.0, 9.0, 0.5];
        assert_eq!(top_channels(&rms, 3), vec![(1, 9.0), (3, 9.0), (2, 2.0)]);
        assert_eq!(peak_to_median(&rms), Some(9.0 / 2.0));
        assert_eq!(peak_to_median(&[0.0, 0.0, 1.0]), None, "a zero median has no ratio");
        assert_eq!(peak_to_median(&[]), None);
    }
}
