//! `y = W' x` with the activations kept in f32: the exact product up to round-off, for every
//! width and both axes (the fallback of the integer matvecs, and `ActBits::F32`).
//!
//! Where the time goes: a matvec reads every packed weight once and does one multiply-add
//! per weight, so it is bound by memory bandwidth once the matrix is larger than the caches;
//! the work is to decode codes as fast as they arrive. Eight `b`-bit codes are exactly `b`
//! bytes ([`crate::bits`]): one unaligned 32-bit load (64-bit for b = 8), eight shifts and
//! masks, a conversion and a multiply-add under AVX2. The AVX2+FMA kernel ([`dot_codes_avx2`],
//! 2 and 4 bits) and the portable loop ([`dot_codes`]) sit side by side (planar 3-bit rows are
//! unpacked to a byte per code first and multiplied as 8-bit codes); [`matvec_ref`] is the
//! plain definition, in f64, that the tests hold both to.

use adadim_quantize::Axis;

use crate::bits;
use crate::format::PackedLinear;
#[cfg(target_arch = "x86_64")]
use crate::simd::hsum;
use crate::simd::simd_available;

/// `sum_j code(c0 + j) * v[j]` over a packed row of `B`-bit codes (`c0 % 8 == 0` for the fast path).
#[inline(always)]
fn dot_codes<const B: usize>(row: &[u8], c0: usize, v: &[f32]) -> f32 {
    if !c0.is_multiple_of(8) {
        return v.iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + j, B as u8)) * x).sum();
    }
    let mask = ((1u64 << B) - 1) as u32;
    let base = c0 / 8 * B;
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for (i, x) in chunks.enumerate() {
        let at = base + i * B;
        let mut q = [0u32; 8];
        if B <= 4 {
            // Eight codes in the low 8B <= 32 bits of one word.
            let w = u32::from_le_bytes(row[at..at + 4].try_into().expect("4 bytes"));
            for (l, q) in q.iter_mut().enumerate() {
                *q = (w >> (l * B)) & mask;
            }
        } else {
            let w = u64::from_le_bytes(row[at..at + 8].try_into().expect("8 bytes"));
            for (l, q) in q.iter_mut().enumerate() {
                *q = (w >> (l * B)) as u32 & mask;
            }
        }
        for l in 0..8 {
            acc[l] += q[l] as f32 * x[l];
        }
    }
    let n = v.len() - tail.len();
    let tail_sum: f32 = tail.iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + n + j, B as u8)) * x).sum();
    // Pairwise lane sum, fixed order.
    let s4 = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail_sum
}

/// AVX2: `sum_j code(8 i0 + j) * v[j]` over `n8` whole chunks of eight codes, as 8 lane sums.
/// Per chunk: one 4-byte load, a broadcast, a variable shift, a mask, a conversion and an FMA;
/// two accumulators hide the FMA latency.
///
/// # Safety
/// AVX2 and FMA; `rp` points at the chunk's first byte with at least `(n8 - 1) B + 4` bytes
/// readable behind it (the buffer's padding covers the last load), `vp` at `8 n8` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunks_avx2<const B: usize>(rp: *const u8, vp: *const f32, n8: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let b = B as i32;
    let shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
    let mask = _mm256_set1_epi32((1 << B) - 1);
    let decode = |i: usize| {
        crate::simd::prefetch(rp.add(i * B));
        let w = _mm256_set1_epi32((rp.add(i * B) as *const i32).read_unaligned());
        _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), mask))
    };
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 2 <= n8 {
        a0 = _mm256_fmadd_ps(decode(i), _mm256_loadu_ps(vp.add(i * 8)), a0);
        a1 = _mm256_fmadd_ps(decode(i + 1), _mm256_loadu_ps(vp.add(i * 8 + 8)), a1);
        i += 2;
    }
    if i < n8 {
        a0 = _mm256_fmadd_ps(decode(i), _mm256_loadu_ps(vp.add(i * 8)), a0);
    }
    _mm256_add_ps(a0, a1)
}

