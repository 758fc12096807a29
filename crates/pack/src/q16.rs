//! The decode matvec on integers: `x` rounded to int16 per block, codes widened to int16 in
//! registers, `vpmaddwd` products summed in int32 over the whole block, one float multiply-add
//! per block.
//!
//! Why: the f32 kernel in [`crate::kernels`] converts every code to a float and spends five
//! instructions per eight weights; on two cores that is compute-bound well below memory
//! bandwidth. Here 32 codes of 2 bits take one 16-byte load, two byte shuffles (each 16-bit
//! lane gets the two bytes holding its code), two `vpmullw` (a left shift by a per-lane amount
//! puts the code at the top of its lane; the bits above fall off), two shifts right, two
//! `vpmaddwd` against the int16 activations and two adds; the codes come out in their natural
//! order. 3- and 4-bit codes stay bytes: a step of 64 (4-bit low and high nibbles, or a planar
//! 3-bit chunk, [`bits::chunk3_avx2`]) gives the even codes and the odd ones, and the int16
//! activations are stored split into high and low bytes in that order ([`Q16::split`]), so
//! `vpmaddubsw` multiplies 32 codes by 32 bytes at once, as in the int8 kernel of [`crate::q8`]
//! ([`row_sum_split_avx2`]).
//! A block is up to 128 activations (per-OC: the largest of 128, 64, 32 dividing the group,
//! so a block never straddles two scales); its int32 sums are converted and scaled once.
//!
//! What it costs in accuracy: every activation (per-OC: `x`; per-IC: `s[kr, c] x[c]`) moves by
//! at most half a step of its block, `max|block| / 65534`. llama.cpp rounds activations to
//! 8 bits for the same reason; 16 bits keep the result within about 1e-5 of the f32 product.
//! 8-bit codes are widened directly (`vpmovzxbw`). Sums stay inside int32: an int32 lane adds
//! 16 products per block of 128, at most 16 * 255 * 32767 < 2^28.
//! The tests hold the AVX2 kernel to [`matvec_ref`] (the same rounded activations, f64) and
//! the whole product to the exact one within the bound [`matvec_ref`] also returns.

use adadim_quantize::Axis;
use rayon::prelude::*;

use crate::bits;
use crate::format::PackedLinear;
#[cfg(target_arch = "x86_64")]
use crate::kernels::{hsum, Ahead4, Job, Wide, ZeroTail, ROWS4};

/// Codes per SIMD step; per-OC groups must be a multiple of it.
pub const QB: usize = 32;

/// Largest activation block (one scale each).
pub const MAX_BLOCK: usize = 128;

/// The activation block for a layout: per-IC [`MAX_BLOCK`]; per-OC the largest of 128, 64, 32
/// that divides the group, so every block lies inside one group.
pub fn block_size(p: &PackedLinear) -> usize {
    let l = p.layout;
    match l.axis {
        Axis::Ic => MAX_BLOCK,
        Axis::Oc => [128, 64, 32].into_iter().find(|b| l.group % b == 0).unwrap_or(QB),
    }
}

/// For `|t| < 2^22` the float `t + ROUND` has no fraction bits left: its bit pattern minus
/// `ROUND`'s is `round(t)` (ties to even).
const ROUND: f32 = 12_582_912.0;

/// Rounds one block into `q` and returns its step `d = max|x| / qmax` (NaN when the block holds
/// a non-finite value, so the product comes out NaN as it would in f32); `cast` stores a
/// rounded value (|v| <= qmax) in `q`'s integer type. Shared with [`crate::q8`].
#[inline(always)]
pub(crate) fn round_block<T>(x: &[f32], q: &mut [T], qmax: f32, cast: impl Fn(i32) -> T) -> f32 {
    let (mut m, mut poison) = ([0f32; 8], [0f32; 8]);
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let a = c[l].abs();
            m[l] = if a > m[l] { a } else { m[l] };
            poison[l] += c[l] * 0.0; // NaN for inf or NaN
        }
    }
    let mut max = m.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    let mut bad = poison.iter().sum::<f32>();
    for &v in tail {
        max = if v.abs() > max { v.abs() } else { max };
        bad += v * 0.0;
    }
    if bad.is_nan() {
        for q in q.iter_mut() {
            *q = cast(0);
        }
        return f32::NAN;
    }
    let d = max / qmax;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let base = ROUND.to_bits() as i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // |v inv| <= qmax by construction (up to one rounding of inv): clamp anyway.
        let t = (v * inv).clamp(-qmax, qmax);
        *q = cast((t + ROUND).to_bits() as i32 - base);
    }
    d
}

/// [`round_block`] on `8 V` values held in registers, with AVX2: the rounded values as int32
/// lanes and the step, bit for bit what [`round_block`] gives (the same products, maximum,
/// division and ties-to-even rounding; a block with a non-finite value comes out all zero
/// with a NaN step).
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn round_block_avx2<const V: usize>(v: &[std::arch::x86_64::__m256; V], qmax: f32) -> ([std::arch::x86_64::__m256i; V], f32) {
    use std::arch::x86_64::*;
    // |v| as integers: ordered as the floats are, and above f32::MAX exactly for inf and NaN.
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let mut m = _mm256_setzero_si256();
    for v in v {
        m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_castps_si256(*v), abs));
    }
    let h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    let h = _mm_max_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
    let max_bits = _mm_cvtsi128_si32(_mm_max_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)));
    let mut out = [_mm256_setzero_si256(); V];
    if max_bits > f32::MAX.to_bits() as i32 {
        return (out, f32::NAN);
    }
    let max = f32::from_bits(max_bits as u32);
    let d = max / qmax;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (lo, hi) = (_mm256_set1_ps(-qmax), _mm256_set1_ps(qmax));
    for (o, v) in out.iter_mut().zip(v) {
        // The default rounding mode (MXCSR) is to nearest, ties to even, as `ROUND` rounds.
        *o = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(*v, inv), lo), hi));
    }
    (out, d)
}

/// Largest int16 step count: `q = round(x / d)`, `d = max|x| / QMAX`.
const QMAX: f32 = 32767.0;

/// Activations rounded to int16 per block of `block`: value `i` is `q[i] * d[i / block]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Q16 {
    pub q: Vec<i16>,
    pub d: Vec<f32>,
    pub block: usize,
    /// High bytes of `q` (signed) for the 3- and 4-bit kernels: each whole step of [`SPLIT`]
    /// values as they read codes, the 32 even positions then the 32 odd ones (empty unless asked
    /// for, [`Q16::split`]).
    pub hi: Vec<i8>,
    /// Low bytes of `q` (unsigned), in the order of `hi`: `q = 256 hi + lo`.
    pub lo: Vec<u8>,
}

impl Q16 {
    /// Rounds `x` block by block (the last block may be short). Written so the compiler
    /// vectorizes it (eight-lane maxima, rounding by bit arithmetic): it runs once per matvec
    /// on `x`, and per-IC once per row group on `s x`.
    pub fn new(x: &[f32], block: usize) -> Self {
        let mut q = vec![0i16; x.len()];
        let d = x.chunks(block).zip(q.chunks_mut(block)).map(|(x, q)| round_block(x, q, QMAX, |v| v as i16)).collect();
        Q16 { q, d, block, hi: Vec::new(), lo: Vec::new() }
    }

    /// [`Q16::new`], then [`Q16::split`] when `split`, in one AVX2 pass for blocks of
    /// [`MAX_BLOCK`] where the CPU has it (the same values): every per-OC matvec rounds its `x`
    /// on one thread before its rows start, and the two passes took 0.5 us of SmolLM2's 576.
    pub fn rounded(x: &[f32], block: usize, split: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if block == MAX_BLOCK && crate::kernels::simd_available() {
            let mut v = Self::default();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { v.round_avx2(x, None, split) };
            return v;
        }
        Self::new_split(x, block, split)
    }

