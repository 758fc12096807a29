//! Round-to-nearest along either axis: fit every group on the original weights, then
//! quantize every weight on its group's grid. The axis only sets the group's shape.

use rayon::prelude::*;

use crate::error::Result;
use crate::grid::Grid;
use crate::matrix::{check_weights, QuantizedMatrix};
use crate::quantizer::{quantize, GroupParams, QuantSpec};
use crate::search::{self, ScaleSearch};

/// Quantizes the row-major `[rows, cols]` matrix `w` to nearest on the grid of `spec`.
///
/// Groups are fitted in parallel, each one from its own weights only, so the result does
/// not depend on the number of threads.
///
/// ```
/// use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
/// let w = [0.1, -0.4, 0.3, 0.8, -0.2, 0.5];
/// let spec = QuantSpec { bits: 4, group: None, axis: Axis::Ic, zero: Zero::Awq };
/// let q = rtn(&w, 2, 3, &spec)?;
/// assert_eq!(q.param_shape(), (1, 3)); // one group per input column
/// # Ok::<(), adadim_quantize::Error>(())
/// ```
pub fn rtn(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> Result<QuantizedMatrix> {
    rtn_fitted(w, rows, cols, spec, &Fitter::MINMAX)
}

/// As [`rtn`], with each group's params chosen by `fitter` (min-max, or the error search
/// weighted by the input channels' Hessian diagonal).
pub fn rtn_fitted(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec, fitter: &Fitter) -> Result<QuantizedMatrix> {
    spec.validate()?;
    check_weights(w, rows, cols)?;
    fitter.check(cols)?;
    let grid = Grid::new(rows, cols, spec);
    let params = fit_groups(w, cols, &grid, spec, fitter);
    let (gr, gc) = grid.group_shape();
    let maxq = spec.maxq();
    let mut codes = vec![0u8; w.len()];
    codes.par_chunks_mut(cols).zip(w.par_chunks(cols)).enumerate().for_each(|(r, (codes_r, w_r))| {
        // Row r meets the groups of params row r / g_r, one per g_c columns.
        let row_params = &params[grid.index(r / gr, 0)..];
        for ((q, x), &p) in codes_r.chunks_mut(gc).zip(w_r.chunks(gc)).zip(row_params) {
            q.iter_mut().zip(x).for_each(|(q, &x)| *q = quantize(x, p, maxq));
        }
    });
    Ok(QuantizedMatrix::from_params(rows, cols, *spec, codes, &params, None))
}

/// Fits the params of every group of the grid on `w` (row-major, `cols` wide), one
/// parallel task per group, in the grid's flat order.
pub(crate) fn fit_groups(w: &[f32], cols: usize, grid: &Grid, spec: &QuantSpec, fitter: &Fitter) -> Vec<GroupParams> {
    (0..grid.len())
        .into_par_iter()
        .map(|p| {
            let (rs, cs) = grid.block(p);
            if fitter.search.is_minmax() {
                return spec.fit(rs.flat_map(|r| w[r * cols + cs.start..r * cols + cs.end].iter().copied()));
            }
            let values: Vec<f32> =
                rs.clone().flat_map(|r| w[r * cols + cs.start..r * cols + cs.end].iter().copied()).collect();
            let weights: Option<Vec<f32>> =
                fitter.h_diag.map(|h| rs.flat_map(|_| h[cs.clone()].iter().copied()).collect());
            search::fit(spec, &values, weights.as_deref(), fitter.search)
        })
        .collect()
}

/// How groups are fitted: the search, and the weight of each input channel in its error
/// (the Hessian diagonal; `None`: equal weights).
#[derive(Clone, Copy, Debug)]
pub struct Fitter<'a> {
    /// Min-max or the error search.
    pub search: ScaleSearch,
    /// `diag(H)`, one value per input channel.
    pub h_diag: Option<&'a [f32]>,
}

impl<'a> Fitter<'a> {
    /// The min-max fit (no weights needed).
    pub const MINMAX: Fitter<'static> = Fitter { search: ScaleSearch::MinMax, h_diag: None };

    /// `search`, weighted by the diagonal of `h` (clamped at 0) when there is one.
    pub fn new(search: ScaleSearch, h_diag: Option<&'a [f32]>) -> Self {
        Fitter { search, h_diag }
    }

    fn check(&self, cols: usize) -> Result<()> {
        match self.h_diag {
            Some(h) if h.len() != cols => {
                Err(crate::error::Error::Shape { what: "Hessian diagonal [cols]", expected: cols, got: h.len() })
            }
            _ => Ok(()),
        }
    }
}
