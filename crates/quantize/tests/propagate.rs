//! Error propagation: the corrected weights solve the least-squares problem against the float
//! model's outputs, alpha interpolates, no drift means no change, bad shapes are errors.

mod common;

use adadim_quantize::{Correction, Drift, Hessian};
use common::Rng;

const ROWS: usize = 6;
const COLS: usize = 10;
const TOKENS: usize = 400;

/// Float inputs `x` and drifted ones `x~ = x + noise` (correlated channels), row-major.
fn streams(rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let mut x = vec![0f32; TOKENS * COLS];
    let mut xq = vec![0f32; TOKENS * COLS];
    for t in 0..TOKENS {
        let common = rng.normal();
        for c in 0..COLS {
            let v = 0.5 * common + rng.normal();
            x[t * COLS + c] = v as f32;
            xq[t * COLS + c] = (v * 1.05 + 0.2 * rng.normal()) as f32;
        }
    }
    (x, xq)
}

fn accumulate(x: &[f32], xq: &[f32]) -> (Hessian, Drift) {
    let mut h = Hessian::new(COLS);
    let mut d = Drift::new(COLS);
    // Two batches, to exercise the running average.
    let half = TOKENS / 2 * COLS;
    for (a, b) in [(&x[..half], &xq[..half]), (&x[half..], &xq[half..])] {
        h.add_batch(b).unwrap();
        d.add_batch(a, b).unwrap();
    }
    (h, d)
}

/// `(W X - V X~) X~^T` in f64: zero at the least-squares `V`.
fn gradient(w: &[f32], v: &[f32], x: &[f32], xq: &[f32]) -> f64 {
    let mut worst = 0f64;
    for r in 0..ROWS {
        for j in 0..COLS {
            let mut g = 0f64;
            for t in 0..TOKENS {
                let (mut y, mut yq) = (0f64, 0f64);
                for i in 0..COLS {
                    y += f64::from(w[r * COLS + i]) * f64::from(x[t * COLS + i]);
                    yq += f64::from(v[r * COLS + i]) * f64::from(xq[t * COLS + i]);
                }
                g += (y - yq) * f64::from(xq[t * COLS + j]);
            }
            worst = worst.max((g / TOKENS as f64).abs());
        }
    }
    worst
}

#[test]
fn the_full_correction_is_the_least_squares_fit_to_the_float_outputs() {
    let mut rng = Rng::new(3);
    let (x, xq) = streams(&mut rng);
    let w: Vec<f32> = (0..ROWS * COLS).map(|_| rng.normal() as f32).collect();
    let (h, d) = accumulate(&x, &xq);
    // percdamp 0: only the solver's floor of 1e-6 of the mean diagonal.
    let full = Correction::new(&h, &d, 1.0, 0.0).unwrap().apply(&w, ROWS).unwrap();
    let before = gradient(&w, &w, &x, &xq);
    let after = gradient(&w, &full, &x, &xq);
    assert!(before > 0.05, "the streams drift: {before}");
    assert!(after < 1e-4 * before, "normal equations: {after} of {before}");
    // alpha interpolates between W and the full correction.
    let half = Correction::new(&h, &d, 0.5, 0.0).unwrap().apply(&w, ROWS).unwrap();
    for i in 0..w.len() {
        let mid = 0.5 * (w[i] + full[i]);
        assert!((half[i] - mid).abs() <= 1e-5 * (1.0 + mid.abs()), "{i}: {} vs {mid}", half[i]);
    }
    let none = Correction::new(&h, &d, 0.0, 0.01).unwrap().apply(&w, ROWS).unwrap();
    assert_eq!(none, w);
}

#[test]
fn without_drift_the_weights_are_unchanged() {
    let mut rng = Rng::new(4);
    let (x, _) = streams(&mut rng);
    let w: Vec<f32> = (0..ROWS * COLS).map(|_| rng.normal() as f32).collect();
    let (h, d) = accumulate(&x, &x);
    assert!(d.matrix().iter().all(|&v| v == 0.0));
    assert_eq!(Correction::new(&h, &d, 1.0, 0.01).unwrap().apply(&w, ROWS).unwrap(), w);
}

#[test]
fn mismatched_inputs_are_errors() {
    let mut rng = Rng::new(5);
    let (x, xq) = streams(&mut rng);
    let (h, d) = accumulate(&x, &xq);
    let mut short = Drift::new(COLS);
    assert!(short.add_batch(&x[..COLS * 3], &xq[..COLS * 2]).is_err(), "token counts differ");
    assert!(short.add_batch(&x[..COLS + 1], &xq[..COLS + 1]).is_err(), "not a whole token");
    short.add_batch(&x[..COLS * 2], &xq[..COLS * 2]).unwrap();
    assert!(Correction::new(&h, &short, 1.0, 0.01).is_err(), "other tokens than the Hessian's");
    assert!(Correction::new(&h, &Drift::new(COLS + 1), 1.0, 0.01).is_err(), "other width");
    assert!(Correction::new(&h, &d, 1.5, 0.01).is_err(), "alpha above 1");
    assert!(Correction::new(&h, &d, -0.1, 0.01).is_err(), "alpha below 0");
    let c = Correction::new(&h, &d, 1.0, 0.01).unwrap();
    assert!(c.apply(&vec![1.0; ROWS * (COLS - 1)], ROWS).is_err(), "weights of another width");
}