    /// [`Q16::new`], then [`Q16::split`] when `split`: [`Q16::rounded`] without the one-pass
    /// AVX2 path (other block sizes, and the short last block of that path).
    fn new_split(x: &[f32], block: usize, split: bool) -> Self {
        let v = Self::new(x, block);
        if split { v.split() } else { v }
    }

    /// Fills `hi` and `lo` (for the 3- and 4-bit kernels): with AVX2 where the CPU has it, the
    /// same bytes as [`Q16::split_ref`].
    pub fn split(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd_available() {
            let mut me = self;
            let steps = me.q.len() / SPLIT;
            let (mut hi, mut lo) = (vec![0i8; steps * SPLIT], vec![0u8; steps * SPLIT]);
            for j in 0..steps {
                // SAFETY: AVX2 was detected; step j's 64 values and bytes are in bounds.
                unsafe {
                    use std::arch::x86_64::*;
                    let n = std::array::from_fn(|i| _mm256_loadu_si256(me.q.as_ptr().add(j * SPLIT + 16 * i) as *const __m256i));
                    split_step_avx2(n, hi.as_mut_ptr().add(j * SPLIT), lo.as_mut_ptr().add(j * SPLIT));
                }
            }
            (me.hi, me.lo) = (hi, lo);
            return me;
        }
        self.split_ref()
    }

    /// [`Q16::split`] in plain Rust: the definition.
    pub fn split_ref(mut self) -> Self {
        let steps = self.q.len() / SPLIT;
        let (mut hi, mut lo) = (vec![0i8; steps * SPLIT], vec![0u8; steps * SPLIT]);
        for (j, q) in self.q.chunks_exact(SPLIT).enumerate() {
            for (i, &v) in q.iter().enumerate() {
                let at = j * SPLIT + (i % 2) * (SPLIT / 2) + i / 2;
                (hi[at], lo[at]) = ((v >> 8) as i8, v as u8);
            }
        }
        (self.hi, self.lo) = (hi, lo);
        self
    }

    /// Value `i` as rounded.
    pub fn value(&self, i: usize) -> f32 {
        f32::from(self.q[i]) * self.d[i / self.block]
    }

    /// `v = s * x` rounded in blocks of `block` (the per-IC activations of one row group), with
    /// `hi` and `lo` filled when `split` (3- and 4-bit codes), and `sum_c z[c] v̂[c]`: with AVX2 for
    /// blocks of [`MAX_BLOCK`] where the CPU has it (the same values as [`Q16::scaled_ref`]; the
    /// sum in another order).
    pub fn scaled(s: &[f32], x: &[f32], z: &[f32], block: usize, split: bool) -> (Self, f32) {
        let mut v = Self::default();
        let bias = v.scaled_into(s, x, z, block, split);
        (v, bias)
    }

    /// [`Q16::scaled`] into `self`, reusing its buffers (whatever they held is replaced).
    pub fn scaled_into(&mut self, s: &[f32], x: &[f32], z: &[f32], block: usize, split: bool) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if block == MAX_BLOCK && crate::kernels::simd_available() {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { self.round_avx2(x, Some((s, z)), split) };
        }
        let (v, bias) = Self::scaled_ref(s, x, z, block, split);
        *self = v;
        bias
    }

    /// [`Q16::scaled`] in plain Rust: the definition the AVX2 version is tested against.
    pub fn scaled_ref(s: &[f32], x: &[f32], z: &[f32], block: usize, split: bool) -> (Self, f32) {
        let q = Q16::new(&s.iter().zip(x).map(|(s, x)| s * x).collect::<Vec<_>>(), block);
        let q = if split { q.split_ref() } else { q };
        // sum_c z[c] v̂[c], block by block (no division per value).
        let bias = z.chunks(block).zip(q.q.chunks(block)).zip(&q.d).map(|((z, qb), d)| d * z.iter().zip(qb).map(|(z, &q)| z * f32::from(q)).sum::<f32>()).sum::<f32>();
        (q, bias)
    }

    /// [`Q16::rounded`] (`sz = None`) or [`Q16::scaled`] (`sz = Some((s, z))`) with AVX2 on blocks
    /// of [`MAX_BLOCK`], into `self`: each whole block multiplied by its scales, rounded and
    /// packed to int16 in registers, stored in natural order and (`split`) as the 3- and 4-bit
    /// kernels read it ([`round_run`]); a short last block of one step (SmolLM2's rows of 576:
    /// 4.5 blocks) the same way, other short last blocks in plain Rust. Returns the zero-point
    /// sum (0 without `z`). Per-IC it runs per row group on every matvec, and in plain Rust cost
    /// a fifth of the product's time; the half block in plain Rust (allocating) cost 5-8% of a
    /// per-IC 1536 x 576 matvec.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn round_avx2(&mut self, x: &[f32], sz: Option<(&[f32], &[f32])>, split: bool) -> f32 {
        use std::arch::x86_64::*;
        const B: usize = MAX_BLOCK;
        let n = x.len();
        if let Some((s, z)) = sz {
            assert!(s.len() == n && z.len() == n, "scaled: {} scales and {} zeros for {n} values", s.len(), z.len());
        }
        let blocks = n / B;
        // Every element below is written again: only the lengths matter.
        let Q16 { q, d, block, hi, lo } = self;
        *block = B;
        q.resize(n, 0);
        let split_len = if split { n / SPLIT * SPLIT } else { 0 };
        hi.resize(split_len, 0);
        lo.resize(split_len, 0);
        d.clear();
        let szp = sz.map(|(s, z)| (s.as_ptr(), z.as_ptr()));
        let out = (q.as_mut_ptr(), split.then(|| (hi.as_mut_ptr(), lo.as_mut_ptr())));
        // sum_c z[c] d(c) q[c], lane by lane.
        let mut zq = _mm256_setzero_ps();
        for b in 0..blocks {
            d.push(round_run::<{ B / 8 }, { B / 16 }>(x.as_ptr(), szp, b * B, out, &mut zq));
        }
        let o = blocks * B;
        if n - o == SPLIT {
            d.push(round_run::<{ SPLIT / 8 }, { SPLIT / 16 }>(x.as_ptr(), szp, o, out, &mut zq));
        }
        let mut bias = crate::kernels::hsum(zq);
        if o < n && n - o != SPLIT {
            // Another short last block, and the split of its whole steps.
            let (tail, tb) = match sz {
                Some((s, z)) => Self::scaled_ref(&s[o..], &x[o..], &z[o..], B, split),
                None => (Self::new_split(&x[o..], B, split), 0.0),
            };
            q[o..].copy_from_slice(&tail.q);
            if split {
                hi[o..].copy_from_slice(&tail.hi);
                lo[o..].copy_from_slice(&tail.lo);
            }
            d.push(tail.d[0]);
            bias += tb;
        }
        bias
    }
}

