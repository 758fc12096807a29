//! `y = W' x` straight from packed codes, for both axes and every width.
//!
//! Where the time goes: a matvec reads every packed weight once and does one multiply-add
//! per weight, so it is bound by memory bandwidth once the matrix is larger than the caches;
//! the work is to decode codes as fast as they arrive. Eight `b`-bit codes are exactly `b`
//! bytes ([`crate::bits`]): one unaligned 32-bit load (64-bit for b = 8), eight shifts and
//! masks, a conversion and a multiply-add (`vpbroadcastd` / `vpsrlvd` / `vpand` /
//! `vcvtdq2ps` / `vfmadd` under AVX2).
//! The AVX2+FMA kernel ([`dot_codes_avx2`], used for 2 and 4 bits when the CPU has it) and
//! the portable loop ([`dot_codes`]) sit side by side (planar 3-bit rows, [`crate::bits`], are
//! unpacked to a byte per code first and multiplied as 8-bit codes); [`matvec_ref`] is the plain definition,
//! in f64, that the tests hold both to. (AVX-512: the int16 kernel's 3- and 4-bit blocks, [`crate::q16`],
//! where [`avx512_available`].)

use adadim_quantize::Axis;
use rayon::prelude::*;

use crate::bits;
use crate::format::PackedLinear;
use crate::q16;

/// `sum_j code(c0 + j) * v[j]` over a packed row of `B`-bit codes (`c0 % 8 == 0` for the fast path).
#[inline(always)]
fn dot_codes<const B: usize>(row: &[u8], c0: usize, v: &[f32]) -> f32 {
    if c0 % 8 != 0 {
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
        prefetch(rp.add(i * B));
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

/// How far ahead of the bytes it is decoding a kernel asks for the row's next bytes: 4 KiB.
/// Rows lie back to back, so one thread's matvec reads one long stream, and the hardware
/// prefetcher alone left the core waiting on it. On a Zen 3 (2 threads, no AVX-512) a hint
/// 2 KiB ahead took 4-bit int8 from 22 to 28-30 GB/s against a triad of 30. On a Zen 5, 2 KiB
/// was too close for large matrices. Measured there, alternating builds, 2 threads, from
/// memory (us): 4096 x 14336 w4 int16 865-909 -> 688-722 with 4 KiB, w3 int16 768-773 ->
/// 583-593, w4 int8 767-800 -> 674-686; SmolLM2's shapes (576 to 1536) unchanged, decode
/// unchanged. Farther was faster still for large matrices (8-16 KiB, into L1 or L2: one
/// thread 1660 -> 935-1050 us on w4 int16) but 3-7% slower on SmolLM2's shapes on two
/// threads: each thread's hints run that far past its own part of a small matrix, into the
/// other thread's part or past the end. A far hint clamped to the thread's part is the next
/// step.
pub(crate) const PREFETCH: usize = 4 << 10;

/// Asks for the cache line [`PREFETCH`] bytes past `p` (a hint: it never faults, so it may
/// point past the buffer; the address is formed with `wrapping_add`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    prefetch_line(p.wrapping_add(PREFETCH));
}

/// Asks for the cache line holding `p` (a hint, as [`prefetch`]; also decode attention's).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::*;
    // SAFETY: prefetch reads nothing the program sees and does not fault on any address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

/// Whether rows of `row_bytes` are short enough for the four-row kernels: four of them
/// within [`PREFETCH`]. Short rows (SmolLM2's: 576 to 1536 codes) paid as much around their
/// blocks as in them, and four at a time made them 20-30% faster in cache and up to 16% from
/// memory (two threads, best of 6, us: 1536 x 576 3-bit int16 per-OC 15.7 -> 13.2, 4-bit
/// 14.5 -> 12.6; 576 x 1536 4-bit per-OC 12.9 -> 11.8, per-IC 12.3 -> 13.2, the one loss).
/// Long rows gain nothing from it from memory and read four streams at once: 14336 x 4096
/// 4-bit int16 per-OC 672 -> 709 us, per-IC 686 -> 752.
pub(crate) fn short_rows(row_bytes: usize) -> bool {
    ROWS4 * row_bytes <= PREFETCH
}

/// How far ahead a kernel that walks [`ROWS4`] rows side by side (rows `row_bytes` apart)
/// asks for each row's bytes: whole passes of four rows, at least [`PREFETCH`], so each row
/// asks for the same place in a row of a later pass. Each row asking [`PREFETCH`] past itself
/// (as a one-row kernel does) made reading from memory slower than with one row at a time (one
/// thread, 576 x 1536 4-bit int16: 19.6 -> 21.9 us): the first row's hints fell on the other
/// three rows' bytes, which the pass was reading already. Worked out once per run of rows:
/// per four rows, its divisions and the checks around them were a sixth of a 1536 x 576 3-bit
/// per-OC matvec outside the block loop.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ahead4 {
    /// Bytes past a row's codes.
    pub(crate) bytes: usize,
    /// The same distance in rows.
    pub(crate) rows: usize,
}

