//! Coordinate descent on the codes of a quantized matrix (as QuantEase, Behdin et al. 2023).
//!
//! Every group's scale and zero point stay; each weight in turn moves to the grid point that
//! minimises the linear's output error `tr((W - W') H (W - W')^T)` with all other weights
//! held. For one weight that error is a convex quadratic whose minimum sits at
//! `w'_j + G[r, j] / H[j, j]` (`G = (W - W') H`), so the nearest grid point to it, clamped to
//! the group's codes, is the best code: no step raises the error. GPTQ visits each column once
//! and never revisits a rounding; passes over all columns let every weight answer the ones
//! rounded after it. The axis only changes which params a weight reads, so both axes share it.
//!
//! `G` is kept current as in GPTQ's lazy batches: inside a block of columns each row updates
//! its own slice of `G`; after the block one GEMM applies the block's moves to all of `G`.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::ada::output_error_from_hessian;
use crate::error::{Error, Result};
use crate::grid::Grid;
use crate::hessian::Hessian;
use crate::matrix::{check_weights, QuantizedMatrix};
use crate::quantizer::{dequantize, quantize, GroupParams};

/// Columns per lazy update of `G`.
const BLOCK: usize = 128;

/// What [`descend_codes`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Descent {
    /// The matrix with the new codes (the same scales and zero points).
    pub quantized: QuantizedMatrix,
    /// Output error before, as [`crate::output_error_from_hessian`] measures it.
    pub before: f64,
    /// Output error after: never above `before` (the input comes back unchanged if the
    /// measured error would rise through f32 round-off).
    pub after: f64,
    /// Passes run (fewer than asked when a pass moved no code).
    pub passes: usize,
    /// Codes that differ from the input's.
    pub moved: usize,
}

/// Runs up to `passes` cycles of coordinate descent over the codes of `q` (quantized from
/// `w`, row-major `[rows, cols]`) against the Hessian `h` of its inputs; see the module doc.
pub fn descend_codes(q: &QuantizedMatrix, w: &[f32], h: &Hessian, passes: usize) -> Result<Descent> {
    let (rows, cols) = (q.rows(), q.cols());
    check_weights(w, rows, cols)?;
    h.check_dim(cols)?;
    if h.tokens() == 0 {
        return Err(Error::Invalid("coordinate descent needs at least one calibration token"));
    }
    let spec = *q.spec();
    let maxq = spec.maxq();
    let grid = Grid::new(rows, cols, &spec);
    let (_, pc) = grid.shape();
    let band_rows = grid.group_shape().0;
    let gcol: Vec<usize> = (0..cols).map(|i| q.param_index(0, i) % pc).collect();
    let (scales, zeros) = (q.scales(), q.zeros());
    let params = |r: usize, j: usize| {
        let k = grid.index(r / band_rows, gcol[j]);
        GroupParams { scale: scales[k], zero: zeros[k] }
    };
    let hm = h.matrix();
    let H = MatRef::from_row_major_slice(hm, cols, cols);
    let diag: Vec<f32> = (0..cols).map(|j| hm[j * cols + j]).collect();

    let mut codes = q.codes().to_vec();
    let mut w_hat = q.dequantize();
    let before = output_error_from_hessian(w, &w_hat, rows, cols, h)?;
    let mut G = Mat::<f32>::zeros(rows, cols);
    let mut done = 0;
    for _ in 0..passes {
        // G = (W - W') H afresh each pass, so f32 drift from the updates cannot build up.
        let E: Vec<f32> = w.iter().zip(&w_hat).map(|(&a, &b)| a - b).collect();
        matmul(G.as_mut(), Accum::Replace, MatRef::from_row_major_slice(&E, rows, cols), H, 1.0, Par::rayon(0));
        done += 1;
        let mut moved_this_pass = 0usize;
        for b0 in (0..cols).step_by(BLOCK) {
            let b = BLOCK.min(cols - b0);
            let g_block: Vec<f32> =
                (0..rows).flat_map(|r| (0..b).map(move |k| (r, k))).map(|(r, k)| G[(r, b0 + k)]).collect();
            let mut d_block = vec![0f32; rows * b];
            let moved: usize = codes
                .par_chunks_mut(cols)
                .zip(w_hat.par_chunks_mut(cols))
                .zip(g_block.par_chunks(b).zip(d_block.par_chunks_mut(b)))
                .enumerate()
                .map(|(r, ((codes, w_hat), (g0, d)))| {
                    let mut g = g0.to_vec();
                    let mut moved = 0;
                    for k in 0..b {
                        let j = b0 + k;
                        if diag[j] <= 0.0 {
                            continue;
                        }
                        let p = params(r, j);
                        let code = quantize(w_hat[j] + g[k] / diag[j], p, maxq);
                        if code == codes[j] {
                            continue;
                        }
                        let value = dequantize(code, p);
                        let step = value - w_hat[j];
                        (codes[j], w_hat[j], d[k]) = (code, value, step);
                        moved += 1;
                        let hj = &hm[j * cols + b0..j * cols + b0 + b];
                        g.iter_mut().zip(hj).for_each(|(g, &h)| *g -= step * h);
                    }
                    moved
                })
                .sum();
            moved_this_pass += moved;
            if moved > 0 {
                let D = MatRef::from_row_major_slice(&d_block, rows, b);
                matmul(G.as_mut(), Accum::Add, D, H.subrows(b0, b), -1.0, Par::rayon(0));
            }
        }
        if moved_this_pass == 0 {
            break;
        }
    }
    let moved = codes.iter().zip(q.codes()).filter(|(a, b)| a != b).count();
    let candidate = q.with_codes(codes);
    let after = output_error_from_hessian(w, &w_hat, rows, cols, h)?;
    Ok(if after <= before {
        Descent { quantized: candidate, before, after, passes: done, moved }
    } else {
        Descent { quantized: q.clone(), before, after: before, passes: done, moved: 0 }
    })
}
