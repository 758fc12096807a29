//! GPTQ along either axis: better than RTN where inputs correlate, equal to RTN (and
//! axis-symmetric) where they do not, groups as gptq.py forms them.

mod common;

use adadim_quantize::{gptq, output_error, rtn, Axis, GptqOptions, Zero};
use common::{gptq_opts as opts, hessian, identity, inputs, spec, transpose, weights};

#[test]
fn gptq_beats_rtn_on_correlated_inputs_with_outliers() {
    let (rows, cols, tokens) = (96, 256, 1024);
    let w = weights(rows, cols, 0.02, 1);
    let x = inputs(tokens, cols, &[5, 77, 200], 40.0, 2);
    let h = hessian(&x, cols);
    for (axis, zero) in [(Axis::Oc, Zero::Gptq), (Axis::Ic, Zero::Awq)] {
        for (bits, group) in [(3, Some(32)), (4, Some(128)), (4, None)] {
            let s = spec(bits, group, axis, zero);
            let e_rtn = output_error(&w, &rtn(&w, rows, cols, &s).unwrap().dequantize(), rows, cols, &x).unwrap();
            for act_order in [false, true] {
                let out = gptq(&w, rows, cols, &h, &s, &opts(act_order, false)).unwrap();
                let e = output_error(&w, &out.quantized.dequantize(), rows, cols, &x).unwrap();
                println!(
                    "{axis:?} b{bits} g{group:?} act={act_order}: gptq {e:.4e} rtn {e_rtn:.4e} ratio {:.3}",
                    e / e_rtn
                );
                assert!(e < 0.8 * e_rtn, "{axis:?} b{bits} g{group:?} act={act_order}: gptq {e:e} vs rtn {e_rtn:e}");
                assert_eq!(out.percdamp, 0.01);
            }
        }
    }
}

#[test]
fn with_an_identity_hessian_gptq_is_rtn_along_both_axes() {
    // H = I spreads no error, so GPTQ must reduce to RTN, and per-IC of W must equal
    // per-OC of W^T: the same symmetry as RTN's, through the whole sweep.
    let (rows, cols) = (70, 40);
    let w = weights(rows, cols, 0.02, 3);
    let w_t = transpose(&w, rows, cols);
    for zero in [Zero::Awq, Zero::Gptq] {
        for group in [Some(16), Some(32), None] {
            let ic_spec = spec(3, group, Axis::Ic, zero);
            let ic = gptq(&w, rows, cols, &identity(cols), &ic_spec, &opts(true, false)).unwrap().quantized;
            assert_eq!(ic, rtn(&w, rows, cols, &ic_spec).unwrap());
            let oc_spec = spec(3, group, Axis::Oc, zero);
            let oc_t = gptq(&w_t, cols, rows, &identity(rows), &oc_spec, &GptqOptions::default()).unwrap().quantized;
            assert_eq!(oc_t, rtn(&w_t, cols, rows, &oc_spec).unwrap());
            assert_eq!(ic.codes(), transpose(oc_t.codes(), cols, rows).as_slice());
            assert_eq!(ic.dequantize(), transpose(&oc_t.dequantize(), cols, rows));
        }
    }
}

#[test]
fn act_order_groups_follow_processing_order_unless_static() {
    let (rows, cols, g) = (16, 80, 32);
    let w = weights(rows, cols, 0.02, 4);
    let x = inputs(512, cols, &[70, 9], 25.0, 5);
    let h = hessian(&x, cols);
    let s = spec(4, Some(g), Axis::Oc, Zero::Gptq);
    let dynamic = gptq(&w, rows, cols, &h, &s, &opts(true, false)).unwrap().quantized;
    let diag: Vec<f32> = (0..cols).map(|i| h.matrix()[i * cols + i]).collect();
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    let g_idx = dynamic.g_idx().expect("act-order with dynamic groups needs g_idx");
    for (j, &c) in order.iter().enumerate() {
        assert_eq!(g_idx[c] as usize, j / g, "column {c} processed {j}-th");
    }
    // Static groups: fitted on the original W before reordering, i.e. RTN's params.
    let fixed = gptq(&w, rows, cols, &h, &s, &opts(true, true)).unwrap().quantized;
    let rtn_q = rtn(&w, rows, cols, &s).unwrap();
    assert!(fixed.g_idx().is_none());
    assert_eq!((fixed.scales(), fixed.zeros()), (rtn_q.scales(), rtn_q.zeros()));
}

