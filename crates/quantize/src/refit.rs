//! Least-squares refit of a quantized matrix's group scales on the layer's output error.
//!
//! The codes and zero points stay; each group's scale `d` is re-chosen so that
//! `tr((W - W') H (W - W')^T)` is least, with `W'[r, i] = d(r, i) c[r, i]`, `c = q - zero`:
//! a quadratic in the scales, solved exactly. GPTQ fits a group's scale on the weights as they
//! were when the group started (or on `W` itself for static groups) and only then spreads the
//! rounding errors; the refit sees the final codes and the full `H`, cross terms included,
//! where the search saw only its diagonal. Groups on one param row share a system
//! (per-OC: a row's groups, `ceil(C_in / g)` unknowns; per-IC: a band of `g` rows, one scale
//! per input column), and a param row keeps its old scales unless the new ones, rounded to
//! f16 as stored, lower its exact error: the refit never raises the output error.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::grid::Grid;
use crate::hessian::Hessian;
use crate::matrix::{check_weights, QuantizedMatrix};
use crate::quantizer::{f16_nearest, Axis, GroupParams, Zero};

/// What [`refit_scales`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Refit {
    /// The matrix with refitted scales (the same codes and zero points).
    pub quantized: QuantizedMatrix,
    /// Output error before, as [`crate::output_error_from_hessian`] measures it.
    pub before: f64,
    /// Output error after (never above `before`, up to the f32 products it is measured with).
    pub after: f64,
    /// Param rows whose scales changed, of how many.
    pub changed: (usize, usize),
}

/// Refits the group scales of `q` (quantized from `w`, row-major `[rows, cols]`) against the
/// Hessian `h` of its inputs; see the module doc.
pub fn refit_scales(q: &QuantizedMatrix, w: &[f32], h: &Hessian) -> Result<Refit> {
    let (rows, cols) = (q.rows(), q.cols());
    check_weights(w, rows, cols)?;
    h.check_dim(cols)?;
    if h.tokens() == 0 {
        return Err(Error::Invalid("the scale refit needs at least one calibration token"));
    }
    let spec = *q.spec();
    let grid = Grid::new(rows, cols, &spec);
    let (pr, pc) = grid.shape();
    // Each input column's param column (once: it is read per weight below), and c = q - zero.
    let gcol: Vec<usize> = (0..cols).map(|i| q.param_index(0, i) % pc).collect();
    let band_rows = grid.group_shape().0;
    let codes = q.codes();
    let mut c = vec![0f32; rows * cols];
    c.par_chunks_mut(cols).enumerate().for_each(|(r, cr)| {
        let base = grid.index(r / band_rows, 0);
        for (i, v) in cr.iter_mut().enumerate() {
            *v = f32::from(codes[r * cols + i]) - q.zeros()[base + gcol[i]];
        }
    });
    let H = MatRef::from_row_major_slice(h.matrix(), cols, cols);
    let Wm = MatRef::from_row_major_slice(w, rows, cols);
    let mut WH = Mat::<f32>::zeros(rows, cols);
    matmul(WH.as_mut(), Accum::Replace, Wm, H, 1.0, Par::rayon(0));
    let C = MatRef::from_row_major_slice(&c, rows, cols);
    let group_col = |i: usize| gcol[i];

    // The normal equations A d = b of every param row.
    let systems: Vec<(Mat<f64>, Vec<f64>)> = match spec.axis {
        Axis::Oc => {
            // Columns of each group (several ranges under a g_idx, so listed).
            let mut members = vec![Vec::new(); pc];
            (0..cols).for_each(|i| members[group_col(i)].push(i));
            let mut A = vec![0f64; rows * pc * pc];
            for (l, js) in members.iter().enumerate() {
                // P = C[:, js] H[js, :]: column i of row r holds sum_{j in l} H[i, j] c[r, j].
                let Cl = Mat::<f32>::from_fn(rows, js.len(), |r, k| C[(r, js[k])]);
                let Hl = Mat::<f32>::from_fn(js.len(), cols, |k, i| H[(js[k], i)]);
                let mut P = Mat::<f32>::zeros(rows, cols);
                matmul(P.as_mut(), Accum::Replace, Cl.as_ref(), Hl.as_ref(), 1.0, Par::rayon(0));
                A.par_chunks_mut(pc * pc).enumerate().for_each(|(r, Ar)| {
                    for i in 0..cols {
                        Ar[group_col(i) * pc + l] += f64::from(C[(r, i)]) * f64::from(P[(r, i)]);
                    }
                });
            }
            (0..rows)
                .map(|r| {
                    let mut b = vec![0f64; pc];
                    (0..cols).for_each(|i| b[group_col(i)] += f64::from(C[(r, i)]) * f64::from(WH[(r, i)]));
                    (Mat::from_fn(pc, pc, |k, l| A[r * pc * pc + k * pc + l]), b)
                })
                .collect()
        }
        Axis::Ic => (0..pr)
            .map(|p| {
                let (band, _) = grid.block(grid.index(p, 0));
                let Cb = C.subrows(band.start, band.len());
                let mut M = Mat::<f32>::zeros(cols, cols);
                matmul(M.as_mut(), Accum::Replace, Cb.transpose(), Cb, 1.0, Par::rayon(0));
                let A = Mat::from_fn(cols, cols, |i, j| f64::from(M[(i, j)]) * f64::from(H[(i, j)]));
                let b = (0..cols)
                    .map(|i| band.clone().map(|r| f64::from(C[(r, i)]) * f64::from(WH[(r, i)])).sum())
                    .collect();
                (A, b)
            })
            .collect(),
    };

    // Solve each, round to f16, fall back per group where a scale would not be a valid one.
    let old: Vec<GroupParams> =
        (0..pr * pc).map(|k| GroupParams { scale: q.scales()[k], zero: q.zeros()[k] }).collect();
    let mut new = old.clone();
    new.par_chunks_mut(pc).zip(systems.into_par_iter()).for_each(|(row, (A, b))| {
        let d0: Vec<f64> = row.iter().map(|p| f64::from(p.scale)).collect();
        let Some(d) = solve_towards(A, &b, &d0) else { return };
        for (p, d) in row.iter_mut().zip(d) {
            let s = f16_nearest(d as f32);
            if !(s.is_finite() && s > 0.0) {
                continue;
            }
            *p = match spec.zero {
                Zero::Float => GroupParams::from_min(s, f16_nearest(-p.zero * s)),
                _ => GroupParams { scale: s, zero: p.zero },
            };
        }
    });
    let candidate = q.with_params(&new);

    // Keep, per param row, whichever scales give the lower exact error.
    let err_old = row_errors(w, &q.dequantize(), rows, cols, h);
    let err_new = row_errors(w, &candidate.dequantize(), rows, cols, h);
    let band = |e: &[f64], p: usize| e[p * band_rows..((p + 1) * band_rows).min(rows)].iter().sum::<f64>();
    let (mut before, mut after, mut changed) = (0.0, 0.0, 0);
    for p in 0..pr {
        let (eo, en) = (band(&err_old, p), band(&err_new, p));
        before += eo;
        if en < eo && new[p * pc..(p + 1) * pc] != old[p * pc..(p + 1) * pc] {
            after += en;
            changed += 1;
        } else {
            new[p * pc..(p + 1) * pc].copy_from_slice(&old[p * pc..(p + 1) * pc]);
            after += eo;
        }
    }
    let norm = 2.0 * rows as f64;
    Ok(Refit { quantized: q.with_params(&new), before: before / norm, after: after / norm, changed: (changed, pr) })
}