impl Ahead4 {
    pub(crate) fn new(row_bytes: usize) -> Self {
        debug_assert!(short_rows(row_bytes));
        let pass = ROWS4 * row_bytes;
        let bytes = PREFETCH.div_ceil(pass.max(1)).max(1) * pass;
        Ahead4 { bytes, rows: bytes / row_bytes.max(1) }
    }
}

/// Asks for the per-OC scales and zeros (`pc` a row) of the [`ROWS4`] rows from row `r` on
/// (the rows [`Ahead4::rows`] after the ones being read). Without it a four-row kernel read
/// more slowly from memory than one row at a time (one thread, 576 x 1536 4-bit int16 per-OC:
/// 19.3 us one row at a time, 21.6 four, 17.3 with these hints; best of 5 each).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_params4(p: &PackedLinear, r: usize, pc: usize) {
    let at = r * pc;
    let (sp, zp) = (p.scales.as_ptr().wrapping_add(at) as *const u8, p.zeros.as_ptr().wrapping_add(at) as *const u8);
    for o in (0..ROWS4 * pc * 4).step_by(64) {
        prefetch_line(sp.wrapping_add(o));
        prefetch_line(zp.wrapping_add(o));
    }
}

/// Sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(a: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
}

/// The two 256-bit halves of `a` added: 16 lane sums folded to the 8 the AVX2 code reduces.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn halves_avx512(a: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))))
}

/// Rows the four-row kernels ([`crate::q16`], [`crate::q8`]) take together.
pub(crate) const ROWS4: usize = 4;

/// A run of rows' inputs for a matvec's row loop on rounded activations `A` ([`crate::q16`],
/// [`crate::q8`]): per-OC the rounded `x` and its group sums, per-IC the row group's rounded
/// `s x` and zero-point sum.
#[cfg(target_arch = "x86_64")]
pub(crate) enum Job<'a, A> {
    Oc { x: &'a A, xsum: &'a [f32] },
    Ic { v: &'a A, bias: f32 },
}

/// The sums of four rows' 8 lane sums: three `vhaddps` and one add for the four, where a
/// reduction per row takes five dependent instructions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(crate) unsafe fn sums4(r: [std::arch::x86_64::__m256; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // [a 01, a 23, b 01, b 23 | a 45, a 67, b 45, b 67], then [a 0-3, b 0-3, c 0-3, d 0-3 | 4-7].
    let q = _mm256_hadd_ps(_mm256_hadd_ps(r[0], r[1]), _mm256_hadd_ps(r[2], r[3]));
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps::<1>(q)));
    out
}

/// The per-OC zero-point term of a row, `sum_k s[k] (z[k] - offset) xsum[k]`, eight groups at a
/// time (as a scalar loop it took a sixth of a large 4-bit int8 matvec: one term per group of
/// 128 codes against about three instructions per 64 codes in the kernel).
///
/// # Safety
/// AVX2 and FMA; the three slices have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn zero_term_avx2(s: &[f32], z: &[f32], xsum: &[f32], offset: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = s.len();
    assert!(z.len() == n && xsum.len() == n, "zero term: {} scales, {} zeros, {} sums", n, z.len(), xsum.len());
    let (sp, zp, xp) = (s.as_ptr(), z.as_ptr(), xsum.as_ptr());
    let off = _mm256_set1_ps(offset);
    let mut acc = _mm256_setzero_ps();
    let n8 = n / 8 * 8;
    for k in (0..n8).step_by(8) {
        let sz = _mm256_mul_ps(_mm256_loadu_ps(sp.add(k)), _mm256_sub_ps(_mm256_loadu_ps(zp.add(k)), off));
        acc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xp.add(k)), acc);
    }
    hsum(acc) + zero_term_ref(&s[n8..], &z[n8..], &xsum[n8..], offset)
}