/// One block of `8 V` activations from `o` on, as [`Q16::round_avx2`] rounds it (`H = V / 2`;
/// `V` a multiple of 8, so the block is whole steps): multiplied by the scales where `sz`
/// gives them (the zero-point sum `sum_c z[c] q[c]` on two chains, then one multiply-add by
/// its step into `zq`), rounded, stored in natural order at `out.0` and, where `out.1`, split
/// as the 3- and 4-bit kernels read it. Returns the block's step.
///
/// # Safety
/// AVX2 and FMA; `x`, the scales and zeros hold `o + 8 V` values; `out`'s buffers as many.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn round_run<const V: usize, const H: usize>(x: *const f32, sz: Option<(*const f32, *const f32)>, o: usize, out: (*mut i16, Option<(*mut i8, *mut u8)>), zq: &mut std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(H * 2 == V && V % 8 == 0);
    let xv = |i: usize| _mm256_loadu_ps(x.add(o + 8 * i));
    let (r, db) = match sz {
        None => round_block_avx2::<V>(&std::array::from_fn(xv), QMAX),
        Some((sp, zp)) => {
            // The scale and zero rows stream from memory: ask for them ahead.
            for l in (0..V * 32).step_by(64) {
                crate::kernels::prefetch((sp.add(o) as *const u8).wrapping_add(l));
                crate::kernels::prefetch((zp.add(o) as *const u8).wrapping_add(l));
            }
            let v: [__m256; V] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(sp.add(o + 8 * i)), xv(i)));
            let (r, db) = round_block_avx2(&v, QMAX);
            let zr = |i: usize, a: __m256| _mm256_fmadd_ps(_mm256_loadu_ps(zp.add(o + 8 * i)), _mm256_cvtepi32_ps(r[i]), a);
            let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in (0..V).step_by(2) {
                (t0, t1) = (zr(i, t0), zr(i + 1, t1));
            }
            *zq = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(db), *zq);
            (r, db)
        }
    };
    // Sixteen values per register in natural order, then each step of 64 split.
    let nat: [__m256i; H] = std::array::from_fn(|i| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(r[2 * i], r[2 * i + 1])));
    for (i, v) in nat.iter().enumerate() {
        _mm256_storeu_si256(out.0.add(o + 16 * i) as *mut __m256i, *v);
    }
    if let Some((hi, lo)) = out.1 {
        for k in 0..V * 8 / SPLIT {
            let c = o + k * SPLIT;
            split_step_avx2(std::array::from_fn(|i| nat[4 * k + i]), hi.add(c), lo.add(c));
        }
    }
    db
}

/// Activations per step of the 3- and 4-bit kernels (their `hi` / `lo` order).
pub const SPLIT: usize = 64;

/// One step of 64 int16 values (natural order, sixteen per register) stored as [`Q16::split`]
/// does: high and low bytes, each as the even positions then the odd ones.
///
/// # Safety
/// AVX2; `hi` and `lo` have 64 writable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn split_step_avx2(n: [std::arch::x86_64::__m256i; 4], hi: *mut i8, lo: *mut u8) {
    use std::arch::x86_64::*;
    let m = _mm256_set1_epi16(0xff);
    // Within each 16-byte lane: the even bytes, then the odd ones.
    let even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    // 32 values as bytes, `pack`ed as [0-7, 16-23 | 8-15, 24-31]; the shuffle makes each 4 bytes
    // the evens or odds of one run of 8 and the dword permutation orders the runs: [evens | odds].
    let runs = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let half = |packed: __m256i| _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(packed, even_odd), runs);
    let lo01 = half(_mm256_packus_epi16(_mm256_and_si256(n[0], m), _mm256_and_si256(n[1], m)));
    let lo23 = half(_mm256_packus_epi16(_mm256_and_si256(n[2], m), _mm256_and_si256(n[3], m)));
    let hi01 = half(_mm256_packs_epi16(_mm256_srai_epi16::<8>(n[0]), _mm256_srai_epi16::<8>(n[1])));
    let hi23 = half(_mm256_packs_epi16(_mm256_srai_epi16::<8>(n[2]), _mm256_srai_epi16::<8>(n[3])));
    _mm256_storeu_si256(lo as *mut __m256i, _mm256_permute2x128_si256::<0x20>(lo01, lo23));
    _mm256_storeu_si256(lo.add(32) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(lo01, lo23));
    _mm256_storeu_si256(hi as *mut __m256i, _mm256_permute2x128_si256::<0x20>(hi01, hi23));
    _mm256_storeu_si256(hi.add(32) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(hi01, hi23));
}

/// Activations rounded to integers in blocks, as the integer kernels read them.
pub(crate) trait Rounded {
    /// Value `i` as rounded.
    fn value(&self, i: usize) -> f32;
    /// The step of value `i`'s block (the rounding moved it at most half of this).
    fn step(&self, i: usize) -> f32;
    /// Values per block (one step each).
    fn block(&self) -> usize;
    /// The integers of values `c0..c1` summed (exact: at most 2^15 each, far fewer than 2^16).
    fn int_sum(&self, c0: usize, c1: usize) -> i32;
}

impl Rounded for Q16 {
    fn value(&self, i: usize) -> f32 {
        Q16::value(self, i)
    }
    fn step(&self, i: usize) -> f32 {
        self.d[i / self.block]
    }
    fn block(&self) -> usize {
        self.block
    }
    #[inline]
    fn int_sum(&self, c0: usize, c1: usize) -> i32 {
        self.q[c0..c1].iter().map(|&v| i32::from(v)).sum()
    }
}

/// `sum_{c in k} x̂[c]` for each group `k` of `g` of the `cols` rounded values (the per-OC
/// zero-point term). Shared with [`crate::q8`]. Each run of values inside one block and one
/// group adds its integers exactly, then one multiply by the block's step: value by value this
/// was a float multiply and a dependent add per value, several microseconds per matvec of 4096
/// columns on the leader alone (the per-OC matvec's serial part). With AVX2 the same code is
/// compiled for it (the integer sums in 256-bit lanes: in plain x86-64 they took 12% of a
/// 64 x 14336 int8 matvec).
pub(crate) fn group_sums<A: Rounded>(x: &A, cols: usize, g: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd_available() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { group_sums_avx2(x, cols, g) };
    }
    group_sums_body(x, cols, g)
}

/// [`group_sums`] compiled for AVX2 (the body and the integer sums inlined into it).
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_sums_avx2<A: Rounded>(x: &A, cols: usize, g: usize) -> Vec<f32> {
    group_sums_body(x, cols, g)
}

/// [`group_sums`]: group by group, each block run's exact integer sum times its step, added in a
/// local (no division or store per run). Plain loops, no closures: a closure is compiled out of
/// line without the caller's target features.
#[inline(always)]
fn group_sums_body<A: Rounded>(x: &A, cols: usize, g: usize) -> Vec<f32> {
    let (b, mut sums) = (x.block(), Vec::with_capacity(cols.div_ceil(g)));
    let mut g0 = 0;
    while g0 < cols {
        let g1 = (g0 + g).min(cols);
        let (mut sum, mut c, mut block_end) = (0f32, g0, (g0 / b + 1) * b);
        while c < g1 {
            let end = block_end.min(g1);
            sum += x.step(c) * x.int_sum(c, end) as f32;
            (c, block_end) = (end, block_end + b);
        }
        sums.push(sum);
        g0 = g1;
    }
    sums
}

/// What every row needs from `x`, rounded once per call (activations `A`: [`Q16`] or
/// [`crate::q8::Q8`]).
pub(crate) enum Prepared<A = Q16> {
    /// per-OC: `x` (gathered by `perm`) rounded, and `sum_{c in k} x̂[c]` per group.
    Oc { x: A, xsum: Vec<f32> },
    /// per-IC: `v[kr][c] = s[kr, c] x[c]` rounded per row group.
    Ic { v: Vec<A> },
}

/// Whether the kernel reads `b`-bit codes as bytes, even and odd halves of steps of 64, against
/// split activations ([`Q16::split`]): 4-bit codes (low and high nibbles) and 3-bit ones
/// (planar chunks, [`bits::chunk3_avx2`]).
fn splits(bits: u8) -> bool {
    matches!(bits, 3 | 4)
}

