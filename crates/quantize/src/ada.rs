//! AdaDim's dimension search (paper Eq. 3): quantize a layer along both axes with RTN and
//! keep the axis whose output `Q(W) X` is closer to `W X`.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::error::{Error, Result};
use crate::hessian::{check_inputs, Hessian};
use crate::matrix::{check_weights, QuantizedMatrix};
use crate::quantizer::{Axis, QuantSpec};
use crate::rtn::{rtn_fitted, Fitter};
use crate::search::ScaleSearch;

/// Calibration data of one layer, to measure Eq. 3 on.
#[derive(Clone, Copy, Debug)]
pub enum Calibration<'a> {
    /// The layer's inputs `X`, row-major `[tokens, cols]`.
    Inputs(&'a [f32]),
    /// Their Hessian: the same error, without keeping `X` ([`output_error_from_hessian`]).
    Hessian(&'a Hessian),
}

/// The axis Eq. 3 picked for one layer, with the error of both.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisChoice {
    /// The axis with the lower output error; per-OC on a tie (the layout GPTQ
    /// checkpoints and kernels already support).
    pub axis: Axis,
    /// `mean((Q_oc(W) X - W X)^2)`.
    pub oc_error: f64,
    /// `mean((Q_ic(W) X - W X)^2)`.
    pub ic_error: f64,
    /// The RTN quantization along `axis`.
    pub quantized: QuantizedMatrix,
}

/// Columns of H per GEMM in [`output_error_from_hessian`].
const HESSIAN_BLOCK: usize = 512;

/// Tokens per GEMM in [`output_error`]: bounds the `[rows, tokens]` scratch.
const TOKEN_CHUNK: usize = 2048;

/// `mean((W' X - W X)^2)` over rows and tokens, with `w`, `w_hat` row-major `[rows, cols]`
/// and `x` row-major `[tokens, cols]` (paper Eq. 3, squared and averaged).
///
/// Computed as `(W' - W) X^T` with one f32 GEMM per chunk of tokens; squares summed in f64.
pub fn output_error(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, x: &[f32]) -> Result<f64> {
    check_weights(w, rows, cols)?;
    check_weights(w_hat, rows, cols)?;
    let tokens = check_inputs(x, cols)?;
    if tokens == 0 {
        return Err(Error::Invalid("output error needs at least one calibration token"));
    }
    let D: Vec<f32> = w_hat.iter().zip(w).map(|(a, b)| a - b).collect();
    let D = MatRef::from_row_major_slice(&D, rows, cols);
    let mut Y = vec![0.0f32; rows * TOKEN_CHUNK.min(tokens)];
    let mut sum = 0.0f64;
    for x in x.chunks(TOKEN_CHUNK * cols) {
        let t = x.len() / cols;
        let X = MatRef::from_row_major_slice(x, t, cols);
        let Y = &mut Y[..rows * t];
        let Y_mat = MatMut::from_column_major_slice_mut(Y, rows, t);
        matmul(Y_mat, Accum::Replace, D, X.transpose(), 1.0, Par::rayon(0));
        sum += Y.iter().map(|&y| f64::from(y) * f64::from(y)).sum::<f64>();
    }
    Ok(sum / (rows * tokens) as f64)
}

/// The same error as [`output_error`] from the Hessian `H = (2 / n) sum_t x_t x_t^T`:
/// `mean_{r,t} (d_r . x_t)^2 = sum_r d_r^T H d_r / (2 rows) = trace(D H D^T) / (2 rows)`
/// with `D = W' - W`, so a driver can keep the `[cols, cols]` H instead of all of `X`.
pub fn output_error_from_hessian(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, h: &Hessian) -> Result<f64> {
    check_weights(w, rows, cols)?;
    check_weights(w_hat, rows, cols)?;
    h.check_dim(cols)?;
    if h.tokens() == 0 {
        return Err(Error::Invalid("output error needs at least one calibration token"));
    }
    // f32 GEMMs (H is f32 as accumulated; D = W' - W is exact in f32 wherever W' is within
    // a factor 2 of W), products summed in f64: relative error ~1e-6, far below any gap the
    // axis choice acts on, at twice the f64 speed; this is most of a 7B block's time.
    // One block of H's columns at a time bounds the scratch to [rows, HESSIAN_BLOCK]:
    // trace(D H D^T) = sum over blocks b of sum(D H[:, b] .* D[:, b]).
    let D: Vec<f32> = w_hat.iter().zip(w).map(|(&a, &b)| a - b).collect();
    let D = MatRef::from_row_major_slice(&D, rows, cols);
    let H = MatRef::from_row_major_slice(h.matrix(), cols, cols);
    let width = HESSIAN_BLOCK.min(cols);
    let mut DHb = Mat::<f32>::zeros(rows, width);
    let mut trace = 0.0f64;
    for j0 in (0..cols).step_by(width) {
        let b = width.min(cols - j0);
        let mut DHb = DHb.as_mut().submatrix_mut(0, 0, rows, b);
        matmul(DHb.as_mut(), Accum::Replace, D, H.submatrix(0, j0, cols, b), 1.0, Par::rayon(0));
        for j in 0..b {
            trace += (0..rows).map(|r| f64::from(DHb[(r, j)]) * f64::from(D[(r, j0 + j)])).sum::<f64>();
        }
    }
    Ok(trace / (2.0 * rows as f64))
}

