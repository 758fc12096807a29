//! GPTQ (Frantar et al. 2022; IST-DASLab `gptq.py`, `fasterquant`) along either axis.
//!
//! Steps, as in `gptq.py`: zero the dead inputs; fit static groups; reorder by
//! `diag(H)` (act-order); damp and invert H (`hinv`); sweep the columns, spreading each
//! column's rounding error over the ones not yet quantized (`sweep`).
//!
//! `H` arrives in f32 (as `gptq.py` accumulates it); the inverse and the sweep run in f64,
//! so that a badly conditioned H costs accuracy in the damping only, not in round-off.

mod hinv;
mod sweep;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::grid::Grid;
use crate::hessian::Hessian;
use crate::matrix::{check_weights, QuantizedMatrix};
use crate::quantizer::{Axis, GroupParams, QuantSpec};
use crate::rtn::{fit_groups, Fitter};
use crate::search::ScaleSearch;

/// Settings of [`gptq`]; the defaults are `gptq.py`'s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptqOptions {
    /// Columns per lazy batch update (`blocksize`, 128). Changes speed, and the
    /// group fits of per-OC dynamic groups (see [`gptq`]).
    pub blocksize: usize,
    /// Damping added to `diag(H)`, as a fraction of its mean (`percdamp`, 0.01).
    pub percdamp: f64,
    /// Quantize input columns in order of decreasing `diag(H)` (`--act-order`, "desc_act").
    pub act_order: bool,
    /// Per-OC only: fit every group on the original `W` before reordering
    /// (`--static-groups`), so params stay in `c / g` order under act-order. Per-IC params
    /// are in column order whatever the processing order (paper §3.3), so Ic ignores it.
    pub static_groups: bool,
    /// Per-OC with act-order: reorder whole groups (most important first, by their largest
    /// `diag(H)`; columns by decreasing `diag(H)` inside each) and fit each group on the
    /// error-compensated weights when the sweep reaches it. Groups stay contiguous (no
    /// `g_idx`) and none is fitted on the original weights; `static_groups` is then ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_aware: bool,
    /// How many times a failed Cholesky is retried with 10x the damping (4: up to
    /// `100 x mean(diag(H))` from the default 0.01).
    pub damp_retries: u32,
    /// How each group's params are fitted (per-OC groups weighted by `diag(H)` of their
    /// input channels, on the error-compensated weights when fitted during the sweep).
    #[serde(default, skip_serializing_if = "ScaleSearch::is_minmax")]
    pub search: ScaleSearch,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self {
            blocksize: 128,
            percdamp: 0.01,
            act_order: false,
            static_groups: false,
            group_aware: false,
            damp_retries: 4,
            search: ScaleSearch::MinMax,
        }
    }
}

impl GptqOptions {
    /// Checks `blocksize >= 1` and `percdamp` is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        if self.blocksize == 0 {
            return Err(Error::Invalid("GPTQ blocksize must be at least 1"));
        }
        if !(self.percdamp.is_finite() && self.percdamp >= 0.0) {
            return Err(Error::Invalid("GPTQ percdamp must be finite and >= 0"));
        }
        Ok(())
    }
}

/// What [`gptq`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOutput {
    /// `W'` as codes and params, in the original column order: `dequantize()` is the final `W'`.
    pub quantized: QuantizedMatrix,
    /// GPTQ's own error estimate, `sum (w - q)^2 / Hinv[i, i]^2 / 2` (`gptq.py`'s `Losses`).
    pub loss: f64,
    /// The damping that let `H` factor, as a fraction of `mean(diag(H))`; larger than the
    /// requested `percdamp` when the Cholesky had to be retried.
    pub percdamp: f64,
    /// Input channels with `H[i, i] == 0`, whose weights were set to 0.
    pub dead: Vec<usize>,
    /// Seconds spent damping, factoring and inverting `H` (the Cholesky steps).
    pub inverse_seconds: f64,
    /// Seconds spent in the column sweep.
    pub sweep_seconds: f64,
    /// Per input column (original order), the mean over rows of `|w - w_orig|` at the moment
    /// the column was quantized: how far GPTQ's error compensation moved it (paper Fig. 7),
    /// without the column's own final rounding.
    pub update: Vec<f64>,
}

