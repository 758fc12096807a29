//! A quantized matrix: codes in `W`'s own row-major layout, params on the group grid.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::grid::Grid;
use crate::quantizer::{dequantize, GroupParams, QuantSpec};

/// A `[rows, cols]` matrix quantized on the grid of a [`QuantSpec`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    rows: usize,
    cols: usize,
    spec: QuantSpec,
    codes: Vec<u8>,
    scales: Vec<f32>,
    zeros: Vec<f32>,
    g_idx: Option<Vec<u32>>,
}

impl QuantizedMatrix {
    /// Assembles a matrix from stored parts, checking every length and index so that
    /// [`QuantizedMatrix::dequantize`] cannot go out of bounds.
    ///
    /// `codes` is row-major `[rows, cols]`; `scales` and `zeros` are row-major
    /// [`QuantizedMatrix::param_shape`]; `g_idx` (per-OC only) maps each input column to its
    /// group column, as in GPTQ checkpoints; `None` means `c / g`.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        codes: Vec<u8>,
        scales: Vec<f32>,
        zeros: Vec<f32>,
        g_idx: Option<Vec<u32>>,
    ) -> Result<Self> {
        spec.validate()?;
        let len = checked_len(rows, cols)?;
        let grid = Grid::new(rows, cols, &spec);
        let shape = |what, expected, got| Error::Shape { what, expected, got };
        if codes.len() != len {
            return Err(shape("codes [rows, cols]", len, codes.len()));
        }
        if scales.len() != grid.len() || zeros.len() != grid.len() {
            let got = if scales.len() != grid.len() { scales.len() } else { zeros.len() };
            return Err(shape("scales and zeros [param_rows, param_cols]", grid.len(), got));
        }
        if let Some(i) = codes.iter().position(|&q| q > spec.maxq()) {
            let (row, col, code) = (i / cols, i % cols, codes[i]);
            return Err(Error::Code { row, col, code, maxq: spec.maxq() });
        }
        if let Some(g) = &g_idx {
            if grid.group_shape().0 != 1 {
                return Err(Error::Invalid("g_idx only applies to per-OC groups"));
            }
            if g.len() != cols {
                return Err(shape("g_idx [cols]", cols, g.len()));
            }
            if g.iter().any(|&k| k as usize >= grid.shape().1) {
                return Err(Error::Invalid("g_idx names a group past the last params column"));
            }
        }
        Ok(Self { rows, cols, spec, codes, scales, zeros, g_idx })
    }

    /// Internal constructor for codes and params this crate produced itself.
    pub(crate) fn from_params(
        rows: usize,
        cols: usize,
        spec: QuantSpec,
        codes: Vec<u8>,
        params: &[GroupParams],
        g_idx: Option<Vec<u32>>,
    ) -> Self {
        let scales = params.iter().map(|p| p.scale).collect();
        let zeros = params.iter().map(|p| p.zero).collect();
        Self { rows, cols, spec, codes, scales, zeros, g_idx }
    }

    /// The same codes with new params (one per group, in [`QuantizedMatrix::param_shape`] order).
    pub(crate) fn with_params(&self, params: &[GroupParams]) -> Self {
        debug_assert_eq!(params.len(), self.scales.len());
        let scales = params.iter().map(|p| p.scale).collect();
        let zeros = params.iter().map(|p| p.zero).collect();
        Self { scales, zeros, ..self.clone() }
    }

    /// The same params with new codes (row-major `[rows, cols]`, each in `0..=maxq`).
    pub(crate) fn with_codes(&self, codes: Vec<u8>) -> Self {
        debug_assert_eq!(codes.len(), self.codes.len());
        Self { codes, ..self.clone() }
    }

    /// Output channels `C_out`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input channels `C_in`.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The grid the codes live on.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// Codes, row-major `[rows, cols]`, each in `0..=maxq`.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// Scales, row-major [`QuantizedMatrix::param_shape`].
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Zero points, row-major [`QuantizedMatrix::param_shape`].
    pub fn zeros(&self) -> &[f32] {
        &self.zeros
    }

    /// Per-OC act-order GPTQ with dynamic groups: the group column of each input column
    /// (GPTQ's `g_idx`). `None` when it is simply `c / g`.
    pub fn g_idx(&self) -> Option<&[u32]> {
        self.g_idx.as_deref()
    }

    /// Shape of the params: `[rows, ceil(cols / g)]` per-OC, `[ceil(rows / g), cols]` per-IC.
    pub fn param_shape(&self) -> (usize, usize) {
        Grid::new(self.rows, self.cols, &self.spec).shape()
    }

    /// Flat index into `scales` / `zeros` of the group holding weight `(r, c)`.
    pub fn param_index(&self, r: usize, c: usize) -> usize {
        let grid = Grid::new(self.rows, self.cols, &self.spec);
        grid.index(r / grid.group_shape().0, self.group_col(c, &grid))
    }

    /// Params of the group holding weight `(r, c)`.
    pub fn params(&self, r: usize, c: usize) -> GroupParams {
        let i = self.param_index(r, c);
        GroupParams { scale: self.scales[i], zero: self.zeros[i] }
    }

    /// The dequantized matrix `W'`, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let grid = Grid::new(self.rows, self.cols, &self.spec);
        let mut w_hat = vec![0.0; self.codes.len()];
        let rows = w_hat.par_chunks_mut(self.cols).zip(self.codes.par_chunks(self.cols));
        rows.enumerate().for_each(|(r, (w_hat, codes))| {
            let base = grid.index(r / grid.group_shape().0, 0);
            for (c, (v, &q)) in w_hat.iter_mut().zip(codes).enumerate() {
                let i = base + self.group_col(c, &grid);
                *v = dequantize(q, GroupParams { scale: self.scales[i], zero: self.zeros[i] });
            }
        });
        w_hat
    }

    /// The same matrix with output row `r` divided by `s[r]` (AWQ's fold into the linear that
    /// produces the next one's inputs): per-OC params only (a group lies in one row), and only
    /// when every new scale is exactly an f16 value, so the result is exactly `diag(s)^-1 W'`.
    pub fn divide_rows(&self, s: &[f32]) -> Result<Self> {
        if s.len() != self.rows {
            return Err(Error::Shape { what: "row scales [rows]", expected: self.rows, got: s.len() });
        }
        let (pr, pc) = self.param_shape();
        if pr != self.rows {
            return Err(Error::Invalid("only per-OC params can be divided by row"));
        }
        let mut scales = self.scales.clone();
        for (r, row) in scales.chunks_mut(pc).enumerate() {
            for v in row {
                *v /= s[r];
                if crate::quantizer::f16_scale(*v) != *v {
                    return Err(Error::Invalid("a row scale does not keep the f16 scales exact"));
                }
            }
        }
        Ok(Self { scales, ..self.clone() })
    }

    /// Column of `P` for input column `c`: `g_idx[c]`, or `c / g_c`.
    fn group_col(&self, c: usize, grid: &Grid) -> usize {
        self.g_idx.as_ref().map_or(c / grid.group_shape().1, |g| g[c] as usize)
    }
}

/// `rows * cols`, rejecting empty and overflowing shapes.
pub(crate) fn checked_len(rows: usize, cols: usize) -> Result<usize> {
    match rows.checked_mul(cols) {
        Some(0) => Err(Error::Empty { rows, cols }),
        Some(len) => Ok(len),
        None => Err(Error::Invalid("rows * cols overflows usize")),
    }
}

/// Checks `w` is a finite `[rows, cols]` matrix, naming the first bad weight.
pub(crate) fn check_weights(w: &[f32], rows: usize, cols: usize) -> Result<()> {
    let len = checked_len(rows, cols)?;
    if w.len() != len {
        return Err(Error::Shape { what: "weights [rows, cols]", expected: len, got: w.len() });
    }
    match w.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::NonFiniteWeight { row: i / cols, col: i % cols, value: w[i] }),
        None => Ok(()),
    }
}
