//! The 4-, 3- and 2-bit (and 8-bit) decode matvec on 8-bit activations, as llama.cpp computes its
//! Q4 products: `x` rounded to int8 per block of 32 (a step `d = max|block| / 127` each), codes and activations
//! multiplied byte by byte with `vpmaddubsw`, one float multiply-add per 64 codes.
//!
//! Why: [`crate::matvec_i16`] widens every code to 16 bits and gets 16 products per `vpmaddwd`; here 32
//! bytes of codes (64 weights) are split into their low and high nibbles (`and`, `shift`, `and`)
//! and multiplied against 64 int8 activations by two `vpmaddubsw` (32 products each, pairs
//! summed to int16: at most 2 * 15 * 127, so nothing saturates), one `vpmaddwd` by ones sums
//! them to int32, and one conversion and multiply-add apply both blocks' steps (and per-OC the
//! group's scale). About half the instructions per weight of the int16 kernel.
//!
//! Activation order: a whole step of 64 codes reads byte `i` as codes `2i` (low nibble) and
//! `2i + 1` (high), so the activations are stored per step as the 32 even positions then the 32
//! odd ones ([`Q8::new`]); lanes 0-3 of the int32 sum then belong to the step's first block and
//! lanes 4-7 to its second, and the step's scale vector is `[d0 x4, d1 x4]`.
//!
//! 3-bit codes: a planar chunk of 64 ([`bits::chunk3_avx2`]: 24 bytes, two shifts and masks of
//! its low plane, two of its high plane, two `or`s) gives the same even and odd codes as a 4-bit
//! step's nibbles, and the rest of the step is the 4-bit one. 2-bit codes: a step's 16 bytes
//! widened to words and shifted ([`bits::step_codes_avx2`]) give them too.
//!
//! 8-bit codes (the decode head's layout, per-OC): centred to `code - 128`, which fits int8,
//! each block of 32 is one signed byte product (`vpsignb` moves the code's sign onto the
//! activation, `vpmaddubsw` multiplies by its magnitude), as llama.cpp multiplies Q8_0 blocks.
//!
//! What it costs in accuracy: every activation (per-OC: `x`; per-IC: `s[kr, c] x[c]`) moves by at
//! most half its block's step, `max|block| / 254`, as in llama.cpp's Q8_0; the int16 kernel
//! moves it 256 times less. Chosen by `ActBits::I8` ([`crate::PackedLinear::matvec`]); the tests hold the
//! AVX2 kernel to [`matvec_ref`] (the definition from the same rounded activations, in f64)
//! and the product to the exact one within the rounding bound [`matvec_ref`] also returns. The
//! row loop is [`crate::matvec_int`]'s.

use adadim_quantize::Axis;

use crate::bits;
use crate::format::PackedLinear;
use crate::matvec_int::{round_block, IntActs, Rounded};
#[cfg(target_arch = "x86_64")]
use crate::matvec_int::{rows_avx2, rows_avx512bw, rows_vnni, Job, Outs};
use crate::simd::ROWS4;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Ahead4, Wide, ZeroTail};

/// Codes per SIMD step (32 bytes of 4-bit codes).
pub const STEP: usize = 64;

/// Activations per int8 step size.
pub const BLOCK: usize = 32;

/// Largest int8 step count.
const QMAX: f32 = 127.0;

/// Activations rounded to int8 per block of [`BLOCK`]: value `i` is `q[i] * d[i / BLOCK]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Q8 {
    /// In natural order.
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    /// Whole steps in kernel order: per step of 64, the even positions, then the odd ones.
    pub swizzled: Vec<i8>,
    /// Per whole step, its two blocks' steps `[d0, d0, d0, d0, d1, d1, d1, d1]`.
    pub d8: Vec<f32>,
}

impl Q8 {
    /// Rounds `x` block by block (the last block may be short). A block holding a non-finite
    /// value gets a NaN step, so the product comes out NaN as it would in f32. With AVX2 where
    /// the CPU has it (the same values as [`Q8::new_ref`]): every per-OC matvec rounds its `x`
    /// before its rows start, on one thread, where plain Rust cost a small matrix's product
    /// much of its time.
    pub fn new(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::simd_available() {
            let mut v = Self::default();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { v.round_avx2(x, None) };
            return v;
        }
        Self::new_ref(x)
    }

