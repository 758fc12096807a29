//! The shared quantizer: validation, the three zero-point variants, the error bound, and
//! the stored layout of a QuantizedMatrix.

mod common;

use adadim_quantize::{dequantize, f16_scale, quantize, rtn, Axis, Error, GroupParams, QuantizedMatrix, Zero};
use common::{spec, weights};

#[test]
fn validate_rejects_unsupported_bits_and_zero_group() {
    for bits in [0, 1, 5, 6, 7, 9, 16] {
        let s = spec(bits, Some(32), Axis::Oc, Zero::Awq);
        assert_eq!(s.validate(), Err(Error::Bits { bits }));
        assert_eq!(rtn(&[0.5; 4], 2, 2, &s), Err(Error::Bits { bits }));
    }
    for bits in [2, 3, 4, 8] {
        assert_eq!(spec(bits, Some(32), Axis::Ic, Zero::Gptq).validate(), Ok(()));
    }
    assert_eq!(spec(4, Some(0), Axis::Oc, Zero::Awq).validate(), Err(Error::ZeroGroup));
    for group in [None, Some(1), Some(7), Some(32), Some(64), Some(128), Some(256), Some(10_000)] {
        assert_eq!(spec(4, group, Axis::Oc, Zero::Sym).validate(), Ok(()));
    }
}

#[test]
fn non_finite_weight_is_named_by_row_and_col() {
    let s = spec(4, Some(4), Axis::Oc, Zero::Awq);
    let mut w = weights(3, 8, 1.0, 1);
    w[2 * 8 + 5] = f32::NAN;
    assert!(matches!(rtn(&w, 3, 8, &s), Err(Error::NonFiniteWeight { row: 2, col: 5, .. })));
    w[2 * 8 + 5] = 0.0;
    w[1] = f32::NEG_INFINITY;
    assert!(matches!(rtn(&w, 3, 8, &s), Err(Error::NonFiniteWeight { row: 0, col: 1, .. })));
    assert!(matches!(rtn(&w, 3, 7, &s), Err(Error::Shape { expected: 21, got: 24, .. })));
    assert_eq!(rtn(&[], 0, 8, &s), Err(Error::Empty { rows: 0, cols: 8 }));
}

#[test]
fn fit_matches_the_reference_formulas() {
    let fit = |zero, bits, v: &[f32]| spec(bits, None, Axis::Oc, zero).fit(v.iter().copied());
    // Every scale is rounded to f16 first (what packed checkpoints store).
    // GPTQ-style widens [0.5, 2] to [0, 2]: scale 2/3, zero 0.
    assert_eq!(fit(Zero::Gptq, 2, &[0.5, 1.0, 2.0]), GroupParams { scale: f16_scale(2.0 / 3.0), zero: 0.0 });
    // ... and an all-zero group to [-1, 1]: scale 2/15 rounded up to f16, 1093 * 2^-13,
    // zero round(1 / scale) = round(7.495) = 7.
    assert_eq!(fit(Zero::Gptq, 4, &[0.0, 0.0]), GroupParams { scale: 1093.0 / 8192.0, zero: 7.0 });
    // AWQ-style keeps [0.2, 0.8] and clamps the zero at 0.
    let p = fit(Zero::Awq, 2, &[0.2, 0.8]);
    assert!(p.scale == f16_scale(0.2) && (p.scale - 0.2).abs() < 1e-4 && p.zero == 0.0, "{p:?}");
    // ... with a range floor of 1e-5 for a constant group; 1e-5 / 255 is below f16's
    // smallest subnormal step, so it becomes 2^-24 (never 0).
    assert_eq!(fit(Zero::Awq, 8, &[-0.3, -0.3]).scale, 2f32.powi(-24));
    // Symmetric: scale 2 max|w| / maxq, zero (maxq + 1) / 2, also for an all-positive group.
    assert_eq!(fit(Zero::Sym, 4, &[-1.0, 0.5]), GroupParams { scale: f16_scale(2.0 / 15.0), zero: 8.0 });
    assert_eq!(fit(Zero::Sym, 4, &[0.25, 1.0]), GroupParams { scale: f16_scale(2.0 / 15.0), zero: 8.0 });
}