#[test]
fn lazy_block_updates_do_not_change_the_result() {
    // Per-IC and static per-OC fit nothing from the stale `W`, so the block size must only
    // change the order of floating-point operations (GPTQ paper, "lazy batch updates").
    let (rows, cols) = (48, 150);
    let w = weights(rows, cols, 0.02, 6);
    let h = hessian(&inputs(600, cols, &[1, 100], 20.0, 7), cols);
    for (s, static_groups) in
        [(spec(3, Some(32), Axis::Ic, Zero::Awq), false), (spec(3, Some(32), Axis::Oc, Zero::Gptq), true)]
    {
        let run =
            |blocksize| gptq(&w, rows, cols, &h, &s, &GptqOptions { blocksize, ..opts(true, static_groups) }).unwrap();
        let reference = run(128);
        for blocksize in [1, 7, 64, 1000] {
            let out = run(blocksize);
            assert_eq!(out.quantized.codes(), reference.quantized.codes(), "{:?} blocksize {blocksize}", s.axis);
            assert!((out.loss - reference.loss).abs() <= 1e-9 * reference.loss);
        }
    }
}

#[test]
fn ragged_smollm2_shapes() {
    // [576, 192] with g = 128: a 64-wide last group per-IC, 192 = 128 + 64 per-OC.
    let (rows, cols) = (576, 192);
    let w = weights(rows, cols, 0.02, 8);
    let x = inputs(400, cols, &[10], 30.0, 9);
    let h = hessian(&x, cols);
    for (axis, shape) in [(Axis::Oc, (576, 2)), (Axis::Ic, (5, 192))] {
        let s = spec(3, Some(128), axis, Zero::Awq);
        let out = gptq(&w, rows, cols, &h, &s, &opts(true, false)).unwrap();
        assert_eq!(out.quantized.param_shape(), shape);
        let w_hat = out.quantized.dequantize();
        assert!(w_hat.iter().all(|v| v.is_finite()) && out.loss.is_finite());
        let e_rtn = output_error(&w, &rtn(&w, rows, cols, &s).unwrap().dequantize(), rows, cols, &x).unwrap();
        let e = output_error(&w, &w_hat, rows, cols, &x).unwrap();
        println!("576x192 g128 {axis:?}: gptq {e:.4e} rtn {e_rtn:.4e}");
        assert!(e < e_rtn, "{axis:?}: gptq {e:e} vs rtn {e_rtn:e}");
    }
}

#[test]
fn updates_measure_the_error_compensation_each_column_received() {
    let (rows, cols) = (48, 96);
    let w = weights(rows, cols, 0.02, 5);
    // H = I: nothing is compensated.
    let s = spec(3, Some(16), Axis::Ic, Zero::Awq);
    let out = gptq(&w, rows, cols, &identity(cols), &s, &opts(false, false)).unwrap();
    assert!(out.update.iter().all(|&u| u == 0.0), "{:?}", &out.update[..4]);
    // Correlated inputs: the first column processed is never moved, later ones are; per-IC
    // (groups fitted on the compensated column, so nothing is clamped) each column's final
    // change |W' - W| is its update give or take its own rounding, half a step at most.
    let x = inputs(512, cols, &[9, 40], 30.0, 6);
    let h = hessian(&x, cols);
    for axis in [Axis::Oc, Axis::Ic] {
        let s = spec(3, Some(16), axis, Zero::Awq);
        let out = gptq(&w, rows, cols, &h, &s, &opts(false, false)).unwrap();
        assert_eq!(out.update[0], 0.0, "{axis:?}");
        assert!(out.update[1..].iter().filter(|&&u| u > 0.0).count() > cols * 9 / 10, "{axis:?}");
        let wq = out.quantized.dequantize();
        let q = &out.quantized;
        let max_step = q.scales().iter().fold(0f32, |a, &b| a.max(b.abs())) as f64;
        for c in (0..cols).filter(|_| axis == Axis::Ic) {
            let change =
                (0..rows).map(|r| f64::from((wq[r * cols + c] - w[r * cols + c]).abs())).sum::<f64>() / rows as f64;
            assert!(
                (change - out.update[c]).abs() <= max_step / 2.0 + 1e-6,
                "column {c}: |W' - W| {change} vs update {}",
                out.update[c]
            );
        }
    }
}

