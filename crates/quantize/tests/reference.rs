//! Golden test against an independent float64 numpy port of IST-DASLab's GPTQ (per-OC)
//! and of the paper's per-IC GPTQ: `tests/reference/gptq_ref.py` writes the fixture.

use adadim_quantize::{gptq, Axis, GptqOptions, Hessian, QuantSpec, Zero};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    rows: usize,
    cols: usize,
    tokens: usize,
    percdamp: f64,
    w_denominator: f64,
    w_int: Vec<i64>,
    x: Vec<i64>,
    h_diag: Vec<f64>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    axis: String,
    zero: String,
    bits: u8,
    group: usize,
    act_order: bool,
    static_groups: bool,
    blocksize: usize,
    loss: f64,
    codes: Vec<u8>,
    scales: Vec<f64>,
    zeros: Vec<f64>,
    g_idx: Option<Vec<u32>>,
}

fn load() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/gptq_fixture.json");
    let text = std::fs::read_to_string(path).expect("run tests/reference/gptq_ref.py to write the fixture");
    serde_json::from_str(&text).expect("fixture matches gptq_ref.py's layout")
}

#[test]
fn gptq_matches_the_numpy_reference() {
    let f = load();
    let (rows, cols) = (f.rows, f.cols);
    // W is a multiple of 2^-12 and X integer: both exact in f32.
    let w: Vec<f32> = f.w_int.iter().map(|&v| (v as f64 / f.w_denominator) as f32).collect();
    let x: Vec<f32> = f.x.iter().map(|&v| v as f32).collect();
    let mut h = Hessian::new(cols);
    for batch in x.chunks(f.tokens / 2 * cols) {
        h.add_batch(batch).unwrap();
    }
    // X^T X stays below 2^24, so the f32 running average is exact: same H as numpy's.
    for (i, &d) in f.h_diag.iter().enumerate() {
        assert_eq!(f64::from(h.matrix()[i * cols + i]), d, "H[{i}, {i}]");
    }
    for case in &f.cases {
        let spec = QuantSpec {
            bits: case.bits,
            group: Some(case.group),
            axis: if case.axis == "oc" { Axis::Oc } else { Axis::Ic },
            zero: if case.zero == "gptq" { Zero::Gptq } else { Zero::Awq },
        };
        let opts = GptqOptions {
            blocksize: case.blocksize,
            percdamp: f.percdamp,
            act_order: case.act_order,
            static_groups: case.static_groups,
            ..GptqOptions::default()
        };
        let out = gptq(&w, rows, cols, &h, &spec, &opts).unwrap();
        let q = &out.quantized;
        let mismatched = q.codes().iter().zip(&case.codes).filter(|(a, b)| a != b).count();
        let g_idx: Vec<u32> = match q.g_idx() {
            Some(g) => g.to_vec(),
            None => (0..cols as u32).map(|c| c / case.group as u32).collect(),
        };
        let max_param_diff = q
            .scales()
            .iter()
            .zip(&case.scales)
            .chain(q.zeros().iter().zip(&case.zeros))
            .map(|(&a, &b)| (f64::from(a) - b).abs() / b.abs().max(1.0))
            .fold(0.0, f64::max);
        // The reference W' in float64, rebuilt from its codes and params.
        let (pr, pc) = q.param_shape();
        assert_eq!(case.scales.len(), pr * pc, "{}", case.name);
        let w_hat = q.dequantize();
        let mut max_w_diff = 0.0f64;
        for r in 0..rows {
            for c in 0..cols {
                let p = if spec.axis == Axis::Oc { r * pc + g_idx[c] as usize } else { r / case.group * pc + c };
                let reference = case.scales[p] * (f64::from(case.codes[r * cols + c]) - case.zeros[p]);
                max_w_diff = max_w_diff.max((f64::from(w_hat[r * cols + c]) - reference).abs());
            }
        }
        let loss_rel = (out.loss - case.loss).abs() / case.loss;
        println!(
            "{:28} loss {:.6e} vs {:.6e} (rel {loss_rel:.1e}), max |W' - W'_ref| {max_w_diff:.1e}, \
             codes differing {mismatched}/{}, max param rel diff {max_param_diff:.1e}",
            case.name,
            out.loss,
            case.loss,
            case.codes.len()
        );
        assert!(loss_rel < 1e-4, "{}: loss {} vs reference {}", case.name, out.loss, case.loss);
        assert_eq!(mismatched, 0, "{}: codes differ from the reference", case.name);
        if let Some(reference) = &case.g_idx {
            assert_eq!(&g_idx, reference, "{}: g_idx", case.name);
        }
        assert!(max_param_diff < 1e-6, "{}: params differ by {max_param_diff:e}", case.name);
        assert!(max_w_diff < 1e-6, "{}: W' differs by {max_w_diff:e}", case.name);
    }
}
