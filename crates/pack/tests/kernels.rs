//! Packed matrices against the quantizer and the matvec kernels against their f64 definition,
//! on seeded matrices of every width, both axes, ragged shapes and act-order permutations.

use adadim_load::synth::Rng;
use adadim_pack::matvec_f32::matvec_ref;
use adadim_pack::matvec_i16 as q16;
use adadim_pack::round_i16::Q16;
use adadim_pack::{Layout, PackedLinear};
use adadim_quantize::{rtn, Axis, QuantSpec, QuantizedMatrix, Zero};

mod common;
use common::{act_order_gptq, weights};

fn cases() -> Vec<(usize, usize, QuantSpec)> {
    let mut out = Vec::new();
    for bits in [2u8, 3, 4, 8] {
        for axis in [Axis::Oc, Axis::Ic] {
            for zero in [Zero::Awq, Zero::Gptq, Zero::Sym, Zero::Float] {
                // SmolLM2 shapes (ragged g128 on 576 and 192), a width that is no multiple of
                // 8, a group that is no multiple of 8, whole channels, groups of 32 with a
                // 48-code tail across two of them (3-bit: after one planar chunk), groups of
                // several int16 blocks (256: two of 128; 192: three of 64), the last one short.
                for (rows, cols, group) in [
                    (192, 576, Some(128)),
                    (67, 45, Some(16)),
                    (40, 96, Some(12)),
                    (33, 64, None),
                    (24, 112, Some(32)),
                    (20, 640, Some(256)),
                    (20, 640, Some(192)),
                ] {
                    out.push((rows, cols, QuantSpec { bits, group, axis, zero }));
                }
            }
        }
    }
    // Groups of 64 and 32 (per-OC: one int16 block a step or two, four rows at a time), after
    // the rest so that the earlier cases draw the same weights as before.
    for bits in [2u8, 3, 4, 8] {
        for axis in [Axis::Oc, Axis::Ic] {
            for (rows, cols, group) in [(22, 576, 64), (9, 1536, 64), (22, 576, 32), (9, 608, 32), (9, 1536, 32)] {
                out.push((rows, cols, QuantSpec { bits, group: Some(group), axis, zero: Zero::Awq }));
            }
        }
    }
    out
}

/// Returns whether the dispatched matvec took the int16 path.
fn check(q: &QuantizedMatrix, rng: &mut Rng, what: &str) -> bool {
    let p = PackedLinear::from_quantized(q);
    assert_eq!(p.dequantize(), q.dequantize(), "{what}: packed -> dequantized differs from the quantizer's W'");
    let x = rng.normals(q.cols(), 1.0);
    let (want, scale) = matvec_ref(&p, &x);
    let mut y = vec![0f32; q.rows()];
    let mut y1 = vec![0f32; q.rows()];
    p.matvec(adadim_pack::ActBits::F32, &x, &mut y);
    p.matvec_portable(&x, &mut y1);
    for r in 0..q.rows() {
        // f32 sums over `cols` terms of the codes (not of W'), with a zero point folded out:
        // round-off grows with cols and with maxq.
        let tol = 1e-6 * (q.cols() as f64).sqrt() * f64::from(q.spec().maxq()) * scale[r].max(1e-30);
        for (name, got) in [("dispatched", y[r]), ("portable", y1[r])] {
            assert!((f64::from(got) - want[r]).abs() <= tol, "{what} {name} row {r}: {got} vs {} (tol {tol})", want[r]);
        }
    }
    // The dispatched kernel (int16 activations where the layout allows) against its own
    // definition on the same rounded activations, and against the exact product within the
    // bound the rounding allows.
    p.matvec(adadim_pack::ActBits::I16, &x, &mut y);
    let (want16, bound) =
        if p.matvec_rounds_activations() { q16::matvec_ref(&p, &x) } else { (want.clone(), vec![0.0; q.rows()]) };
    for r in 0..q.rows() {
        let tol = 1e-6 * (q.cols() as f64).sqrt() * f64::from(q.spec().maxq()) * scale[r].max(1e-30);
        let got = f64::from(y[r]);
        assert!(
            (want16[r] - want[r]).abs() <= bound[r] * (1.0 + 1e-9) + 1e-12 * scale[r],
            "{what} row {r}: rounded activations moved the product by {} > bound {}",
            (want16[r] - want[r]).abs(),
            bound[r]
        );
        assert!(
            (got - want16[r]).abs() <= tol,
            "{what} dispatched row {r}: {got} vs {} on rounded activations (tol {tol})",
            want16[r]
        );
        assert!((got - want[r]).abs() <= bound[r] + tol, "{what} dispatched row {r}: {got} vs exact {}", want[r]);
    }
    p.matvec_rounds_activations()
}

