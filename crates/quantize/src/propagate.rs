//! Quantization error propagation (Arai & Ichikawa 2025, "QEP"; GPTAQ's asymmetric target):
//! a linear of a model whose earlier layers are already quantized sees inputs `x~` that have
//! drifted from the float model's `x`. Layer-wise GPTQ makes `W' x~` close to `W x~`; the model
//! needs it close to `W x`. The float weights that do that best on the calibration tokens are
//! `W* = W + W D H~^-1`, with `H~ = (2/n) sum x~ x~^T` (the Hessian GPTQ already uses) and
//! `D = (2/n) sum (x - x~) x~^T` (the drift), since `sum |W x - V x~|^2` is
//! `tr((V - W*) H~ (V - W*)^T) / 2` plus a constant. Quantizing `W* = W + alpha W D H~^-1`
//! instead of `W` (alpha in `[0, 1]`, QEP's partial correction against over-fitting the
//! calibration tokens) leaves every quantizer as it is.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

use crate::error::{Error, Result};
use crate::hessian::{check_inputs, running_average_step, Hessian};
use crate::matrix::check_weights;

/// Running average of `2 (x - x~) x~^T` over one linear's calibration tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Drift {
    dim: usize,
    tokens: usize,
    /// Row-major `[dim, dim]`.
    d: Vec<f32>,
}

impl Drift {
    /// An empty drift for a layer with `dim` input channels.
    pub fn new(dim: usize) -> Self {
        Self { dim, tokens: 0, d: vec![0.0; dim * dim] }
    }

    /// Adds the same tokens as seen by the float model (`float`) and by the partly quantized
    /// one (`quantized`), both row-major `[tokens, dim]`; weighted as [`Hessian::add_batch`].
    pub fn add_batch(&mut self, float: &[f32], quantized: &[f32]) -> Result<()> {
        let t = check_inputs(quantized, self.dim)?;
        if check_inputs(float, self.dim)? != t {
            return Err(Error::Shape {
                what: "float inputs [tokens, dim]",
                expected: quantized.len(),
                got: float.len(),
            });
        }
        if t == 0 {
            return Ok(());
        }
        let alpha = running_average_step(&mut self.tokens, t, |keep| self.d.iter_mut().for_each(|v| *v *= keep));
        let delta: Vec<f32> = float.iter().zip(quantized).map(|(a, b)| a - b).collect();
        let E = MatRef::from_row_major_slice(&delta, t, self.dim);
        let X = MatRef::from_row_major_slice(quantized, t, self.dim);
        let D = MatMut::from_row_major_slice_mut(&mut self.d, self.dim, self.dim);
        matmul(D, Accum::Add, E.transpose(), X, alpha, Par::rayon(0));
        Ok(())
    }

    /// Number of input channels.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Tokens accumulated.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `D`, row-major `[dim, dim]`.
    pub fn matrix(&self) -> &[f32] {
        &self.d
    }
}

/// `H~ + damp I` factored once per stage (q, k and v share their inputs, as gate and up do),
/// to correct each of its linears.
pub struct Correction {
    dim: usize,
    /// `D^T`, row-major: row `i` holds column `i` of `D`.
    dt: Mat<f64>,
    llt: faer::linalg::solvers::Llt<f64>,
    alpha: f64,
}

impl Correction {
    /// Factors `H~ + percdamp mean(diag(H~)) I` (GPTQ's damping, raised tenfold up to 4 times
    /// if it does not factor).
    pub fn new(h: &Hessian, drift: &Drift, alpha: f64, percdamp: f64) -> Result<Self> {
        let dim = h.dim();
        if drift.dim() != dim {
            return Err(Error::Shape { what: "drift [dim, dim]", expected: dim * dim, got: drift.matrix().len() });
        }
        if !(0.0..=1.0).contains(&alpha) {
            return Err(Error::Invalid("the error propagation's alpha must lie in [0, 1]"));
        }
        if h.tokens() == 0 || drift.tokens() != h.tokens() {
            return Err(Error::Invalid("the drift and the Hessian must come from the same calibration tokens"));
        }
        let H = MatRef::from_row_major_slice(h.matrix(), dim, dim);
        let mean = (0..dim).map(|i| f64::from(H[(i, i)])).sum::<f64>() / dim as f64;
        let mut damp = percdamp.max(1e-6);
        for _ in 0..5 {
            let A = Mat::<f64>::from_fn(dim, dim, |i, j| f64::from(H[(i, j)]) + if i == j { damp * mean } else { 0.0 });
            if let Ok(llt) = A.llt(Side::Lower) {
                let D = MatRef::from_row_major_slice(drift.matrix(), dim, dim);
                let dt = Mat::<f64>::from_fn(dim, dim, |i, j| f64::from(D[(j, i)]));
                return Ok(Self { dim, dt, llt, alpha });
            }
            damp *= 10.0;
        }
        Err(Error::NotPositiveDefinite { percdamp: damp, tries: 5 })
    }

    /// `W + alpha W D H~^-1` for `w` row-major `[rows, dim]`.
    pub fn apply(&self, w: &[f32], rows: usize) -> Result<Vec<f32>> {
        check_weights(w, rows, self.dim)?;
        // (W D H~^-1)^T = H~^-1 D^T W^T (H~ symmetric).
        let Wt = Mat::<f64>::from_fn(self.dim, rows, |i, r| f64::from(w[r * self.dim + i]));
        let mut DtWt = Mat::<f64>::zeros(self.dim, rows);
        matmul(DtWt.as_mut(), Accum::Replace, self.dt.as_ref(), Wt.as_ref(), 1.0, Par::rayon(0));
        let X = self.llt.solve(DtWt);
        let mut out = w.to_vec();
        for r in 0..rows {
            for i in 0..self.dim {
                out[r * self.dim + i] += (self.alpha * X[(i, r)]) as f32;
            }
        }
        check_weights(&out, rows, self.dim)?;
        Ok(out)
    }
}
