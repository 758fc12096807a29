//! The dimension search (paper Eq. 3): the output error, its Hessian form, and the choice.

mod common;

use adadim_quantize::{choose_axis, output_error, output_error_from_hessian, rtn, Axis, Calibration, Error, Zero};
use common::{hessian, inputs, spec, weights};

/// `mean((W' X - W X)^2)` by the definition, in f64.
fn naive_error(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, x: &[f32]) -> f64 {
    let tokens = x.len() / cols;
    let mut sum = 0.0;
    for r in 0..rows {
        for t in 0..tokens {
            let y: f64 =
                (0..cols).map(|c| f64::from(w_hat[r * cols + c] - w[r * cols + c]) * f64::from(x[t * cols + c])).sum();
            sum += y * y;
        }
    }
    sum / (rows * tokens) as f64
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn gemm_error_matches_the_definition_and_the_hessian_form() {
    // 5000 tokens: more than one GEMM chunk; 1100 columns: H in three f64 blocks, the
    // last one ragged.
    for (rows, cols, tokens) in [(24, 40, 5000), (8, 1100, 600)] {
        let w = weights(rows, cols, 0.02, 1);
        let x = inputs(tokens, cols, &[7], 30.0, 2);
        let h = hessian(&x, cols);
        for axis in [Axis::Oc, Axis::Ic] {
            let w_hat = rtn(&w, rows, cols, &spec(3, Some(8), axis, Zero::Awq)).unwrap().dequantize();
            let gemm = output_error(&w, &w_hat, rows, cols, &x).unwrap();
            let exact = naive_error(&w, &w_hat, rows, cols, &x);
            let from_h = output_error_from_hessian(&w, &w_hat, rows, cols, &h).unwrap();
            println!("{rows}x{cols} {axis:?}: gemm {gemm:.6e} naive {exact:.6e} hessian {from_h:.6e}");
            assert!(rel(gemm, exact) < 1e-5, "GEMM {gemm:e} vs naive {exact:e}");
            assert!(rel(from_h, exact) < 1e-4, "Hessian form {from_h:e} vs naive {exact:e}");
        }
    }
}

#[test]
fn choice_is_the_axis_with_the_lower_error() {
    let (rows, cols, tokens) = (64, 96, 512);
    // per-IC wins: activation outliers (channels 3, 50) meet ordinary weights whose per-OC
    // groups are widened by a few wide weight columns; per-IC gives columns 3 and 50 their
    // own small scales, so their errors, amplified 20x by the inputs, stay small.
    let x_outliers = inputs(tokens, cols, &[3, 50], 20.0, 3);
    let mut wide_cols = weights(rows, cols, 0.02, 4);
    for r in 0..rows {
        for c in [11, 40, 77] {
            wide_cols[r * cols + c] *= 25.0;
        }
    }
    // per-OC wins: a wide output row in every per-IC group widens all of them.
    let x_plain = inputs(tokens, cols, &[], 1.0, 5);
    let mut wide_rows = weights(rows, cols, 0.02, 6);
    for r in [5, 40] {
        wide_rows[r * cols..(r + 1) * cols].iter_mut().for_each(|v| *v *= 25.0);
    }
    for (w, x, expected) in [(&wide_cols, &x_outliers, Axis::Ic), (&wide_rows, &x_plain, Axis::Oc)] {
        let h = hessian(x, cols);
        let s = spec(3, Some(32), Axis::Oc, Zero::Awq);
        let by_x = choose_axis(w, rows, cols, &s, Calibration::Inputs(x)).unwrap();
        let by_h = choose_axis(w, rows, cols, &s, Calibration::Hessian(&h)).unwrap();
        let oc =
            output_error(w, &rtn(w, rows, cols, &s.with_axis(Axis::Oc)).unwrap().dequantize(), rows, cols, x).unwrap();
        let ic =
            output_error(w, &rtn(w, rows, cols, &s.with_axis(Axis::Ic)).unwrap().dequantize(), rows, cols, x).unwrap();
        println!(
            "expect {expected:?}: oc {oc:.4e} ic {ic:.4e} (by H: oc {:.4e} ic {:.4e})",
            by_h.oc_error, by_h.ic_error
        );
        assert_eq!((by_x.oc_error, by_x.ic_error), (oc, ic));
        assert_eq!(by_x.axis, if ic < oc { Axis::Ic } else { Axis::Oc });
        assert_eq!(by_x.axis, expected);
        assert_eq!(by_h.axis, expected);
        assert!(rel(by_h.oc_error, oc) < 1e-4 && rel(by_h.ic_error, ic) < 1e-4);
        assert_eq!(by_x.quantized, rtn(w, rows, cols, &s.with_axis(expected)).unwrap());
    }
}

#[test]
fn bad_calibration_is_a_typed_error() {
    let (rows, cols) = (4, 6);
    let w = weights(rows, cols, 0.02, 5);
    let s = spec(4, None, Axis::Oc, Zero::Gptq);
    let mut x = inputs(3, cols, &[], 1.0, 6);
    assert!(matches!(choose_axis(&w, rows, cols, &s, Calibration::Inputs(&x[..7])), Err(Error::Shape { .. })));
    assert!(matches!(output_error(&w, &w, rows, cols, &[]), Err(Error::Invalid(_))));
    assert!(matches!(output_error(&w, &w[..20], rows, cols, &x), Err(Error::Shape { .. })));
    x[8] = f32::NAN;
    assert!(matches!(output_error(&w, &w, rows, cols, &x), Err(Error::NonFiniteInput { token: 1, channel: 2, .. })));
    let empty = adadim_quantize::Hessian::new(cols);
    assert!(matches!(output_error_from_hessian(&w, &w, rows, cols, &empty), Err(Error::Invalid(_))));
    assert!(matches!(
        choose_axis(&w, rows, cols, &s, Calibration::Hessian(&hessian(&x[..0], 5))),
        Err(Error::Shape { .. })
    ));
}