/// Quantizes `w` with RTN per-OC and per-IC (`spec.axis` is ignored) and keeps the axis
/// with the lower output error on `calib` (paper Eq. 3, "RTN-ada"; GPTQ-ada then runs
/// [`crate::gptq`] along the returned axis).
pub fn choose_axis(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    calib: Calibration<'_>,
) -> Result<AxisChoice> {
    choose_axis_fitted(w, rows, cols, spec, calib, ScaleSearch::MinMax)
}

/// As [`choose_axis`], with RTN's groups fitted by `search` in both axes (per-OC groups
/// weighted by the input channels' energy on `calib`), so the errors compared are the
/// searched ones.
pub fn choose_axis_fitted(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    calib: Calibration<'_>,
    search: ScaleSearch,
) -> Result<AxisChoice> {
    Ok(rtn_candidates(w, rows, cols, spec, calib, search)?.choose())
}

/// RTN along both axes, with each one's output error on `calib`: the two candidates AdaDim
/// chooses between (by these errors, [`Candidates::choose`], or by errors measured further
/// downstream, [`Candidates::choose_by`]).
#[derive(Clone, Debug)]
pub struct Candidates {
    /// RTN per-OC and its output error.
    pub oc: QuantizedMatrix,
    /// `mean((Q_oc(W) X - W X)^2)`.
    pub oc_error: f64,
    /// RTN per-IC and its output error.
    pub ic: QuantizedMatrix,
    /// `mean((Q_ic(W) X - W X)^2)`.
    pub ic_error: f64,
}

/// Quantizes `w` with RTN per-OC and per-IC (`spec.axis` is ignored), groups fitted by
/// `search`, and measures both output errors on `calib`.
pub fn rtn_candidates(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    calib: Calibration<'_>,
    search: ScaleSearch,
) -> Result<Candidates> {
    let error = |q: &QuantizedMatrix| match calib {
        Calibration::Inputs(x) => output_error(w, &q.dequantize(), rows, cols, x),
        Calibration::Hessian(h) => output_error_from_hessian(w, &q.dequantize(), rows, cols, h),
    };
    let h_diag: Option<Vec<f32>> = (!search.is_minmax()).then(|| match calib {
        Calibration::Hessian(h) => h.diag(),
        Calibration::Inputs(x) => {
            let mut d = vec![0f32; cols];
            x.chunks(cols).for_each(|t| t.iter().zip(&mut d).for_each(|(v, s)| *s += v * v));
            d
        }
    });
    let fitter = Fitter::new(search, h_diag.as_deref());
    let oc = rtn_fitted(w, rows, cols, &spec.with_axis(Axis::Oc), &fitter)?;
    let ic = rtn_fitted(w, rows, cols, &spec.with_axis(Axis::Ic), &fitter)?;
    let (oc_error, ic_error) = (error(&oc)?, error(&ic)?);
    Ok(Candidates { oc, oc_error, ic, ic_error })
}

impl Candidates {
    /// The axis with the lower output error (per-OC on a tie): paper Eq. 3.
    pub fn choose(self) -> AxisChoice {
        let (oc, ic) = (self.oc_error, self.ic_error);
        self.choose_by(oc, ic)
    }

    /// The axis with the lower of `oc` / `ic`, errors measured elsewhere (per-OC on a tie);
    /// the choice still reports the linear's own output errors.
    pub fn choose_by(self, oc: f64, ic: f64) -> AxisChoice {
        let (axis, quantized) = if ic < oc { (Axis::Ic, self.ic) } else { (Axis::Oc, self.oc) };
        AxisChoice { axis, oc_error: self.oc_error, ic_error: self.ic_error, quantized }
    }
}
