//! The error search: never worse than min-max under its own weighted error, equal to a brute
//! force over the same clipping grid, and wired into RTN and GPTQ along both axes.

mod common;

use adadim_quantize::scale_search::{grid_search, ratio, weighted_error, STEPS};
use adadim_quantize::{
    dequantize, gptq, quantize, rtn, rtn_fitted, Axis, Fitter, GptqOptions, Hessian, QuantSpec, ScaleSearch, Zero,
};
use common::Rng;

const ZEROS: [Zero; 4] = [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float];

/// A group of `n` values: normal, sometimes with an outlier, sometimes all positive.
fn group(rng: &mut Rng, n: usize, kind: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.05).collect();
    match kind % 3 {
        0 => v[(rng.next_u64() as usize) % n] = 0.8,
        1 => v.iter_mut().for_each(|x| *x = x.abs() + 0.01),
        _ => {}
    }
    v
}

#[test]
fn the_search_is_never_worse_than_min_max() {
    let mut rng = Rng::new(7);
    for case in 0..600u64 {
        let n = [3usize, 17, 64, 128][(case % 4) as usize];
        let v = group(&mut rng, n, case / 4);
        let h: Vec<f32> = (0..n).map(|_| (rng.uniform() * rng.uniform() * 10.0) as f32).collect();
        for bits in [2u8, 3, 4, 8] {
            for zero in ZEROS {
                let spec = QuantSpec { bits, group: Some(n), axis: Axis::Oc, zero };
                for weights in [None, Some(&h[..])] {
                    let mm = weighted_error(&v, weights, spec.fit(v.iter().copied()), spec.maxq());
                    let p = adadim_quantize::scale_search::fit(&spec, &v, weights, ScaleSearch::Mse);
                    let se = weighted_error(&v, weights, p, spec.maxq());
                    assert!(se <= mm, "case {case} w{bits} {zero:?}: {se} > {mm}");
                    // On the stored grid: an f16 scale, a whole zero within the codes (or an
                    // f16 minimum that gives back exactly the zero held).
                    assert_eq!(half::f16::from_f32(p.scale).to_f32(), p.scale);
                    if zero == Zero::Float {
                        assert_eq!(half::f16::from_f32(p.min()).to_f32(), p.min());
                        assert_eq!(adadim_quantize::GroupParams::from_min(p.scale, p.min()), p);
                    } else {
                        assert!(p.zero.fract() == 0.0 && (0.0..=f32::from(spec.maxq())).contains(&p.zero));
                    }
                }
            }
        }
    }
}

/// Independent of `grid_search`'s loop: the error of each clipping ratio's fit computed in
/// f64 from the dequantization formula, the smallest kept (the earliest on ties).
fn brute_force(spec: &QuantSpec, v: &[f32]) -> (adadim_quantize::GroupParams, f64) {
    let (min, max) = v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let mut best: Option<(adadim_quantize::GroupParams, f64)> = None;
    for k in 0..=STEPS {
        let p = if k == 0 { spec.fit(v.iter().copied()) } else { spec.fit([ratio(k) * min, ratio(k) * max]) };
        let maxq = f64::from(spec.maxq());
        let err: f64 = v
            .iter()
            .map(|&w| {
                // A whole zero is added after rounding (GPTQ's order); a float minimum's
                // fractional zero before it, in f32 as the quantizer does.
                let q = if p.zero.fract() == 0.0 {
                    (f64::from(w) / f64::from(p.scale)).round_ties_even() + f64::from(p.zero)
                } else {
                    f64::from((w / p.scale + p.zero).round_ties_even())
                }
                .clamp(0.0, maxq);
                // The value on the grid in f32, as the packed file's consumer computes it.
                let d = f64::from(w) - f64::from(p.scale * (q as f32 - p.zero));
                d * d
            })
            .sum();
        if best.is_none_or(|(_, e)| err < e) {
            best = Some((p, err));
        }
    }
    best.unwrap()
}