    /// [`Q8::new`] in plain Rust: the definition the AVX2 version is tested against.
    pub fn new_ref(x: &[f32]) -> Self {
        let mut q = vec![0i8; x.len()];
        let d = x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)).map(|(x, q)| round_block(x, q, QMAX, |v| v as i8)).collect();
        Self::from_rounded(q, d)
    }

    /// `v = s * x` rounded (the per-IC activations of one row group), formed block by block in
    /// one pass without a buffer the size of `x`, and `sum_c z[c] v̂[c]`: with AVX2 where the
    /// CPU has it (the same values as [`Q8::scaled_ref`]; the sum in another order).
    pub fn scaled(s: &[f32], x: &[f32], z: &[f32]) -> (Self, f32) {
        let mut v = Self::default();
        let bias = v.scaled_into(s, x, z);
        (v, bias)
    }

    /// [`Q8::scaled`] into `self`, reusing its buffers (whatever they held is replaced).
    pub fn scaled_into(&mut self, s: &[f32], x: &[f32], z: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::simd_available() {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { self.round_avx2(x, Some((s, z))) };
        }
        let (v, bias) = Self::scaled_ref(s, x, z);
        *self = v;
        bias
    }

    /// [`Q8::scaled`] in plain Rust: the definition the AVX2 version is tested against.
    pub fn scaled_ref(s: &[f32], x: &[f32], z: &[f32]) -> (Self, f32) {
        let mut q = vec![0i8; x.len()];
        let mut d = Vec::with_capacity(x.len().div_ceil(BLOCK));
        let (mut v, mut bias) = ([0f32; BLOCK], 0f32);
        for (((s, x), z), qb) in s.chunks(BLOCK).zip(x.chunks(BLOCK)).zip(z.chunks(BLOCK)).zip(q.chunks_mut(BLOCK)) {
            let v = &mut v[..x.len()];
            for ((v, s), x) in v.iter_mut().zip(s).zip(x) {
                *v = s * x;
            }
            let db = round_block(v, qb, QMAX, |v| v as i8);
            bias += db * z.iter().zip(qb.iter()).map(|(z, &q)| z * f32::from(q)).sum::<f32>();
            d.push(db);
        }
        (Self::from_rounded(q, d), bias)
    }

    /// [`Q8::new`] (`sz = None`) or [`Q8::scaled`] (`sz = Some((s, z))`) with AVX2, into `self`:
    /// each whole block of 32 multiplied by its scales, rounded and packed to bytes in registers
    /// and stored both in natural order and, inside whole steps, in the kernel's (its 16 even
    /// positions, then its 16 odd ones); a short last block in plain Rust. Returns the
    /// zero-point sum (0 without `z`). Per-IC it runs per row group on every matvec (`rows /
    /// group` times `cols` values), and in plain Rust cost as much as a third of the product.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn round_avx2(&mut self, x: &[f32], sz: Option<(&[f32], &[f32])>) -> f32 {
        use std::arch::x86_64::*;
        let n = x.len();
        if let Some((s, z)) = sz {
            assert!(s.len() == n && z.len() == n, "scaled: {} scales and {} zeros for {n} values", s.len(), z.len());
        }
        let (blocks, steps) = (n / BLOCK, n / STEP);
        // Every element below is written again: only the lengths matter.
        let Q8 { q, d, swizzled, d8 } = self;
        q.resize(n, 0);
        swizzled.resize(steps * STEP, 0);
        d.resize(n.div_ceil(BLOCK), 0.0);
        d8.resize(steps * 8, 0.0);
        // sum_c z[c] d(c) q[c], lane by lane: per block sum_c z[c] q[c], then one multiply-add
        // by its step (one dependent FMA per block, not four).
        let mut zq = _mm256_setzero_ps();
        let (xp, qp, wp) = (x.as_ptr(), q.as_mut_ptr(), swizzled.as_mut_ptr());
        let (dp, d8p) = (d.as_mut_ptr(), d8.as_mut_ptr());
        // Bytes from two `packs` in natural order, then evens | odds within each 16-byte lane.
        let natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let even_odd = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
        );
        // Block b's rounded values (int32 lanes) and step, stored in both orders.
        let store = |b: usize, r: [__m256i; 4], db: f32| {
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])),
                natural,
            );
            _mm256_storeu_si256(qp.add(b * BLOCK) as *mut __m256i, bytes);
            if b / 2 < steps {
                // The step's block steps [d0 x4, d1 x4].
                _mm_storeu_ps(d8p.add(b * 4), _mm_set1_ps(db));
                // qwords: even bytes of positions 0-15, 16-31, then the odd ones.
                let eo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(bytes, even_odd));
                let w = wp.add((b / 2) * STEP + (b % 2) * (BLOCK / 2));
                _mm_storeu_si128(w as *mut __m128i, _mm256_castsi256_si128(eo));
                _mm_storeu_si128(w.add(STEP / 2) as *mut __m128i, _mm256_extracti128_si256::<1>(eo));
            }
        };
        for b in 0..blocks {
            let o = b * BLOCK;
            let xv = |i: usize| _mm256_loadu_ps(xp.add(o + 8 * i));
            let Some((s, z)) = sz else {
                let (r, db) = crate::matvec_int::round_block_avx2::<4>(&std::array::from_fn(xv), QMAX);
                dp.add(b).write(db);
                store(b, r, db);
                continue;
            };
            let (sp, zp) = (s.as_ptr(), z.as_ptr());
            // The scale and zero rows stream from memory (a row group's are read once per
            // matvec): ask for them ahead as the kernels ask for codes.
            for p in [sp.add(o) as *const u8, zp.add(o) as *const u8] {
                crate::simd::prefetch(p);
                crate::simd::prefetch(p.wrapping_add(64));
            }
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(sp.add(o + 8 * i)), xv(i)));
            let (r, db) = crate::matvec_int::round_block_avx2(&v, QMAX);
            let zr = |i: usize| _mm256_mul_ps(_mm256_loadu_ps(zp.add(o + 8 * i)), _mm256_cvtepi32_ps(r[i]));
            let zr01 = _mm256_fmadd_ps(_mm256_loadu_ps(zp.add(o + 8)), _mm256_cvtepi32_ps(r[1]), zr(0));
            let zr23 = _mm256_fmadd_ps(_mm256_loadu_ps(zp.add(o + 24)), _mm256_cvtepi32_ps(r[3]), zr(2));
            zq = _mm256_fmadd_ps(_mm256_add_ps(zr01, zr23), _mm256_set1_ps(db), zq);
            dp.add(b).write(db);
            store(b, r, db);
        }
        let mut bias = crate::simd::hsum(zq);
        if blocks * BLOCK < n {
            // The short last block (never inside a whole step).
            let o = blocks * BLOCK;
            let (tail, tb) = match sz {
                Some((s, z)) => Self::scaled_ref(&s[o..], &x[o..], &z[o..]),
                None => (Self::new_ref(&x[o..]), 0.0),
            };
            q[o..].copy_from_slice(&tail.q);
            d[blocks] = tail.d[0];
            bias += tb;
        }
        bias
    }

    /// Per whole step, its two blocks' steps `[d0 x4, d1 x4]`.
    fn steps8(d: &[f32], steps: usize) -> Vec<f32> {
        let mut d8 = vec![0f32; steps * 8];
        for (j, v) in d8.chunks_exact_mut(8).enumerate() {
            v[..4].fill(d[2 * j]);
            v[4..].fill(d[2 * j + 1]);
        }
        d8
    }

    /// The kernel's order of rounded values `q` with block steps `d`.
    fn from_rounded(q: Vec<i8>, d: Vec<f32>) -> Self {
        let steps = q.len() / STEP;
        let mut swizzled = vec![0i8; steps * STEP];
        for (w, q) in swizzled.chunks_exact_mut(STEP).zip(q.chunks_exact(STEP)) {
            let (even, odd) = w.split_at_mut(STEP / 2);
            for ((e, o), pair) in even.iter_mut().zip(odd).zip(q.chunks_exact(2)) {
                (*e, *o) = (pair[0], pair[1]);
            }
        }
        let d8 = Self::steps8(&d, steps);
        Q8 { q, d, swizzled, d8 }
    }

    /// Value `i` as rounded.
    pub fn value(&self, i: usize) -> f32 {
        f32::from(self.q[i]) * self.d[i / BLOCK]
    }
}

