//! Seeded matrices the kernel tests share.

use adadim_load::synth::Rng;
use adadim_quantize::{gptq, Axis, GptqOptions, Hessian, QuantSpec, QuantizedMatrix, Zero};

/// `[rows, cols]` weights with an outlier column, as real layers have.
pub fn weights(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut w = rng.normals(rows * cols, 0.05);
    for r in 0..rows {
        w[r * cols + cols / 3] *= 20.0;
    }
    w
}

/// A per-OC GPTQ matrix with act-order (dynamic groups unless `static_groups`): calibration
/// activations with an outlier channel drive the order, so columns are stored permuted.
pub fn act_order_gptq(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    static_groups: bool,
) -> QuantizedMatrix {
    let w = weights(rng, rows, cols);
    let mut x = rng.normals(256 * cols, 1.0);
    for t in 0..256 {
        x[t * cols + 7] *= 30.0;
    }
    let mut h = Hessian::new(cols);
    h.add_batch(&x).unwrap();
    let spec = QuantSpec { bits, group: Some(group), axis: Axis::Oc, zero: Zero::Awq };
    gptq(&w, rows, cols, &h, &spec, &GptqOptions { act_order: true, static_groups, ..GptqOptions::default() })
        .unwrap()
        .quantized
}