/// Per-OC: `x` (gathered by the act-order permutation) rounded in blocks, split for 3- and
/// 4-bit codes, and `sum_{c in k} x̂[c]` per group `k`.
fn prepare_oc(p: &PackedLinear, x: &[f32]) -> (Q16, Vec<f32>) {
    let (cols, l, block) = (p.cols, p.layout, block_size(p));
    let x = Q16::rounded(&p.stored_order(x), block, splits(l.bits));
    let xsum = group_sums(&x, cols, l.group);
    (x, xsum)
}

/// Per-IC: row group `kr`'s `s x` rounded in blocks of [`MAX_BLOCK`] (split for 3- and 4-bit
/// codes) and its zero-point sum, into `slot`.
fn prepare_ic(p: &PackedLinear, x: &[f32], kr: usize, slot: &mut (Q16, f32)) {
    let cols = p.cols;
    slot.1 = slot.0.scaled_into(&p.scales[kr * cols..(kr + 1) * cols], x, &p.zeros[kr * cols..(kr + 1) * cols], MAX_BLOCK, splits(p.layout.bits));
}

thread_local! {
    /// The per-IC matvec's row-group slots, reused from call to call ([`crate::team::grouped_rows`]).
    static SLOTS: std::cell::Cell<Vec<(Q16, f32)>> = const { std::cell::Cell::new(Vec::new()) };
}

pub(crate) fn prepare(p: &PackedLinear, x: &[f32]) -> Prepared {
    let l = p.layout;
    match l.axis {
        Axis::Oc => {
            let (x, xsum) = prepare_oc(p, x);
            Prepared::Oc { x, xsum }
        }
        Axis::Ic => {
            let groups = p.rows.div_ceil(l.group);
            let v = (0..groups).into_par_iter().map(|kr| {
                let mut slot = Default::default();
                prepare_ic(p, x, kr, &mut slot);
                slot.0
            }).collect();
            Prepared::Ic { v }
        }
    }
}

/// Whether the int16 kernel handles this layout: 2, 3, 4 or 8 bits, per-OC groups whole steps.
pub(crate) fn supported(p: &PackedLinear) -> bool {
    let l = p.layout;
    matches!(l.bits, 2 | 3 | 4 | 8) && (l.axis == Axis::Ic || l.group % QB == 0)
}

/// `sum_c w(c) code[c] v̂[c]` over codes `c0..c1` of a row (of `v.q.len()` codes), in plain
/// Rust (the tails the kernels leave; per-OC `w` is the column's group scale). Most rows have
/// no tail (whole steps): the test is inlined into the row loops and the loop is not. Called
/// for empty ranges, the loop cost a quarter of a four-row kernel's time (one thread, in
/// cache, 1536 x 576 3-bit int8 per-OC).
#[inline(always)]
fn dot_scalar(row: &[u8], bits: u8, v: &Q16, c0: usize, c1: usize, w: impl Fn(usize) -> f32) -> f32 {
    if c0 >= c1 {
        return 0.0;
    }
    dot_tail(row, bits, v, c0, c1, w)
}

/// [`dot_scalar`]'s loop.
#[inline(never)]
fn dot_tail(row: &[u8], bits: u8, v: &Q16, c0: usize, c1: usize, w: impl Fn(usize) -> f32) -> f32 {
    (c0..c1).map(|c| w(c) * f32::from(bits::code(row, v.q.len(), c, bits)) * v.value(c)).sum()
}

/// Per-lane constants of the bit-stream decoder for `b`-bit codes (used for 2 bits): for 16-bit
/// lane `j` of the first (codes 0..16) and second (codes 16..32) vector, the shuffle that
/// fetches the two bytes holding code `j`, and the power of two that lifts the code to the
/// lane's top bits. A window starts at the code's byte, or one earlier where that byte is the
/// last of the 16 loaded, so it never reaches past the load.
#[cfg(target_arch = "x86_64")]
fn decoder_tables(b: usize) -> ([[i8; 32]; 2], [[i16; 16]; 2]) {
    let (mut shuf, mut mul) = ([[0i8; 32]; 2], [[0i16; 16]; 2]);
    for half in 0..2 {
        for j in 0..16 {
            let bit = (half * 16 + j) * b;
            let start = (bit / 8).min(14);
            let off = bit - 8 * start;
            debug_assert!(off + b <= 16);
            shuf[half][2 * j] = start as i8;
            shuf[half][2 * j + 1] = start as i8 + 1;
            mul[half][j] = 1 << (16 - b - off);
        }
    }
    (shuf, mul)
}

/// AVX2, 2- and 8-bit codes: `sum_b scale(b) * sum_{c in block b} code(c) q(c)` over the `cols`
/// codes of a row (`cols / 32` whole steps; the caller adds the last `cols % 32`), as 8 lane sums, with
/// `scale(b) = sd[b]` ([`block_scales`]; per-IC the blocks' steps).
///
/// # Safety
/// AVX2 and FMA; `rp` points at the row's first byte with 16 bytes readable behind the start
/// of its last whole step (a row's padding or the next row covers the 2-bit overshoot);
/// `x.q` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum_avx2<const B: usize>(rp: *const u8, x: &Q16, cols: usize, sd: &[f32], t: &Tables) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let qp = x.q.as_ptr();
    // int32 lane sums of 32 codes times their activations (step j of the row).
    let step = |j: usize| {
        crate::kernels::prefetch(rp.add(j * 4 * B));
        if B == 8 {
            // Bytes are codes: widen 16 at a time.
            let a = _mm256_cvtepu8_epi16(_mm_loadu_si128(rp.add(j * 32) as *const __m128i));
            let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(rp.add(j * 32 + 16) as *const __m128i));
            let xa = _mm256_loadu_si256(qp.add(j * QB) as *const __m256i);
            let xb = _mm256_loadu_si256(qp.add(j * QB + 16) as *const __m256i);
            return _mm256_add_epi32(_mm256_madd_epi16(a, xa), _mm256_madd_epi16(b, xb));
        }
        let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(rp.add(j * 4 * B) as *const __m128i));
        let lift = |sh, mul| {
            let w = _mm256_mullo_epi16(_mm256_shuffle_epi8(raw, sh), mul);
            _mm256_srli_epi16::<14>(w)
        };
        let (a, b) = (lift(t.shuf[0], t.mul[0]), lift(t.shuf[1], t.mul[1]));
        let xa = _mm256_loadu_si256(qp.add(j * QB) as *const __m256i);
        let xb = _mm256_loadu_si256(qp.add(j * QB + 16) as *const __m256i);
        _mm256_add_epi32(_mm256_madd_epi16(a, xa), _mm256_madd_epi16(b, xb))
    };
    let block = |j0: usize, j1: usize| (j0 + 1..j1).fold(step(j0), |acc, j| _mm256_add_epi32(acc, step(j)));
    let steps = cols / QB;
    match x.block / QB {
        1 => block_sums::<1>(steps, sd, block),
        2 => block_sums::<2>(steps, sd, block),
        n => {
            assert_eq!(n, 4, "int16 blocks of {} values", x.block);
            block_sums::<4>(steps, sd, block)
        }
    }
}

