//! The layer Hessian of GPTQ, `H = (2 / n) sum_t x_t x_t^T`, accumulated as a running
//! average over calibration batches (IST-DASLab `gptq.py`, `add_batch`).

use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};

use crate::error::{Error, Result};

/// Running average of `2 x x^T` over the calibration tokens seen by one linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    dim: usize,
    tokens: usize,
    /// `H`, row-major `[dim, dim]`, f32 as in `gptq.py`.
    h: Vec<f32>,
}

impl Hessian {
    /// An empty Hessian for a layer with `dim` input channels.
    pub fn new(dim: usize) -> Self {
        Self { dim, tokens: 0, h: vec![0.0; dim * dim] }
    }

    /// Wraps an already accumulated `H` (row-major `[dim, dim]`) built from `tokens` tokens,
    /// e.g. one saved by an earlier run. Only shape and finiteness are checked: positive
    /// definiteness is GPTQ's business (it damps and retries).
    pub fn from_matrix(dim: usize, h: Vec<f32>, tokens: usize) -> Result<Self> {
        let expected = dim.checked_mul(dim).ok_or(Error::Invalid("dim * dim overflows usize"))?;
        if h.len() != expected {
            return Err(Error::Shape { what: "Hessian [dim, dim]", expected, got: h.len() });
        }
        if let Some(i) = h.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteHessian { row: i / dim, col: i % dim, value: h[i] });
        }
        Ok(Self { dim, tokens, h })
    }

    /// Adds a batch of calibration inputs `x`, row-major `[tokens, dim]`.
    ///
    /// `H <- H n / (n + t) + (2 / (n + t)) X^T X`, one GEMM per batch rather than `t`
    /// rank-1 updates; only the lower triangle is computed (half the FLOPs of the full
    /// product, measured 1.9x faster) and mirrored. A batch with a NaN or infinity is
    /// rejected whole, leaving `H` as it was. Many batches in a row: [`HessianSum`].
    pub fn add_batch(&mut self, x: &[f32]) -> Result<()> {
        self.add_lower(x)?;
        mirror_lower(&mut self.h, self.dim);
        Ok(())
    }

    /// [`Hessian::add_batch`] on the lower triangle only (the upper one left stale).
    fn add_lower(&mut self, x: &[f32]) -> Result<()> {
        let t = check_inputs(x, self.dim)?;
        if t == 0 {
            return Ok(());
        }
        // The rescale only where the GEMM reads and writes: the lower triangle.
        let d = self.dim;
        let alpha = running_average_step(&mut self.tokens, t, |keep| {
            for (i, row) in self.h.chunks_exact_mut(d).enumerate() {
                row[..=i].iter_mut().for_each(|v| *v *= keep);
            }
        });
        let X = MatRef::from_row_major_slice(x, t, self.dim);
        let H = MatMut::from_row_major_slice_mut(&mut self.h, self.dim, self.dim);
        matmul(
            H,
            BlockStructure::TriangularLower,
            Accum::Add,
            X.transpose(),
            BlockStructure::Rectangular,
            X,
            BlockStructure::Rectangular,
            alpha,
            Par::rayon(0),
        );
        Ok(())
    }

    /// Number of input channels.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of calibration tokens accumulated so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `H`, row-major `[dim, dim]`.
    pub fn matrix(&self) -> &[f32] {
        &self.h
    }

    /// Fail with [`Error::Shape`] unless this is the Hessian of a layer with `cols` inputs.
    pub fn check_dim(&self, cols: usize) -> Result<()> {
        if self.dim() != cols {
            return Err(Error::Shape { what: "Hessian [cols, cols]", expected: cols * cols, got: self.matrix().len() });
        }
        Ok(())
    }

    /// `diag(H)`, negative round-off clamped to 0: each input channel's weight in the
    /// Hessian-weighted scale search.
    pub fn diag(&self) -> Vec<f32> {
        (0..self.dim).map(|i| self.h[i * self.dim + i].max(0.0)).collect()
    }

    /// The Hessian of the inputs `S^-1 x` (AWQ's scaled channels): `H[i, j] / (s_i s_j)`.
    pub fn scaled(&self, s: &[f32]) -> Result<Hessian> {
        if s.len() != self.dim {
            return Err(Error::Shape { what: "channel scales [dim]", expected: self.dim, got: s.len() });
        }
        let d = self.dim;
        let h = (0..d * d).map(|k| self.h[k] / (s[k / d] * s[k % d])).collect();
        Hessian::from_matrix(d, h, self.tokens)
    }

    /// Input channels that never saw a non-zero input (`H[i, i] == 0`): GPTQ zeroes their
    /// weights, which cannot affect the layer's output on this calibration data.
    pub fn dead_inputs(&self) -> Vec<usize> {
        (0..self.dim).filter(|&i| self.h[i * self.dim + i] == 0.0).collect()
    }
}

/// A [`Hessian`] being accumulated over many batches: each batch updates the lower triangle
/// only and [`HessianSum::finish`] mirrors it once, the same numbers as
/// [`Hessian::add_batch`] batch by batch, without the mirror's strided pass over `H` per
/// batch.
#[derive(Clone, Debug)]
pub struct HessianSum(Hessian);

impl HessianSum {
    /// An empty sum for a layer with `dim` input channels.
    pub fn new(dim: usize) -> Self {
        HessianSum(Hessian::new(dim))
    }

    /// As [`Hessian::add_batch`].
    pub fn add_batch(&mut self, x: &[f32]) -> Result<()> {
        self.0.add_lower(x)
    }

    /// Number of input channels.
    pub fn dim(&self) -> usize {
        self.0.dim
    }

    /// The Hessian of every batch added.
    pub fn finish(mut self) -> Hessian {
        mirror_lower(&mut self.0.h, self.0.dim);
        self.0
    }
}

/// Copies the lower triangle of the row-major `[d, d]` matrix `h` onto the upper one.
fn mirror_lower(h: &mut [f32], d: usize) {
    for i in 0..d {
        for j in i + 1..d {
            h[i * d + j] = h[j * d + i];
        }
    }
}

/// Makes room in a running average of `2 x y^T` over `tokens` tokens for `t` more: `rescale`
/// multiplies the sum by `tokens / (tokens + t)`, the tokens are counted, and the weight
/// `2 / (tokens + t)` of the new batch's product is returned.
pub(crate) fn running_average_step(tokens: &mut usize, t: usize, rescale: impl FnOnce(f32)) -> f32 {
    let n = *tokens + t;
    rescale(*tokens as f32 / n as f32);
    *tokens = n;
    2.0 / n as f32
}

/// Checks `x` is a finite `[tokens, dim]` batch and returns `tokens`.
pub(crate) fn check_inputs(x: &[f32], dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::Empty { rows: 0, cols: 0 });
    }
    if !x.len().is_multiple_of(dim) {
        let expected = x.len().next_multiple_of(dim);
        return Err(Error::Shape { what: "inputs [tokens, dim]", expected, got: x.len() });
    }
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFiniteInput { token: i / dim, channel: i % dim, value: x[i] }),
        None => Ok(x.len() / dim),
    }
}
