//! The Hessian accumulator: running average equals the one-shot `(2/n) X^T X`, dead
//! inputs, and rejected inputs.

mod common;

use adadim_quantize::{Error, Hessian, HessianSum};
use common::inputs;

/// `(2/n) X^T X` in f64, one token at a time: the definition, not the GEMM.
fn naive(x: &[f32], dim: usize) -> Vec<f64> {
    let n = x.len() / dim;
    let mut h = vec![0.0; dim * dim];
    for t in x.chunks(dim) {
        for i in 0..dim {
            for j in 0..dim {
                h[i * dim + j] += 2.0 / n as f64 * f64::from(t[i]) * f64::from(t[j]);
            }
        }
    }
    h
}

#[test]
fn running_average_over_uneven_batches_equals_one_shot() {
    let (tokens, dim) = (256, 40);
    let x = inputs(tokens, dim, &[3, 17], 30.0, 1);
    let mut h = Hessian::new(dim);
    for (start, end) in [(0, 100), (100, 101), (101, 101), (101, 256)] {
        h.add_batch(&x[start * dim..end * dim]).unwrap();
    }
    assert_eq!(h.tokens(), tokens);
    let expected = naive(&x, dim);
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_err = h.matrix().iter().zip(&expected).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
    assert!(max_err <= 1e-5 * scale, "max |H - H_ref| = {max_err:e}, max |H| = {scale:e}");
    for i in 0..dim {
        for j in 0..dim {
            assert_eq!(h.matrix()[i * dim + j], h.matrix()[j * dim + i], "H symmetric at ({i}, {j})");
        }
    }
}

#[test]
fn silent_channels_are_reported_dead() {
    let (tokens, dim) = (64, 12);
    let mut x = inputs(tokens, dim, &[], 1.0, 2);
    for t in 0..tokens {
        x[t * dim + 4] = 0.0;
        x[t * dim + 9] = 0.0;
    }
    let mut h = Hessian::new(dim);
    h.add_batch(&x).unwrap();
    assert_eq!(h.dead_inputs(), vec![4, 9]);
}

#[test]
fn bad_batches_are_rejected_and_leave_h_unchanged() {
    let dim = 8;
    let mut h = Hessian::new(dim);
    h.add_batch(&inputs(16, dim, &[], 1.0, 3)).unwrap();
    let before = h.clone();
    let mut x = inputs(4, dim, &[], 1.0, 4);
    x[2 * dim + 6] = f32::NAN;
    assert!(matches!(h.add_batch(&x), Err(Error::NonFiniteInput { token: 2, channel: 6, .. })));
    x[2 * dim + 6] = f32::INFINITY;
    assert!(matches!(h.add_batch(&x), Err(Error::NonFiniteInput { token: 2, channel: 6, .. })));
    assert!(matches!(h.add_batch(&x[..dim + 3]), Err(Error::Shape { expected: 16, got: 11, .. })));
    assert_eq!(h, before);
}

#[test]
fn from_matrix_checks_shape_and_finiteness() {
    assert!(matches!(Hessian::from_matrix(3, vec![0.0; 8], 1), Err(Error::Shape { expected: 9, .. })));
    let mut m = vec![1.0; 9];
    m[5] = f32::NAN;
    assert!(matches!(Hessian::from_matrix(3, m, 1), Err(Error::NonFiniteHessian { row: 1, col: 2, .. })));
    let h = Hessian::from_matrix(2, vec![2.0, 1.0, 1.0, 0.0], 10).unwrap();
    assert_eq!((h.dim(), h.tokens(), h.dead_inputs()), (2, 10, vec![1]));
}

#[test]
fn same_bits_whatever_the_thread_count() {
    // Large enough for faer to split the GEMM between threads.
    let (tokens, dim) = (4096, 512);
    let x = inputs(tokens, dim, &[1, 300], 30.0, 5);
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let run = || common::hessian(&x, dim);
    let one = pool(1).install(run);
    let two = pool(2).install(run);
    assert!(one.matrix().iter().zip(two.matrix()).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn a_sum_mirrored_once_equals_adding_batch_by_batch() {
    // Uneven batches (one empty, one of a single token), a rejected one in between.
    let (tokens, dim) = (300, 67);
    let x = inputs(tokens, dim, &[5], 20.0, 2);
    let (mut h, mut sum) = (Hessian::new(dim), HessianSum::new(dim));
    for (start, end) in [(0, 128), (128, 129), (129, 129), (129, 300)] {
        h.add_batch(&x[start * dim..end * dim]).unwrap();
        sum.add_batch(&x[start * dim..end * dim]).unwrap();
        let mut bad = x[..dim].to_vec();
        bad[3] = f32::NAN;
        assert!(sum.add_batch(&bad).is_err());
    }
    assert_eq!(sum.dim(), dim);
    let sum = sum.finish();
    assert_eq!(sum.tokens(), tokens);
    let bits = |h: &Hessian| h.matrix().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&sum), bits(&h), "bit for bit, both triangles");
}