#[test]
fn int16_activations_round_to_half_a_step() {
    let mut rng = Rng::new(4);
    let mut x = rng.normals(100, 1.0);
    x[5] = 300.0; // an outlier sets its block's step
    for v in &mut x[32..64] {
        *v = 0.0; // an all-zero block
    }
    let q = Q16::new(&x, 32);
    assert_eq!(q.d.len(), 4, "blocks of 32, the last one short");
    assert_eq!(q.d[1], 0.0);
    for (i, &v) in x.iter().enumerate() {
        assert!((q.value(i) - v).abs() <= q.d[i / 32] / 2.0 * (1.0 + 1e-6), "value {i}: {} vs {v}", q.value(i));
    }
    assert!((q.d[0] - 300.0 / 32767.0).abs() < 1e-9);
    x[70] = f32::NAN;
    let q = Q16::new(&x, 32);
    assert!(q.d[2].is_nan() && q.d[0].is_finite(), "a NaN poisons its own block only");
}

#[test]
fn per_ic_preparation_with_avx2_rounds_as_the_definition() {
    let mut rng = Rng::new(9);
    // Reused for every case, as the per-IC matvec reuses its slots (nothing left over may show).
    let mut reused = Q16::default();
    // Whole blocks of 128, a short last block, a short last step, shorter than one block, and
    // longer again.
    for n in [128 * 5, 128 * 3 + 40, 128 + 17, 100, 32, 128 * 6 + 64] {
        for split in [false, true] {
            let (s, mut x) = (rng.normals(n, 0.1), rng.normals(n, 1.0));
            x[n / 2] = 500.0;
            let z: Vec<f32> = (0..n).map(|i| (i % 16) as f32).collect();
            if n > 300 {
                x[200] = f32::INFINITY; // poisons block 1 only
            }
            let (fast, fb) = Q16::scaled(&s, &x, &z, 128, split);
            let (want, wb) = Q16::scaled_ref(&s, &x, &z, 128, split);
            // Bit for bit (a poisoned block's step and the sum are NaN).
            let bits = |b: f32, q: &Q16| {
                (
                    b.to_bits(),
                    q.d.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
                    q.q.clone(),
                    q.hi.clone(),
                    q.lo.clone(),
                    q.block,
                )
            };
            let b = reused.scaled_into(&s, &x, &z, 128, split);
            assert_eq!(bits(b, &reused), bits(fb, &fast), "n {n} split {split}: into a used value");
            // The per-OC rounding of x alone (the same AVX2 loop without scales) as the definition.
            let plain = Q16::new(&x, 128);
            let plain = if split { plain.split_ref() } else { plain };
            assert_eq!(bits(0.0, &Q16::rounded(&x, 128, split)), bits(0.0, &plain), "n {n} split {split}: x alone");
            assert_eq!(fast.q, want.q, "n {n}: rounded values");
            assert_eq!((&fast.hi, &fast.lo), (&want.hi, &want.lo), "n {n} split {split}");
            if split {
                // The split's definition: q = 256 hi + lo, each step of 64 as its evens then odds.
                assert_eq!(want.hi.len(), n / 64 * 64);
                for (c, &q) in want.q[..want.hi.len()].iter().enumerate() {
                    let at = c / 64 * 64 + (c % 2) * 32 + (c % 64) / 2;
                    assert_eq!(256 * i32::from(want.hi[at]) + i32::from(want.lo[at]), i32::from(q), "n {n} value {c}");
                }
                // And the per-OC split (from rounded values in memory) as the definition.
                let (a, b) = (Q16::new(&x, 64).split(), Q16::new(&x, 64).split_ref());
                assert_eq!((a.hi, a.lo), (b.hi, b.lo), "n {n}");
            }
            assert_eq!(fast.d.len(), want.d.len());
            for (a, b) in fast.d.iter().zip(&want.d) {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "n {n}: step {a} vs {b}");
            }
            if n > 300 {
                assert!(fb.is_nan() && wb.is_nan(), "a non-finite activation poisons the zero-point sum");
            } else {
                assert!((fb - wb).abs() <= 1e-5 * wb.abs().max(1.0), "n {n}: zero-point sum {fb} vs {wb}");
            }
        }
    }
}