/// [`zero_term_avx2`] as 8 lane sums, for a four-row kernel to subtract from its lane sums
/// before it folds them ([`sums4`]): eight groups a load, the last `n % 8` from one more load
/// of 8 where `s` and `z` go on that far (the row's params followed by the next rows'), its
/// lanes past the row's groups zeroed after the products ([`ZeroTail`]), else in plain Rust
/// into lane 0. SmolLM2's rows have 5 groups: in plain Rust, as the compiler unrolled it, the
/// term took about 100 instructions a row, a sixth of a 1536 x 576 3-bit per-OC matvec. No
/// masked load: with a masked AVX-512 load of a row's 5 params (its other lanes past them),
/// per-OC 1536 x 576 matvecs took 120 us instead of 14 in `bench kernels` after the 576 x 1536
/// matrices had been freed (not when run alone); masked-off lanes reaching a page the process
/// cannot read are the likely cause.
///
/// # Safety
/// AVX2 and FMA; `xsum` has `n` values, `s` and `z` at least `n` (the row's first `n`), `tail`
/// was built from `xsum`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn zero_lanes(s: &[f32], z: &[f32], xsum: &[f32], offset: f32, tail: &ZeroTail) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let n = xsum.len();
    assert!(s.len() >= n && z.len() >= n, "zero term: {} scales, {} zeros, {n} sums", s.len(), z.len());
    let (sp, zp, xp) = (s.as_ptr(), z.as_ptr(), xsum.as_ptr());
    let off = _mm256_set1_ps(offset);
    let n8 = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for k in (0..n8).step_by(8) {
        let sz = _mm256_mul_ps(_mm256_loadu_ps(sp.add(k)), _mm256_sub_ps(_mm256_loadu_ps(zp.add(k)), off));
        acc = _mm256_fmadd_ps(sz, _mm256_loadu_ps(xp.add(k)), acc);
    }
    if n8 == n {
        return acc;
    }
    if s.len() >= n8 + 8 && z.len() >= n8 + 8 {
        // Lanes past the row hold the next row's params (any value, inf and NaN included):
        // zeroed after the products.
        let sz = _mm256_mul_ps(_mm256_loadu_ps(sp.add(n8)), _mm256_sub_ps(_mm256_loadu_ps(zp.add(n8)), off));
        return _mm256_add_ps(acc, _mm256_and_ps(_mm256_mul_ps(sz, tail.x), tail.mask));
    }
    let t = zero_term_ref(&s[n8..n], &z[n8..n], &xsum[n8..], offset);
    _mm256_add_ps(acc, _mm256_setr_ps(t, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
}

/// The sums of per-OC rows `r..r + ROWS4` from their kernel's lane sums: each row's zero-point
/// lanes ([`zero_lanes`], from the row's params and those after it) taken away, then the four
/// folded ([`sums4`]). The four-row kernels of both activation widths end with it.
///
/// # Safety
/// AVX2 and FMA; rows `r..r + ROWS4` exist, with `xsum.len()` groups each; `tail` was built
/// from `xsum`. Compiled inside the row loops' wrappers, whose target features it takes (as a
/// function of its own the four rows' lanes went through memory: 4% of a 1536 x 576 matvec).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn oc_sums4(p: &PackedLinear, r: usize, mut lanes: [std::arch::x86_64::__m256; ROWS4], xsum: &[f32], tail: &ZeroTail) -> [f32; ROWS4] {
    let pc = xsum.len();
    for (i, l) in lanes.iter_mut().enumerate() {
        let (s, z) = (&p.scales[(r + i) * pc..], &p.zeros[(r + i) * pc..]);
        *l = std::arch::x86_64::_mm256_sub_ps(*l, zero_lanes(s, z, xsum, 0.0, tail));
    }
    sums4(lanes)
}

/// The last `n % 8` of a per-OC `x`'s `n` group sums in lanes (the rest zero) and the mask of
/// those lanes, for [`zero_lanes`]: built once per run of rows.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct ZeroTail {
    x: std::arch::x86_64::__m256,
    mask: std::arch::x86_64::__m256,
}

#[cfg(target_arch = "x86_64")]
impl ZeroTail {
    /// # Safety
    /// AVX.
    #[target_feature(enable = "avx")]
    #[inline]
    pub(crate) unsafe fn new(xsum: &[f32]) -> Self {
        use std::arch::x86_64::*;
        let rest = &xsum[xsum.len() / 8 * 8..];
        let (mut x, mut m) = ([0f32; 8], [0i32; 8]);
        x[..rest.len()].copy_from_slice(rest);
        m[..rest.len()].fill(-1);
        ZeroTail { x: _mm256_loadu_ps(x.as_ptr()), mask: _mm256_castsi256_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i)) }
    }
}

