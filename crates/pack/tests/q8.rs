//! The int8-activation 2-, 3-, 4- and 8-bit matvec ([`adadim_pack::matvec_i8`]) against its f64 definition on the same
//! rounded activations, and against the exact product within the rounding's bound, on seeded
//! matrices of both axes, ragged shapes and act-order permutations.

use adadim_load::synth::Rng;
use adadim_pack::matvec_f32::matvec_ref;
use adadim_pack::matvec_i8::{self as q8, Q8};
use adadim_pack::PackedLinear;
use adadim_quantize::{rtn, Axis, QuantSpec, QuantizedMatrix, Zero};

mod common;
use common::{act_order_gptq, weights};

/// Returns whether the int8 kernel ran.
fn check(q: &QuantizedMatrix, rng: &mut Rng, what: &str) -> bool {
    let p = PackedLinear::from_quantized(q);
    let mut x = rng.normals(q.cols(), 1.0);
    x[q.cols() / 2] = 40.0; // an activation outlier sets its block's step
    let (exact, scale) = matvec_ref(&p, &x);
    let (want, bound) = q8::matvec_ref(&p, &x);
    let mut y = vec![0f32; q.rows()];
    p.matvec(adadim_pack::ActBits::I8, &x, &mut y);
    let ran = q8::supported(&p)
        && cfg!(target_arch = "x86_64")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma");
    for r in 0..q.rows() {
        // f32 sums of int32 partial products: round-off ~ cols * eps of the product's scale, or
        // of the zero-point term taken from the codes' sum where the two nearly cancel (a row
        // whose weights mostly sit at its zero point, as 2-bit ones do).
        let zero_term: f64 = (0..q.cols())
            .map(|c| {
                let g = q.params(r, c);
                f64::from(g.scale * g.zero * x[c]).abs()
            })
            .sum();
        let tol = 1e-6 * (q.cols() as f64).sqrt() * (15.0 * scale[r]).max(zero_term).max(1e-30);
        assert!(
            (want[r] - exact[r]).abs() <= bound[r] * (1.0 + 1e-9) + 1e-12 * scale[r],
            "{what} row {r}: int8 rounding moved the product by {} > bound {}",
            (want[r] - exact[r]).abs(),
            bound[r]
        );
        let got = f64::from(y[r]);
        if ran {
            assert!(
                (got - want[r]).abs() <= tol,
                "{what} row {r}: kernel {got} vs its definition {} (tol {tol})",
                want[r]
            );
        }
        assert!(
            (got - exact[r]).abs() <= bound[r] + tol + 1e-5 * scale[r],
            "{what} row {r}: {got} vs exact {}",
            exact[r]
        );
    }
    ran
}

#[test]
fn int8_activations_round_to_half_a_step() {
    let mut rng = Rng::new(4);
    let mut x = rng.normals(150, 1.0);
    x[5] = 300.0;
    for v in &mut x[32..64] {
        *v = 0.0;
    }
    let q = Q8::new(&x);
    assert_eq!(q.d.len(), 5, "blocks of 32, the last one short");
    assert_eq!(q.d[1], 0.0);
    assert_eq!(q.d8.len(), 2 * 8, "two whole steps of 64");
    assert_eq!(&q.d8[..8], &[q.d[0], q.d[0], q.d[0], q.d[0], q.d[1], q.d[1], q.d[1], q.d[1]]);
    assert_eq!(q.swizzled[..4], [q.q[0], q.q[2], q.q[4], q.q[6]]);
    assert_eq!(q.swizzled[32..34], [q.q[1], q.q[3]]);
    for (i, &v) in x.iter().enumerate() {
        assert!((q.value(i) - v).abs() <= q.d[i / 32] / 2.0 * (1.0 + 1e-6), "value {i}: {} vs {v}", q.value(i));
    }
    assert!((q.d[0] - 300.0 / 127.0).abs() < 1e-6);
    // The per-IC form (s * x rounded in one pass, and its zero-point sum) is the same rounding.
    let (sc, z) = (rng.normals(150, 0.1), (0..150).map(|i| (i % 16) as f32).collect::<Vec<_>>());
    let (v, bias) = Q8::scaled(&sc, &x, &z);
    assert_eq!(v, Q8::new(&sc.iter().zip(&x).map(|(s, x)| s * x).collect::<Vec<_>>()));
    let want: f64 = (0..150).map(|c| f64::from(z[c]) * f64::from(v.value(c))).sum();
    assert!((f64::from(bias) - want).abs() <= 1e-5 * want.abs().max(1.0), "bias {bias} vs {want}");
    x[70] = f32::NAN;
    let q = Q8::new(&x);
    assert!(q.d[2].is_nan() && q.d[0].is_finite(), "a NaN poisons its own block only");
}