/// Whether the int8 kernel handles this layout: 2, 3 or 4 bits, per-IC, or per-OC groups of
/// whole steps; 8 bits per-OC in whole blocks.
pub fn supported(p: &PackedLinear) -> bool {
    let l = p.layout;
    match l.bits {
        2..=4 => l.axis == Axis::Ic || l.group.is_multiple_of(STEP),
        // The decode head (8-bit RTN, per-OC): whole blocks only.
        8 => l.axis == Axis::Oc && l.group.is_multiple_of(BLOCK) && p.cols.is_multiple_of(BLOCK),
        _ => false,
    }
}

impl Rounded for Q8 {
    fn value(&self, i: usize) -> f32 {
        Q8::value(self, i)
    }
    fn step(&self, i: usize) -> f32 {
        self.d[i / BLOCK]
    }
    fn block(&self) -> usize {
        BLOCK
    }
    #[inline]
    fn int_sum(&self, c0: usize, c1: usize) -> i32 {
        self.q[c0..c1].iter().map(|&v| i32::from(v)).sum()
    }
}

/// `sum_c code[c] v̂[c]` over codes `c0..c1` of a row of `b`-bit codes, in plain Rust (tails).
/// Most rows have no tail (whole steps): the test is inlined into the row loops and the loop
/// is not ([`crate::matvec_i16`]'s `dot_scalar`).
#[inline(always)]
fn dot_scalar(row: &[u8], b: u8, v: &Q8, c0: usize, c1: usize) -> f32 {
    if c0 >= c1 {
        return 0.0;
    }
    dot_tail(row, b, v, c0, c1)
}

/// [`dot_scalar`]'s loop.
#[inline(never)]
fn dot_tail(row: &[u8], b: u8, v: &Q8, c0: usize, c1: usize) -> f32 {
    (c0..c1).map(|c| f32::from(bits::code(row, v.q.len(), c, b)) * v.value(c)).sum()
}

