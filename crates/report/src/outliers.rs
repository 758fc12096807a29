//! An encoder's activation outliers (the BERT notes' claim): per layer, the largest magnitude of
//! each hidden dimension of the residual sum after its FFN (`x + output(f)`, before the
//! LayerNorm), the few dimensions that stand out, and on which tokens they are large ([SEP],
//! [CLS], punctuation or words), on the float model.

use adadim_model::Bert;

use crate::error::{ReportError, Result};
use crate::plot::{Figure, Panel, Series, Style, PALETTE};

/// Dimensions named per layer.
pub const TOP_DIMS: usize = 3;
/// Token occurrences per dimension whose kinds are counted (its largest |x|).
pub const TOP_TOKENS: usize = 50;

/// What kind of token an activation sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Sep,
    Cls,
    /// A token with no letter or digit (`.`, `,`, `'`, `##.`).
    Punctuation,
    Word,
}

impl TokenKind {
    pub fn of(token: &str) -> TokenKind {
        match token {
            "[SEP]" => TokenKind::Sep,
            "[CLS]" => TokenKind::Cls,
            t if !t.trim_start_matches("##").chars().any(char::is_alphanumeric) => TokenKind::Punctuation,
            _ => TokenKind::Word,
        }
    }
}

/// One standing-out dimension of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct DimOutlier {
    pub dim: usize,
    /// Largest |x| over the tokens.
    pub peak: f32,
    /// `peak` over the median of all dimensions' peaks.
    pub ratio: f64,
    /// Mean |x| of this dimension on [SEP], [CLS], punctuation and word tokens (NaN where the
    /// samples have none of that kind).
    pub by_kind: [f64; 4],
    /// The most frequent token strings among them, with counts.
    pub tokens: Vec<(String, usize)>,
}

/// One layer's picture.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOutliers {
    /// Largest |x| of each hidden dimension.
    pub peak: Vec<f32>,
    pub top: Vec<DimOutlier>,
}

/// Runs the float `bert` on `samples` (token ids with [CLS] / [SEP]) and gathers, layer by layer,
/// each dimension's peak and its outliers' tokens (`token(id)` names a token).
pub fn compute(bert: &Bert, samples: &[Vec<u32>], token: &dyn Fn(u32) -> String) -> Result<Vec<LayerOutliers>> {
    let err = |e: candle_core::Error| ReportError::Invalid(format!("encoder forward: {e}"));
    let d = bert.config.hidden_size;
    let ids: Vec<u32> = samples.iter().flatten().copied().collect();
    let mut out = Vec::new();
    // One sample per forward: the stream's rows are then exactly the sample's tokens, no padding.
    let mut streams = Vec::new();
    for s in samples {
        let (p, x) = bert.start(std::slice::from_ref(s))?;
        streams.push((p, x));
    }
    for i in 0..bert.layers.len() {
        let mut rows: Vec<f32> = Vec::with_capacity(ids.len() * d);
        for (p, x) in &mut streams {
            let a = bert.attention(i, p, x).map_err(err)?;
            let mid = bert.attn_residual(i, x, &a).map_err(err)?;
            let f = bert.ffn_hidden(i, &mid).map_err(err)?;
            let sum = bert.ffn_sum(i, &mid, &f).map_err(err)?;
            rows.extend(sum.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(err)?);
            *x = bert.out_norm(i, &sum).map_err(err)?;
        }
        out.push(layer_outliers(&rows, d, &ids, token));
    }
    Ok(out)
}