/// `sum_b sd[b] * block(j0, j1)` over `steps` steps in blocks of `N` (the last block may be
/// short; `block(j0, j1)` gives the int32 lane sums of steps `j0..j1`; `sd` the blocks' scales,
/// [`block_scales`]), as 8 lane sums: the block loop of both int16 kernels. Whole blocks are
/// called with `j1 = j0 + N` known when compiling: with the block's length decided at run time
/// (and two accumulators taken in turn), the split kernel's two-step block spent more
/// instructions moving registers and counting than multiplying. One accumulator: a block's
/// multiply-add waits on the last one's, but a block takes longer than that.
///
/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn block_sums<const N: usize>(steps: usize, sd: &[f32], block: impl Fn(usize, usize) -> std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let sd = &sd[..steps.div_ceil(N)];
    let mut a = _mm256_setzero_ps();
    for (b, &scale) in sd.iter().enumerate().take(steps / N) {
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block(b * N, b * N + N)), _mm256_set1_ps(scale), a);
    }
    if steps % N != 0 {
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block(steps / N * N, steps)), _mm256_set1_ps(sd[steps / N]), a);
    }
    a
}

/// `s[b / per] * d[b]` for every block `b` into `out[..d.len()]` (the int16 kernels'
/// block scales; per-OC `s` is the row's group scales and `d` the activation blocks' steps),
/// once per row: computed inside the block loop, with the group counted up, they took a third
/// of a 3-bit step's instructions. Inlined into the row loop (a call per row was 3% of a
/// small matrix's time), where the compiler vectorises its multiplies.
#[inline]
fn block_scales(s: &[f32], d: &[f32], per: usize, out: &mut [f32]) {
    let out = &mut out[..d.len()];
    if per == 1 {
        assert!(s.len() >= d.len(), "{} group scales for {} blocks", s.len(), d.len());
        for ((o, s), d) in out.iter_mut().zip(s).zip(d) {
            *o = s * d;
        }
    } else {
        // Rows of large groups (256 codes and more): the division is per block, not per step.
        for (b, (o, d)) in out.iter_mut().zip(d).enumerate() {
            *o = s[b / per] * d;
        }
    }
}

/// Rows of at most this many blocks keep their block scales on the stack.
const SHORT: usize = 32;

thread_local! {
    /// [`block_scales`]' buffer, reused from row to row.
    static SCALES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The int16 pair sums of step `j` of a row of 3- or 4-bit codes against split activations,
/// (codes x hi, lo x codes): lanes 0-7 from the step's first 32 codes.
///
/// # Safety
/// AVX2; as [`row_sum_split_avx2`], `j` a whole step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn split_products_avx2<const B: usize>(rp: *const u8, x: &Q16, j: usize) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    let [e, o] = bits::step_codes_avx2::<B>(rp, j);
    let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
    let (h, l) = (x.hi.as_ptr().add(j * SPLIT) as *const u8, x.lo.as_ptr().add(j * SPLIT));
    let ph = _mm256_add_epi16(_mm256_maddubs_epi16(e, ld(h)), _mm256_maddubs_epi16(o, ld(h.add(32))));
    let pl = _mm256_add_epi16(_mm256_maddubs_epi16(ld(l), e), _mm256_maddubs_epi16(ld(l.add(32)), o));
    (ph, pl)
}

/// `256 ph + pl` widened to int32 lane sums (pairs added).
///
/// # Safety
/// AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn split_int32_avx2(ph: std::arch::x86_64::__m256i, pl: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)))
}

/// AVX2, 3- and 4-bit codes: `sum_b scale(b) * sum_{c in block b} code(c) q(c)` over the row's
/// whole steps of [`SPLIT`] codes (as [`row_sum_avx2`]), on split activations: with
/// `q = 256 hi + lo`, each step is `vpmaddubsw` of the codes (bytes, even and odd halves: 4-bit
/// nibbles or a planar 3-bit chunk) with `hi` (signed) and of `lo` (unsigned) with the codes,
/// then per block two `vpmaddwd` (by 256 and by 1) and an add: 64 int16 products in 4
/// multiplies, where widening the codes took 4 `vpmaddwd` and 4 widenings. No int16 sum
/// saturates or wraps: pairs of code x hi are at most 2 * 15 * 128, a step's 7680; code x lo
/// pairs 2 * 15 * 255, a step's 15300; a block of 128 adds its two steps in int16 (at most
/// 15360 and 30600 < 2^15) before widening them, which halved the `vpmaddwd` (4-bit int16
/// matvecs 10-20% faster in cache).
///
/// # Safety
/// AVX2 and FMA; `rp` has the row's `64 B / 8` bytes per whole step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum_split_avx2<const B: usize>(rp: *const u8, x: &Q16, sd: &[f32]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let steps = x.hi.len() / SPLIT;
    let step = |j: usize| split_products_avx2::<B>(rp, x, j);
    let int32 = |(ph, pl): (__m256i, __m256i)| split_int32_avx2(ph, pl);
    if x.block >= SPLIT {
        // A block's two steps are added in int16 before they are widened (two `vpmaddwd`
        // a block, not four): at most 2 * 7680 and 2 * 15300. A third would not fit.
        assert!(x.block <= 2 * SPLIT, "int16 blocks of {} values: at most {}", x.block, 2 * SPLIT);
        let block = |j0: usize, j1: usize| {
            let (mut ph, mut pl) = step(j0);
            if j1 > j0 + 1 {
                let (h, l) = step(j0 + 1);
                (ph, pl) = (_mm256_add_epi16(ph, h), _mm256_add_epi16(pl, l));
            }
            int32((ph, pl))
        };
        return if x.block == SPLIT { block_sums::<1>(steps, sd, block) } else { block_sums::<2>(steps, sd, block) };
    }
    // Blocks of 32 (groups of an odd number of 32s): a step's halves are blocks 2j, 2j + 1.
    let mut a = _mm256_setzero_ps();
    for j in 0..steps {
        let (d0, d1) = (sd[2 * j], sd[2 * j + 1]);
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int32(step(j))), _mm256_setr_ps(d0, d0, d0, d0, d1, d1, d1, d1), a);
    }
    a
}

/// The int32 lane sums of one block of 128 codes (two steps, each `[e, o]` bytes) against its
/// split activations `hi` and `lo` (one register per step), as [`row_sum_split_avx512`]
/// describes: with `VNNI` four `vpdpbusd`, without two `vpmaddubsw` per byte plane.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_sums_avx512<const VNNI: bool>(c: [std::arch::x86_64::__m512i; 2], hi: [std::arch::x86_64::__m512i; 2], lo: [std::arch::x86_64::__m512i; 2]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if VNNI {
        let h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], hi[0]), c[1], hi[1]);
        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(h), lo[0], c[0]), lo[1], c[1])
    } else {
        let ph = _mm512_add_epi16(_mm512_maddubs_epi16(c[0], hi[0]), _mm512_maddubs_epi16(c[1], hi[1]));
        let pl = _mm512_add_epi16(_mm512_maddubs_epi16(lo[0], c[0]), _mm512_maddubs_epi16(lo[1], c[1]));
        _mm512_add_epi32(_mm512_madd_epi16(ph, _mm512_set1_epi16(256)), _mm512_madd_epi16(pl, _mm512_set1_epi16(1)))
    }
}