/// AVX2: `sum_j s[j * STEP / group] * sum_{c in step j} code(c) v̂(c)` over the row's whole steps
/// of `B`-bit codes (4: 32 bytes, low nibbles the even codes and high nibbles the odd ones; 3: a
/// planar chunk, [`bits::chunk3_avx2`]), as 8 lane sums (per-IC, `SCALED` false: no group scales).
///
/// # Safety
/// AVX2 and FMA; `row` holds the row's `cols B / 8` code bytes; `v` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum_avx2<const B: usize, const SCALED: bool>(
    row: &[u8],
    v: &Q8,
    s: &[f32],
    group: usize,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let steps = v.swizzled.len() / STEP;
    debug_assert!(row.len() >= steps * STEP * B / 8);
    let (rp, xp, dp) = (row.as_ptr(), v.swizzled.as_ptr(), v.d8.as_ptr());
    let ones = _mm256_set1_epi16(1);
    // Step j's int32 lane sums as floats.
    let step = |j: usize| {
        let [even, odd] = bits::step_codes_avx2::<B>(rp, j);
        let xe = _mm256_loadu_si256(xp.add(j * STEP) as *const __m256i);
        let xo = _mm256_loadu_si256(xp.add(j * STEP + 32) as *const __m256i);
        let p16 = _mm256_add_epi16(_mm256_maddubs_epi16(even, xe), _mm256_maddubs_epi16(odd, xo));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones))
    };
    // Two steps an iteration into two accumulators: neither multiply-add waits for the other,
    // and the loop's own instructions (a third of a 3-bit step's, counted per step) are paid
    // once a pair. Per-OC the blocks' steps are multiplied by the group's scale, the group
    // counted up (a division per step cost as much as the step); a pair shares one when groups
    // are an even number of steps.
    let per = group / STEP;
    let (mut k, mut next) = (0, per);
    let mut scale = |j: usize| {
        if j == next {
            (k, next) = (k + 1, next + per);
        }
        _mm256_set1_ps(s[k])
    };
    let d = |j: usize| _mm256_loadu_ps(dp.add(j * 8));
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for j in (0..steps / 2).map(|i| 2 * i) {
        let (p0, p1) = (step(j), step(j + 1));
        let (d0, d1) = if !SCALED {
            (d(j), d(j + 1))
        } else if per.is_multiple_of(2) {
            // Group borders fall on even steps only.
            let s = scale(j);
            (_mm256_mul_ps(d(j), s), _mm256_mul_ps(d(j + 1), s))
        } else {
            (_mm256_mul_ps(d(j), scale(j)), _mm256_mul_ps(d(j + 1), scale(j + 1)))
        };
        (a0, a1) = (_mm256_fmadd_ps(p0, d0, a0), _mm256_fmadd_ps(p1, d1, a1));
    }
    if steps % 2 == 1 {
        let d = if SCALED { _mm256_mul_ps(d(steps - 1), scale(steps - 1)) } else { d(steps - 1) };
        a0 = _mm256_fmadd_ps(step(steps - 1), d, a0);
    }
    _mm256_add_ps(a0, a1)
}

/// The int32 lane sums of one step's codes `c` (unsigned bytes) times its int8 activations
/// `x`, four products a lane: one `vpdpbusd` with `VNNI`, else `vpmaddubsw` (pairs, at most
/// 2 * 15 * 127: no saturation) and `vpmaddwd` by ones.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step_sums_avx512<const VNNI: bool>(
    c: std::arch::x86_64::__m512i,
    x: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if VNNI {
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, x)
    } else {
        _mm512_madd_epi16(_mm512_maddubs_epi16(c, x), _mm512_set1_epi16(1))
    }
}

/// [`row_sum_avx2`] with AVX-512: a step per 512-bit register, its codes
/// ([`bits::step_codes_avx512`]: even then odd, as the activations are stored) times its 64
/// activations with four products summed to each int32 lane (at most 4 * 15 * 127), converted
/// and multiplied by the step's block steps `[d0 x4, d1 x4]` twice over (lanes 8-15 hold the
/// odd codes of the same two blocks). `VNNI`: the products and sums are one `vpdpbusd`
/// (unsigned code times signed activation); without it `vpmaddubsw` (pairs, at most 2 * 15 *
/// 127: no saturation) and `vpmaddwd` by ones, as the AVX2 step. Against the AVX2 step the
/// codes take no lane shuffle and half the registers per code. Two steps an iteration into
/// two accumulators, as there. Compiled inside the row loop's AVX-512 wrappers ([`rows`]),
/// whose target features it takes.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`), AVX2 and FMA; as [`row_sum_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum_avx512<const B: usize, const SCALED: bool, const VNNI: bool>(
    row: &[u8],
    v: &Q8,
    s: &[f32],
    group: usize,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let steps = v.swizzled.len() / STEP;
    debug_assert!(row.len() >= steps * STEP * B / 8);
    let (rp, xp, dp) = (row.as_ptr(), v.swizzled.as_ptr(), v.d8.as_ptr());
    let step = |j: usize| {
        let (c, x) = (bits::step_codes_avx512::<B>(rp, j), _mm512_loadu_si512(xp.add(j * STEP) as *const _));
        _mm512_cvtepi32_ps(step_sums_avx512::<VNNI>(c, x))
    };
    // (As doubles: `broadcast_f32x8` would need AVX-512 DQ.)
    let d = |j: usize| _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(dp.add(j * 8) as *const f64)));
    let per = group / STEP;
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut j = 0;
    if SCALED && per == 2 {
        // Groups of 128 (two steps): each group's two steps summed, then times its scale, on
        // two chains; no group counter (counted up per step with a multiply by the scale
        // each, the per-OC loop of long rows was much slower than the per-IC one).
        // (Written out: as a closure, not inlined, its intrinsics compiled without the row
        // loop's target features became calls, 8x slower.)
        assert!(s.len() >= steps / 2, "{} group scales for {steps} steps", s.len());
        for j in (0..steps / 4).map(|i| 4 * i) {
            let g0 = _mm512_fmadd_ps(step(j), d(j), _mm512_mul_ps(step(j + 1), d(j + 1)));
            let g1 = _mm512_fmadd_ps(step(j + 2), d(j + 2), _mm512_mul_ps(step(j + 3), d(j + 3)));
            a0 = _mm512_fmadd_ps(g0, _mm512_set1_ps(*s.get_unchecked(j / 2)), a0);
            a1 = _mm512_fmadd_ps(g1, _mm512_set1_ps(*s.get_unchecked(j / 2 + 1)), a1);
        }
        j = steps / 4 * 4;
    }
    // The rest, and other groups: per-OC the group's scale counted up as in the AVX2 loop
    // (from group `j / per`: `j` is 0 or a whole number of groups).
    let (mut k, mut next) = (j / per.max(1), j + per);
    let mut scaled = |j: usize| {
        if !SCALED {
            return d(j);
        }
        if j == next {
            (k, next) = (k + 1, next + per);
        }
        _mm512_mul_ps(d(j), _mm512_set1_ps(s[k]))
    };
    while j + 1 < steps {
        let (d0, d1) = (scaled(j), scaled(j + 1));
        (a0, a1) = (_mm512_fmadd_ps(step(j), d0, a0), _mm512_fmadd_ps(step(j + 1), d1, a1));
        j += 2;
    }
    if j < steps {
        a0 = _mm512_fmadd_ps(step(j), scaled(j), a0);
    }
    let a = _mm512_add_ps(a0, a1);
    crate::simd::halves_avx512(a)
}