/// The picture of one layer from its stream `rows` (`[tokens, d]`) over the tokens `ids`.
pub fn layer_outliers(rows: &[f32], d: usize, ids: &[u32], token: &dyn Fn(u32) -> String) -> LayerOutliers {
    let mut peak = vec![0f32; d];
    for r in rows.chunks(d) {
        for (p, v) in peak.iter_mut().zip(r) {
            *p = p.max(v.abs());
        }
    }
    let mut sorted = peak.clone();
    sorted.sort_by(f32::total_cmp);
    let median = f64::from(sorted[d / 2]).max(f64::MIN_POSITIVE);
    let mut dims: Vec<usize> = (0..d).collect();
    dims.sort_by(|&a, &b| peak[b].total_cmp(&peak[a]).then(a.cmp(&b)));
    let kinds: Vec<TokenKind> = ids.iter().map(|&id| TokenKind::of(&token(id))).collect();
    let top = dims[..TOP_DIMS.min(d)]
        .iter()
        .map(|&dim| {
            let mut sum = [0f64; 4];
            let mut n = [0usize; 4];
            for (r, k) in rows.chunks(d).zip(&kinds) {
                sum[*k as usize] += f64::from(r[dim].abs());
                n[*k as usize] += 1;
            }
            let by_kind = std::array::from_fn(|k| if n[k] > 0 { sum[k] / n[k] as f64 } else { f64::NAN });
            let mut at: Vec<(usize, f32)> = rows.chunks(d).map(|r| r[dim].abs()).enumerate().collect();
            at.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            at.truncate(TOP_TOKENS);
            let mut counts: Vec<(String, usize)> = Vec::new();
            for &(t, _) in &at {
                let s = token(ids[t]);
                match counts.iter_mut().find(|(n, _)| *n == s) {
                    Some(c) => c.1 += 1,
                    None => counts.push((s, 1)),
                }
            }
            counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            counts.truncate(4);
            DimOutlier { dim, peak: peak[dim], ratio: f64::from(peak[dim]) / median, by_kind, tokens: counts }
        })
        .collect();
    LayerOutliers { peak, top }
}

/// One panel per layer: each hidden dimension's peak |x| (log scale).
pub fn figure(layers: &[LayerOutliers]) -> Figure {
    let panels = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let named: Vec<String> = l.top.iter().map(|t| format!("{} ({:.0})", t.dim, t.peak)).collect();
            Panel {
                title: format!(
                    "layer {i}, x + FFN(x) before LayerNorm: largest |x| per dimension; top {}",
                    named.join(", ")
                ),
                x_desc: "hidden dimension".into(),
                y_desc: "max |x| over tokens".into(),
                log_y: true,
                series: vec![Series {
                    name: String::new(),
                    color: PALETTE[i % PALETTE.len()],
                    style: Style::Line,
                    points: l.peak.iter().enumerate().map(|(d, v)| (d as f64, f64::from(*v))).collect(),
                }],
                ..Panel::default()
            }
        })
        .collect();
    Figure { panels, columns: 1, panel_size: (900, 200) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_a_planted_outlier_found_at_its_tokens() {
        assert_eq!(TokenKind::of("[SEP]"), TokenKind::Sep);
        assert_eq!(TokenKind::of("."), TokenKind::Punctuation);
        assert_eq!(TokenKind::of("##,"), TokenKind::Punctuation);
        assert_eq!(TokenKind::of("cat"), TokenKind::Word);
        // 4 dims, 6 tokens; dim 2 is large at the two [SEP] tokens.
        let ids = [0u32, 1, 2, 0, 1, 2];
        let names = |id: u32| ["[CLS]", "word", "[SEP]"][id as usize].to_string();
        let mut rows = vec![0.1f32; 6 * 4];
        rows[2 * 4 + 2] = -30.0;
        rows[5 * 4 + 2] = 20.0;
        rows[4] = 0.5; // token 1, dim 0
        let l = layer_outliers(&rows, 4, &ids, &names);
        assert_eq!(l.peak, vec![0.5, 0.1, 30.0, 0.1]);
        assert_eq!(l.top[0].dim, 2);
        assert!((l.top[0].ratio - 30.0 / 0.5).abs() < 1e-9, "{}", l.top[0].ratio);
        // All 6 tokens are among its top ones (fewer than TOP_TOKENS): 2 of each, ties by name.
        assert_eq!(l.top[0].tokens[1], ("[SEP]".to_string(), 2), "{:?}", l.top[0].tokens);
        // Mean |x| by kind: 25 on the [SEP]s, 0.1 elsewhere; no punctuation in the samples.
        let k = l.top[0].by_kind;
        assert!((k[TokenKind::Sep as usize] - 25.0).abs() < 1e-5 && (k[TokenKind::Word as usize] - 0.1).abs() < 1e-6);
        assert!(k[TokenKind::Punctuation as usize].is_nan());
    }
}