/// [`row_sum_split_avx2`] for blocks of two steps with AVX-512: a block of 128 codes per
/// iteration in 512-bit registers. Each step's codes come as one register `[e, o]`
/// ([`bits::step_codes_avx512`], shared with the int8 kernel), lined up with the split
/// activations as stored (per step, even positions then odd ones). Without `VNNI`: two
/// `vpmaddubsw` per byte plane, one int16 add (a block's two steps, as the AVX2 kernel adds
/// them), two `vpmaddwd`, a conversion and one multiply-add: about two thirds of the AVX2
/// kernel's instructions per code. With `VNNI`, `vpdpbusd` sums four byte products into each
/// int32 lane: codes (unsigned) x `hi` (signed) twice, the sum shifted left by 8, then `lo`
/// (unsigned) x codes (signed: at most 15) twice into it; no int16 stage, so nothing to
/// saturate (a lane's eight products: at most 8 * 15 * 128 * 256 + 8 * 15 * 255 < 2^22). A
/// short last block (one step) is a block with zero for its second step. Run only where the CPU has AVX-512 ([`crate::kernels::Wide`]); the loop
/// without VNNI is tested natively there and everywhere on an emulator
/// (`tests/avx512_emulated.rs`), the VNNI loop natively on CPUs with VNNI. Compiled inside
/// the row loop's AVX-512 wrappers ([`rows`]), whose target features it takes.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`), AVX2 and FMA; as [`row_sum_split_avx2`]; `x.block`
/// is `2 SPLIT`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum_split_avx512<const B: usize, const VNNI: bool>(rp: *const u8, x: &Q16, sd: &[f32]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.block, 2 * SPLIT);
    let steps = x.hi.len() / SPLIT;
    let (hp, lp) = (x.hi.as_ptr() as *const u8, x.lo.as_ptr());
    // Steps j and j + 1 as bytes, [e_j, o_j] and [e_j+1, o_j+1], as the int8 kernel reads them.
    let codes = |j: usize| [bits::step_codes_avx512::<B>(rp, j), bits::step_codes_avx512::<B>(rp, j + 1)];
    let ld = |p: *const u8| _mm512_loadu_si512(p as *const _);
    let sd = &sd[..steps.div_ceil(2)];
    let block = |b: usize, a: __m512| {
        let j = 2 * b;
        let [c0, c1] = codes(j);
        let (h, l) = (hp.add(j * SPLIT), lp.add(j * SPLIT));
        let sums = block_sums_avx512::<VNNI>([c0, c1], [ld(h), ld(h.add(SPLIT))], [ld(l), ld(l.add(SPLIT))]);
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(*sd.get_unchecked(b)), a)
    };
    // Two accumulators, alternate blocks: one chain waited on its multiply-add.
    let (mut a, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let whole = steps / 2;
    for b in (0..whole / 2).map(|i| 2 * i) {
        (a, a1) = (block(b, a), block(b + 1, a1));
    }
    if whole % 2 == 1 {
        a = block(whole - 1, a);
    }
    a = _mm512_add_ps(a, a1);
    if steps % 2 == 1 {
        // A last block of one step: the second step's codes and activations zero.
        let (j, z) = (steps - 1, _mm512_setzero_si512());
        let sums = block_sums_avx512::<VNNI>([bits::step_codes_avx512::<B>(rp, j), z], [ld(hp.add(j * SPLIT)), z], [ld(lp.add(j * SPLIT)), z]);
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(sd[steps / 2]), a);
    }
    crate::kernels::halves_avx512(a)
}

/// [`row_sum_split_avx512`] for [`ROWS4`] rows at once, each with its own block scales, as
/// their 8 lane sums: each block's split activations are loaded once for the four rows, the
/// four accumulators are independent chains, and the caller folds the four rows' lane sums
/// together ([`crate::kernels::sums4`]), per-OC after taking each row's zero-point lanes
/// ([`crate::kernels::zero_lanes`]) from them. SmolLM2's rows are short (576 to 1536 codes):
/// one at a time, a row paid about 7 ns beyond its blocks (one thread in cache: 768 x 576
/// 4-bit 17.1 ns a row, 256 x 1792 37.1), as much as the blocks of a row of 576 codes.
///
/// # Safety
/// As [`row_sum_split_avx512`] for each row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_split_avx512<const B: usize, const VNNI: bool>(rp: [*const u8; ROWS4], x: &Q16, sd: [&[f32]; ROWS4], ahead: usize) -> [std::arch::x86_64::__m256; ROWS4] {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.block, 2 * SPLIT);
    let steps = x.hi.len() / SPLIT;
    let (hp, lp) = (x.hi.as_ptr() as *const u8, x.lo.as_ptr());
    let ld = |p: *const u8| _mm512_loadu_si512(p as *const _);
    let sd = sd.map(|s| &s[..steps.div_ceil(2)]);
    // `ahead` ([`crate::kernels::Ahead4`]); a block's 16 B bytes are at most a line.
    let mut acc = [_mm512_setzero_ps(); ROWS4];
    for b in 0..steps / 2 {
        let j = 2 * b;
        let (h, l) = (hp.add(j * SPLIT), lp.add(j * SPLIT));
        let (h0, h1, l0, l1) = (ld(h), ld(h.add(SPLIT)), ld(l), ld(l.add(SPLIT)));
        for (i, a) in acc.iter_mut().enumerate() {
            crate::kernels::prefetch_line(rp[0].wrapping_add(ahead + (ROWS4 * b + i) * 16 * B));
            let (c0, c1) = (bits::codes_avx512::<B>(rp[i], j), bits::codes_avx512::<B>(rp[i], j + 1));
            let sums = block_sums_avx512::<VNNI>([c0, c1], [h0, h1], [l0, l1]);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(sd[i][b]), *a);
        }
    }
    if steps % 2 == 1 {
        // A last block of one step, as in the one-row loop.
        let (j, z) = (steps - 1, _mm512_setzero_si512());
        let (h0, l0) = (ld(hp.add(j * SPLIT)), ld(lp.add(j * SPLIT)));
        for (i, a) in acc.iter_mut().enumerate() {
            let sums = block_sums_avx512::<VNNI>([bits::codes_avx512::<B>(rp[i], j), z], [h0, z], [l0, z]);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(sd[i][steps / 2]), *a);
        }
    }
    acc.map(|a| crate::kernels::halves_avx512(a))
}

/// [`ROWS4`] per-OC rows from `r` on ([`row_oc`] for each, the kernel [`rows4_split_avx512`]).
///
/// # Safety
/// AVX2, FMA, AVX-512 F and BW (and VNNI if `VNNI`); `B` 3 or 4, `x.block` `2 SPLIT`, at most
/// [`SHORT`] blocks; rows `r..r + ROWS4` exist.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_oc<const B: usize, const VNNI: bool>(p: &PackedLinear, x: &Q16, (xsum, tail): (&[f32], &ZeroTail), per: usize, r: usize, ahead: Ahead4, sd: &mut [[f32; SHORT]; ROWS4]) -> [f32; ROWS4] {
    let (cols, pc, g) = (p.cols, xsum.len(), p.layout.group);
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let params = |i: usize| (&p.scales[(r + i) * pc..(r + i + 1) * pc], &p.zeros[(r + i) * pc..(r + i + 1) * pc]);
    let steps = x.hi.len() / SPLIT;
    assert!(rows.iter().all(|row| steps * SPLIT * B / 8 <= row.len()), "packed row too short for its codes");
    let n = x.d.len();
    crate::kernels::prefetch_params4(p, r + ahead.rows, pc);
    for (i, sd) in sd.iter_mut().enumerate() {
        block_scales(params(i).0, &x.d, per, sd);
    }
    let lanes = rows4_split_avx512::<B, VNNI>(rows.map(|row| row.as_ptr()), x, [&sd[0][..n], &sd[1][..n], &sd[2][..n], &sd[3][..n]], ahead.bytes);
    let mut sums = crate::kernels::oc_sums4(p, r, lanes, xsum, tail);
    if steps * SPLIT < cols {
        for (i, y) in sums.iter_mut().enumerate() {
            *y += dot_scalar(rows[i], B as u8, x, steps * SPLIT, cols, |c| params(i).0[c / g]);
        }
    }
    sums
}