/// The 2-, 3- or 4-bit row sum: [`row_sum_avx512`] where `AVX512` (with `vpdpbusd` where `VNNI`),
/// else [`row_sum_avx2`], as the row loop's wrapper chose ([`rows`]).
///
/// # Safety
/// AVX2 and FMA, AVX-512 F and BW if `AVX512`, VNNI if `VNNI`; as [`row_sum_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum<const B: usize, const SCALED: bool, const AVX512: bool, const VNNI: bool>(
    row: &[u8],
    v: &Q8,
    s: &[f32],
    group: usize,
) -> std::arch::x86_64::__m256 {
    if AVX512 {
        row_sum_avx512::<B, SCALED, VNNI>(row, v, s, group)
    } else {
        row_sum_avx2::<B, SCALED>(row, v, s, group)
    }
}

/// [`row_sum_avx512`] for [`ROWS4`] rows at once (per-OC each with its group scales `s[i]`)
/// and `T` tokens (`v[t]`), as their 8 lane sums per token and row: each step's codes are
/// unpacked once for the tokens, each token's activations and block steps loaded once for the
/// four rows, and every accumulator is a chain of its own; the caller folds each token's four
/// together ([`crate::simd::sums4`]). Short rows paid as much around their steps as in them
/// ([`crate::matvec_i16`]'s four-row kernel). Token `t`'s accumulators see the same operations
/// in the same order whatever `T` is.
///
/// # Safety
/// As [`row_sum_avx512`] for each row; every `v[t]` of the same length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_avx512<const B: usize, const SCALED: bool, const VNNI: bool, const T: usize>(
    rp: [*const u8; ROWS4],
    v: [&Q8; T],
    s: [&[f32]; ROWS4],
    group: usize,
    ahead: usize,
) -> [[std::arch::x86_64::__m256; ROWS4]; T] {
    use std::arch::x86_64::*;
    let steps = v[0].swizzled.len() / STEP;
    assert!(v.iter().all(|v| v.swizzled.len() == steps * STEP && v.d8.len() >= steps * 8), "tokens of unequal length");
    let (xp, dp) = (v.map(|v| v.swizzled.as_ptr()), v.map(|v| v.d8.as_ptr()));
    let per = group / STEP;
    if SCALED {
        assert!(s.iter().all(|s| s.len() * per >= steps), "group scales for {steps} steps");
    }
    let (mut k, mut next) = (0, per);
    let mut acc = [[_mm512_setzero_ps(); ROWS4]; T];
    for j in 0..steps {
        if SCALED && j == next {
            (k, next) = (k + 1, next + per);
        }
        // A loop, not a closure: a closure's intrinsics compile without this function's target features.
        let mut c = [_mm512_setzero_si512(); ROWS4];
        for (i, c) in c.iter_mut().enumerate() {
            crate::simd::prefetch_line(rp[0].wrapping_add(ahead + (ROWS4 * j + i) * 8 * B));
            *c = bits::codes_avx512::<B>(rp[i], j);
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_loadu_si512(xp[t].add(j * STEP) as *const _);
            let d = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(dp[t].add(j * 8) as *const f64)));
            for (i, a) in acc.iter_mut().enumerate() {
                let sums = step_sums_avx512::<VNNI>(c[i], x);
                let d = if SCALED { _mm512_mul_ps(d, _mm512_set1_ps(*s[i].get_unchecked(k))) } else { d };
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, *a);
            }
        }
    }
    crate::simd::halves4(acc)
}