#[test]
fn rtn_matrices_round_trip_and_multiply() {
    let mut rng = Rng::new(1);
    let mut int16 = 0;
    for (rows, cols, spec) in cases() {
        let w = weights(&mut rng, rows, cols);
        let q = rtn(&w, rows, cols, &spec).unwrap();
        int16 += usize::from(check(&q, &mut rng, &format!("rtn {rows}x{cols} {spec:?}")));
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // 2, 3, 4, 8 bits x (per-IC on all seven shapes + per-OC on the five with 32-multiple groups) x 4 zero
        // styles (float minima included), and the groups of 64 and 32 (both axes, five shapes).
        assert_eq!(int16, 4 * 12 * 4 + 4 * 2 * 5, "cases that ran the int16 kernel");
    }
}

#[test]
fn act_order_gptq_is_stored_permuted_and_still_exact() {
    let mut rng = Rng::new(2);
    for bits in [3u8, 4] {
        for static_groups in [false, true] {
            let q = act_order_gptq(&mut rng, 48, 200, bits, 32, static_groups);
            assert_eq!(q.g_idx().is_some(), !static_groups, "dynamic act-order groups have a g_idx");
            check(&q, &mut rng, &format!("gptq act-order w{bits} static {static_groups}"));
        }
    }
}

#[test]
fn bits_per_weight_follow_the_declaration() {
    let l = |bits, group, axis| Layout { bits, group, axis, min: false };
    // b + (16 + b) / g on whole groups; b + 32 / g with float minima (Q4_1: 5.0).
    let q4_1 = Layout { bits: 4, group: 32, axis: Axis::Oc, min: true };
    assert!((q4_1.bits_per_weight(576, 1536, false) - 5.0).abs() < 1e-12);
    assert!((l(4, 128, Axis::Oc).bits_per_weight(1536, 512, false) - (4.0 + 20.0 / 128.0)).abs() < 1e-12);
    assert!((l(3, 128, Axis::Ic).bits_per_weight(512, 1536, false) - (3.0 + 19.0 / 128.0)).abs() < 1e-12);
    assert!((l(2, 64, Axis::Oc).bits_per_weight(256, 4096, true) - (2.0 + 18.0 / 64.0 + 32.0 / 256.0)).abs() < 1e-12);
}

