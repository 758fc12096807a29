//! GPTQ's `Hinv`: the upper Cholesky factor `U` of `(H + damp I)^{-1}`, i.e. `gptq.py`'s
//! `cholesky` -> `cholesky_inverse` -> `cholesky(upper=True)`, with the damping raised
//! tenfold until `H + damp I` factors (a non-positive-definite H is the failure users of
//! GPTQ report most; we never let it turn into NaNs).

use faer::linalg::solvers::DenseSolveCore;
use faer::{Mat, MatRef, Side};

use crate::error::{Error, Result};

/// `U` with `U^T U = (H + damp I)^{-1}`, and the damping that made it exist.
pub(crate) struct DampedInverse {
    /// Upper triangular `[n, n]`; `U[i, i]` scales column `i`'s error, `U[i, i+1..]` spreads it.
    pub U: Mat<f64>,
    /// The damping used, as a fraction of `mean(diag(H))`.
    pub percdamp: f64,
}

/// Factors `H + percdamp * mean(diag(H)) I` (row-major `[n, n]`), multiplying `percdamp`
/// by 10 (starting from `gptq.py`'s 0.01 if it was 0) up to `retries` times.
pub(crate) fn damped_inverse(
    H: &[f64],
    n: usize,
    percdamp: f64,
    retries: u32,
) -> Result<DampedInverse> {
    // |mean| so that a damping never pushes the diagonal down, even for a hand-made H.
    let mean_diag = ((0..n).map(|i| H[i * n + i]).sum::<f64>() / n as f64).abs();
    let (mut percdamp, mut tries) = (percdamp, 1);
    loop {
        if let Some(U) = upper_inverse_factor(H, n, percdamp * mean_diag) {
            return Ok(DampedInverse { U, percdamp });
        }
        if tries > retries {
            return Err(Error::NotPositiveDefinite { percdamp, tries });
        }
        tries += 1;
        percdamp = if percdamp > 0.0 {
            percdamp * 10.0
        } else {
            0.01
        };
    }
}

/// `U` for one damping, or `None` when `H + damp I` is not (numerically) positive definite.
fn upper_inverse_factor(H: &[f64], n: usize, damp: f64) -> Option<Mat<f64>> {
    let A = Mat::from_fn(n, n, |i, j| H[i * n + j] + if i == j { damp } else { 0.0 });
    let llt = A.llt(Side::Lower).ok()?;
    if !pivots_significant(llt.L(), A.as_ref()) {
        return None;
    }
    let A_inv = llt.inverse();
    let U = A_inv.llt(Side::Lower).ok()?.L().transpose().to_owned();
    U.is_all_finite().then_some(U)
}

/// A positive pivot `L[i, i]^2` below the rounding noise of `A[i, i] - |L[i, :i]|^2`
/// (about `n eps A[i, i]`) is a zero pivot in disguise: accepting it would give an
/// inverse of size `1 / eps` and GPTQ updates that blow the weights up.
fn pivots_significant(L: MatRef<'_, f64>, A: MatRef<'_, f64>) -> bool {
    let n = A.nrows();
    let tol = 8.0 * n as f64 * f64::EPSILON;
    (0..n).all(|i| L[(i, i)] * L[(i, i)] > tol * A[(i, i)])
}