/// AVX2, 8-bit codes (per-OC, `cols` a multiple of 32): `sum_j s[j / per] d_j sum_{c in block j}
/// (code(c) - 128) x̂(c)` as 8 lane sums. Centred codes fit int8, so each block is one signed
/// byte product, as llama.cpp multiplies Q8_0 by Q8_0: `vpmaddubsw(|c'|, sign(x̂, c'))`, pairs
/// at most 2 * 128 * 127 < 2^15.
///
/// # Safety
/// AVX2 and FMA; `row` holds the row's `cols` code bytes; `x` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum8_avx2(row: &[u8], x: &Q8, s: &[f32], per: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let blocks = x.q.len() / BLOCK;
    debug_assert!(row.len() >= blocks * BLOCK && s.len() * per >= blocks);
    let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
    let (centre, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut k, mut in_group) = (0, 0);
    for j in 0..blocks {
        crate::simd::prefetch(rp.add(j * BLOCK));
        let c = _mm256_xor_si256(_mm256_loadu_si256(rp.add(j * BLOCK) as *const __m256i), centre);
        let xv = _mm256_loadu_si256(xp.add(j * BLOCK) as *const __m256i);
        let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(xv, c));
        let p32 = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        let d = _mm256_set1_ps(x.d[j] * s[k]);
        if j % 2 == 0 {
            a0 = _mm256_fmadd_ps(p32, d, a0);
        } else {
            a1 = _mm256_fmadd_ps(p32, d, a1);
        }
        in_group += 1;
        if in_group == per {
            (k, in_group) = (k + 1, 0);
        }
    }
    _mm256_add_ps(a0, a1)
}

/// VNNI, 8-bit codes (per-OC, groups of whole steps of 64), `R` rows and `T` tokens at once:
/// each step's 64 codes (unsigned bytes, not centred) times its 64 int8 activations by one
/// `vpdpbusd`, lanes 0-7 the step's first block of 32 and 8-15 its second, converted and
/// multiplied by `[d0 x8, d1 x8]` times the row's group scale. Sums stay inside int32: four
/// products a lane, at most 4 * 255 * 128. The AVX2 loop ([`row_sum8_avx2`]) needs the codes
/// centred for its signed byte products and pays a sign and an absolute value per 32. The
/// caller subtracts the zero-point term and adds the codes past the last whole step. Token
/// `t`'s accumulators see the same operations in the same order whatever `T` is.
///
/// # Safety
/// AVX-512 F, BW and VNNI, AVX2 and FMA; each row holds `x[t].q.len() / 64 * 64` code bytes from
/// its pointer; each `s[i]` one scale per group of `per` steps; every `x[t]` of one length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows8_vnni<const R: usize, const T: usize>(
    rp: [*const u8; R],
    x: [&Q8; T],
    s: [&[f32]; R],
    per: usize,
    ahead: usize,
) -> [[std::arch::x86_64::__m256; R]; T] {
    use std::arch::x86_64::*;
    let steps = x[0].q.len() / STEP;
    assert!(per > 0 && s.iter().all(|s| s.len() * per >= steps), "group scales for {steps} steps");
    let len = x[0].q.len();
    assert!(x.iter().all(|x| x.q.len() == len && x.d.len() * BLOCK >= steps * STEP), "tokens of unequal length");
    let (xp, dp) = (x.map(|x| x.q.as_ptr() as *const u8), x.map(|x| x.d.as_ptr()));
    let (mut k, mut next) = (0, per);
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    for j in 0..steps {
        if j == next {
            (k, next) = (k + 1, next + per);
        }
        // A loop, not a closure: a closure's intrinsics compile without this function's target features.
        let mut c = [_mm512_setzero_si512(); R];
        for (i, c) in c.iter_mut().enumerate() {
            crate::simd::prefetch_line(rp[0].wrapping_add(ahead + (R * j + i) * STEP));
            *c = _mm512_loadu_si512(rp[i].add(j * STEP) as *const _);
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let xv = _mm512_loadu_si512(xp[t].add(j * STEP) as *const _);
            let half = |b: usize| _mm256_castps_pd(_mm256_set1_ps(*dp[t].add(b)));
            let d = _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(half(2 * j)), half(2 * j + 1)));
            for (i, a) in acc.iter_mut().enumerate() {
                let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[i], xv);
                *a = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sums),
                    _mm512_mul_ps(d, _mm512_set1_ps(*s[i].get_unchecked(k))),
                    *a,
                );
            }
        }
    }
    crate::simd::halves4(acc)
}

/// One per-OC output row, from the rounded `x` and its group sums.
///
/// # Safety
/// AVX2 and FMA, and what `AVX512` and `VNNI` name.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(
    p: &PackedLinear,
    x: &Q8,
    xsum: &[f32],
    r: usize,
    row: &[u8],
) -> f32 {
    let (cols, pc) = (p.cols, xsum.len());
    let (s, z) = (&p.scales[r * pc..(r + 1) * pc], &p.zeros[r * pc..(r + 1) * pc]);
    if B == 8 && VNNI {
        assert!(row.len() >= cols / STEP * STEP, "packed row too short for its codes");
        let [[lanes]] = rows8_vnni::<1, 1>([row.as_ptr()], [x], [s], p.layout.group / STEP, crate::simd::PREFETCH);
        let tail = dot_scalar(row, 8, x, cols / STEP * STEP, cols) * s[pc - 1];
        return crate::simd::hsum(lanes) + tail - crate::simd::zero_term_avx2(s, z, xsum, 0.0);
    }
    if B == 8 {
        let body = crate::simd::hsum(row_sum8_avx2(row, x, s, p.layout.group / BLOCK));
        // The kernel multiplied code - 128: the zero point is z - 128 of those.
        return body - crate::simd::zero_term_avx2(s, z, xsum, 128.0);
    }
    let body = crate::simd::hsum(row_sum::<B, true, AVX512, VNNI>(row, x, s, p.layout.group));
    // The last cols % 64 codes lie in the last group.
    let tail = s[pc - 1] * dot_scalar(row, B as u8, x, cols / STEP * STEP, cols);
    let zx = crate::simd::zero_term_avx2(s, z, xsum, 0.0);
    body + tail - zx
}