/// [`zero_term_avx2`] in plain Rust: the definition it is tested against.
pub(crate) fn zero_term_ref(s: &[f32], z: &[f32], xsum: &[f32], offset: f32) -> f32 {
    s.iter().zip(z).zip(xsum).map(|((s, z), x)| s * (z - offset) * x).sum()
}

/// [`dot_codes`] with AVX2 (per-IC rows: one long dot product).
///
/// # Safety
/// AVX2 and FMA; `row` extends [`bits::PAD`] bytes past its codes or to the buffer's end-padding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_codes_avx2<const B: usize>(row: &[u8], c0: usize, v: &[f32]) -> f32 {
    if c0 % 8 != 0 || B == 8 {
        return dot_codes::<B>(row, c0, v);
    }
    let n8 = v.len() / 8;
    let base = c0 / 8 * B;
    assert!(n8 == 0 || base + (n8 - 1) * B + 4 <= row.len(), "packed row too short for its codes");
    let n = n8 * 8;
    hsum(chunks_avx2::<B>(row.as_ptr().add(base), v.as_ptr(), n8)) + v[n..].iter().enumerate().map(|(j, &x)| f32::from(bits::get(row, c0 + n + j, B as u8)) * x).sum::<f32>()
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
    if group % 8 != 0 || B == 8 {
        return (0..s.len()).map(|k| {
            let c0 = k * group;
            s[k] * (dot_codes::<B>(row, c0, &x[c0..(c0 + group).min(cols)]) - z[k] * xsum[k])
        }).sum();
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
                oc_row(l.bits, row, x, &p.scales[r * pc..(r + 1) * pc], &p.zeros[r * pc..(r + 1) * pc], xsum, l.group, simd)
            }
            Prepared::Ic { v, bias } => {
                let kr = r / l.group;
                dot(l.bits, row, 0, &v[kr * cols..(kr + 1) * cols], simd) - bias[kr]
            }
        };
    }
}

/// Whether this CPU runs the AVX2 kernel.
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Set by [`assume_avx512`]: [`avx512_available`] then answers true whatever the CPU has.
static AVX512_ASSUMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the AVX-512 kernels run (3- and 4-bit codes: the int16 blocks of 128, [`q16`], and
/// every int8 step, [`crate::q8`]): this CPU has AVX-512 F and BW besides AVX2 and FMA, and
/// `ADADIM_AVX512` is not `0` in the environment (to compare them with the AVX2 kernels, or
/// rule them out). Decided once per process.
pub fn avx512_available() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if AVX512_ASSUMED.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            simd_available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && std::env::var("ADADIM_AVX512").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the int8 and int16 kernels' AVX-512 loops use VNNI (`vpdpbusd`, [`crate::q8`],
/// [`crate::q16`]): [`avx512_available`], the CPU has it, and `ADADIM_VNNI` is not `0` in the
/// environment (to time or test the loops without it on such a CPU). Decided once per process.
/// False under [`assume_avx512`]: the emulator the tests run those kernels on has no VNNI.
pub fn avx512_vnni_available() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if AVX512_ASSUMED.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx512_available() && is_x86_feature_detected!("avx512vnni") && std::env::var("ADADIM_VNNI").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Which 3- and 4-bit loop the int8 and int16 kernels take on this CPU, decided once per
/// matvec: AVX-512 with or without VNNI (`vpdpbusd` in place of `vpmaddubsw` + `vpmaddwd`), or
/// AVX2.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Wide {
    Avx2,
    /// AVX-512 F and BW ([`avx512_available`]), no VNNI.
    Avx512,
    /// AVX-512 with VNNI ([`avx512_vnni_available`]).
    Vnni,
}

impl Wide {
    pub(crate) fn detect() -> Self {
        if avx512_vnni_available() {
            Wide::Vnni
        } else if avx512_available() {
            Wide::Avx512
        } else {
            Wide::Avx2
        }
    }
}

