//! The scale refit: never raises the output error, keeps codes and zero points, stores f16
//! scales, and finds back the exact scales of a matrix that lies on a known grid.

mod common;

use adadim_quantize::{
    gptq, output_error_from_hessian, refit_scales, rtn, Axis, GptqOptions, Hessian, QuantSpec, QuantizedMatrix, Zero,
};
use common::{hessian, Rng};

/// Inputs with correlated channels and a few outlier channels, as a linear's are.
fn inputs(rng: &mut Rng, tokens: usize, cols: usize) -> Vec<f32> {
    let mut x = vec![0f32; tokens * cols];
    for t in 0..tokens {
        let common = rng.normal();
        for c in 0..cols {
            let outlier = if c % 7 == 3 { 8.0 } else { 1.0 };
            x[t * cols + c] = ((0.6 * common + rng.normal()) * outlier) as f32;
        }
    }
    x
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-12
}

#[test]
fn the_refit_never_raises_the_output_error_and_keeps_codes_and_zeros() {
    let mut rng = Rng::new(11);
    let mut lowered = 0;
    let mut cases = 0;
    for (rows, cols) in [(24usize, 40usize), (37, 29)] {
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32 * 0.1).collect();
        let h = hessian(&inputs(&mut rng, 200, cols), cols);
        for bits in [2u8, 3, 4] {
            for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
                for axis in [Axis::Oc, Axis::Ic] {
                    for group in [Some(8), Some(16), None] {
                        let spec = QuantSpec { bits, group, axis, zero };
                        let act = GptqOptions { act_order: true, ..GptqOptions::default() };
                        let qs = [
                            rtn(&w, rows, cols, &spec).unwrap(),
                            gptq(&w, rows, cols, &h, &spec, &GptqOptions::default()).unwrap().quantized,
                            // Act-order with dynamic groups: per-OC groups under a g_idx.
                            gptq(&w, rows, cols, &h, &spec, &act).unwrap().quantized,
                        ];
                        for q in qs {
                            let r = refit_scales(&q, &w, &h).unwrap();
                            let before = output_error_from_hessian(&w, &q.dequantize(), rows, cols, &h).unwrap();
                            let after =
                                output_error_from_hessian(&w, &r.quantized.dequantize(), rows, cols, &h).unwrap();
                            let what = format!("{rows}x{cols} w{bits} {zero:?} {axis:?} {group:?}");
                            assert!(close(r.before, before, 1e-5), "{what}: before {} vs {before}", r.before);
                            assert!(close(r.after, after, 1e-5), "{what}: after {} vs {after}", r.after);
                            assert!(after <= before * (1.0 + 1e-6), "{what}: {after} > {before}");
                            assert_eq!(r.quantized.codes(), q.codes(), "{what}");
                            assert_eq!(r.quantized.g_idx(), q.g_idx(), "{what}");
                            if zero != Zero::Float {
                                assert_eq!(r.quantized.zeros(), q.zeros(), "{what}");
                            }
                            for &s in r.quantized.scales() {
                                assert!(s > 0.0 && half::f16::from_f32(s).to_f32() == s, "{what}: scale {s}");
                            }
                            cases += 1;
                            lowered += usize::from(after < before * (1.0 - 1e-3));
                        }
                    }
                }
            }
        }
    }
    // Not a no-op: it lowers the error of most of them.
    assert!(lowered * 2 > cases, "lowered {lowered} of {cases}");
}

/// `W` lies exactly on a grid (f16 scales, codes, whole zeros); handed the same codes with
/// every scale off by up to 20%, the refit finds the true scales and zero error.
#[test]
fn the_refit_finds_back_the_scales_of_a_matrix_on_its_grid() {
    let mut rng = Rng::new(5);
    let (rows, cols) = (20usize, 48usize);
    let h = hessian(&inputs(&mut rng, 300, cols), cols);
    for axis in [Axis::Oc, Axis::Ic] {
        let spec = QuantSpec { bits: 3, group: Some(8), axis, zero: Zero::Awq };
        let (pr, pc) = match axis {
            Axis::Oc => (rows, cols / 8),
            Axis::Ic => (rows.div_ceil(8), cols),
        };
        let scales: Vec<f32> =
            (0..pr * pc).map(|_| half::f16::from_f64(0.01 + 0.05 * rng.uniform()).to_f32()).collect();
        let zeros: Vec<f32> = (0..pr * pc).map(|_| (rng.next_u64() % 8) as f32).collect();
        let codes: Vec<u8> = (0..rows * cols).map(|_| (rng.next_u64() % 8) as u8).collect();
        let truth =
            QuantizedMatrix::from_parts(rows, cols, spec, codes.clone(), scales.clone(), zeros.clone(), None).unwrap();
        let w = truth.dequantize();
        let off: Vec<f32> =
            scales.iter().map(|&s| half::f16::from_f64(f64::from(s) * (0.8 + 0.4 * rng.uniform())).to_f32()).collect();
        let given = QuantizedMatrix::from_parts(rows, cols, spec, codes, off, zeros, None).unwrap();
        let r = refit_scales(&given, &w, &h).unwrap();
        assert!(r.before > 0.0);
        assert_eq!(r.quantized.scales(), &scales[..], "{axis:?}");
        assert!(r.after <= 1e-9 * r.before, "{axis:?}: {} of {}", r.after, r.before);
        assert_eq!(r.changed, (pr, pr));
    }
}

#[test]
fn the_refit_rejects_a_hessian_of_the_wrong_size_or_without_tokens() {
    let w = vec![0.5f32; 4 * 8];
    let q = rtn(&w, 4, 8, &QuantSpec { bits: 4, group: Some(4), axis: Axis::Oc, zero: Zero::Awq }).unwrap();
    assert!(refit_scales(&q, &w, &Hessian::new(7)).is_err());
    assert!(refit_scales(&q, &w, &Hessian::new(8)).is_err());
}