#[test]
fn groups_near_zero_never_give_nan() {
    // Subnormal weights would make a 0 scale and a 0/0 zero point; they quantize to ~0.
    let w = [1e-44, -3e-45, 0.0, 2e-45, 0.0, 0.0];
    for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
        let q = rtn(&w, 2, 3, &spec(4, None, Axis::Oc, zero)).unwrap();
        assert!(q.scales().iter().all(|s| s.is_normal()), "{zero:?}: {:?}", q.scales());
        assert!(q.dequantize().iter().all(|v| v.abs() < 1e-5), "{zero:?}");
    }
}

#[test]
fn quantize_rounds_half_to_even_and_clamps() {
    let p = GroupParams { scale: 0.5, zero: 0.0 };
    assert_eq!(quantize(1.25, p, 15), 2, "2.5 rounds to even, as torch.round does");
    assert_eq!(quantize(1.75, p, 15), 4, "3.5 rounds to even");
    assert_eq!(quantize(-3.0, p, 15), 0);
    assert_eq!(quantize(100.0, p, 15), 15);
    let p = GroupParams { scale: 0.1, zero: 3.0 };
    for q in 0..=7 {
        assert_eq!(quantize(dequantize(q, p), p, 7), q, "every grid point is a fixed point");
    }
}

#[test]
fn error_is_at_most_half_a_step_inside_the_range() {
    let (rows, cols) = (40, 72); // 72 = 4 x 16 + 8: ragged per-OC groups too
    let w = weights(rows, cols, 0.05, 7);
    for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
        for bits in [2, 3, 4, 8] {
            for axis in [Axis::Oc, Axis::Ic] {
                for group in [Some(16), Some(32), None] {
                    let s = spec(bits, group, axis, zero);
                    let q = rtn(&w, rows, cols, &s).unwrap();
                    let w_hat = q.dequantize();
                    let maxq = f32::from(s.maxq());
                    for (i, (&x, &y)) in w.iter().zip(&w_hat).enumerate() {
                        let p = q.params(i / cols, i % cols);
                        // The grid spans [lo, hi]; round-to-nearest reaches half a step past it.
                        let (lo, hi) = (-p.zero * p.scale, (maxq - p.zero) * p.scale);
                        let reach = p.scale * (0.5 + 1e-4) + f32::EPSILON * x.abs();
                        let inside = lo - reach <= x && x <= hi + reach;
                        // GPTQ-style and symmetric ranges always cover the group; AWQ-style
                        // clips groups that do not straddle 0 (its zero is clamped).
                        assert!(inside || zero == Zero::Awq, "{s:?} at {i}: {x} outside [{lo}, {hi}]");
                        if inside {
                            assert!((x - y).abs() <= reach, "{s:?} at {i}: |{x} - {y}| > {reach}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn param_layout_follows_the_axis() {
    let (rows, cols) = (10, 12);
    let w = weights(rows, cols, 1.0, 3);
    let oc = rtn(&w, rows, cols, &spec(4, Some(5), Axis::Oc, Zero::Awq)).unwrap();
    assert_eq!(oc.param_shape(), (10, 3));
    assert_eq!(oc.param_index(4, 11), 4 * 3 + 2);
    let ic = rtn(&w, rows, cols, &spec(4, Some(4), Axis::Ic, Zero::Awq)).unwrap();
    assert_eq!(ic.param_shape(), (3, 12));
    assert_eq!(ic.param_index(9, 5), 2 * 12 + 5);
    assert_eq!(ic.scales().len(), 36);
    assert!(ic.g_idx().is_none());
}

#[test]
fn from_parts_round_trips_and_rejects_inconsistent_parts() {
    let (rows, cols) = (6, 8);
    let s = spec(3, Some(4), Axis::Oc, Zero::Gptq);
    let q = rtn(&weights(rows, cols, 1.0, 5), rows, cols, &s).unwrap();
    let parts = |codes: Vec<u8>, g_idx| {
        QuantizedMatrix::from_parts(rows, cols, s, codes, q.scales().to_vec(), q.zeros().to_vec(), g_idx)
    };
    assert_eq!(parts(q.codes().to_vec(), None).as_ref(), Ok(&q));
    let mut bad = q.codes().to_vec();
    bad[9] = 8;
    assert_eq!(parts(bad, None), Err(Error::Code { row: 1, col: 1, code: 8, maxq: 7 }));
    assert!(matches!(parts(vec![0; 47], None), Err(Error::Shape { expected: 48, .. })));
    assert!(matches!(parts(q.codes().to_vec(), Some(vec![2; 8])), Err(Error::Invalid(_))));
    assert!(matches!(parts(q.codes().to_vec(), Some(vec![1; 7])), Err(Error::Shape { .. })));
    let g_idx = Some(vec![1, 0, 1, 0, 1, 0, 1, 0]);
    assert_eq!(parts(q.codes().to_vec(), g_idx.clone()).unwrap().g_idx(), g_idx.as_deref());
    let ic = spec(3, Some(4), Axis::Ic, Zero::Gptq);
    let (sc, ze) = (vec![1.0; 16], vec![0.0; 16]);
    let with_g_idx = QuantizedMatrix::from_parts(rows, cols, ic, vec![0; 48], sc, ze, Some(vec![0; 8]));
    assert!(matches!(with_g_idx, Err(Error::Invalid(_))));
}

#[test]
fn scales_round_up_to_the_next_f16() {
    use half::f16;
    let mut x = 0x1234_5678u32;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Positive finite f32s from 2^-30 to 2^16, across f16's subnormal and normal ranges.
        let s = f32::from_bits(0x3080_0000 + x % (0x4780_0000 - 0x3080_0000));
        let h = f16_scale(s);
        assert_eq!(f16::from_f32(h).to_f32(), h, "{s:e} -> {h:e} is not an f16");
        if s > 65504.0 {
            assert_eq!(h, 65504.0);
        } else if s <= 2f32.powi(-24) {
            assert_eq!(h, 2f32.powi(-24));
        } else {
            let below = f16::from_bits(f16::from_f32(h).to_bits() - 1).to_f32();
            assert!(below < s && s <= h, "{s:e}: {below:e} < s <= {h:e} fails");
        }
    }
}

/// llama.cpp's Q4_1 (blocks of 32 along rows, f16 scale `d = (max - min) / 15` and f16
/// minimum, codes `round((w - m) / d)`), written here from its definition.
fn q4_1(w: &[f32]) -> Vec<f32> {
    let f16 = |x: f32| half::f16::from_f32(x).to_f32();
    w.chunks(32)
        .flat_map(|b| {
            let (min, max) = b.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, c), &x| (a.min(x), c.max(x)));
            let (d, m) = (f16((max - min) / 15.0), f16(min));
            b.iter().map(move |&x| d * ((x - m) / d).round().clamp(0.0, 15.0) + m).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn float_minima_per_32_hold_a_q4_1_grid_exactly() {
    // Weights already on a Q4_1 grid (the SmolLM2 GGUF's): per-OC w4g32 with float minima finds
    // that grid again (to an f32 rounding), with min-max and with the weighted search; whole
    // zero points cannot.
    let (rows, cols) = (24, 96);
    let w = q4_1(&weights(rows, cols, 0.05, 3));
    let worst = |zero, search| {
        let fitter = adadim_quantize::Fitter { search, h_diag: None };
        let q = adadim_quantize::rtn_fitted(&w, rows, cols, &spec(4, Some(32), Axis::Oc, zero), &fitter).unwrap();
        w.iter().zip(q.dequantize()).map(|(a, b)| (a - b).abs() / a.abs().max(1e-3)).fold(0f32, f32::max)
    };
    for search in [adadim_quantize::ScaleSearch::MinMax, adadim_quantize::ScaleSearch::Mse] {
        let e = worst(Zero::Float, search);
        assert!(e < 1e-5, "{search:?}: relative error {e}");
    }
    assert!(worst(Zero::Awq, adadim_quantize::ScaleSearch::MinMax) > 1e-2);
}

#[test]
fn a_fractional_zero_rounds_after_the_offset() {
    // w = d q + m: the code is round((w - m) / d), so the fraction of -m / d is not lost.
    let m = half::f16::from_f32(0.2).to_f32();
    let p = GroupParams::from_min(0.5, m);
    assert_eq!(p.min(), m);
    for q in 0..=15u8 {
        let w = 0.5 * f32::from(q) + p.min();
        assert_eq!(quantize(w, p, 15), q);
        assert!((dequantize(q, p) - w).abs() < 1e-6);
    }
}
