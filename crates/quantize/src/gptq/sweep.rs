//! The column sweep of GPTQ (`gptq.py`, `fasterquant`'s block loop): quantize one input
//! column, spread its error over the columns not yet quantized, lazily in blocks.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::grid::Grid;
use crate::quantizer::{dequantize, quantize, Axis, GroupParams, QuantSpec};
use crate::search::ScaleSearch;
use rayon::prelude::*;

/// One sweep over the input columns of `W`, in processing order.
pub(crate) struct Sweep<'a> {
    pub rows: usize,
    pub cols: usize,
    pub spec: &'a QuantSpec,
    pub grid: &'a Grid,
    /// `perm[j]` is the original index of the column processed `j`-th.
    pub perm: &'a [usize],
    /// `Hinv` of `gptq.py`, in processing order.
    pub U: &'a Mat<f64>,
    pub blocksize: usize,
    /// Per-OC params were all fitted up front (static groups); nothing is fitted here.
    pub static_groups: bool,
    /// Per-OC groups are whole in processing order (group-aware act-order): each is fitted on
    /// its columns' current, fully compensated values and keeps its original index.
    pub group_aware: bool,
    /// The weights before GPTQ (row-major, original column order), to measure its updates.
    pub orig: &'a [f32],
    /// How groups fitted during the sweep are fitted.
    pub search: ScaleSearch,
    /// `diag(H)` in original column order: per-OC groups' weights in the search.
    pub h_diag: &'a [f32],
}