/// [`dot_codes`] with AVX2 (per-IC rows: one long dot product).
///
/// # Safety
/// AVX2 and FMA; `row` extends [`bits::PAD`] bytes past its codes or to the buffer's end-padding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_codes_avx2<const B: usize>(row: &[u8], c0: usize, v: &[f32]) -> f32 {
    if !c0.is_multiple_of(8) || B == 8 {
        return dot_codes::<B>(row, c0, v);
    }
    let n8 = v.len() / 8;
    let base = c0 / 8 * B;
    assert!(n8 == 0 || base + (n8 - 1) * B + 4 <= row.len(), "packed row too short for its codes");
    let n = n8 * 8;
    hsum(chunks_avx2::<B>(row.as_ptr().add(base), v.as_ptr(), n8))
        + v[n..].iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + n + j, B as u8)) * x).sum::<f32>()
}

/// One per-OC row with AVX2: `sum_k s[k] (sum_{c in k} code[c] x[c] - z[k] xsum[k])`, the group
/// sums kept in a vector register (scaled by `s[k]` with one FMA) and reduced once per row.
///
/// # Safety
/// As [`dot_codes_avx2`]; `s`, `z`, `xsum` have one entry per group of `group` columns of `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn oc_row_avx2<const B: usize>(row: &[u8], x: &[f32], s: &[f32], z: &[f32], xsum: &[f32], group: usize) -> f32 {
    use std::arch::x86_64::*;
    let cols = x.len();
    if !group.is_multiple_of(8) || B == 8 {
        return (0..s.len())
            .map(|k| {
                let c0 = k * group;
                s[k] * (dot_codes::<B>(row, c0, &x[c0..(c0 + group).min(cols)]) - z[k] * xsum[k])
            })
            .sum();
    }
    assert!(cols < 8 || (cols / 8 - 1) * B + 4 <= row.len(), "packed row too short for its codes");
    let (mut acc, mut scalar) = (_mm256_setzero_ps(), 0f32);
    for k in 0..s.len() {
        let c0 = k * group;
        let len = group.min(cols - c0);
        let n8 = len / 8;
        let d = chunks_avx2::<B>(row.as_ptr().add(c0 / 8 * B), x.as_ptr().add(c0), n8);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s[k]), d, acc);
        let tail: f32 = (n8 * 8..len).map(|j| f32::from(bits::get(row, c0 + j, B as u8)) * x[c0 + j]).sum();
        scalar += s[k] * (tail - z[k] * xsum[k]);
    }
    hsum(acc) + scalar
}

/// `dot_codes` for the layout's width (2, 4 or 8: 3-bit rows arrive unpacked to bytes), with the
/// AVX2 kernel when `simd` (checked by the caller).
#[inline(always)]
fn dot(bits: u8, row: &[u8], c0: usize, v: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and FMA were detected; rows are sliced with
        // the buffer's padding behind them (`rows_body`).
        return unsafe {
            match bits {
                2 => dot_codes_avx2::<2>(row, c0, v),
                4 => dot_codes_avx2::<4>(row, c0, v),
                _ => dot_codes::<8>(row, c0, v),
            }
        };
    }
    let _ = simd;
    match bits {
        2 => dot_codes::<2>(row, c0, v),
        4 => dot_codes::<4>(row, c0, v),
        _ => dot_codes::<8>(row, c0, v),
    }
}

/// What every row needs from `x`, computed once per call.
enum Prepared {
    /// per-OC: `x` (gathered by `perm` if any) and its sum over each group.
    Oc { x: Vec<f32>, xsum: Vec<f32> },
    /// per-IC: `v[kr][c] = s[kr, c] x[c]` and `bias[kr] = sum_c z[kr, c] v[kr][c]`.
    Ic { v: Vec<f32>, bias: Vec<f32> },
}

fn prepare(p: &PackedLinear, x: &[f32]) -> Prepared {
    let (cols, l) = (p.cols, p.layout);
    match l.axis {
        Axis::Oc => {
            let x = p.stored_order(x).into_owned();
            let xsum = x.chunks(l.group).map(|g| g.iter().sum()).collect();
            Prepared::Oc { x, xsum }
        }
        Axis::Ic => {
            let pr = p.rows.div_ceil(l.group);
            let mut v = vec![0f32; pr * cols];
            let mut bias = vec![0f32; pr];
            for kr in 0..pr {
                let (s, z) = (&p.scales[kr * cols..(kr + 1) * cols], &p.zeros[kr * cols..(kr + 1) * cols]);
                let vk = &mut v[kr * cols..(kr + 1) * cols];
                let mut b = 0f32;
                for c in 0..cols {
                    vk[c] = s[c] * x[c];
                    b += z[c] * vk[c];
                }
                bias[kr] = b;
            }
            Prepared::Ic { v, bias }
        }
    }
}

