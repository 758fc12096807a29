//! Golden test of `--scale-search mse` against an independent numpy version of the search on
//! one layer: `tests/reference/search_ref.py` writes the fixture.

use adadim_quantize::{rtn, rtn_fitted, Axis, Fitter, QuantSpec, ScaleSearch, Zero};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    rows: usize,
    cols: usize,
    w_denominator: f64,
    w_int: Vec<i64>,
    h_diag: Vec<f32>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    axis: String,
    bits: u8,
    group: usize,
    zero: String,
    scales: Vec<f32>,
    zeros: Vec<f32>,
    error: f64,
}

/// `sum_i h_i (w_i - w'_i)^2` over the whole matrix, `h` per input column.
fn weighted(w: &[f32], w_hat: &[f32], h: &[f32]) -> f64 {
    let cols = h.len();
    w.iter()
        .zip(w_hat)
        .enumerate()
        .map(|(i, (a, b))| f64::from(h[i % cols]) * (f64::from(*a) - f64::from(*b)).powi(2))
        .sum()
}

#[test]
fn mse_search_matches_the_numpy_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/search_fixture.json");
    let text = std::fs::read_to_string(path).expect("run tests/reference/search_ref.py to write the fixture");
    let f: Fixture = serde_json::from_str(&text).expect("fixture matches search_ref.py's layout");
    let (rows, cols) = (f.rows, f.cols);
    let w: Vec<f32> = f.w_int.iter().map(|&v| (v as f64 / f.w_denominator) as f32).collect();
    for case in &f.cases {
        let spec = QuantSpec {
            bits: case.bits,
            group: Some(case.group),
            axis: if case.axis == "oc" { Axis::Oc } else { Axis::Ic },
            zero: match case.zero.as_str() {
                "awq" => Zero::Awq,
                "gptq" => Zero::Gptq,
                _ => Zero::Sym,
            },
        };
        let name = format!("{} w{}g{} {}", case.axis, case.bits, case.group, case.zero);
        let q = rtn_fitted(&w, rows, cols, &spec, &Fitter::new(ScaleSearch::Mse, Some(&f.h_diag))).unwrap();
        // Same params group for group: both sides quantize in f32 and sum errors in f64.
        let differ =
            (0..q.scales().len()).filter(|&i| q.scales()[i] != case.scales[i] || q.zeros()[i] != case.zeros[i]).count();
        assert!(differ == 0, "{name}: {differ} of {} groups differ", q.scales().len());
        let got = weighted(&w, &q.dequantize(), &f.h_diag);
        assert!((got - case.error).abs() <= 1e-6 * case.error, "{name}: error {got} vs numpy {}", case.error);
        // And the search pays: below min-max on the same measure.
        let minmax = weighted(&w, &rtn(&w, rows, cols, &spec).unwrap().dequantize(), &f.h_diag);
        assert!(got < minmax, "{name}: searched {got} vs min-max {minmax}");
    }
}
