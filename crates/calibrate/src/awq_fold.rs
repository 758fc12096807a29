//! Where AWQ's channel scales go in a LLaMA block, so that the float model is unchanged:
//! `S^-1` into the RMSNorm before q/k/v and before gate/up (any scales), and into the rows of
//! v_proj (for o_proj) and up_proj (for down_proj), which are quantized by then: there the
//! scales are powers of two and the producer must be per-OC, so dividing its f16 group scales
//! is exact and the calibration activations already computed can be rescaled exactly too.

use crate::driver::LinearReport;
use crate::error::{CalibError, Result};
use adadim_load::LlamaConfig;
use adadim_model::LinearKind;
use adadim_quantize::{awq, Axis, Hessian, QuantSpec, QuantizedMatrix};
use candle_core::{Device, Tensor};

/// Where a step's AWQ scales go: into the RMSNorm before it (float scales), or into the rows of
/// an already quantized `producer` (powers of two, and only while it is per-OC; `tie` maps each
/// input column to its producer row when several share one, as grouped-query attention's).
pub(crate) enum Fold {
    Norm,
    Rows { producer: LinearKind, tie: Option<Vec<usize>> },
}

/// The step's AWQ scales, already folded into the producer for [`Fold::Rows`]; `None` when the
/// step cannot take them (a per-IC producer, or a fold that would not be exact).
pub(crate) fn awq_scales(
    layer: usize,
    ws: &[(LinearKind, Vec<f32>, usize, usize)],
    h: &Hessian,
    spec: &QuantSpec,
    fold: &Fold,
    quantized: &mut [(LinearKind, QuantizedMatrix)],
) -> Result<Option<awq::AwqScales>> {
    let cols = ws[0].3;
    let linears: Vec<(&[f32], usize)> = ws.iter().map(|(_, w, rows, _)| (w.as_slice(), *rows)).collect();
    let qerr = |source| CalibError::Quantize { layer, module: ws[0].0.module().to_string(), source };
    match fold {
        Fold::Norm => Ok(Some(awq::search(&linears, cols, h, spec, None, false).map_err(qerr)?)),
        Fold::Rows { producer, tie } => {
            let Some((_, q)) = quantized.iter_mut().find(|(k, _)| k == producer) else {
                return Ok(None);
            };
            if q.spec().axis != Axis::Oc {
                return Ok(None);
            }
            let s = awq::search(&linears, cols, h, spec, tie.as_deref(), true).map_err(qerr)?;
            match q.divide_rows(&s.source_scales) {
                Ok(folded) => {
                    *q = folded;
                    Ok(Some(s))
                }
                Err(_) => Ok(None),
            }
        }
    }
}

/// An RMSNorm weight with AWQ's scales folded in: `g_i / s_i` (the linears after it hold
/// `W diag(s)`). The writer and the calibration forward both use this.
pub fn folded_norm(norm: &[f32], s: &[f32]) -> Vec<f32> {
    norm.iter().zip(s).map(|(g, s)| g / s).collect()
}

pub(crate) fn tensor_1d(v: Vec<f32>) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)
        .map_err(|e| adadim_model::ModelError::Tensor { context: "tensor from host".into(), source: e })?)
}

/// One linear on its own (`quantize-layer`), AWQ included when `cfg.awq`: the scales found
/// for it alone, and `W'` back in the original space (`Q(W S) S^-1`, what the model computes
/// once `S^-1` is folded into the producer).
pub fn quantize_alone(
    cfg: &crate::QuantizeConfig,
    kind: LinearKind,
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
) -> Result<(Vec<f32>, LinearReport)> {
    if cfg.qep.is_some() {
        return Err(CalibError::Invalid(
            "--qep compares a linear's inputs in the float and the partly quantized model: it needs a whole model (quantize), not one layer's inputs".into(),
        ));
    }
    if !cfg.awq {
        let (q, r) = cfg.quantize_linear(0, kind, w, rows, cols, Some(h))?;
        return Ok((q.dequantize(), r));
    }
    let qerr = |source| CalibError::Quantize { layer: 0, module: kind.module().to_string(), source };
    let s = awq::search(&[(w, rows)], cols, h, &cfg.spec, None, false).map_err(qerr)?;
    let hs = h.scaled(&s.scales).map_err(qerr)?;
    let (q, mut r) = cfg.quantize_linear(0, kind, &awq::scale_columns(w, cols, &s.scales), rows, cols, Some(&hs))?;
    r.input_rms = crate::input_rms::from_hessian(h);
    r.awq_alpha = Some(s.alpha);
    let inv: Vec<f32> = s.scales.iter().map(|v| 1.0 / v).collect();
    r.awq_scales = s.scales;
    Ok((awq::scale_columns(&q.dequantize(), cols, &inv), r))
}