#[test]
fn matmul_equals_the_dequantized_gemm() {
    let mut rng = Rng::new(3);
    for (rows, cols, spec) in [
        (200, 96, QuantSpec { bits: 3, group: Some(32), axis: Axis::Ic, zero: Zero::Awq }),
        (130, 72, QuantSpec { bits: 4, group: Some(24), axis: Axis::Oc, zero: Zero::Gptq }),
        (64, 96, QuantSpec { bits: 4, group: Some(32), axis: Axis::Oc, zero: Zero::Float }),
        (96, 64, QuantSpec { bits: 3, group: Some(32), axis: Axis::Ic, zero: Zero::Float }),
    ] {
        let q = rtn(&weights(&mut rng, rows, cols), rows, cols, &spec).unwrap();
        let p = PackedLinear::from_quantized(&q);
        let w = q.dequantize();
        let t = 37;
        let x = rng.normals(t * cols, 1.0);
        let mut y = vec![0f32; t * rows];
        p.matmul(adadim_pack::ActBits::F32, &x, t, &mut y);
        for i in 0..t {
            for r in 0..rows {
                let (want, scale) = (0..cols).fold((0f64, 0f64), |(s, a), c| {
                    let v = f64::from(w[r * cols + c]) * f64::from(x[i * cols + c]);
                    (s + v, a + v.abs())
                });
                let got = f64::from(y[i * rows + r]);
                assert!((got - want).abs() <= 1e-5 * scale + 1e-30, "token {i} row {r}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn matvecs_on_a_decode_team_equal_those_on_rayon_bit_for_bit() {
    // Each row is computed the same way whoever computes it: the team only changes which
    // thread does which rows (and per-IC, when each group's activations are rounded).
    let mut rng = Rng::new(21);
    let mut shapes = cases();
    shapes.push((1536, 576, QuantSpec { bits: 4, group: Some(128), axis: Axis::Ic, zero: Zero::Awq }));
    shapes.push((300, 576, QuantSpec { bits: 8, group: Some(128), axis: Axis::Oc, zero: Zero::Awq }));
    for (rows, cols, spec) in shapes {
        let q = rtn(&weights(&mut rng, rows, cols), rows, cols, &spec).unwrap();
        let p = PackedLinear::from_quantized(&q);
        let x = rng.normals(cols, 1.0);
        for act in [adadim_pack::ActBits::I16, adadim_pack::ActBits::I8] {
            let mut alone = vec![0f32; rows];
            p.matvec(act, &x, &mut alone);
            let mut teamed = vec![0f32; rows];
            adadim_team::with_team(1, || {
                for _ in 0..3 {
                    p.matvec(act, &x, &mut teamed);
                }
            });
            assert_eq!(teamed, alone, "{rows}x{cols} {spec:?} {act:?}");
        }
    }
}

#[test]
fn batched_matvecs_give_each_token_its_own_matvec_bit_for_bit() {
    // A server's greedy answers may not depend on which other requests share a decode step:
    // every token of a batch gets exactly its matvec's numbers, on rayon and on a team, for
    // batches of 1 to 8 (the per-IC slots are reused across batch sizes, as from step to step).
    let mut rng = Rng::new(22);
    let mut shapes = cases();
    shapes.push((1536, 576, QuantSpec { bits: 4, group: Some(128), axis: Axis::Ic, zero: Zero::Awq }));
    for (rows, cols, spec) in shapes {
        let q = rtn(&weights(&mut rng, rows, cols), rows, cols, &spec).unwrap();
        let p = PackedLinear::from_quantized(&q);
        let x = rng.normals(8 * cols, 1.0);
        for act in [adadim_pack::ActBits::I16, adadim_pack::ActBits::I8, adadim_pack::ActBits::F32] {
            let mut alone = vec![0f32; 8 * rows];
            for (x, y) in x.chunks(cols).zip(alone.chunks_mut(rows)) {
                p.matvec(act, x, y);
            }
            for t in [1, 3, 8, 2, 5, 4] {
                let mut batched = vec![f32::NAN; t * rows];
                p.matvec_batch(act, &x[..t * cols], t, &mut batched);
                assert_eq!(batched, alone[..t * rows], "{rows}x{cols} {spec:?} {act:?} batch of {t}");
                let mut teamed = vec![f32::NAN; t * rows];
                adadim_team::with_team(1, || p.matvec_batch(act, &x[..t * cols], t, &mut teamed));
                assert_eq!(teamed, alone[..t * rows], "{rows}x{cols} {spec:?} {act:?} batch of {t} on a team");
            }
        }
    }
}

#[test]
fn integer_sums_hold_at_their_largest() {
    // Every code at its largest against activations at the ends of the int16 range (q = 32767:
    // hi 127, lo 255; q = -32767: hi -128, lo 1): the int16 sums of a block's two steps are
    // at their bounds, and must neither saturate nor wrap.
    let (rows, cols) = (6usize, 512usize);
    for bits in [3u8, 4] {
        for axis in [Axis::Oc, Axis::Ic] {
            let spec = QuantSpec { bits, group: Some(128), axis, zero: Zero::Awq };
            let params = if axis == Axis::Oc { rows * cols.div_ceil(128) } else { rows.div_ceil(128) * cols };
            let maxq = spec.maxq();
            let q = QuantizedMatrix::from_parts(
                rows,
                cols,
                spec,
                vec![maxq; rows * cols],
                vec![1.0; params],
                vec![0.0; params],
                None,
            )
            .unwrap();
            let p = PackedLinear::from_quantized(&q);
            for (name, x) in [
                ("all +1", vec![1f32; cols]),
                ("all -1", vec![-1f32; cols]),
                ("+1 -1", (0..cols).map(|c| if c % 2 == 0 { 1.0 } else { -1.0 }).collect()),
            ] {
                let want: f64 = x.iter().map(|&v| f64::from(maxq) * f64::from(v)).sum();
                for act in [adadim_pack::ActBits::I16, adadim_pack::ActBits::I8] {
                    let mut y = vec![0f32; rows];
                    p.matvec(act, &x, &mut y);
                    for (r, &got) in y.iter().enumerate() {
                        assert!(
                            (f64::from(got) - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "w{bits} {axis:?} {act:?} {name} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn integer_matmul_equals_the_decode_matvec_definition_token_by_token() {
    // Every case of the matvec tests, plus SmolLM2's and act-order shapes: token i of the integer
    // prefill product is the decode matvec's definition on x[i] (the same rounded activations,
    // f64) up to f32 round-off, and within the rounding bound of the exact product.
    use adadim_pack::{matmul_int as qgemm, ActBits};
    let mut rng = Rng::new(31);
    let mut shapes = cases();
    shapes.push((1536, 576, QuantSpec { bits: 4, group: Some(128), axis: Axis::Ic, zero: Zero::Awq }));
    shapes.push((576, 1536, QuantSpec { bits: 3, group: Some(128), axis: Axis::Oc, zero: Zero::Awq }));
    let mut integer = 0;
    let mut matrices: Vec<(QuantSpec, QuantizedMatrix)> = shapes
        .into_iter()
        .map(|(rows, cols, spec)| (spec, rtn(&weights(&mut rng, rows, cols), rows, cols, &spec).unwrap()))
        .collect();
    // Per-OC act-order GPTQ: columns stored permuted, the activations gathered to match.
    for bits in [3u8, 4] {
        let q = act_order_gptq(&mut rng, 48, 256, bits, 64, false);
        assert!(q.g_idx().is_some());
        matrices.push((*q.spec(), q));
    }
    for (spec, q) in matrices {
        let (rows, cols) = (q.rows(), q.cols());
        let p = PackedLinear::from_quantized(&q);
        // Two whole tiles and a short one.
        let t = 2 * qgemm::MR + 1;
        let mut x = rng.normals(t * cols, 1.0);
        x[cols + 3] = 40.0; // an outlier in token 1
        for act in [ActBits::I16, ActBits::I8] {
            let mut y = vec![f32::NAN; t * rows];
            p.matmul(act, &x, t, &mut y);
            let kind = qgemm::kind(&p, act);
            integer += usize::from(kind.is_some());
            for i in 0..t {
                let xi = &x[i * cols..(i + 1) * cols];
                let (exact, scale) = matvec_ref(&p, xi);
                let (want, bound) = match kind {
                    Some(ActBits::I16) => q16::matvec_ref(&p, xi),
                    Some(ActBits::I8) => adadim_pack::matvec_i8::matvec_ref(&p, xi),
                    None => (exact.clone(), vec![0.0; rows]),
                    Some(ActBits::F32) => unreachable!("the integer product's kind is I16 or I8"),
                };
                for r in 0..rows {
                    // The code and zero-point terms are each up to sum_c s maxq |x|, and cancel
                    // where an outlier activation meets a weight at its zero point: round-off
                    // goes with their size, not with the result's.
                    let terms: f64 = (0..cols)
                        .map(|c| {
                            f64::from(q.params(r, c).scale.abs()) * f64::from(spec.maxq()) * f64::from(xi[c].abs())
                        })
                        .sum();
                    let tol = 1e-6 * (cols as f64).sqrt() * (f64::from(spec.maxq()) * scale[r] + terms).max(1e-30);
                    let got = f64::from(y[i * rows + r]);
                    let what = format!(
                        "{rows}x{cols} {spec:?} permuted {} {act:?} as {kind:?} token {i} row {r}",
                        p.permuted()
                    );
                    assert!(
                        (got - want[r]).abs() <= tol,
                        "{what}: {got} vs {} on the rounded activations (tol {tol})",
                        want[r]
                    );
                    assert!((got - exact[r]).abs() <= bound[r] + tol, "{what}: {got} vs exact {}", exact[r]);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if adadim_pack::simd::avx512_vnni_available() {
        assert!(integer >= 100, "only {integer} cases ran the integer product");
    }
}
