//! GPTQ on hostile inputs: dead channels, singular and indefinite Hessians, bad settings;
//! and the same bits whatever the thread count.

mod common;

use adadim_quantize::{gptq, Axis, Error, GptqOptions, Hessian, QuantSpec, Zero};
use common::{gptq_opts as opts, hessian, identity, inputs, spec, weights};

#[test]
fn dead_inputs_get_zero_weights() {
    let (rows, cols) = (20, 24);
    let w = weights(rows, cols, 0.02, 10);
    let mut x = inputs(128, cols, &[], 1.0, 11);
    (0..128).for_each(|t| x[t * cols + 13] = 0.0);
    let h = hessian(&x, cols);
    for axis in [Axis::Oc, Axis::Ic] {
        let out = gptq(&w, rows, cols, &h, &spec(4, Some(8), axis, Zero::Gptq), &opts(true, false)).unwrap();
        assert_eq!(out.dead, vec![13]);
        let w_hat = out.quantized.dequantize();
        assert!((0..rows).all(|r| w_hat[r * cols + 13] == 0.0), "{axis:?}: dead column not zero");
        assert!(w_hat.iter().all(|v| v.is_finite()) && out.loss.is_finite());
    }
}

#[test]
fn singular_hessian_succeeds_through_more_damping() {
    // Channels 16..32 repeat channels 0..16 (integers, so H is exact in f32): rank 16 of 32,
    // and without damping the Cholesky meets an exactly zero pivot.
    let (rows, cols, tokens) = (16, 32, 64);
    let w = weights(rows, cols, 0.02, 12);
    let mut rng = common::Rng::new(13);
    let half: Vec<f32> = (0..tokens * 16).map(|_| (rng.next_u64() % 11) as f32 - 5.0).collect();
    let x: Vec<f32> = (0..tokens * cols).map(|i| half[i / cols * 16 + i % cols % 16]).collect();
    let h = hessian(&x, cols);
    let s = spec(4, Some(8), Axis::Oc, Zero::Gptq);
    let undamped = GptqOptions { percdamp: 0.0, ..GptqOptions::default() };
    let out = gptq(&w, rows, cols, &h, &s, &undamped).unwrap();
    assert_eq!(out.percdamp, 0.01, "retried with gptq.py's default damping");
    assert!(out.quantized.dequantize().iter().all(|v| v.is_finite()) && out.loss.is_finite());
    let never = GptqOptions { damp_retries: 0, ..undamped };
    assert_eq!(gptq(&w, rows, cols, &h, &s, &never), Err(Error::NotPositiveDefinite { percdamp: 0.0, tries: 1 }));
    // An indefinite H (eigenvalue -0.5 of mean diag ~1) needs 0.01 -> 0.1 -> 1.
    let mut m: Vec<f32> = identity(cols).matrix().to_vec();
    m[0] = -0.5;
    let indefinite = Hessian::from_matrix(cols, m, 1).unwrap();
    let out = gptq(&w, rows, cols, &indefinite, &s, &GptqOptions::default()).unwrap();
    assert!((out.percdamp - 1.0).abs() < 1e-12, "damping used: {}", out.percdamp);
    let two_tries = GptqOptions { damp_retries: 1, ..GptqOptions::default() };
    let err = gptq(&w, rows, cols, &indefinite, &s, &two_tries).unwrap_err();
    assert!(matches!(err, Error::NotPositiveDefinite { tries: 2, percdamp } if (percdamp - 0.1).abs() < 1e-12));
}

#[test]
fn same_bits_on_every_run_and_thread_count() {
    let (rows, cols) = (64, 300);
    let w = weights(rows, cols, 0.02, 14);
    let x = inputs(700, cols, &[2, 299], 30.0, 15);
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    for s in [spec(3, Some(64), Axis::Oc, Zero::Gptq), spec(3, Some(64), Axis::Ic, Zero::Awq)] {
        let run = || gptq(&w, rows, cols, &hessian(&x, cols), &s, &opts(true, false)).unwrap();
        let one = pool(1).install(run);
        for other in [pool(2).install(run), run()] {
            assert_eq!(other.quantized, one.quantized, "{:?}", s.axis);
            assert_eq!(other.loss.to_bits(), one.loss.to_bits());
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (rows, cols) = (4, 8);
    let mut w = weights(rows, cols, 0.02, 16);
    let h = identity(cols);
    let s = spec(4, Some(4), Axis::Oc, Zero::Gptq);
    let bad = |o: GptqOptions| gptq(&w, rows, cols, &h, &s, &o);
    assert!(matches!(bad(GptqOptions { blocksize: 0, ..GptqOptions::default() }), Err(Error::Invalid(_))));
    assert!(matches!(bad(GptqOptions { percdamp: f64::NAN, ..GptqOptions::default() }), Err(Error::Invalid(_))));
    assert!(matches!(bad(GptqOptions { percdamp: -0.1, ..GptqOptions::default() }), Err(Error::Invalid(_))));
    assert!(matches!(gptq(&w, rows, cols, &identity(7), &s, &GptqOptions::default()), Err(Error::Shape { .. })));
    let s5 = QuantSpec { bits: 5, ..s };
    assert_eq!(gptq(&w, rows, cols, &h, &s5, &GptqOptions::default()), Err(Error::Bits { bits: 5 }));
    w[3 * cols + 2] = f32::NAN;
    let nan = gptq(&w, rows, cols, &h, &s, &GptqOptions::default());
    assert!(matches!(nan, Err(Error::NonFiniteWeight { row: 3, col: 2, .. })));
}
