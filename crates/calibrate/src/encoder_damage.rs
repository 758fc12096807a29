//! `--bpw` on an encoder: its damage table (the decoder's [`DamageTable`], planned by the same
//! [`crate::damage::plan`]) measured on the float BERT. Each linear's inputs over the first
//! [`DAMAGE_SAMPLES`] calibration samples (padding left out), every layout fitted by RTN and
//! measured on them; a linear's sensitivity is how far the pooled sentence embeddings move
//! (squared distance, `2 (1 - cos)` for normalised ones) per unit of its output error energy
//! under a seeded perturbation, where the decoder measures the KL of its next-token
//! distributions.

use std::time::Instant;

use adadim_model::{Bert, LinearKind, Padded, Weight};
use adadim_quantize::{ScaleSearch, Zero};
use candle_core::Tensor;

use crate::damage::{candidates_of, perturbation, Budget, DamageTable, Layouts, LinearDamage, Site, DAMAGE_SAMPLES};
use crate::driver::{tensor_err, to_vec, Timings};
use crate::encoder::{hessian, linear_mut, LINEARS};
use crate::error::{CalibError, Result};

/// Sentences the sensitivities are measured on (the first calibration samples, one batch).
pub const SENSITIVITY_SENTENCES: usize = 16;

/// The damage table of the float encoder `bert` for `budget`'s layouts, on batches of `batch`
/// of the first [`DAMAGE_SAMPLES`] `samples`.
pub fn measure_encoder(
    bert: &Bert,
    samples: &[Vec<u32>],
    batch: usize,
    budget: &Budget,
    (zero, search, permuted): (Zero, ScaleSearch, bool),
) -> Result<DamageTable> {
    let t0 = Instant::now();
    let samples = &samples[..samples.len().min(DAMAGE_SAMPLES)];
    if samples.is_empty() || batch == 0 {
        return Err(CalibError::Invalid("--bpw needs calibration samples to measure each layout's error".into()));
    }
    let specs = budget.specs(zero);
    let mut streams: Vec<(Padded, Tensor)> =
        samples.chunks(batch).map(|b| bert.start(b)).collect::<std::result::Result<_, _>>()?;
    let mut times = Timings::default();
    let mut linears = Vec::new();
    // Handles to the same tensors: read here, perturbed one linear at a time by `sensitivities`.
    let mut model = bert.clone();
    for i in 0..bert.layers.len() {
        let each = |what: &str, f: &dyn Fn(&Padded, usize) -> candle_core::Result<Tensor>| {
            (0..streams.len())
                .map(|k| f(&streams[k].0, k).map_err(|e| tensor_err(format!("encoder layer {i}: {what}"), e)))
                .collect::<Result<Vec<_>>>()
        };
        let xs: Vec<Tensor> = streams.iter().map(|(_, x)| x.clone()).collect();
        let attn_stream = stream_energy(&streams, &xs)?;
        let h_qkv = hessian(&streams, (i, LINEARS[0].0), &xs, &mut times)?;
        let attn = each("attention", &|p, k| bert.attention(i, p, &xs[k]))?;
        let h_o = hessian(&streams, (i, LINEARS[3].0), &attn, &mut times)?;
        let mid = each("attention residual", &|_, k| bert.attn_residual(i, &xs[k], &attn[k]))?;
        drop(attn);
        let mlp_stream = stream_energy(&streams, &mid)?;
        let h_up = hessian(&streams, (i, LINEARS[4].0), &mid, &mut times)?;
        let hidden = each("feed-forward", &|_, k| bert.ffn_hidden(i, &mid[k]))?;
        let h_down = hessian(&streams, (i, LINEARS[5].0), &hidden, &mut times)?;
        let next = each("feed-forward residual", &|_, k| bert.ffn_residual(i, &mid[k], &hidden[k]))?;
        for &(name, kind) in &LINEARS {
            let (h, stream) = match kind {
                LinearKind::O => (&h_o, attn_stream),
                LinearKind::Up => (&h_up, mlp_stream),
                LinearKind::Down => (&h_down, mlp_stream),
                _ => (&h_qkv, attn_stream),
            };
            let (w, shape) = dense_weights(&linear_mut(&mut model, i, name).weight, i, name)?;
            let at = Site { layer: i, kind, module: name };
            linears.push(candidates_of(&w, shape, at, h, stream, Layouts { specs: &specs, search, permuted })?);
        }
        streams.iter_mut().zip(next).for_each(|((_, x), n)| *x = n);
    }
    drop(streams);
    sensitivities(&mut model, samples, &mut linears)?;
    Ok(DamageTable { samples: samples.len(), seconds: t0.elapsed().as_secs_f64(), linears })
}