/// Makes [`avx512_available`] true whatever the CPU says (and [`avx512_vnni_available`] false): for running the AVX-512 kernels on an
/// emulator that has the instructions when the host has not (the tests' `avx512_emulated`).
///
/// # Safety
/// Every kernel called afterwards, on any thread, runs on a CPU (or emulator) with AVX-512 F
/// and BW, AVX2 and FMA; otherwise it executes instructions the CPU does not have.
#[doc(hidden)]
pub unsafe fn assume_avx512() {
    AVX512_ASSUMED.store(true, std::sync::atomic::Ordering::Relaxed);
}

impl PackedLinear {
    /// `y = W' x` (`x` has `cols` values, `y` gets `rows`), from the packed codes.
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows` (a caller's bug, not bad input).
    ///
    /// With AVX2, 2, 3, 4 or 8 bits and per-OC groups of whole [`q16::QB`]-steps, the activations are
    /// rounded to int16 per block ([`crate::q16`]: within about 1e-5 of the f32 product);
    /// otherwise this is [`PackedLinear::matvec_f32`].
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "matvec: x has {} values for {} input channels", x.len(), self.cols);
        assert_eq!(y.len(), self.rows, "matvec: y has {} values for {} output channels", y.len(), self.rows);
        #[cfg(target_arch = "x86_64")]
        if simd_available() && q16::supported(self) {
            // SAFETY: AVX2 and FMA were detected; the layout is one the kernel handles.
            unsafe { q16::matvec_avx2(self, x, y) };
            return;
        }
        self.matvec_f32(x, y);
    }

    /// `y = W' x` with the activations rounded to int8 per block of 32 ([`crate::q8`]: llama.cpp's
    /// Q8_0 precision, for its speed) where this CPU and layout have that kernel (3, 4 or 8 bits, AVX2);
    /// otherwise [`PackedLinear::matvec`].
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows`.
    pub fn matvec_q8(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "matvec: x has {} values for {} input channels", x.len(), self.cols);
        assert_eq!(y.len(), self.rows, "matvec: y has {} values for {} output channels", y.len(), self.rows);
        if !crate::q8::matvec(self, x, y) {
            self.matvec(x, y);
        }
    }

    /// Whether [`PackedLinear::matvec`] rounds the activations to int16 on this CPU.
    pub fn matvec_rounds_activations(&self) -> bool {
        cfg!(target_arch = "x86_64") && simd_available() && q16::supported(self)
    }

    /// `y = W' x` with `x` kept in f32 (codes converted to floats; the AVX2 kernel when the CPU
    /// has it): the exact product up to f32 round-off.
    pub fn matvec_f32(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "matvec: x has {} values for {} input channels", x.len(), self.cols);
        assert_eq!(y.len(), self.rows, "matvec: y has {} values for {} output channels", y.len(), self.rows);
        let prep = prepare(self, x);
        let simd = simd_available();
        // On the decode team when there is one, as the integer kernels.
        crate::team::rows(y, &|r0, y| rows_body(self, &prep, r0, y, simd));
    }

    /// One thread, no SIMD: the portable loop (for tests of the SIMD one).
    pub fn matvec_portable(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!((x.len(), y.len()), (self.cols, self.rows));
        let prep = prepare(self, x);
        rows_body(self, &prep, 0, y, false);
    }
}

/// The precision the integer matvec kernels round activations to: 16 bits ([`crate::q16`], the
/// default: within about 1e-5 of the f32 product) or 8 bits in blocks of 32 ([`crate::q8`]:
/// llama.cpp's Q8_0 precision, faster; 3-, 4- and 8-bit codes, 2-bit keeps 16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActBits {
    #[default]
    I16,
    I8,
}

impl ActBits {
    pub fn bits(self) -> u8 {
        match self {
            ActBits::I16 => 16,
            ActBits::I8 => 8,
        }
    }

    /// From a bit count (16 or 8).
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            16 => Some(ActBits::I16),
            8 => Some(ActBits::I8),
            _ => None,
        }
    }
}

impl PackedLinear {
    /// [`PackedLinear::matvec`] or [`PackedLinear::matvec_q8`] as `act` says.
    pub fn matvec_act(&self, act: ActBits, x: &[f32], y: &mut [f32]) {
        match act {
            ActBits::I16 => self.matvec(x, y),
            ActBits::I8 => self.matvec_q8(x, y),
        }
    }
}

/// Output channels dequantized per task of [`PackedLinear::matmul`]: 64 rows of f32 stay in L2.
const PANEL: usize = 64;