#[test]
fn with_unit_weights_the_grid_equals_brute_force() {
    let mut rng = Rng::new(11);
    for case in 0..300u64 {
        let v = group(&mut rng, 1 + (case as usize % 12), case);
        for bits in [2u8, 3, 4] {
            for zero in ZEROS {
                let spec = QuantSpec { bits, group: None, axis: Axis::Oc, zero };
                let (p, e) = grid_search(&spec, &v, None);
                let (bp, be) = brute_force(&spec, &v);
                assert!((e - be).abs() <= 1e-12 * be.max(1e-30), "case {case}: {e} vs {be}");
                assert_eq!(p, bp, "case {case} w{bits} {zero:?}");
            }
        }
    }
}

/// Weighted error of a whole quantized matrix: `sum_{r,c} h_c (w - w')^2`.
fn matrix_error(w: &[f32], wq: &[f32], cols: usize, h: &[f32]) -> f64 {
    w.iter().zip(wq).enumerate().map(|(i, (&a, &b))| f64::from(h[i % cols]) * f64::from(a - b).powi(2)).sum()
}

#[test]
fn rtn_searches_along_both_axes() {
    let (rows, cols) = (48, 96);
    let w = common::weights(rows, cols, 0.05, 3);
    let x = common::inputs(256, cols, &[3, 40], 20.0, 4);
    let mut h = Hessian::new(cols);
    h.add_batch(&x).unwrap();
    let hd = h.diag();
    for axis in [Axis::Oc, Axis::Ic] {
        for bits in [2u8, 3, 4, 8] {
            let spec = QuantSpec { bits, group: Some(32), axis, zero: Zero::Awq };
            let mm = rtn(&w, rows, cols, &spec).unwrap();
            let se = rtn_fitted(&w, rows, cols, &spec, &Fitter::new(ScaleSearch::Mse, Some(&hd))).unwrap();
            let (em, es) =
                (matrix_error(&w, &mm.dequantize(), cols, &hd), matrix_error(&w, &se.dequantize(), cols, &hd));
            assert!(es <= em, "{axis:?} w{bits}: {es} > {em}");
            if bits <= 3 {
                assert!(es < 0.95 * em, "{axis:?} w{bits}: the search should gain at low bits ({es} vs {em})");
            }
            // Per-IC groups hold one input channel: equal weights, so the unweighted search.
            if axis == Axis::Ic {
                let un = rtn_fitted(&w, rows, cols, &spec, &Fitter::new(ScaleSearch::Mse, None)).unwrap();
                assert_eq!(un, se);
            }
            // Codes agree with the params: quantize / dequantize of the one quantizer.
            let (r, c) = (5, 7);
            let p = se.params(r / if axis == Axis::Ic { 32 } else { 1 }, c / if axis == Axis::Oc { 32 } else { 1 });
            assert_eq!(se.dequantize()[r * cols + c], dequantize(quantize(w[r * cols + c], p, spec.maxq()), p));
        }
    }
    // A Hessian diagonal of the wrong length is an error, not a panic.
    let spec = QuantSpec { bits: 3, group: Some(32), axis: Axis::Oc, zero: Zero::Awq };
    assert!(rtn_fitted(&w, rows, cols, &spec, &Fitter::new(ScaleSearch::Mse, Some(&hd[1..]))).is_err());
}

#[test]
fn gptq_uses_the_search_when_it_fits_groups() {
    let (rows, cols) = (32, 64);
    let w = common::weights(rows, cols, 0.05, 5);
    let x = common::inputs(256, cols, &[9], 20.0, 6);
    let mut h = Hessian::new(cols);
    h.add_batch(&x).unwrap();
    for axis in [Axis::Oc, Axis::Ic] {
        for (act_order, static_groups) in [(false, false), (true, false), (true, true)] {
            let spec = QuantSpec { bits: 3, group: Some(16), axis, zero: Zero::Awq };
            let opts = GptqOptions { act_order, static_groups, ..GptqOptions::default() };
            let mm = gptq(&w, rows, cols, &h, &spec, &opts).unwrap();
            let se = gptq(&w, rows, cols, &h, &spec, &GptqOptions { search: ScaleSearch::Mse, ..opts }).unwrap();
            assert_ne!(
                mm.quantized, se.quantized,
                "{axis:?} act {act_order} static {static_groups}: the search changed nothing"
            );
            assert!(se.loss.is_finite() && se.loss < 1.5 * mm.loss, "{axis:?}: loss {} vs {}", se.loss, mm.loss);
        }
    }
}