/// Group-aware act-order is GPTQ without act-order on the matrix whose columns (and `H`) are
/// put in its order beforehand, fitting each group on fully compensated weights (`blocksize`
/// 1 leaves nothing stale), mapped back: groups whole, no `g_idx`, every block size the same
/// codes. Checked with groups that cross the sweep's blocks and on a ragged last group
/// (placed first by its outlier), which shifts every later group off the multiples of g.
#[test]
fn group_aware_order_is_gptq_on_the_reordered_matrix() {
    let (rows, cols) = (24, 192);
    let w = weights(rows, cols, 0.02, 11);
    let h = hessian(&inputs(700, cols, &[170, 3, 90], 30.0, 12), cols);
    let diag: Vec<f32> = (0..cols).map(|i| h.matrix()[i * cols + i]).collect();
    for (bits, g) in [(3, 32), (4, 48), (4, 128)] {
        // The order by hand: groups by their largest diagonal, columns by diagonal inside.
        let mut groups: Vec<Vec<usize>> = (0..cols.div_ceil(g))
            .map(|k| {
                let mut cs: Vec<usize> = (k * g..((k + 1) * g).min(cols)).collect();
                cs.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
                cs
            })
            .collect();
        groups.sort_by(|a, b| diag[b[0]].total_cmp(&diag[a[0]]));
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        let order = groups.concat();
        let s = spec(bits, Some(g), Axis::Oc, Zero::Awq);
        let gar = |blocksize| {
            let o = GptqOptions { blocksize, group_aware: true, ..opts(true, true) };
            gptq(&w, rows, cols, &h, &s, &o).unwrap().quantized
        };
        let q = gar(128);
        assert!(q.g_idx().is_none(), "g{g}: groups stay whole");
        for blocksize in [1, 7, 64] {
            assert_eq!(gar(blocksize).codes(), q.codes(), "g{g} blocksize {blocksize}");
        }
        // The reference, where all groups are whole (plain dynamic groups start at multiples
        // of g of the reordered matrix, which then are exactly the original groups).
        let wp: Vec<f32> = (0..rows * cols).map(|i| w[i - i % cols + order[i % cols]]).collect();
        let hp: Vec<f32> = (0..cols * cols).map(|i| h.matrix()[order[i / cols] * cols + order[i % cols]]).collect();
        let hp = adadim_quantize::Hessian::from_matrix(cols, hp, h.tokens()).unwrap();
        let whole = GptqOptions { blocksize: 1, ..opts(false, false) };
        let plain = |gs: usize| gptq(&wp, rows, cols, &hp, &spec(bits, Some(gs), Axis::Oc, Zero::Awq), &whole);
        if sizes.iter().all(|&n| n == g) {
            let r = plain(g).unwrap().quantized;
            let back = |m: &[u8]| -> Vec<u8> {
                let mut out = vec![0u8; rows * cols];
                for (j, &c) in order.iter().enumerate() {
                    (0..rows).for_each(|row| out[row * cols + c] = m[row * cols + j]);
                }
                out
            };
            assert_eq!(back(r.codes()), q.codes(), "g{g}: codes of the reordered run, mapped back");
        }
        // Whatever the sizes: well below RTN on these correlated inputs, as GPTQ is; beside
        // static groups (the layout it replaces), printed: neither wins on every matrix.
        let x = inputs(700, cols, &[170, 3, 90], 30.0, 12);
        let e = |m: &adadim_quantize::QuantizedMatrix| output_error(&w, &m.dequantize(), rows, cols, &x).unwrap();
        let fixed = gptq(&w, rows, cols, &h, &s, &opts(true, true)).unwrap().quantized;
        let e_rtn = e(&adadim_quantize::rtn(&w, rows, cols, &s).unwrap());
        println!("g{g} w{bits}: group-aware {:.4e} static {:.4e} rtn {e_rtn:.4e}", e(&q), e(&fixed));
        let mse = |group_aware| {
            let o = GptqOptions { group_aware, search: adadim_quantize::ScaleSearch::Mse, ..opts(true, true) };
            e(&gptq(&w, rows, cols, &h, &s, &o).unwrap().quantized)
        };
        println!("g{g} w{bits} searched: group-aware {:.4e} static {:.4e}", mse(true), mse(false));
        assert!(e(&q) < 0.8 * e_rtn, "g{g} w{bits}: group-aware {} rtn {e_rtn}", e(&q));
    }
}
