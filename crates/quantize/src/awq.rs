//! AWQ (Lin et al. 2023): scale input channel `i` of a linear by `s_i = rms(x_i)^alpha` before
//! quantizing, `W X = (W S)(S^-1 X)`, so that the channels whose activations are large get
//! finer steps relative to their weights; `S^-1` is folded into whatever produces `X` (an
//! RMSNorm weight, or the rows of the linear before), which leaves the float model unchanged.
//!
//! `alpha` is searched on a grid, each candidate judged by the output error
//! `mean((Q(W S) S^-1 X - W X)^2)` of the linears that share the input, computed from their
//! Hessian (no activations kept). The RMS comes from `diag(H)` (AWQ uses `mean|x|`; the
//! driver keeps `H`, not `X`). Only per-OC groups respond: a per-IC group holds one input
//! channel, whose scale `s_i` it absorbs whole, so the search quantizes per-OC.

use crate::ada::output_error_from_hessian;
use crate::error::{Error, Result};
use crate::hessian::Hessian;
use crate::quantizer::{Axis, QuantSpec};
use crate::rtn::rtn;

/// Grid points of `alpha`: `k / ALPHAS`, `k = 0 .. ALPHAS` (AutoAWQ's `n_grid`); `alpha = 0`
/// is no scaling, so the search never does worse than plain RTN on its own measure.
pub const ALPHAS: usize = 20;

/// What [`search`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct AwqScales {
    /// The exponent kept.
    pub alpha: f32,
    /// `s` per input column of the linears searched.
    pub scales: Vec<f32>,
    /// `s` per producer channel (equal to `scales` without a tie map).
    pub source_scales: Vec<f32>,
    /// Summed squared output error (rows x mean) of per-OC RTN at `alpha`.
    pub error: f64,
    /// The same at `alpha = 0` (no scaling).
    pub error_unscaled: f64,
}

/// The scales for `alpha` from per-channel RMS values: `max(rms, 1e-4)^alpha`, normalised by
/// `sqrt(max s * min s)` (AutoAWQ's), and rounded to powers of two when `pow2` (a fold into
/// already-quantized rows is then exact: f16 scales divided by a power of two stay exact).
pub fn channel_scales(rms: &[f32], alpha: f32, pow2: bool) -> Vec<f32> {
    let mut s: Vec<f32> = rms.iter().map(|&r| r.max(1e-4).powf(alpha)).collect();
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (lo * hi).sqrt();
    if norm.is_finite() && norm > 0.0 {
        s.iter_mut().for_each(|v| *v /= norm);
    }
    if pow2 {
        s.iter_mut().for_each(|v| *v = v.log2().round().clamp(-16.0, 16.0).exp2());
    }
    s
}

/// `W diag(s)`: column `c` of the row-major `[rows, cols]` `w` times `s[c]`.
pub fn scale_columns(w: &[f32], cols: usize, s: &[f32]) -> Vec<f32> {
    w.chunks(cols).flat_map(|row| row.iter().zip(s).map(|(&w, &s)| w * s)).collect()
}

/// Searches `alpha` for the linears `(w, rows)` that share one input (`cols` columns, Hessian
/// `h`). `tie[c]` (optional) names the producer channel of column `c` when several columns come
/// from one channel (grouped-query attention: one value head feeds several heads of o_proj);
/// their scale is then one, from the RMS over the tied columns.
pub fn search(
    linears: &[(&[f32], usize)],
    cols: usize,
    h: &Hessian,
    spec: &QuantSpec,
    tie: Option<&[usize]>,
    pow2: bool,
) -> Result<AwqScales> {
    h.check_dim(cols)?;
    if h.tokens() == 0 {
        return Err(Error::Invalid("AWQ needs calibration tokens"));
    }
    let m = h.matrix();
    let sources = tie.map_or(cols, |t| t.iter().max().map_or(0, |&m| m + 1));
    if let Some(t) = tie {
        if t.len() != cols {
            return Err(Error::Shape { what: "AWQ tie map [cols]", expected: cols, got: t.len() });
        }
    }
    let source = |c: usize| tie.map_or(c, |t| t[c]);
    // Mean square per producer channel: diag(H) / 2 averaged over its columns.
    let (mut ms, mut n) = (vec![0f64; sources], vec![0usize; sources]);
    for c in 0..cols {
        ms[source(c)] += f64::from(m[c * cols + c].max(0.0)) / 2.0;
        n[source(c)] += 1;
    }
    let rms: Vec<f32> = ms.iter().zip(&n).map(|(&s, &k)| (s / k.max(1) as f64).sqrt() as f32).collect();
    let spec = spec.with_axis(Axis::Oc);
    let error_of = |source_scales: &[f32]| -> Result<f64> {
        let s: Vec<f32> = (0..cols).map(|c| source_scales[source(c)]).collect();
        let mut total = 0.0;
        for &(w, rows) in linears {
            let q = rtn(&scale_columns(w, cols, &s), rows, cols, &spec)?.dequantize();
            let back: Vec<f32> = q.chunks(cols).flat_map(|r| r.iter().zip(&s).map(|(&q, &s)| q / s)).collect();
            total += rows as f64 * output_error_from_hessian(w, &back, rows, cols, h)?;
        }
        Ok(total)
    };
    let ones = vec![1f32; sources];
    let error_unscaled = error_of(&ones)?;
    let (mut alpha, mut best, mut error) = (0f32, ones, error_unscaled);
    for k in 1..ALPHAS {
        let a = k as f32 / ALPHAS as f32;
        let s = channel_scales(&rms, a, pow2);
        let e = error_of(&s)?;
        if e < error {
            (alpha, best, error) = (a, s, e);
        }
    }
    let scales = (0..cols).map(|c| best[source(c)]).collect();
    Ok(AwqScales { alpha, scales, source_scales: best, error, error_unscaled })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_normalised_and_powers_of_two_on_request() {
        let rms = [0.5, 2.0, 8.0, 0.0];
        let s = channel_scales(&rms, 0.5, false);
        let (lo, hi) = s.iter().fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert!((lo * hi - 1.0).abs() < 1e-5, "{s:?}");
        assert!(s[2] > s[1] && s[1] > s[0] && s[0] > s[3]);
        for v in channel_scales(&rms, 0.5, true) {
            assert_eq!(v, v.log2().round().exp2(), "{v}");
        }
        assert!(channel_scales(&rms, 0.0, false).iter().all(|&v| v == 1.0));
    }
}