/// [`ROWS4`] per-OC rows of 2-, 3-, 4- or 8-bit codes from `r` on for `T` tokens ([`row_oc`]
/// for each, the kernel [`rows4_avx512`] or [`rows8_vnni`]).
///
/// # Safety
/// AVX2, FMA, AVX-512 F and BW (and VNNI if `VNNI`, which 8-bit codes need); rows `r..r + ROWS4`
/// exist; every token's `x` of one length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_oc<const B: usize, const VNNI: bool, const T: usize>(
    p: &PackedLinear,
    x: [&Q8; T],
    sums: [(&[f32], &ZeroTail); T],
    r: usize,
    ahead: Ahead4,
) -> [[f32; ROWS4]; T] {
    let (cols, pc) = (p.cols, sums[0].0.len());
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let params = |i: usize| (&p.scales[(r + i) * pc..(r + i + 1) * pc], &p.zeros[(r + i) * pc..(r + i + 1) * pc]);
    let scales = [params(0).0, params(1).0, params(2).0, params(3).0];
    let (lanes, steps) = if B == 8 {
        // Only with VNNI ([`Q8::rows`] sends 8-bit rows nowhere else four at a time).
        let steps = x[0].q.len() / STEP;
        assert!(rows.iter().all(|row| row.len() >= steps * STEP), "packed row too short for its codes");
        crate::simd::prefetch_params4(p, r + ahead.rows, pc);
        (rows8_vnni::<ROWS4, T>(rows.map(|row| row.as_ptr()), x, scales, p.layout.group / STEP, ahead.bytes), steps)
    } else {
        let steps = x[0].swizzled.len() / STEP;
        assert!(rows.iter().all(|row| row.len() >= steps * STEP * B / 8), "packed row too short for its codes");
        crate::simd::prefetch_params4(p, r + ahead.rows, pc);
        (rows4_avx512::<B, true, VNNI, T>(rows.map(|row| row.as_ptr()), x, scales, p.layout.group, ahead.bytes), steps)
    };
    // Each token's zero-point terms off, then the codes past the kernel's whole steps (the last
    // cols % 64, in the last group). A loop, not a closure: its intrinsics stay inlined.
    let mut out = [[0f32; ROWS4]; T];
    for (t, (o, lanes)) in out.iter_mut().zip(lanes).enumerate() {
        let (xsum, tail) = sums[t];
        *o = crate::simd::oc_sums4(p, r, lanes, xsum, tail);
        if steps * STEP < cols {
            for (i, y) in o.iter_mut().enumerate() {
                *y += params(i).0[pc - 1] * dot_scalar(rows[i], B as u8, x[t], steps * STEP, cols);
            }
        }
    }
    out
}

/// One per-IC output row, from its row group's rounded `s x` and zero-point sum.
///
/// # Safety
/// AVX2 and FMA, and what `AVX512` and `VNNI` name.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(row: &[u8], v: &Q8, bias: f32) -> f32 {
    let cols = v.q.len();
    let body = crate::simd::hsum(row_sum::<B, false, AVX512, VNNI>(row, v, &[], 0));
    body + dot_scalar(row, B as u8, v, cols / STEP * STEP, cols) - bias
}

/// [`ROWS4`] per-IC rows of one row group from `r` on for `T` tokens ([`row_ic`] for each).
///
/// # Safety
/// As [`rows4_oc`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_ic<const B: usize, const VNNI: bool, const T: usize>(
    p: &PackedLinear,
    v: [&Q8; T],
    bias: [f32; T],
    r: usize,
    ahead: Ahead4,
) -> [[f32; ROWS4]; T] {
    assert!(B != 8, "8-bit rows per-IC take the int16 kernel ([`supported`])");
    let cols = v[0].q.len();
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let steps = v[0].swizzled.len() / STEP;
    assert!(rows.iter().all(|row| row.len() >= steps * STEP * B / 8), "packed row too short for its codes");
    let lanes = rows4_avx512::<B, false, VNNI, T>(rows.map(|row| row.as_ptr()), v, [&[]; ROWS4], 0, ahead.bytes);
    let mut out = [[0f32; ROWS4]; T];
    for (t, (o, lanes)) in out.iter_mut().zip(lanes).enumerate() {
        *o = crate::simd::sums4(lanes);
        for (y, row) in o.iter_mut().zip(rows) {
            *y += dot_scalar(row, B as u8, v[t], steps * STEP, cols) - bias[t];
        }
    }
    out
}

thread_local! {
    /// The per-IC matvec's row-group slots, reused from call to call.
    static SLOTS: std::cell::Cell<Vec<(Q8, f32)>> = const { std::cell::Cell::new(Vec::new()) };
    /// The batched per-IC matvec's.
    static BATCH_SLOTS: std::cell::Cell<Vec<Vec<(Q8, f32)>>> = const { std::cell::Cell::new(Vec::new()) };
}

