//! Error-optimal group params: instead of spanning a group's min and max, choose the
//! `(scale, zero)` that minimise the weighted rounding error `sum_i h_i (w_i - w'_i)^2`, where
//! `h_i` is the Hessian diagonal of the weight's input channel (per-OC groups run along one
//! row's inputs, each with its own `h_i`; per-IC groups hold one input channel, so equal
//! weights and plain MSE).
//!
//! Two steps, both on the grid the packed file stores (f16 scales; whole zero points, or f16
//! minima for [`Zero::Float`]):
//! 1. a grid of clipping ratios `p` (GPTQ's `mse` search): the group's range shrunk to
//!    `[p min, p max]` and fitted by [`QuantSpec::fit`], so every [`Zero`] style keeps its own
//!    formula; min-max (`p = 1`) is the first candidate, so the search is never worse;
//! 2. alternating refinement (as llama.cpp's weighted block search): with the codes fixed,
//!    the weighted least-squares scale (and, for asymmetric styles, offset) of `w ~ s (q - z)`,
//!    rounded onto the stored grid; kept only while the error falls.

use serde::{Deserialize, Serialize};

use crate::quantizer::{f16_nearest, quantize, round_half_even, GroupParams, QuantSpec, Zero, F16_MIN_POSITIVE};

/// How a group's params are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleSearch {
    /// Span the group's min and max ([`QuantSpec::fit`]).
    #[default]
    MinMax,
    /// Minimise the weighted squared rounding error (clipping grid + refinement).
    Mse,
}

impl ScaleSearch {
    /// Whether this is the min-max fit (serialized settings leave it out).
    pub fn is_minmax(&self) -> bool {
        *self == ScaleSearch::MinMax
    }
}

/// Clipping ratios tried: `p = 1 - 0.5 k / STEPS`, `k = 0..=STEPS`.
pub const STEPS: usize = 40;
/// Refinement rounds after the grid.
const ROUNDS: usize = 4;