impl PackedLinear {
    /// `Y = X W'^T` for `t` tokens: `x` row-major `[t, cols]`, `y` row-major `[t, rows]`
    /// (prefill and evaluation). Panels of [`PANEL`] output channels are dequantized into a
    /// small f32 buffer and multiplied with one GEMM each; panels run in parallel. The
    /// dequantization costs `1/t` of the GEMM's work, so this runs at the f32 GEMM rate while
    /// the weights stay packed in memory.
    pub fn matmul(&self, x: &[f32], t: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), t * cols, "matmul: x is not [{t}, {cols}]");
        assert_eq!(y.len(), t * rows, "matmul: y is not [{t}, {rows}]");
        let y_ptr = SendPtr(y.as_mut_ptr());
        (0..rows.div_ceil(PANEL)).into_par_iter().for_each_init(
            || vec![0f32; PANEL * cols],
            |panel, k| {
                let (r0, r1) = (k * PANEL, ((k + 1) * PANEL).min(rows));
                let n = r1 - r0;
                let w = &mut panel[..n * cols];
                self.dequantize_rows(r0, w);
                let y_ptr = &y_ptr;
                // SAFETY: dst is columns r0..r1 of the row-major (t x rows) `y`, which no other
                // task writes; lhs is x (t x cols, row-major); rhs is W'^T read from the panel
                // (element (c, j) = w[j * cols + c]). All indices stay inside their buffers.
                unsafe {
                    gemm::gemm(
                        t, n, cols, y_ptr.0.add(r0), 1, rows as isize, false,
                        x.as_ptr(), 1, cols as isize,
                        w.as_ptr(), cols as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
            },
        );
    }
}

/// A pointer the panel tasks share; each writes its own columns only.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the buffer behind it (see `matmul`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The definition: `y[r] = sum_c W'[r, c] x[c]` with `W'` from [`PackedLinear::dequantize`],
/// accumulated in f64. Also returns `sum_c |W'[r, c] x[c]|` per row, the scale of the round-off.
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let w = p.dequantize();
    w.chunks(p.cols)
        .map(|row| row.iter().zip(x).fold((0.0, 0.0), |(s, a), (&w, &x)| (s + f64::from(w) * f64::from(x), a + (f64::from(w) * f64::from(x)).abs())))
        .unzip()
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn zero_term_avx2_sums_as_the_definition() {
        if !super::simd_available() {
            return;
        }
        let v = |n: usize, seed: usize| (0..n).map(|i| (((i + seed) * 2654435761usize >> 9) % 1000) as f32 / 100.0 - 3.0).collect::<Vec<f32>>();
        for n in [0, 1, 5, 7, 8, 9, 12, 15, 16, 17, 112, 115] {
            let (s, z, x) = (v(n, 1), v(n, 2), v(n, 3));
            for off in [0.0, 128.0] {
                let want: f64 = (0..n).map(|k| f64::from(s[k]) * (f64::from(z[k]) - off) * f64::from(x[k])).sum();
                let scale: f64 = (0..n).map(|k| (f64::from(s[k]) * (f64::from(z[k]) - off) * f64::from(x[k])).abs()).sum();
                // SAFETY: AVX2 and FMA were detected.
                let got = unsafe { super::zero_term_avx2(&s, &z, &x, off as f32) };
                assert!((f64::from(got) - want).abs() <= 1e-6 * scale.max(1.0), "n {n} offset {off}: {got} vs {want}");
                // The four-row kernels' lanes: the row alone (the last n % 8 in plain Rust), and
                // followed by another row's params, some not finite (the last n % 8 from one
                // more load, the lanes past the row masked).
                let after = |v: &[f32]| [v, &[f32::NAN, f32::INFINITY, -1e30, 7.0, f32::NEG_INFINITY, 0.0, 3.0, f32::NAN]].concat();
                let (s2, z2) = (after(&s), after(&z));
                for (s, z, how) in [(&s[..], &z[..], "alone"), (&s2[..], &z2[..], "followed")] {
                    // SAFETY: as above.
                    let got = unsafe { super::hsum(super::zero_lanes(s, z, &x, off as f32, &super::ZeroTail::new(&x))) };
                    assert!((f64::from(got) - want).abs() <= 1e-6 * scale.max(1.0), "lanes, {how}, n {n} offset {off}: {got} vs {want}");
                }
                assert!((f64::from(super::zero_term_ref(&s, &z, &x, off as f32)) - want).abs() <= 1e-6 * scale.max(1.0));
            }
        }
    }
}