/// One per-OC row, `sum_k s[k] (dot_k - z[k] xsum[k])`, with the AVX2 kernel when `simd`.
#[allow(clippy::too_many_arguments)]
fn oc_row(bits: u8, row: &[u8], x: &[f32], s: &[f32], z: &[f32], xsum: &[f32], group: usize, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when AVX2 and FMA were detected; `row` carries the padding.
        return unsafe {
            match bits {
                2 => oc_row_avx2::<2>(row, x, s, z, xsum, group),
                4 => oc_row_avx2::<4>(row, x, s, z, xsum, group),
                _ => oc_row_avx2::<8>(row, x, s, z, xsum, group),
            }
        };
    }
    let cols = x.len();
    (0..s.len())
        .map(|k| {
            let c0 = k * group;
            s[k] * (dot(bits, row, c0, &x[c0..(c0 + group).min(cols)], false) - z[k] * xsum[k])
        })
        .sum()
}

/// Rows `r0..r0 + y.len()` of `W' x`, with the AVX2 kernels when `simd`.
fn rows_body(p: &PackedLinear, prep: &Prepared, r0: usize, y: &mut [f32], simd: bool) {
    let (cols, l) = (p.cols, p.layout);
    let rb = bits::row_bytes(cols, l.bits);
    // Planar 3-bit rows are unpacked to one byte per code (and multiplied as 8-bit codes): this
    // kernel reads codes in their natural order.
    let mut unpacked = if l.bits == 3 { vec![0u8; cols + bits::PAD] } else { Vec::new() };
    let width = if l.bits == 3 { 8 } else { l.bits };
    for (i, y) in y.iter_mut().enumerate() {
        let r = r0 + i;
        // The row and the bytes after it up to the buffer's end-padding: the last chunk's load
        // may reach a few bytes past the row (masked away).
        let mut row = &p.codes[r * rb..((r + 1) * rb + bits::PAD).min(p.codes.len())];
        if l.bits == 3 {
            bits::unpack_row(row, cols, 3, &mut unpacked);
            row = &unpacked;
        }
        let l = crate::format::Layout { bits: width, ..l };
        *y = match prep {
            Prepared::Oc { x, xsum } => {
                let pc = xsum.len();
                oc_row(
                    l.bits,
                    row,
                    x,
                    &p.scales[r * pc..(r + 1) * pc],
                    &p.zeros[r * pc..(r + 1) * pc],
                    xsum,
                    l.group,
                    simd,
                )
            }
            Prepared::Ic { v, bias } => {
                let kr = r / l.group;
                dot(l.bits, row, 0, &v[kr * cols..(kr + 1) * cols], simd) - bias[kr]
            }
        };
    }
}

/// `y = W' x` with `x` kept in f32 (codes converted to floats; the AVX2 kernel when the CPU
/// has it): the exact product up to f32 round-off.
pub(crate) fn matvec(p: &PackedLinear, x: &[f32], y: &mut [f32]) {
    let prep = prepare(p, x);
    let simd = simd_available();
    // On the decode team when there is one, as the integer kernels.
    adadim_team::rows(y, &|r0, y| rows_body(p, &prep, r0, y, simd));
}

/// One thread, no SIMD: the portable loop (for tests of the SIMD one).
pub(crate) fn matvec_portable(p: &PackedLinear, x: &[f32], y: &mut [f32]) {
    let prep = prepare(p, x);
    rows_body(p, &prep, 0, y, false);
}

/// The definition: `y[r] = sum_c W'[r, c] x[c]` with `W'` from [`PackedLinear::dequantize`],
/// accumulated in f64. Also returns `sum_c |W'[r, c] x[c]|` per row, the scale of the round-off.
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let w = p.dequantize();
    w.chunks(p.cols)
        .map(|row| {
            row.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| {
                (s + f64::from(w) * f64::from(x), a + (f64::from(w) * f64::from(x)).abs())
            })
        })
        .unzip()
}