/// Quantizes the row-major `[rows, cols]` matrix `w` with GPTQ, given the Hessian `h` of
/// its inputs (`h.dim() == cols`), on the grid of `spec`.
///
/// * per-OC: groups of `g` input columns. Dynamic groups are fitted when one starts in
///   processing order, on `W` as `gptq.py` holds it then: with the updates of earlier
///   blocks, not yet those of earlier columns in the same block (a quirk of `gptq.py`,
///   kept for parity). With act-order this makes groups non-contiguous, recorded in `g_idx`.
/// * per-IC: each input column's groups are fitted on the error-compensated column right
///   before it is quantized (paper §3.3, "reordering for free"); no `g_idx` is needed.
///
/// Whole-channel per-OC params (`group: None`) are fitted after the dead inputs are
/// zeroed; `gptq.py` fits them before, letting dead weights widen the range.
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &Hessian,
    spec: &QuantSpec,
    opts: &GptqOptions,
) -> Result<GptqOutput> {
    spec.validate()?;
    opts.validate()?;
    check_weights(w, rows, cols)?;
    h.check_dim(cols)?;
    // Dead inputs: no calibration signal reaches them, so their weights cannot matter;
    // zero them and put 1 on H's diagonal to keep it invertible.
    let dead = h.dead_inputs();
    let mut is_dead = vec![false; cols];
    dead.iter().for_each(|&i| is_dead[i] = true);
    let mut w0 = std::borrow::Cow::Borrowed(w);
    if !dead.is_empty() {
        let w0 = w0.to_mut();
        for &i in &dead {
            (0..rows).for_each(|r| w0[r * cols + i] = 0.0);
        }
    }
    let grid = Grid::new(rows, cols, spec);
    let h_diag = h.diag();
    let gc = grid.group_shape().1;
    let group_aware = opts.group_aware && opts.act_order && spec.axis == Axis::Oc && gc < cols;
    let static_groups = opts.static_groups && spec.axis == Axis::Oc && !group_aware;
    let mut params = match static_groups {
        true => fit_groups(&w0, cols, &grid, spec, &Fitter::new(opts.search, Some(&h_diag))),
        false => vec![GroupParams::default(); grid.len()],
    };
    // Act-order; the stable sort keeps tied columns in their original order.
    let hm = h.matrix();
    let mut perm: Vec<usize> = (0..cols).collect();
    let diag = |c: usize| hm[c * cols + c];
    if group_aware {
        perm = group_aware_order(cols, gc, diag);
    } else if opts.act_order {
        perm.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
    }
    // H in processing order, read from the f32 matrix as needed (never copied whole).
    let h_perm = |i: usize, j: usize| {
        let (a, b) = (perm[i], perm[j]);
        if a == b && is_dead[a] {
            1.0
        } else {
            f64::from(hm[a * cols + b])
        }
    };
    let mut W: Vec<f64> = (0..rows * cols).map(|i| f64::from(w0[i - i % cols + perm[i % cols]])).collect();
    let t = std::time::Instant::now();
    let inv = hinv::damped_inverse(&h_perm, cols, opts.percdamp, opts.damp_retries)?;
    let inverse_seconds = t.elapsed().as_secs_f64();

    let mut codes = vec![0u8; rows * cols];
    let sweep = sweep::Sweep {
        rows,
        cols,
        spec,
        grid: &grid,
        perm: &perm,
        U: &inv.U,
        blocksize: opts.blocksize,
        static_groups,
        group_aware,
        orig: &w0,
        search: opts.search,
        h_diag: &h_diag,
    };
    let t = std::time::Instant::now();
    let mut update = vec![0.0; cols];
    let loss = sweep.run(&mut W, &mut params, &mut codes, &mut update);
    update.iter_mut().for_each(|u| *u /= rows as f64);
    let sweep_seconds = t.elapsed().as_secs_f64();
    let g_idx = dynamic_g_idx(&perm, &grid, spec, static_groups || group_aware);
    let quantized = QuantizedMatrix::from_params(rows, cols, *spec, codes, &params, g_idx);
    Ok(GptqOutput { quantized, loss, percdamp: inv.percdamp, dead, inverse_seconds, sweep_seconds, update })
}

/// Group-aware act-order: the groups of `g` columns by decreasing largest `diag`, each
/// group's columns by decreasing `diag`; stable, so ties keep their original order.
fn group_aware_order(cols: usize, g: usize, diag: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut groups: Vec<Vec<usize>> = (0..cols.div_ceil(g))
        .map(|k| {
            let mut cs: Vec<usize> = (k * g..((k + 1) * g).min(cols)).collect();
            cs.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
            cs
        })
        .collect();
    groups.sort_by(|a, b| diag(b[0]).total_cmp(&diag(a[0])));
    groups.concat()
}

/// GPTQ's `g_idx` for per-OC dynamic groups: column `c`, processed at position `j`, is in
/// group `j / g`. `None` when that is just `c / g` (no act-order, or one group per row).
fn dynamic_g_idx(perm: &[usize], grid: &Grid, spec: &QuantSpec, static_groups: bool) -> Option<Vec<u32>> {
    if spec.axis != Axis::Oc || static_groups {
        return None;
    }
    let gc = grid.group_shape().1;
    let mut g_idx = vec![0u32; perm.len()];
    for (j, &c) in perm.iter().enumerate() {
        // j / gc < cols, which a u32 holds for any matrix a Hessian fits in memory for.
        g_idx[c] = (j / gc) as u32;
    }
    let trivial = g_idx.iter().enumerate().all(|(c, &k)| k as usize == c / gc);
    (!trivial).then_some(g_idx)
}
