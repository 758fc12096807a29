//! The group grid, the one place where the axis becomes an index mapping.
//!
//! Both axes share one layout rule: the params form a matrix `P` oriented like `W` with
//! one side shrunk by `g`, and weight `(r, c)` uses `P[r / g_r, c / g_c]`, where
//! `(g_r, g_c)` is `(1, g)` per-OC and `(g, 1)` per-IC ([`QuantSpec::group_shape`]).

use std::ops::Range;

use crate::quantizer::QuantSpec;

/// The group grid of a `[rows, cols]` matrix: group `(k_r, k_c)` covers the block
/// `[k_r g_r .., k_c g_c ..]` of `W` and its params sit at `k_r * grid_cols + k_c`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Grid {
    rows: usize,
    cols: usize,
    gr: usize,
    gc: usize,
    /// `ceil(cols / g_c)`, the row stride of `P`.
    pcols: usize,
}

impl Grid {
    pub(crate) fn new(rows: usize, cols: usize, spec: &QuantSpec) -> Self {
        let (gr, gc) = spec.group_shape(rows, cols);
        let pcols = cols.div_ceil(gc);
        Self { rows, cols, gr, gc, pcols }
    }

    /// `(g_r, g_c)`, the shape of a full group.
    pub(crate) fn group_shape(&self) -> (usize, usize) {
        (self.gr, self.gc)
    }

    /// Shape of the params matrix `P`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.rows.div_ceil(self.gr), self.pcols)
    }

    pub(crate) fn len(&self) -> usize {
        let (pr, pc) = self.shape();
        pr * pc
    }

    /// Flat index of group `(k_r, k_c)` in `P`.
    pub(crate) fn index(&self, kr: usize, kc: usize) -> usize {
        kr * self.pcols + kc
    }

    /// Rows and columns of `W` covered by group `p` (flat index); the last ones may be ragged.
    pub(crate) fn block(&self, p: usize) -> (Range<usize>, Range<usize>) {
        let (kr, kc) = (p / self.pcols, p % self.pcols);
        let span = |k: usize, g: usize, len: usize| k * g..((k + 1) * g).min(len);
        (span(kr, self.gr, self.rows), span(kc, self.gc, self.cols))
    }
}