/// [`ROWS4`] per-IC rows of one row group from `r` on ([`row_ic`] for each).
///
/// # Safety
/// As [`rows4_oc`], but any number of blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_ic<const B: usize, const VNNI: bool>(p: &PackedLinear, v: &Q16, bias: f32, r: usize, ahead: Ahead4) -> [f32; ROWS4] {
    let cols = v.q.len();
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let steps = v.hi.len() / SPLIT;
    assert!(rows.iter().all(|row| steps * SPLIT * B / 8 <= row.len()), "packed row too short for its codes");
    let mut sums = crate::kernels::sums4(rows4_split_avx512::<B, VNNI>(rows.map(|row| row.as_ptr()), v, [&v.d[..]; ROWS4], ahead.bytes));
    for (y, row) in sums.iter_mut().zip(rows) {
        *y += dot_scalar(row, B as u8, v, steps * SPLIT, cols, |_| 1.0) - bias;
    }
    sums
}

/// One row's kernel sum as 8 lane sums (per-OC: `s` the row's group scales, `per` blocks per
/// group; per-IC `s = [1]`, `per = usize::MAX`) and how many of its codes it covered (the
/// caller adds the rest).
///
/// # Safety
/// As [`row_sum`]; `row` is the row's codes followed by at least 8 bytes (the next row or the
/// buffer's padding): the 16-byte load of a 2-bit row's last step reaches past its codes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn body<const B: usize, const AVX512: bool, const VNNI: bool>(row: &[u8], x: &Q16, cols: usize, s: &[f32], per: usize, t: &Tables) -> (std::arch::x86_64::__m256, usize) {
    let split = B == 3 || B == 4;
    let steps = if split { x.hi.len() / SPLIT } else { cols / QB };
    if split {
        assert!(steps * SPLIT <= cols && steps * SPLIT * B / 8 <= row.len(), "packed row too short for its codes");
    } else {
        assert!(steps == 0 || (steps - 1) * 4 * B + 16 <= row.len(), "packed row too short for its codes");
    }
    let sum = if per == usize::MAX {
        // Per-IC: the blocks' own steps.
        row_sum::<B, AVX512, VNNI>(row, x, cols, &x.d, t)
    } else if x.d.len() <= SHORT {
        // Short rows (SmolLM2's: 5 to 12 blocks) on the stack: the thread-local buffer's
        // bookkeeping cost 5% of a decode.
        let mut sd = [0f32; SHORT];
        block_scales(s, &x.d, per, &mut sd);
        row_sum::<B, AVX512, VNNI>(row, x, cols, &sd[..x.d.len()], t)
    } else {
        let mut sd = SCALES.take();
        sd.resize(x.d.len(), 0.0);
        block_scales(s, &x.d, per, &mut sd);
        let r = row_sum::<B, AVX512, VNNI>(row, x, cols, &sd, t);
        SCALES.set(sd);
        r
    };
    (sum, steps * if split { SPLIT } else { QB })
}

/// The kernel for `B`-bit codes with block scales `sd`: 3- and 4-bit blocks of 128 in 512-bit
/// registers where `AVX512` (with `vpdpbusd` where `VNNI`), as the row loop's wrapper chose
/// ([`rows`]).
///
/// # Safety
/// AVX2 and FMA; as [`body`], which checked the row's length; AVX-512 F and BW if `AVX512`, VNNI if
/// `VNNI`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum<const B: usize, const AVX512: bool, const VNNI: bool>(row: &[u8], x: &Q16, cols: usize, sd: &[f32], t: &Tables) -> std::arch::x86_64::__m256 {
    match B {
        3 | 4 if AVX512 && x.block == 2 * SPLIT => row_sum_split_avx512::<B, VNNI>(row.as_ptr(), x, sd),
        3 | 4 => row_sum_split_avx2::<B>(row.as_ptr(), x, sd),
        _ => row_sum_avx2::<B>(row.as_ptr(), x, cols, sd, t),
    }
}

/// The decoder's constants in registers, built once per matvec.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Tables {
    shuf: [std::arch::x86_64::__m256i; 2],
    mul: [std::arch::x86_64::__m256i; 2],
    /// Which loop the 3- and 4-bit blocks of 128 take: [`row_sum_split_avx512`] with or without
    /// VNNI, or [`row_sum_split_avx2`].
    wide: Wide,
}

#[cfg(target_arch = "x86_64")]
impl Tables {
    /// # Safety
    /// AVX2 (checked by the caller: only built when the AVX2 kernel runs).
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn new() -> Self {
        use std::arch::x86_64::*;
        // Only 2-bit codes are decoded by shuffle and multiply.
        let (s, m) = decoder_tables(2);
        let ld8 = |a: &[i8; 32]| _mm256_loadu_si256(a.as_ptr() as *const __m256i);
        let ld16 = |a: &[i16; 16]| _mm256_loadu_si256(a.as_ptr() as *const __m256i);
        Tables { shuf: [ld8(&s[0]), ld8(&s[1])], mul: [ld16(&m[0]), ld16(&m[1])], wide: Wide::detect() }
    }
}

/// One per-OC output row, from the rounded `x` and its group sums.
///
/// # Safety
/// As [`body`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(p: &PackedLinear, x: &Q16, xsum: &[f32], per: usize, r: usize, row: &[u8], t: &Tables) -> f32 {
    let (cols, pc, g) = (p.cols, xsum.len(), p.layout.group);
    let (s, z) = (&p.scales[r * pc..(r + 1) * pc], &p.zeros[r * pc..(r + 1) * pc]);
    let (body, done) = body::<B, AVX512, VNNI>(row, x, cols, s, per, t);
    let tail = dot_scalar(row, B as u8, x, done, cols, |c| s[c / g]);
    hsum(body) + tail - crate::kernels::zero_term_avx2(s, z, xsum, 0.0)
}

/// One per-IC output row, from its row group's rounded `s x` and zero-point sum.
///
/// # Safety
/// As [`body`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(row: &[u8], v: &Q16, bias: f32, t: &Tables) -> f32 {
    let cols = v.q.len();
    let (body, done) = body::<B, AVX512, VNNI>(row, v, cols, &[1.0], usize::MAX, t);
    hsum(body) + dot_scalar(row, B as u8, v, done, cols, |_| 1.0) - bias
}

/// `y = W' x` with the AVX2 kernel; per-IC, each row group's `s x` rounded once
/// ([`crate::team::grouped_rows`]).
///
/// # Safety
/// AVX2 and FMA detected; `supported(p)`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn matvec_avx2(p: &PackedLinear, x: &[f32], y: &mut [f32]) {
    let t = Tables::new();
    if p.layout.axis == Axis::Ic {
        let prep = |kr: usize, slot: &mut (Q16, f32)| prepare_ic(p, x, kr, slot);
        crate::team::with_slots(&SLOTS, p.rows.div_ceil(p.layout.group), |slots| {
            // SAFETY: as the caller's.
            crate::team::grouped_rows(y, p.layout.group, slots, &prep, &|r0, y, (v, bias)| unsafe {
                rows(p, &Job::Ic { v, bias: *bias }, r0, y, &t)
            })
        });
        return;
    }
    let (xq, xsum) = prepare_oc(p, x);
    let job = Job::Oc { x: &xq, xsum: &xsum };
    // SAFETY: as the caller's.
    crate::team::rows(y, &|r0, y| unsafe { rows(p, &job, r0, y, &t) });
}