impl IntActs for Q8 {
    #[cfg(target_arch = "x86_64")]
    type Ctx = Wide;
    type Scratch4 = ();
    /// Four: sixteen accumulators, four rows' codes and a token's activations and steps fit
    /// the registers.
    const TOKENS: usize = 4;

    fn supported(p: &PackedLinear) -> bool {
        supported(p)
    }

    fn slots() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<(Self, f32)>>> {
        &SLOTS
    }

    fn batch_slots() -> &'static crate::matvec_int::SlotsKey<Vec<(Self, f32)>> {
        &BATCH_SLOTS
    }

    fn prepare_oc(p: &PackedLinear, x: &[f32]) -> (Q8, Vec<f32>) {
        let (cols, g) = (p.cols, p.layout.group);
        let x = Q8::new(&p.stored_order(x));
        let xsum = crate::matvec_int::group_sums(&x, cols, g);
        (x, xsum)
    }

    fn prepare_ic(p: &PackedLinear, x: &[f32], kr: usize, slot: &mut (Q8, f32)) {
        let cols = p.cols;
        slot.1 = slot.0.scaled_into(&p.scales[kr * cols..(kr + 1) * cols], x, &p.zeros[kr * cols..(kr + 1) * cols]);
    }

    /// Every width ([`rows4_avx512`]; 8-bit codes [`rows8_vnni`], which [`Q8::rows`] runs only
    /// with VNNI).
    fn four_rows(_: usize) -> bool {
        true
    }

    fn four_rows_oc(_: &Q8) -> bool {
        true
    }

    fn four_rows_ic(_: &Q8) -> bool {
        true
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn ctx() -> Wide {
        Wide::detect()
    }

    /// 2-, 3- and 4-bit codes take the AVX-512 loop where the CPU has it, 8-bit codes (per-OC
    /// only) theirs where it has VNNI and their groups are whole steps, else the AVX2 one.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows(p: &PackedLinear, jobs: &[Job<Q8>], r0: usize, out: Outs, wide: &Wide) {
        match (p.layout.bits, *wide) {
            (2, Wide::Vnni) => rows_vnni::<Q8, 2>(p, jobs, r0, out, wide),
            (3, Wide::Vnni) => rows_vnni::<Q8, 3>(p, jobs, r0, out, wide),
            (4, Wide::Vnni) => rows_vnni::<Q8, 4>(p, jobs, r0, out, wide),
            (8, Wide::Vnni) if p.layout.group.is_multiple_of(STEP) => rows_vnni::<Q8, 8>(p, jobs, r0, out, wide),
            (2, Wide::Avx512) => rows_avx512bw::<Q8, 2>(p, jobs, r0, out, wide),
            (3, Wide::Avx512) => rows_avx512bw::<Q8, 3>(p, jobs, r0, out, wide),
            (4, Wide::Avx512) => rows_avx512bw::<Q8, 4>(p, jobs, r0, out, wide),
            (2, _) => rows_avx2::<Q8, 2>(p, jobs, r0, out, wide),
            (3, _) => rows_avx2::<Q8, 3>(p, jobs, r0, out, wide),
            (4, _) => rows_avx2::<Q8, 4>(p, jobs, r0, out, wide),
            _ => rows_avx2::<Q8, 8>(p, jobs, r0, out, wide),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(
        p: &PackedLinear,
        x: &Q8,
        xsum: &[f32],
        _per: usize,
        r: usize,
        row: &[u8],
        _: &Wide,
    ) -> f32 {
        row_oc::<B, AVX512, VNNI>(p, x, xsum, r, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(
        row: &[u8],
        v: &Q8,
        bias: f32,
        _: &Wide,
    ) -> f32 {
        row_ic::<B, AVX512, VNNI>(row, v, bias)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows4_oc<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        x: [&Q8; T],
        sums: [(&[f32], &ZeroTail); T],
        _per: usize,
        r: usize,
        ahead: Ahead4,
        _: &mut [(); T],
    ) -> [[f32; ROWS4]; T] {
        rows4_oc::<B, VNNI, T>(p, x, sums, r, ahead)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows4_ic<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        v: [&Q8; T],
        bias: [f32; T],
        r: usize,
        ahead: Ahead4,
    ) -> [[f32; ROWS4]; T] {
        rows4_ic::<B, VNNI, T>(p, v, bias, r, ahead)
    }
}

/// `y = W' x` on int8 activations where this CPU and layout have the kernel ([`supported`],
/// AVX2 + FMA): true; false with `y` untouched otherwise.
pub(crate) fn matvec(p: &PackedLinear, x: &[f32], y: &mut [f32]) -> bool {
    crate::matvec_int::matvec::<Q8>(p, x, y)
}

/// [`matvec`] for `t` tokens at once, each token's numbers exactly its matvec's
/// ([`crate::matvec_int::matvec_batch`]).
pub(crate) fn matvec_batch(p: &PackedLinear, x: &[f32], t: usize, y: &mut [f32]) -> bool {
    crate::matvec_int::matvec_batch::<Q8>(p, x, t, y)
}

/// The definition of the int8 product, in f64 from the same rounded activations, and per row
/// the bound of its distance from the exact product (`matvec_int::matvec_ref`).
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    crate::matvec_int::matvec_ref::<Q8>(p, x)
}