/// `sum_i h_i (w_i - w'_i)^2` of `values` on the grid of `p` (`h_i = 1` without weights).
/// The code is [`quantize`]'s rule, inlined (for a whole zero `q` is already the code's value), and
/// the f64 sum runs in [`LANES`] interleaved partial sums (value `i` into lane `i % LANES`,
/// lanes added in order at the end), so the loop vectorizes instead of waiting on one adder.
///
/// Compiled a second time for AVX-512 / AVX2 and picked at run time: the same operations in
/// the same order (Rust never fuses a multiply and an add), so every path gives the same bits
/// as [`weighted_error_portable`], the reference.
pub fn weighted_error(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { weighted_error_avx512(values, weights, p, maxq) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { weighted_error_avx2(values, weights, p, maxq) };
        }
    }
    weighted_error_portable(values, weights, p, maxq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_error_avx512(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    error_body(values, weights, p, maxq)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn weighted_error_avx2(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    error_body(values, weights, p, maxq)
}

/// [`weighted_error`] for the baseline CPU (SSE2): the reference the wider paths equal.
pub fn weighted_error_portable(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    error_body(values, weights, p, maxq)
}

#[inline(always)]
fn error_body(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    if p.zero == round_half_even(p.zero) {
        error_sum::<true>(values, weights, p, maxq)
    } else {
        error_sum::<false>(values, weights, p, maxq)
    }
}

/// [`error_body`] for a whole zero (`WHOLE`) or a float minimum's fractional one, so the
/// rounding rule of [`quantize`] is chosen once per group rather than per value.
#[inline(always)]
fn error_sum<const WHOLE: bool>(values: &[f32], weights: Option<&[f32]>, p: GroupParams, maxq: u8) -> f64 {
    let (s, z, top) = (p.scale, p.zero, f32::from(maxq));
    let sq = |w: f32| {
        let q = if WHOLE { round_half_even(w / s) + z } else { round_half_even(w / s + z) }.clamp(0.0, top);
        let d = f64::from(w) - f64::from(s * (q - z));
        d * d
    };
    let mut lanes = [0f64; LANES];
    match weights {
        None => {
            let mut chunks = values.chunks_exact(LANES);
            for c in &mut chunks {
                for (l, &w) in lanes.iter_mut().zip(c) {
                    *l += sq(w);
                }
            }
            for (l, &w) in lanes.iter_mut().zip(chunks.remainder()) {
                *l += sq(w);
            }
        }
        Some(h) => {
            let h = &h[..values.len()];
            let (mut wc, mut hc) = (values.chunks_exact(LANES), h.chunks_exact(LANES));
            for (c, hh) in (&mut wc).zip(&mut hc) {
                for ((l, &w), &h) in lanes.iter_mut().zip(c).zip(hh) {
                    *l += f64::from(h) * sq(w);
                }
            }
            for ((l, &w), &h) in lanes.iter_mut().zip(wc.remainder()).zip(hc.remainder()) {
                *l += f64::from(h) * sq(w);
            }
        }
    }
    lanes.iter().sum()
}

/// Partial sums of [`weighted_error`].
pub const LANES: usize = 8;

/// The clipping ratio of candidate `k` of the grid.
pub fn ratio(k: usize) -> f32 {
    1.0 - 0.5 * k as f32 / STEPS as f32
}

/// Params of `values` (with optional per-value `weights`, non-negative) chosen by `search`.
///
/// Compiled a second time for AVX-512 / AVX2 and picked at run time, like [`weighted_error`]:
/// the same operations in the same order, so the same params on every path.
pub fn fit(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>, search: ScaleSearch) -> GroupParams {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { fit_avx512(spec, values, weights, search) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { fit_avx2(spec, values, weights, search) };
        }
    }
    fit_portable(spec, values, weights, search)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fit_avx512(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>, search: ScaleSearch) -> GroupParams {
    fit_body(spec, values, weights, search)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fit_avx2(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>, search: ScaleSearch) -> GroupParams {
    fit_body(spec, values, weights, search)
}

/// [`fit`] for the baseline CPU (SSE2): the reference the wider paths equal.
pub fn fit_portable(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>, search: ScaleSearch) -> GroupParams {
    fit_body(spec, values, weights, search)
}

#[inline(always)]
fn fit_body(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>, search: ScaleSearch) -> GroupParams {
    let minmax = spec.fit(values.iter().copied());
    if search == ScaleSearch::MinMax || values.is_empty() {
        return minmax;
    }
    let maxq = spec.maxq();
    let (best, err) = grid_search(spec, values, weights);
    refine(spec, values, weights, best, err, maxq)
}

/// Step 1: the best of the clipping grid (min-max first; ties keep the earlier candidate).
#[inline(always)]
pub fn grid_search(spec: &QuantSpec, values: &[f32], weights: Option<&[f32]>) -> (GroupParams, f64) {
    let maxq = spec.maxq();
    let (min, max) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let mut best = spec.fit(values.iter().copied());
    let mut best_err = weighted_error(values, weights, best, maxq);
    for k in 1..=STEPS {
        let p = ratio(k);
        let cand = spec.fit([p * min, p * max]);
        let err = weighted_error(values, weights, cand, maxq);
        if err < best_err {
            (best, best_err) = (cand, err);
        }
    }
    (best, best_err)
}

/// Step 2: with the codes of `p` fixed, the weighted least-squares grid, rounded onto the
/// stored one (f16 scale rounded up and whole zero in `0..=maxq`, or f16 scale and minimum
/// rounded to nearest); kept while it lowers the error.
#[inline(always)]
fn refine(
    spec: &QuantSpec,
    values: &[f32],
    weights: Option<&[f32]>,
    mut p: GroupParams,
    mut err: f64,
    maxq: u8,
) -> GroupParams {
    let h = |i: usize| weights.map_or(1.0, |h| f64::from(h[i]));
    for _ in 0..ROUNDS {
        let q: Vec<f64> = values.iter().map(|&w| f64::from(quantize(w, p, maxq))).collect();
        let cand = if spec.zero == Zero::Sym {
            // Zero fixed at the centre: s = sum h (q - z) w / sum h (q - z)^2.
            let z = f64::from(p.zero);
            let (num, den) = values.iter().enumerate().fold((0.0, 0.0), |(n, d), (i, &w)| {
                (n + h(i) * (q[i] - z) * f64::from(w), d + h(i) * (q[i] - z) * (q[i] - z))
            });
            if den <= 0.0 || num <= 0.0 {
                break;
            }
            GroupParams { scale: crate::quantizer::f16_scale((num / den) as f32), zero: p.zero }
        } else {
            // w ~ a q + b: a = cov_h(q, w) / var_h(q), b = mean_h(w) - a mean_h(q); z = -b / a.
            let (mut sh, mut sq, mut sw) = (0.0, 0.0, 0.0);
            for (i, &w) in values.iter().enumerate() {
                sh += h(i);
                sq += h(i) * q[i];
                sw += h(i) * f64::from(w);
            }
            if sh <= 0.0 {
                break;
            }
            let (mq, mw) = (sq / sh, sw / sh);
            let (mut cov, mut var) = (0.0, 0.0);
            for (i, &w) in values.iter().enumerate() {
                cov += h(i) * (q[i] - mq) * (f64::from(w) - mw);
                var += h(i) * (q[i] - mq) * (q[i] - mq);
            }
            if var <= 0.0 || cov <= 0.0 {
                break;
            }
            let a = cov / var;
            if spec.zero == Zero::Float {
                // Any f16 offset: w ~ d q + m, both rounded to nearest.
                let scale = f16_nearest((a as f32).max(F16_MIN_POSITIVE));
                GroupParams::from_min(scale, f16_nearest((mw - f64::from(scale) * mq) as f32))
            } else {
                let scale = crate::quantizer::f16_scale(a as f32);
                let b = mw - f64::from(scale) * mq;
                let zero = round_half_even((-b / f64::from(scale)) as f32).clamp(0.0, f32::from(maxq));
                GroupParams { scale, zero }
            }
        };
        let e = weighted_error(values, weights, cand, maxq);
        if e >= err || e.is_nan() {
            break;
        }
        (p, err) = (cand, e);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantizer::Axis;

    #[test]
    fn every_path_of_the_error_gives_the_reference_bits() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for n in [1usize, 7, 8, 31, 32, 33, 128, 257] {
            let v: Vec<f32> = (0..n).map(|_| next() * 0.2).collect();
            let h: Vec<f32> = (0..n).map(|_| next().abs() * 10.0).collect();
            for bits in [2u8, 3, 4, 8] {
                let s = QuantSpec { bits, group: Some(n), axis: Axis::Oc, zero: Zero::Awq };
                let p = s.fit(v.iter().copied());
                for w in [None, Some(h.as_slice())] {
                    let want = weighted_error_portable(&v, w, p, s.maxq());
                    assert_eq!(weighted_error(&v, w, p, s.maxq()).to_bits(), want.to_bits(), "n {n} bits {bits}");
                }
            }
        }
    }

    #[test]
    fn every_path_of_the_search_gives_the_reference_params() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for n in [1usize, 7, 32, 33, 128, 200] {
            let v: Vec<f32> = (0..n).map(|_| next() * next() * 0.3).collect();
            let h: Vec<f32> = (0..n).map(|_| next().abs() * 10.0).collect();
            for bits in [2u8, 3, 4, 8] {
                for zero in [Zero::Awq, Zero::Sym, Zero::Float] {
                    let s = QuantSpec { bits, group: Some(n), axis: Axis::Oc, zero };
                    for w in [None, Some(h.as_slice())] {
                        let want = fit_portable(&s, &v, w, ScaleSearch::Mse);
                        let got = fit(&s, &v, w, ScaleSearch::Mse);
                        assert_eq!(
                            (got.scale.to_bits(), got.zero.to_bits()),
                            (want.scale.to_bits(), want.zero.to_bits()),
                            "n {n} bits {bits} {zero:?}"
                        );
                    }
                }
            }
        }
    }

    fn spec(bits: u8, zero: Zero) -> QuantSpec {
        QuantSpec { bits, group: Some(128), axis: Axis::Oc, zero }
    }

    #[test]
    fn a_bell_shaped_group_is_clipped_and_gains() {
        // A bell-shaped group (sum of uniforms): min-max spends grid points on sparse tails.
        let v: Vec<f32> = (0..128u32)
            .map(|i| {
                (0..4u32)
                    .map(|k| ((i * 2654435761u32).wrapping_add(k * 40503) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
                    .sum::<f32>()
                    * 0.05
            })
            .collect();
        let s = spec(3, Zero::Awq);
        let mm = weighted_error(&v, None, s.fit(v.iter().copied()), s.maxq());
        let se = weighted_error(&v, None, fit(&s, &v, None, ScaleSearch::Mse), s.maxq());
        assert!(se < 0.99 * mm, "searched {se} vs min-max {mm}");
    }
}