/// Rows `r0..r0 + y.len()` into `y` ([`crate::team::rows`]): the row loop, each row's kernel
/// and its sums in one function compiled for the kernel's instructions ([`rows`] picks it).
/// With the AVX-512 block loop a separate function called per row (its features differ from
/// the AVX2 row loop's), a SmolLM2 row of 576 codes spent as long in the call, the sum handed
/// back through memory and the row's reduction waiting on it as in the block loop itself: one
/// thread, 1536 x 576 3-bit per-OC in cache, the row loop was 49% of the time, the kernel 44%.
///
/// # Safety
/// AVX2 and FMA, AVX-512 F and BW if `AVX512`, VNNI if `VNNI`; as [`matvec_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run_rows<const B: usize, const AVX512: bool, const VNNI: bool>(p: &PackedLinear, job: &Job<Q16>, r0: usize, y: &mut [f32], t: &Tables) {
    let rb = bits::row_bytes(p.cols, B as u8);
    let four = AVX512 && (B == 3 || B == 4) && crate::kernels::short_rows(rb);
    let ahead = if four { Ahead4::new(rb) } else { Ahead4::default() };
    match *job {
        Job::Oc { x, xsum } => {
            // Activation blocks per group (a division per row was 1% of a small matrix's time).
            let per = p.layout.group / x.block;
            let mut r = r0;
            if four && x.block == 2 * SPLIT && x.d.len() <= SHORT {
                // Block scales on the stack, filled for each four rows.
                let (mut sd, tail) = ([[0f32; SHORT]; ROWS4], ZeroTail::new(xsum));
                while y.len() - (r - r0) >= ROWS4 {
                    y[r - r0..r - r0 + ROWS4].copy_from_slice(&rows4_oc::<B, VNNI>(p, x, (xsum, &tail), per, r, ahead, &mut sd));
                    r += ROWS4;
                }
            }
            for (r, y) in (r..).zip(&mut y[r - r0..]) {
                *y = row_oc::<B, AVX512, VNNI>(p, x, xsum, per, r, p.row_codes(r), t);
            }
        }
        Job::Ic { v, bias } => {
            let mut r = r0;
            if four && v.block == 2 * SPLIT {
                while y.len() - (r - r0) >= ROWS4 {
                    y[r - r0..r - r0 + ROWS4].copy_from_slice(&rows4_ic::<B, VNNI>(p, v, bias, r, ahead));
                    r += ROWS4;
                }
            }
            for (r, y) in (r..).zip(&mut y[r - r0..]) {
                *y = row_ic::<B, AVX512, VNNI>(p.row_codes(r), v, bias, t);
            }
        }
    }
}

/// [`run_rows`] with AVX2.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<const B: usize>(p: &PackedLinear, job: &Job<Q16>, r0: usize, y: &mut [f32], t: &Tables) {
    run_rows::<B, false, false>(p, job, r0, y, t)
}

/// [`run_rows`] with AVX-512, no VNNI.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn rows_avx512bw<const B: usize>(p: &PackedLinear, job: &Job<Q16>, r0: usize, y: &mut [f32], t: &Tables) {
    run_rows::<B, true, false>(p, job, r0, y, t)
}

/// [`run_rows`] with AVX-512 and VNNI.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn rows_vnni<const B: usize>(p: &PackedLinear, job: &Job<Q16>, r0: usize, y: &mut [f32], t: &Tables) {
    run_rows::<B, true, true>(p, job, r0, y, t)
}

/// Rows `r0..` of `p` into `y` with the loop for `p`'s width and the CPU ([`Tables::wide`]):
/// 3- and 4-bit codes take the AVX-512 block loop where the CPU has it, 2- and 8-bit codes
/// the AVX2 one.
///
/// # Safety
/// As [`matvec_avx2`].
#[cfg(target_arch = "x86_64")]
unsafe fn rows(p: &PackedLinear, job: &Job<Q16>, r0: usize, y: &mut [f32], t: &Tables) {
    match (p.layout.bits, t.wide) {
        (3, Wide::Vnni) => rows_vnni::<3>(p, job, r0, y, t),
        (4, Wide::Vnni) => rows_vnni::<4>(p, job, r0, y, t),
        (3, Wide::Avx512) => rows_avx512bw::<3>(p, job, r0, y, t),
        (4, Wide::Avx512) => rows_avx512bw::<4>(p, job, r0, y, t),
        (2, _) => rows_avx2::<2>(p, job, r0, y, t),
        (3, _) => rows_avx2::<3>(p, job, r0, y, t),
        (4, _) => rows_avx2::<4>(p, job, r0, y, t),
        _ => rows_avx2::<8>(p, job, r0, y, t),
    }
}

/// The definition of the int16 product, in f64 from the same rounded activations, and per row
/// how far it may be from the exact product `W' x` because of that rounding (each activation
/// moved at most half its block's step `d / 2`):
/// per-OC `y[r] = sum_c s[r,k(c)] (code[r,c] - z[r,k(c)]) x̂[c]`, bound `sum_c |W'[r,c]| d(c) / 2`;
/// per-IC `y[r] = sum_c (code[r,c] - z[kr,c]) v̂[kr][c]`, bound `sum_c |code[r,c] - z[kr,c]| d(c) / 2`.
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    reference(p, &prepare(p, x))
}

/// [`matvec_ref`] from activations already rounded (any [`Rounded`] kind).
pub(crate) fn reference<A: Rounded>(p: &PackedLinear, prep: &Prepared<A>) -> (Vec<f64>, Vec<f64>) {
    let (cols, l) = (p.cols, p.layout);
    let rb = bits::row_bytes(cols, l.bits);
    (0..p.rows)
        .map(|r| {
            let row = &p.codes[r * rb..(r + 1) * rb];
            let code = |c| f64::from(bits::code(row, cols, c, l.bits));
            // (weight factor, rounded activation, its step) of column c.
            let term = |c: usize| match prep {
                Prepared::Oc { x, xsum } => {
                    let k = r * xsum.len() + c / l.group;
                    (f64::from(p.scales[k]) * (code(c) - f64::from(p.zeros[k])), x.value(c), x.step(c))
                }
                Prepared::Ic { v } => {
                    let (kr, v) = (r / l.group, &v[r / l.group]);
                    (code(c) - f64::from(p.zeros[kr * cols + c]), v.value(c), v.step(c))
                }
            };
            (0..cols).map(term).fold((0.0, 0.0), |(y, b), (w, x, d)| (y + w * f64::from(x), b + w.abs() * f64::from(d) / 2.0))
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_sums_add_the_rounded_values() {
        for cols in [1, 31, 32, 100, 576, 1000] {
            let x: Vec<f32> = (0..cols).map(|i| ((i * 2654435761usize >> 7) % 2001) as f32 / 100.0 - 10.0).collect();
            let (q8, q16) = (crate::q8::Q8::new(&x), Q16::new(&x, 64));
            // Groups that are and are not whole blocks (200: runs end at block and group borders).
            for g in [32, 64, 128, 200] {
                let check = |got: Vec<f32>, value: &dyn Fn(usize) -> f32, what: &str| {
                    assert_eq!(got.len(), cols.div_ceil(g));
                    for (k, got) in got.iter().enumerate() {
                        let run = k * g..((k + 1) * g).min(cols);
                        let want: f64 = run.clone().map(|c| f64::from(value(c))).sum();
                        let size: f64 = run.map(|c| f64::from(value(c)).abs()).sum();
                        assert!((f64::from(*got) - want).abs() <= 1e-6 * size.max(1.0), "{what} cols {cols} g {g} group {k}: {got} vs {want}");
                    }
                };
                check(group_sums(&q8, cols, g), &|c| q8.value(c), "int8");
                check(group_sums(&q16, cols, g), &|c| q16.value(c), "int16");
                // The plain-x86-64 build of the body (group_sums takes the AVX2 one where it can).
                check(group_sums_body(&q8, cols, g), &|c| q8.value(c), "int8 plain");
                check(group_sums_body(&q16, cols, g), &|c| q16.value(c), "int16 plain");
            }
        }
    }
}