/// For each input column of o_proj (head `h`, dim `j`), the row of v_proj it reads:
/// `(h / (heads / kv_heads), j)`, grouped-query attention's sharing.
pub fn o_input_sources(c: &LlamaConfig) -> Vec<usize> {
    let (gqa, head_dim) = ((c.num_attention_heads / c.n_kv_heads().max(1)).max(1), c.head_dim().max(1));
    (0..c.q_dim()).map(|col| (col / head_dim / gqa) * head_dim + col % head_dim).collect()
}

/// The AWQ scales recorded for the linears after a norm, if any (`LinearKind::Q` for the
/// attention norm, `LinearKind::Gate` for the MLP's).
pub(crate) fn scales_of(reports: &[LinearReport], kind: LinearKind) -> Option<&[f32]> {
    reports.iter().find(|r| r.module == kind.module() && !r.awq_scales.is_empty()).map(|r| r.awq_scales.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use adadim_load::synth::{tiny_config, write_random_checkpoint, Rng};
    use adadim_model::{Linear, Model, Weight};

    fn dense(l: &Linear) -> (Vec<f32>, usize, usize) {
        let Weight::Dense(t) = &l.weight else { panic!("a float checkpoint loads dense") };
        let (rows, cols) = t.dims2().unwrap();
        (t.flatten_all().unwrap().to_vec1().unwrap(), rows, cols)
    }

    fn set(l: &mut Linear, w: Vec<f32>, rows: usize, cols: usize) {
        l.weight = Weight::Dense(Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap());
    }

    fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
        m.logits(&m.forward_hidden(ids).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Every fold the driver makes, with random scales and no rounding, leaves the float
    /// model's logits as they were (grouped-query attention included: 6 heads over 2).
    #[test]
    fn folding_leaves_the_float_model_unchanged() {
        let d = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        write_random_checkpoint(d.path(), &cfg, 3).unwrap();
        let ck = adadim_load::Checkpoint::open(d.path()).unwrap();
        let mut m = Model::load(&ck, 32, &mut |_, _| {}).unwrap();
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 300) as u32).collect();
        let before = logits(&m, &ids);
        let mut rng = Rng::new(5);
        let mut scales = |n: usize, pow2: bool| -> Vec<f32> {
            let v = (0..n).map(|_| (4.0 * rng.uniform() as f32 - 2.0).exp2());
            v.map(|s| if pow2 { s.log2().round().exp2() } else { s }).collect()
        };
        let sources = o_input_sources(&cfg);
        for b in &mut m.blocks {
            // norm -> q, k, v and norm -> gate, up.
            for (norm, kinds) in [
                (0, [LinearKind::Q, LinearKind::K, LinearKind::V]),
                (1, [LinearKind::Gate, LinearKind::Up, LinearKind::Up]),
            ] {
                let s = scales(cfg.hidden_size, false);
                let t = if norm == 0 { &mut b.attn_norm } else { &mut b.mlp_norm };
                *t = tensor_1d(folded_norm(&t.to_vec1().unwrap(), &s)).unwrap();
                for kind in &kinds[..if norm == 0 { 3 } else { 2 }] {
                    let (w, rows, cols) = dense(b.linear(*kind));
                    set(b.linear_mut(*kind), awq::scale_columns(&w, cols, &s), rows, cols);
                }
            }
            // v -> o (tied over the heads sharing a value head) and up -> down, powers of two.
            for (producer, consumer, tie) in
                [(LinearKind::V, LinearKind::O, Some(&sources)), (LinearKind::Up, LinearKind::Down, None)]
            {
                let (p, prows, pcols) = dense(b.linear(producer));
                let s = scales(prows, true);
                let (w, rows, cols) = dense(b.linear(consumer));
                let s_cols: Vec<f32> = (0..cols).map(|c| s[tie.map_or(c, |t| t[c])]).collect();
                set(b.linear_mut(consumer), awq::scale_columns(&w, cols, &s_cols), rows, cols);
                let p: Vec<f32> = p.chunks(pcols).zip(&s).flat_map(|(r, s)| r.iter().map(move |w| w / s)).collect();
                set(b.linear_mut(producer), p, prows, pcols);
            }
        }
        let after = logits(&m, &ids);
        let scale = before.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b} (max |logit| {scale})");
        }
    }
}
