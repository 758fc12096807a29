//! Seeded test data: a tiny SplitMix64 generator (no `rand` dependency) and matrices shaped
//! like real layers (normal weights, correlated inputs with a few outlier channels).
#![allow(dead_code)] // each test file uses its own subset

use adadim_quantize::{Axis, QuantSpec, Zero};

/// SplitMix64 (Steele et al. 2014): 64 bits of state, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1], 53 bits.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// `[rows, cols]` weights ~ N(0, std^2).
pub fn weights(rows: usize, cols: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..rows * cols).map(|_| (rng.normal() * std) as f32).collect()
}

/// `[tokens, cols]` inputs: 4 shared latent factors (so channels are correlated, which is
/// what GPTQ exploits) plus noise; the `outliers` channels are scaled by `magnitude`.
pub fn inputs(tokens: usize, cols: usize, outliers: &[usize], magnitude: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let k = 4;
    let mix: Vec<f64> = (0..k * cols).map(|_| rng.normal()).collect();
    let mut x = vec![0.0f32; tokens * cols];
    for t in 0..tokens {
        let z: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
        for c in 0..cols {
            let v = (0..k).map(|f| z[f] * mix[f * cols + c]).sum::<f64>() + 0.5 * rng.normal();
            let scale = if outliers.contains(&c) { magnitude } else { 1.0 };
            x[t * cols + c] = v as f32 * scale;
        }
    }
    x
}

/// Row-major `[rows, cols]` -> row-major `[cols, rows]`.
pub fn transpose<T: Copy>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    (0..rows * cols).map(|i| m[(i % rows) * cols + i / rows]).collect()
}

pub fn spec(bits: u8, group: Option<usize>, axis: Axis, zero: Zero) -> QuantSpec {
    QuantSpec { bits, group, axis, zero }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The Hessian of `x` (`[tokens, cols]`), accumulated in one batch.
pub fn hessian(x: &[f32], cols: usize) -> adadim_quantize::Hessian {
    let mut h = adadim_quantize::Hessian::new(cols);
    h.add_batch(x).expect("finite test inputs");
    h
}

/// `I` as a Hessian: no input correlations, so GPTQ spreads no error.
pub fn identity(dim: usize) -> adadim_quantize::Hessian {
    let h = (0..dim * dim).map(|i| if i % (dim + 1) == 0 { 1.0 } else { 0.0 }).collect();
    adadim_quantize::Hessian::from_matrix(dim, h, 1).unwrap()
}

/// Default GPTQ options with act-order and static groups set.
pub fn gptq_opts(act_order: bool, static_groups: bool) -> adadim_quantize::GptqOptions {
    adadim_quantize::GptqOptions { act_order, static_groups, ..Default::default() }
}
