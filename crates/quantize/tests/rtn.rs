//! RTN along either axis: the axis symmetry, ragged groups, and determinism.

mod common;

use adadim_quantize::{rtn, Axis, QuantizedMatrix, Zero};
use common::{spec, transpose, weights};

/// per-IC of `W` and per-OC of `W^T` must agree exactly, codes and params alike.
fn assert_transposed(ic: &QuantizedMatrix, oc_t: &QuantizedMatrix) {
    let (rows, cols) = (ic.rows(), ic.cols());
    assert_eq!((oc_t.rows(), oc_t.cols()), (cols, rows));
    assert_eq!(ic.codes(), transpose(oc_t.codes(), cols, rows).as_slice());
    let (pr, pc) = ic.param_shape();
    assert_eq!(oc_t.param_shape(), (pc, pr));
    assert_eq!(ic.scales(), transpose(oc_t.scales(), pc, pr).as_slice());
    assert_eq!(ic.zeros(), transpose(oc_t.zeros(), pc, pr).as_slice());
    assert_eq!(ic.dequantize(), transpose(&oc_t.dequantize(), cols, rows));
}

#[test]
fn per_ic_of_w_is_per_oc_of_w_transposed() {
    for (rows, cols, group) in [(576, 192, Some(128)), (100, 70, Some(32)), (64, 48, None), (33, 5, Some(1))] {
        let w = weights(rows, cols, 0.02, rows as u64);
        let w_t = transpose(&w, rows, cols);
        for zero in [Zero::Awq, Zero::Gptq, Zero::Sym] {
            let ic = rtn(&w, rows, cols, &spec(3, group, Axis::Ic, zero)).unwrap();
            let oc_t = rtn(&w_t, cols, rows, &spec(3, group, Axis::Oc, zero)).unwrap();
            assert_transposed(&ic, &oc_t);
        }
    }
}

#[test]
fn ragged_last_groups_are_fitted_on_their_own_weights() {
    // SmolLM2's k/v projections: [192, 576] and their transposes; and shapes no g divides.
    for (rows, cols, g) in [(576, 192, 128), (192, 576, 128), (100, 70, 32)] {
        let w = weights(rows, cols, 0.02, 11);
        for axis in [Axis::Oc, Axis::Ic] {
            let s = spec(4, Some(g), axis, Zero::Awq);
            let q = rtn(&w, rows, cols, &s).unwrap();
            let expected_shape = match axis {
                Axis::Oc => (rows, cols.div_ceil(g)),
                Axis::Ic => (rows.div_ceil(g), cols),
            };
            assert_eq!(q.param_shape(), expected_shape);
            // The last weight's group is the ragged one in both directions.
            let (r, c) = (rows - 1, cols - 1);
            let group: Vec<f32> = match axis {
                Axis::Oc => w[r * cols + c / g * g..(r + 1) * cols].to_vec(),
                Axis::Ic => (r / g * g..rows).map(|i| w[i * cols + c]).collect(),
            };
            assert_eq!(group.len(), if axis == Axis::Oc { cols - c / g * g } else { rows - r / g * g });
            assert_eq!(q.params(r, c), s.fit(group), "{rows}x{cols} g{g} {axis:?}");
        }
    }
}

#[test]
fn error_shrinks_with_more_bits() {
    let (rows, cols) = (64, 128);
    let w = weights(rows, cols, 0.02, 5);
    for axis in [Axis::Oc, Axis::Ic] {
        let mse: Vec<f64> = [2, 3, 4, 8]
            .iter()
            .map(|&b| {
                let w_hat = rtn(&w, rows, cols, &spec(b, Some(32), axis, Zero::Gptq)).unwrap().dequantize();
                w.iter().zip(&w_hat).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>() / w.len() as f64
            })
            .collect();
        assert!(mse.windows(2).all(|p| p[1] < p[0] / 3.0), "{axis:?}: {mse:?}");
    }
}

#[test]
fn same_bits_on_every_run_and_thread_count() {
    let (rows, cols) = (576, 192);
    let w = weights(rows, cols, 0.02, 99);
    let s = spec(3, Some(128), Axis::Ic, Zero::Awq);
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(|| rtn(&w, rows, cols, &s).unwrap());
    let two = pool(2).install(|| rtn(&w, rows, cols, &s).unwrap());
    let again = rtn(&w, rows, cols, &s).unwrap();
    for q in [&two, &again] {
        assert_eq!(q.codes(), one.codes());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(q.scales()), bits(one.scales()));
        assert_eq!(bits(q.zeros()), bits(one.zeros()));
    }
}