impl Sweep<'_> {
    /// One group's params from its (error-compensated) values.
    fn fit(&self, values: &[f64], weights: Option<&[f32]>) -> GroupParams {
        if self.search.is_minmax() {
            return self.spec.fit(values.iter().map(|&x| x as f32));
        }
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        crate::search::fit(self.spec, &v, weights, self.search)
    }

    /// `fit(k)` for `k` in `0..n`: in parallel under the error search (each fit is independent,
    /// so the result does not depend on the threads), in order for the cheap min-max fit.
    fn fit_each(&self, n: usize, fit: impl Fn(usize) -> GroupParams + Sync + Send) -> Vec<GroupParams> {
        if self.search.is_minmax() {
            (0..n).map(fit).collect()
        } else {
            (0..n).into_par_iter().map(fit).collect()
        }
    }

    /// Row `r` of the column processed `jj`-th, with every update of the columns quantized
    /// before position `i` of the block `i1..i2`: kept current in `W1` inside the block; after
    /// it, `W` still lacks the block's lazy update, so the part already due is taken off here.
    fn current(
        &self,
        W: &[f64],
        W1: &[f64],
        Err1: &[f64],
        (i1, i2, i): (usize, usize, usize),
        r: usize,
        jj: usize,
    ) -> f64 {
        let rows = self.rows;
        if jj < i2 {
            return W1[(jj - i1) * rows + r];
        }
        W[r * self.cols + jj] - (0..i).map(|k| Err1[k * rows + r] * self.U[(i1 + k, jj)]).sum::<f64>()
    }

    /// Runs the sweep on `W` (row-major `[rows, cols]`, columns in processing order, updated
    /// in place), filling `params` and `codes` (original order) and `update` (per original
    /// column, the sum over rows of `|w - w_orig|` when the column is quantized: the error
    /// compensation it received) and returning the GPTQ loss.
    ///
    /// Compiled a second time for AVX-512 / AVX2 and picked at run time: the loops are the
    /// same operations in the same order (Rust never fuses a multiply and an add), only wider,
    /// so every path gives the same bits as [`Sweep::run_portable`].
    pub fn run(&self, W: &mut [f64], params: &mut [GroupParams], codes: &mut [u8], update: &mut [f64]) -> f64 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { self.run_avx512(W, params, codes, update) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: as above.
                return unsafe { self.run_avx2(W, params, codes, update) };
            }
        }
        self.run_portable(W, params, codes, update)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(
        &self,
        W: &mut [f64],
        params: &mut [GroupParams],
        codes: &mut [u8],
        update: &mut [f64],
    ) -> f64 {
        self.run_body(W, params, codes, update)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, W: &mut [f64], params: &mut [GroupParams], codes: &mut [u8], update: &mut [f64]) -> f64 {
        self.run_body(W, params, codes, update)
    }

    /// [`Sweep::run`] for the baseline CPU (SSE2): the reference the wider paths equal.
    pub fn run_portable(&self, W: &mut [f64], params: &mut [GroupParams], codes: &mut [u8], update: &mut [f64]) -> f64 {
        self.run_body(W, params, codes, update)
    }

    #[inline(always)]
    fn run_body(&self, W: &mut [f64], params: &mut [GroupParams], codes: &mut [u8], update: &mut [f64]) -> f64 {
        let (rows, cols, maxq) = (self.rows, self.cols, self.spec.maxq());
        let (gr, gc) = self.grid.group_shape();
        let dynamic_oc = self.spec.axis == Axis::Oc && !self.static_groups;
        // The current block, column-major so that each column is one contiguous slice.
        let mut W1 = vec![0.0; rows * self.blocksize.min(cols)];
        let mut Err1 = vec![0.0; rows * self.blocksize.min(cols)];
        let mut loss = 0.0;
        for i1 in (0..cols).step_by(self.blocksize) {
            let i2 = (i1 + self.blocksize).min(cols);
            let count = i2 - i1;
            for (k, col) in W1.chunks_mut(rows).take(count).enumerate() {
                col.iter_mut().enumerate().for_each(|(r, x)| *x = W[r * cols + i1 + k]);
            }
            for i in 0..count {
                let (j, c) = (i1 + i, self.perm[i1 + i]);
                let w = &W1[i * rows..(i + 1) * rows];
                // Step 1, the params of this column's groups.
                match self.spec.axis {
                    // gptq.py: a group starts every g processed columns and is fitted on
                    // `W[:, j:j+g]`, which holds the updates of earlier blocks but not yet
                    // those of this block (they live in W1). Kept as is for parity.
                    Axis::Oc if self.group_aware && (j == 0 || self.perm[j - 1] / gc != c / gc) => {
                        let k = c / gc;
                        let len = ((k + 1) * gc).min(cols) - k * gc;
                        let weights: Vec<f32> = self.perm[j..j + len].iter().map(|&c| self.h_diag[c]).collect();
                        let (W, W1, Err1) = (&*W, &W1, &Err1);
                        let fitted = self.fit_each(rows, |r| {
                            let v: Vec<f64> =
                                (j..j + len).map(|jj| self.current(W, W1, Err1, (i1, i2, i), r, jj)).collect();
                            self.fit(&v, Some(&weights))
                        });
                        for (r, p) in fitted.into_iter().enumerate() {
                            params[self.grid.index(r, k)] = p;
                        }
                    }
                    Axis::Oc if dynamic_oc && !self.group_aware && j % gc == 0 => {
                        let end = (j + gc).min(cols);
                        let weights: Vec<f32> = self.perm[j..end].iter().map(|&c| self.h_diag[c]).collect();
                        let W = &*W;
                        let fitted =
                            self.fit_each(rows, |r| self.fit(&W[r * cols + j..r * cols + end], Some(&weights)));
                        for (r, p) in fitted.into_iter().enumerate() {
                            params[self.grid.index(r, j / gc)] = p;
                        }
                    }
                    // Paper §3.3: the column is a whole set of per-IC groups, so they are
                    // fitted on the error-compensated column itself, just before use.
                    Axis::Ic => {
                        let fitted = self
                            .fit_each(rows.div_ceil(gr), |kr| self.fit(&w[kr * gr..((kr + 1) * gr).min(rows)], None));
                        for (kr, p) in fitted.into_iter().enumerate() {
                            params[self.grid.index(kr, c)] = p;
                        }
                    }
                    Axis::Oc => {}
                }
                // Dynamic per-OC groups follow processing order; all others the original one.
                let kc = if dynamic_oc && !self.group_aware { j / gc } else { c / gc };
                // Step 2, quantize: err = (w - q) / Hinv[j, j], loss += err^2 / 2.
                let d = self.U[(j, j)];
                let err = &mut Err1[i * rows..(i + 1) * rows];
                update[c] = w.iter().enumerate().map(|(r, &x)| (x - f64::from(self.orig[r * cols + c])).abs()).sum();
                for (r, (&x, e)) in w.iter().zip(err.iter_mut()).enumerate() {
                    let p = params[self.grid.index(r / gr, kc)];
                    let q = quantize(x as f32, p, maxq);
                    codes[r * cols + c] = q;
                    *e = (x - f64::from(dequantize(q, p))) / d;
                    loss += *e * *e / 2.0;
                }
                // Step 3, the rest of the block: W1[:, k] -= err * Hinv[j, i1 + k].
                let err = &Err1[i * rows..(i + 1) * rows];
                for k in i + 1..count {
                    let u = self.U[(j, i1 + k)];
                    let col = &mut W1[k * rows..(k + 1) * rows];
                    col.iter_mut().zip(err).for_each(|(x, e)| *x -= e * u);
                }
            }
            // Step 4, the lazy batch update: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:].
            if i2 < cols {
                let W_after = MatMut::from_row_major_slice_mut(W, rows, cols).submatrix_mut(0, i2, rows, cols - i2);
                let Err1 = MatRef::from_column_major_slice(&Err1[..rows * count], rows, count);
                let U_after = self.U.as_ref().submatrix(i1, i2, count, cols - i2);
                matmul(W_after, Accum::Add, Err1, U_after, -1.0, Par::rayon(0));
            }
        }
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantizer::Zero;

    /// The wide builds of the sweep give the portable one's codes, params, loss and updates,
    /// bit for bit, on both axes, with fits during the sweep and without.
    #[test]
    fn every_path_of_the_sweep_gives_the_reference_bits() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f64 / (1u64 << 24) as f64 - 0.5
        };
        let (rows, cols, t) = (24, 40, 64);
        let xs: Vec<f64> = (0..t * cols).map(|_| next()).collect();
        let h: Vec<f64> = (0..cols * cols)
            .map(|k| (0..t).map(|r| xs[r * cols + k / cols] * xs[r * cols + k % cols]).sum::<f64>() * 2.0 / t as f64)
            .collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| next() as f32 * 0.2).collect();
        let perm: Vec<usize> = (0..cols).rev().collect();
        let inv = super::super::hinv::damped_inverse(&|i, j| h[perm[i] * cols + perm[j]], cols, 0.01, 4).unwrap();
        let h_diag: Vec<f32> = (0..cols).map(|c| h[c * cols + c] as f32).collect();
        for axis in [Axis::Oc, Axis::Ic] {
            for (search, static_groups) in
                [(ScaleSearch::MinMax, false), (ScaleSearch::Mse, false), (ScaleSearch::Mse, true)]
            {
                let spec = QuantSpec { bits: 3, group: Some(8), axis, zero: Zero::Awq };
                let grid = Grid::new(rows, cols, &spec);
                let sweep = Sweep {
                    rows,
                    cols,
                    spec: &spec,
                    grid: &grid,
                    perm: &perm,
                    U: &inv.U,
                    blocksize: 16,
                    static_groups,
                    group_aware: false,
                    orig: &w,
                    search,
                    h_diag: &h_diag,
                };
                let start: Vec<f64> = (0..rows * cols).map(|i| f64::from(w[i - i % cols + perm[i % cols]])).collect();
                let params0 = match static_groups {
                    true => {
                        crate::rtn::fit_groups(&w, cols, &grid, &spec, &crate::rtn::Fitter::new(search, Some(&h_diag)))
                    }
                    false => vec![GroupParams::default(); grid.len()],
                };
                let run = |portable: bool| {
                    let (mut W, mut params, mut codes, mut update) =
                        (start.clone(), params0.clone(), vec![0u8; rows * cols], vec![0.0; cols]);
                    let loss = match portable {
                        true => sweep.run_portable(&mut W, &mut params, &mut codes, &mut update),
                        false => sweep.run(&mut W, &mut params, &mut codes, &mut update),
                    };
                    let params: Vec<(u32, u32)> =
                        params.iter().map(|p| (p.scale.to_bits(), p.zero.to_bits())).collect();
                    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    (loss.to_bits(), codes, params, bits(&update), bits(&W))
                };
                assert!(run(false) == run(true), "{axis:?} {search:?} static {static_groups}");
            }
        }
    }
}