/// A dense linear's weights and `[rows, cols]`.
fn dense_weights(w: &Weight, layer: usize, name: &str) -> Result<(Vec<f32>, (usize, usize))> {
    let Weight::Dense(w) = w else {
        return Err(CalibError::Invalid(format!(
            "encoder.layer.{layer}.{name}: already quantized (--bpw measures the float model)"
        )));
    };
    let shape = w.dims2().map_err(|e| tensor_err(format!("encoder.layer.{layer}.{name}"), e))?;
    Ok((to_vec(w)?, shape))
}

/// Mean over real tokens of `|x_t|^2`, over every batch.
fn stream_energy(streams: &[(Padded, Tensor)], xs: &[Tensor]) -> Result<f64> {
    let (mut sum, mut tokens) = (0f64, 0usize);
    for ((p, _), x) in streams.iter().zip(xs) {
        let real = p.real_rows(x).map_err(|e| tensor_err("calibration tokens".into(), e))?;
        sum += to_vec(&real)?.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        tokens += real.dims()[0];
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Every linear's [`LinearDamage::sensitivity`]: its weight moved by seeded noise
/// ([`perturbation`]), the encoder run from its layer on over the first
/// [`SENSITIVITY_SENTENCES`] samples, and the mean squared distance of the pooled embeddings
/// from the float model's, per unit of the noise's output error energy per token. `model` is
/// the float encoder; each linear gets its weight back after its run.
fn sensitivities(model: &mut Bert, samples: &[Vec<u32>], linears: &mut [LinearDamage]) -> Result<()> {
    let batch = &samples[..samples.len().min(SENSITIVITY_SENTENCES)];
    let err = |what: &str| {
        let what = format!("encoder sensitivities: {what}");
        move |e| tensor_err(what.clone(), e)
    };
    let (p, mut x) = model.start(batch)?;
    let mut entering = Vec::new();
    for i in 0..model.layers.len() {
        entering.push(x.clone());
        x = model.layer(i, &p, &x).map_err(err("float forward"))?;
    }
    let want = model.pool(&p, &x).map_err(err("float pooling"))?;
    for (n, l) in linears.iter_mut().enumerate() {
        let Some(&(name, _)) = LINEARS.iter().find(|(_, k)| k.short() == l.module) else {
            return Err(CalibError::Invalid(format!("damage table: unknown encoder module '{}'", l.module)));
        };
        let (w, _) = dense_weights(&linear_mut(model, l.layer, name).weight, l.layer, name)?;
        let (sigma, moved_energy) = perturbation(l);
        let mut rng = adadim_load::synth::Rng::new(0x5E45_0000 + n as u64);
        let moved: Vec<f32> = w.iter().zip(rng.normals(w.len(), sigma)).map(|(w, n)| w + n).collect();
        let moved = Tensor::from_vec(moved, (l.rows, l.cols), &candle_core::Device::Cpu).map_err(err("weight"))?;
        let original = std::mem::replace(&mut linear_mut(model, l.layer, name).weight, Weight::Dense(moved));
        let mut x = entering[l.layer].clone();
        for i in l.layer..model.layers.len() {
            x = model.layer(i, &p, &x).map_err(err("perturbed forward"))?;
        }
        let got = model.pool(&p, &x).map_err(err("perturbed pooling"))?;
        linear_mut(model, l.layer, name).weight = original;
        let dist = want
            .iter()
            .zip(&got)
            .map(|(a, b)| a.iter().zip(b).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>())
            .sum::<f64>()
            / want.len().max(1) as f64;
        l.sensitivity = if moved_energy > 0.0 { dist / moved_energy } else { 0.0 };
    }
    Ok(())
}
