//! Activations rounded to int16 per block ([`Q16`]), as the int16 kernels
//! ([`crate::matvec_i16`]) and the integer prompt GEMM ([`crate::matmul_int`]) read them: in
//! natural order, and for 2-, 3- and 4-bit codes split into high and low bytes in the order those
//! kernels read codes ([`Q16::split`]). Each AVX2 rounding has its plain-Rust definition beside
//! it ([`Q16::new`], [`Q16::split_ref`], [`Q16::scaled_ref`]).

use adadim_quantize::Axis;

use crate::format::PackedLinear;
#[cfg(target_arch = "x86_64")]
use crate::matvec_int::round_block_avx2;
use crate::matvec_int::{round_block, Rounded};

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
        Axis::Oc => [128, 64, 32].into_iter().find(|b| l.group.is_multiple_of(*b)).unwrap_or(QB),
    }
}

/// Largest int16 step count: `q = round(x / d)`, `d = max|x| / QMAX`.
const QMAX: f32 = 32767.0;

/// Activations rounded to int16 per block of `block`: value `i` is `q[i] * d[i / block]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Q16 {
    pub q: Vec<i16>,
    pub d: Vec<f32>,
    pub block: usize,
    /// High bytes of `q` (signed) for the 2-, 3- and 4-bit kernels: each whole step of [`SPLIT`]
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
    /// on one thread before its rows start.
    pub fn rounded(x: &[f32], block: usize, split: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if block == MAX_BLOCK && crate::simd::simd_available() {
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
        if split {
            v.split()
        } else {
            v
        }
    }

    /// Fills `hi` and `lo` (for the 2-, 3- and 4-bit kernels): with AVX2 where the CPU has it, the
    /// same bytes as [`Q16::split_ref`].
    pub fn split(self) -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::simd_available() {
            let mut me = self;
            let steps = me.q.len() / SPLIT;
            let (mut hi, mut lo) = (vec![0i8; steps * SPLIT], vec![0u8; steps * SPLIT]);
            for j in 0..steps {
                // SAFETY: AVX2 was detected; step j's 64 values and bytes are in bounds.
                unsafe {
                    use std::arch::x86_64::*;
                    let n = std::array::from_fn(|i| {
                        _mm256_loadu_si256(me.q.as_ptr().add(j * SPLIT + 16 * i) as *const __m256i)
                    });
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
    /// `hi` and `lo` filled when `split` (2-, 3- and 4-bit codes), and `sum_c z[c] v̂[c]`: with AVX2 for
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
        if block == MAX_BLOCK && crate::simd::simd_available() {
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
        let bias = z
            .chunks(block)
            .zip(q.q.chunks(block))
            .zip(&q.d)
            .map(|((z, qb), d)| d * z.iter().zip(qb).map(|(z, &q)| z * f32::from(q)).sum::<f32>())
            .sum::<f32>();
        (q, bias)
    }

    /// [`Q16::rounded`] (`sz = None`) or [`Q16::scaled`] (`sz = Some((s, z))`) with AVX2 on blocks
    /// of [`MAX_BLOCK`], into `self`: each whole block multiplied by its scales, rounded and
    /// packed to int16 in registers, stored in natural order and (`split`) as the 2-, 3- and 4-bit
    /// kernels read it ([`round_run`]); a short last block of one step (SmolLM2's rows of 576:
    /// 4.5 blocks) the same way, other short last blocks in plain Rust. Returns the zero-point
    /// sum (0 without `z`). Per-IC it runs per row group on every matvec, where plain Rust
    /// (and an allocating half block) cost a sizeable part of the product's time.
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
        let out = (q.as_mut_ptr(), split.then_some((hi.as_mut_ptr(), lo.as_mut_ptr())));
        // sum_c z[c] d(c) q[c], lane by lane.
        let mut zq = _mm256_setzero_ps();
        for b in 0..blocks {
            d.push(round_run::<{ B / 8 }, { B / 16 }>(x.as_ptr(), szp, b * B, out, &mut zq));
        }
        let o = blocks * B;
        if n - o == SPLIT {
            d.push(round_run::<{ SPLIT / 8 }, { SPLIT / 16 }>(x.as_ptr(), szp, o, out, &mut zq));
        }
        let mut bias = crate::simd::hsum(zq);
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
/// as the 2-, 3- and 4-bit kernels read it. Returns the block's step.
///
/// # Safety
/// AVX2 and FMA; `x`, the scales and zeros hold `o + 8 V` values; `out`'s buffers as many.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn round_run<const V: usize, const H: usize>(
    x: *const f32,
    sz: Option<(*const f32, *const f32)>,
    o: usize,
    out: (*mut i16, Option<(*mut i8, *mut u8)>),
    zq: &mut std::arch::x86_64::__m256,
) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(H * 2 == V && V.is_multiple_of(8));
    let xv = |i: usize| _mm256_loadu_ps(x.add(o + 8 * i));
    let (r, db) = match sz {
        None => round_block_avx2::<V>(&std::array::from_fn(xv), QMAX),
        Some((sp, zp)) => {
            // The scale and zero rows stream from memory: ask for them ahead.
            for l in (0..V * 32).step_by(64) {
                crate::simd::prefetch((sp.add(o) as *const u8).wrapping_add(l));
                crate::simd::prefetch((zp.add(o) as *const u8).wrapping_add(l));
            }
            let v: [__m256; V] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(sp.add(o + 8 * i)), xv(i)));
            let (r, db) = round_block_avx2(&v, QMAX);
            let zr =
                |i: usize, a: __m256| _mm256_fmadd_ps(_mm256_loadu_ps(zp.add(o + 8 * i)), _mm256_cvtepi32_ps(r[i]), a);
            let (mut t0, mut t1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in (0..V).step_by(2) {
                (t0, t1) = (zr(i, t0), zr(i + 1, t1));
            }
            *zq = _mm256_fmadd_ps(_mm256_add_ps(t0, t1), _mm256_set1_ps(db), *zq);
            (r, db)
        }
    };
    // Sixteen values per register in natural order, then each step of 64 split.
    let nat: [__m256i; H] =
        std::array::from_fn(|i| _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(r[2 * i], r[2 * i + 1])));
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

/// Activations per step of the 2-, 3- and 4-bit kernels (their `hi` / `lo` order).
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
    let even_odd = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
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