#[test]
fn per_ic_preparation_with_avx2_rounds_as_the_definition() {
    let mut rng = Rng::new(5);
    // One value reused for every length, as the per-IC matvec reuses its row-group slots:
    // whatever the last call left in it must not show.
    let mut reused = Q8::default();
    // Whole steps, a whole block past the last step, a short last block, one short block, and
    // longer again.
    for n in [64 * 6, 64 * 3 + 32, 64 * 2 + 45, 20, 64 * 7 + 32] {
        let (s, mut x) = (rng.normals(n, 0.1), rng.normals(n, 1.0));
        x[n / 3] = 500.0;
        let z: Vec<f32> = (0..n).map(|i| (i % 16) as f32).collect();
        let (fast, fb) = Q8::scaled(&s, &x, &z);
        let (want, wb) = Q8::scaled_ref(&s, &x, &z);
        assert_eq!(fast, want, "n {n}: rounded values, steps and kernel order");
        // The per-OC rounding of x alone, by the same AVX2 loop without scales.
        assert_eq!(Q8::new(&x), Q8::new_ref(&x), "n {n}: x alone");
        assert!((fb - wb).abs() <= 1e-5 * wb.abs().max(1.0), "n {n}: zero-point sum {fb} vs {wb}");
        assert_eq!((&reused.scaled_into(&s, &x, &z), &reused), (&fb, &fast), "n {n}: into a used value");
        if n > 100 {
            x[70] = f32::NAN;
            let ((fast, fb), (want, wb)) = (Q8::scaled(&s, &x, &z), Q8::scaled_ref(&s, &x, &z));
            assert!(
                fast.d[2].is_nan() && want.d[2].is_nan() && fb.is_nan() && wb.is_nan(),
                "n {n}: a NaN poisons its block and the sum"
            );
            assert_eq!((&fast.q, &fast.swizzled), (&want.q, &want.swizzled));
            let (fast, want) = (Q8::new(&x), Q8::new_ref(&x));
            assert!(fast.d[2].is_nan() && want.d[2].is_nan(), "n {n}: x alone, NaN block");
            assert_eq!((&fast.q, &fast.swizzled), (&want.q, &want.swizzled), "n {n}: x alone, NaN block");
        }
    }
}

#[test]
fn rtn_matrices_multiply_on_int8_activations() {
    let mut rng = Rng::new(11);
    let mut ran = 0;
    let mut cases = 0;
    // 2 bits last: the earlier cases draw the weights they drew before it was added.
    for bits in [4, 3, 2] {
        for axis in [Axis::Oc, Axis::Ic] {
            for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
                // SmolLM2 shapes (ragged g128 on 576 and 192 rows), 200 columns (3 whole steps
                // and a tail of 8), groups of three steps (192: the scale changes inside a pair
                // of steps), a group per-OC cannot use (32: falls back), whole channels.
                for (rows, cols, group) in [
                    (192, 576, Some(128)),
                    (1536, 576, Some(128)),
                    (67, 200, Some(64)),
                    (20, 640, Some(192)),
                    (40, 96, Some(32)),
                    (33, 128, None),
                ] {
                    let spec = QuantSpec { bits, group, axis, zero };
                    let w = weights(&mut rng, rows, cols);
                    let q = rtn(&w, rows, cols, &spec).unwrap();
                    ran += usize::from(check(&q, &mut rng, &format!("rtn {rows}x{cols} {spec:?}")));
                    cases += 1;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // 4, 3 and 2 bits; per-IC: all 6 shapes; per-OC: all but group 32; 4 zero styles each.
        assert_eq!(ran, 3 * (6 + 5) * 4, "of {cases} cases, those that ran the int8 kernel");
    }
}

#[test]
fn eight_bit_codes_multiply_on_int8_activations() {
    // The decode head's layout (8-bit RTN per-OC, g128): codes 0..=255 centred to int8.
    let mut rng = Rng::new(14);
    let mut ran = 0;
    for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
        for (rows, cols, group) in [(300, 576, Some(128)), (17, 96, Some(32)), (9, 64, None)] {
            let spec = QuantSpec { bits: 8, group, axis: Axis::Oc, zero };
            let w = weights(&mut rng, rows, cols);
            let q = rtn(&w, rows, cols, &spec).unwrap();
            ran += usize::from(check(&q, &mut rng, &format!("rtn {rows}x{cols} {spec:?}")));
        }
    }
    // Groups of whole steps with a last short group and a tail of 32 codes past the last step,
    // and rows too long for four at a time (VNNI's 8-bit loop, one row and four).
    for zero in [Zero::Awq, Zero::Sym] {
        for (rows, cols, group) in [(11, 160, Some(64)), (6, 1536, Some(128))] {
            let spec = QuantSpec { bits: 8, group, axis: Axis::Oc, zero };
            let w = weights(&mut rng, rows, cols);
            let q = rtn(&w, rows, cols, &spec).unwrap();
            ran += usize::from(check(&q, &mut rng, &format!("rtn {rows}x{cols} {spec:?}")));
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert_eq!(ran, 16, "cases that ran the int8 kernel");
    }
    // A width of columns that is not whole blocks, and per-IC 8-bit, keep the int16 kernel.
    for (cols, axis) in [(100, Axis::Oc), (128, Axis::Ic)] {
        let q =
            rtn(&weights(&mut rng, 8, cols), 8, cols, &QuantSpec { bits: 8, group: Some(32), axis, zero: Zero::Awq })
                .unwrap();
        assert!(!q8::supported(&PackedLinear::from_quantized(&q)), "{cols} columns {axis:?}");
    }
}

#[test]
fn act_order_gptq_on_int8_activations() {
    let mut rng = Rng::new(12);
    let q = act_order_gptq(&mut rng, 48, 256, 4, 64, false);
    assert!(PackedLinear::from_quantized(&q).permuted());
    check(&q, &mut rng, "gptq act-order");
}

#[test]
fn other_layouts_fall_back_to_the_int16_kernel() {
    let mut rng = Rng::new(13);
    let w = weights(&mut rng, 64, 256);
    let q = rtn(&w, 64, 256, &QuantSpec { bits: 8, group: Some(128), axis: Axis::Ic, zero: Zero::Awq }).unwrap();
    let p = PackedLinear::from_quantized(&q);
    assert!(!q8::supported(&p));
    let x = rng.normals(256, 1.0);
    let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
    p.matvec(adadim_pack::ActBits::I8, &x, &mut a);
    p.matvec(adadim_pack::ActBits::I16, &x, &mut b);
    assert_eq!(a, b);
}