/// `(A + lambda I) d = b + lambda d0`: the least-squares scales, pulled towards the old ones
/// only where `A` does not decide them (a group whose codes all sit on its zero point).
fn solve_towards(mut A: Mat<f64>, b: &[f64], d0: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    let mean = (0..n).map(|i| A[(i, i)]).sum::<f64>() / n as f64;
    if !(mean.is_finite() && mean > 0.0) {
        return None;
    }
    let lambda = 1e-9 * mean;
    (0..n).for_each(|i| A[(i, i)] += lambda);
    let rhs = Mat::from_fn(n, 1, |i, _| b[i] + lambda * d0[i]);
    let d = A.llt(Side::Lower).ok()?.solve(rhs);
    let d: Vec<f64> = (0..n).map(|i| d[(i, 0)]).collect();
    d.iter().all(|v| v.is_finite()).then_some(d)
}

/// Per row `r`, `(w - w')_r H (w - w')_r^T`, summed in f64 over f32 products.
fn row_errors(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, h: &Hessian) -> Vec<f64> {
    let D: Vec<f32> = w_hat.iter().zip(w).map(|(&a, &b)| a - b).collect();
    let Dm = MatRef::from_row_major_slice(&D, rows, cols);
    let H = MatRef::from_row_major_slice(h.matrix(), cols, cols);
    let mut DH = Mat::<f32>::zeros(rows, cols);
    matmul(DH.as_mut(), Accum::Replace, Dm, H, 1.0, Par::rayon(0));
    (0..rows).map(|r| (0..cols).map(|i| f64::from(DH[(r, i)]) * f64::from(Dm[(r, i)])).sum()).collect()
}
