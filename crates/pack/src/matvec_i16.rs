//! The decode matvec on int16 activations: `x` rounded to int16 per block ([`Q16`]), codes
//! widened to int16 in registers, `vpmaddwd` products summed in int32 over the whole block,
//! one float multiply-add per block.
//!
//! Why: the f32 kernel ([`crate::matvec_f32`]) converts every code to a float and spends five
//! instructions per eight weights, compute-bound below memory bandwidth. Here 2-, 3- and
//! 4-bit codes stay bytes: a step of 64 (4-bit low and high nibbles, a planar 3-bit chunk,
//! [`bits::chunk3_avx2`], or 2-bit bytes widened to words and shifted) gives the even codes
//! and the odd ones, and the int16 activations are
//! stored split into high and low bytes in that order ([`Q16::split`]), so `vpmaddubsw`
//! multiplies 32 codes by 32 bytes at once ([`row_sum_split_avx2`]). 8-bit codes are widened
//! directly (`vpmovzxbw`).
//! A block is up to 128 activations (per-OC: the largest of 128, 64, 32 dividing the group,
//! so a block never straddles two scales); its int32 sums are converted and scaled once.
//!
//! What it costs in accuracy: every activation (per-OC: `x`; per-IC: `s[kr, c] x[c]`) moves by
//! at most half a step of its block, `max|block| / 65534`: the result stays within about 1e-5
//! of the f32 product. Sums stay inside int32: a lane adds 16 products per block of 128, at
//! most 16 * 255 * 32767 < 2^28. The tests hold the kernels to [`matvec_ref`] (the same
//! rounded activations, f64) and the whole product to the exact one within the bound
//! [`matvec_ref`] also returns. The row loop is [`crate::matvec_int`]'s.

// Index loops over registers and steps mirror the vector layout the intrinsics use.
#![allow(clippy::needless_range_loop)]

use adadim_quantize::Axis;

use crate::bits;
use crate::format::PackedLinear;
use crate::matvec_int::IntActs;
#[cfg(target_arch = "x86_64")]
use crate::matvec_int::{rows_avx2, rows_avx512bw, rows_vnni, Job, Outs};
use crate::round_i16::{block_size, MAX_BLOCK, Q16, QB, SPLIT};
use crate::simd::ROWS4;
#[cfg(target_arch = "x86_64")]
use crate::simd::{hsum, Ahead4, Wide, ZeroTail};

/// `sum_c w(c) code[c] v̂[c]` over codes `c0..c1` of a row (of `v.q.len()` codes), in plain
/// Rust (the tails the kernels leave; per-OC `w` is the column's group scale). Most rows have
/// no tail (whole steps): the test is inlined into the row loops and the loop is not (called
/// for empty ranges, the loop cost a four-row kernel much of its time).
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

/// AVX2, 8-bit codes (widened to int16): `sum_b scale(b) * sum_{c in block b} code(c) q(c)`
/// over the `cols` codes of a row (`cols / 32` whole steps; the caller adds the last
/// `cols % 32`), as 8 lane sums, with `scale(b) = sd[b]` ([`block_scales`]; per-IC the blocks'
/// steps).
///
/// # Safety
/// AVX2 and FMA; `rp` points at the row's first byte; `x.q` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_sum8_avx2(rp: *const u8, x: &Q16, cols: usize, sd: &[f32]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let qp = x.q.as_ptr();
    // int32 lane sums of 32 codes times their activations (step j of the row): bytes are
    // codes, widened 16 at a time.
    let step = |j: usize| {
        crate::simd::prefetch(rp.add(j * 32));
        let a = _mm256_cvtepu8_epi16(_mm_loadu_si128(rp.add(j * 32) as *const __m128i));
        let b = _mm256_cvtepu8_epi16(_mm_loadu_si128(rp.add(j * 32 + 16) as *const __m128i));
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

/// [`row_sum8_avx2`] with AVX-512: each step's 32 codes widened to int16 in one
/// 512-bit register (`vpmovzxbw`) and multiplied with their 32 int16 activations by one
/// `vpdpwssd` (with `VNNI`; else `vpmaddwd` and an add) into a block's 16 int32 lanes, then
/// one conversion and multiply-add per block: about half the AVX2 loop's instructions per code
/// (8-bit rows are the LM head that `--head-bits` quantizes, and the layers `--bpw` gives 8
/// bits). No lane overflows: two products a step, at most 2 * 255 * 32767, four steps a
/// block. Compiled inside the row loop's AVX-512 wrappers ([`rows`]).
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`), AVX2 and FMA; `x.q` has `cols` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum8_avx512<const VNNI: bool>(row: &[u8], x: &Q16, cols: usize, sd: &[f32]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let (rp, qp) = (row.as_ptr(), x.q.as_ptr());
    let steps = cols / QB;
    assert!(steps * QB <= row.len().min(x.q.len()), "packed row too short for its codes");
    let n = x.block / QB;
    assert!(matches!(n, 1 | 2 | 4), "int16 blocks of {} values", x.block);
    let sd = &sd[..steps.div_ceil(n)];
    let dot = |acc: __m512i, j: usize| {
        crate::simd::prefetch(rp.add(j * QB));
        let c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(rp.add(j * QB) as *const __m256i));
        let a = _mm512_loadu_si512(qp.add(j * QB) as *const _);
        if VNNI {
            _mm512_dpwssd_epi32(acc, c, a)
        } else {
            _mm512_add_epi32(acc, _mm512_madd_epi16(c, a))
        }
    };
    let mut a = _mm512_setzero_ps();
    for (b, &scale) in sd.iter().enumerate() {
        let sums = (b * n..(b * n + n).min(steps)).fold(_mm512_setzero_si512(), dot);
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale), a);
    }
    crate::simd::halves_avx512(a)
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
unsafe fn block_sums<const N: usize>(
    steps: usize,
    sd: &[f32],
    block: impl Fn(usize, usize) -> std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let sd = &sd[..steps.div_ceil(N)];
    let mut a = _mm256_setzero_ps();
    for (b, &scale) in sd.iter().enumerate().take(steps / N) {
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block(b * N, b * N + N)), _mm256_set1_ps(scale), a);
    }
    if !steps.is_multiple_of(N) {
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block(steps / N * N, steps)), _mm256_set1_ps(sd[steps / N]), a);
    }
    a
}

/// `s[b / per] * d[b]` for every block `b` into `out[..d.len()]` (the int16 kernels'
/// block scales; per-OC `s` is the row's group scales and `d` the activation blocks' steps),
/// once per row (inside the block loop, with the group counted up, they were a third of a
/// 3-bit step's instructions). Inlined into the row loop, where the compiler vectorises its
/// multiplies.
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

/// Rows of at most this many blocks keep their block scales on the stack and take the
/// four-row loop: 48 holds SmolLM2's widest rows (1536 codes) in groups of 32.
const SHORT: usize = 48;

/// Four rows' block scales, on the stack (arrays this long have no `Default`).
pub(crate) struct Scales4([[f32; SHORT]; ROWS4]);

impl Default for Scales4 {
    fn default() -> Self {
        Scales4([[0.0; SHORT]; ROWS4])
    }
}

thread_local! {
    /// [`block_scales`]' buffer, reused from row to row.
    static SCALES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The int16 pair sums of step `j` of a row of 2-, 3- or 4-bit codes against split activations,
/// (codes x hi, lo x codes): lanes 0-7 from the step's first 32 codes.
///
/// # Safety
/// AVX2; as [`row_sum_split_avx2`], `j` a whole step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn split_products_avx2<const B: usize>(
    rp: *const u8,
    x: &Q16,
    j: usize,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
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
unsafe fn split_int32_avx2(
    ph: std::arch::x86_64::__m256i,
    pl: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_add_epi32(_mm256_madd_epi16(ph, _mm256_set1_epi16(256)), _mm256_madd_epi16(pl, _mm256_set1_epi16(1)))
}

/// AVX2, 2-, 3- and 4-bit codes: `sum_b scale(b) * sum_{c in block b} code(c) q(c)` over the row's
/// whole steps of [`SPLIT`] codes (as [`row_sum8_avx2`]), on split activations: with
/// `q = 256 hi + lo`, each step is `vpmaddubsw` of the codes (bytes, even and odd halves: 4-bit
/// nibbles, a planar 3-bit chunk or widened 2-bit bytes) with `hi` (signed) and of `lo` (unsigned) with the codes,
/// then per block two `vpmaddwd` (by 256 and by 1) and an add: 64 int16 products in 4
/// multiplies, where widening the codes took 4 `vpmaddwd` and 4 widenings. No int16 sum
/// saturates or wraps: pairs of code x hi are at most 2 * 15 * 128, a step's 7680; code x lo
/// pairs 2 * 15 * 255, a step's 15300; a block of 128 adds its two steps in int16 (at most
/// 15360 and 30600 < 2^15) before widening them, which halves the `vpmaddwd`.
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
unsafe fn block_sums_avx512<const VNNI: bool>(
    c: [std::arch::x86_64::__m512i; 2],
    hi: [std::arch::x86_64::__m512i; 2],
    lo: [std::arch::x86_64::__m512i; 2],
) -> std::arch::x86_64::__m512i {
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

/// [`block_sums_avx512`] for a block of one step (`c` its `[e, o]` codes, `hi` and `lo` its
/// split activations): with `VNNI` two `vpdpbusd` and a shift, without two `vpmaddubsw` and two
/// `vpmaddwd`.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn step_sums_avx512<const VNNI: bool>(
    c: std::arch::x86_64::__m512i,
    hi: std::arch::x86_64::__m512i,
    lo: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if VNNI {
        let h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, hi);
        _mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(h), lo, c)
    } else {
        let (ph, pl) = (_mm512_maddubs_epi16(c, hi), _mm512_maddubs_epi16(lo, c));
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
/// short last block (one step) is a block with zero for its second step. Run only where the CPU has AVX-512 ([`crate::simd::Wide`]); the loop
/// without VNNI is tested natively there and everywhere on an emulator
/// (`tests/avx512_emulated.rs`), the VNNI loop natively on CPUs with VNNI. Compiled inside
/// the row loop's AVX-512 wrappers ([`rows`]), whose target features it takes.
///
/// # Safety
/// AVX-512 F and BW (and VNNI if `VNNI`), AVX2 and FMA; as [`row_sum_split_avx2`]; `x.block`
/// is `2 SPLIT`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum_split_avx512<const B: usize, const VNNI: bool>(
    rp: *const u8,
    x: &Q16,
    sd: &[f32],
) -> std::arch::x86_64::__m256 {
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
        let sums = block_sums_avx512::<VNNI>(
            [bits::step_codes_avx512::<B>(rp, j), z],
            [ld(hp.add(j * SPLIT)), z],
            [ld(lp.add(j * SPLIT)), z],
        );
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(sd[steps / 2]), a);
    }
    crate::simd::halves_avx512(a)
}

/// [`row_sum_split_avx512`] for [`ROWS4`] rows at once, each with its own block scales, and `T`
/// tokens (`x[t]`, scales `sd[t]`), as their 8 lane sums per token and row: each block's codes
/// are unpacked once for the tokens, each token's split activations loaded once for the four
/// rows, every accumulator is a chain of its own, and the caller folds each token's four
/// rows' lane sums together ([`crate::simd::sums4`]), per-OC after taking each row's
/// zero-point lanes ([`crate::simd::zero_lanes`]) from them. Short rows (SmolLM2's: 576 to
/// 1536 codes), one at a time, paid as much around their blocks as in them. Token `t`'s
/// accumulators see the same operations in the same order whatever `T` is.
///
/// # Safety
/// As [`row_sum_split_avx512`] for each row; every `x[t]` of one length and block.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_split_avx512<const B: usize, const VNNI: bool, const T: usize>(
    rp: [*const u8; ROWS4],
    x: [&Q16; T],
    sd: [[&[f32]; ROWS4]; T],
    ahead: usize,
) -> [[std::arch::x86_64::__m256; ROWS4]; T] {
    use std::arch::x86_64::*;
    let (block, steps) = (x[0].block, x[0].hi.len() / SPLIT);
    debug_assert!(matches!(block, QB | SPLIT) || block == 2 * SPLIT);
    assert!(
        x.iter().all(|x| x.block == block && x.hi.len() == steps * SPLIT && x.lo.len() == steps * SPLIT),
        "tokens of unequal length"
    );
    let (hp, lp) = (x.map(|x| x.hi.as_ptr() as *const u8), x.map(|x| x.lo.as_ptr()));
    let ld = |p: *const u8| _mm512_loadu_si512(p as *const _);
    let mut acc = [[_mm512_setzero_ps(); ROWS4]; T];
    if block == SPLIT || block == QB {
        // Blocks of one step (per-OC groups of 64), each step its own scale, or of half a step
        // (groups of 32): a step's lanes 0-3 and 8-11 sum its first 32 codes (even codes in
        // the low half, odd in the high), lanes 4-7 and 12-15 the rest, as the AVX2 loop's
        // halves.
        let halves = block == QB;
        let n = if halves { 2 * steps } else { steps };
        assert!(sd.iter().all(|sd| sd.iter().all(|s| s.len() >= n)), "block scales for {n} blocks");
        for j in 0..steps {
            // A loop, not a closure: a closure's intrinsics compile without this function's target features.
            let mut c = [_mm512_setzero_si512(); ROWS4];
            for (i, c) in c.iter_mut().enumerate() {
                crate::simd::prefetch_line(rp[0].wrapping_add(ahead + (ROWS4 * j + i) * 8 * B));
                *c = bits::codes_avx512::<B>(rp[i], j);
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let (h, l) = (ld(hp[t].add(j * SPLIT)), ld(lp[t].add(j * SPLIT)));
                for (i, a) in acc.iter_mut().enumerate() {
                    let sums = step_sums_avx512::<VNNI>(c[i], h, l);
                    let d = if halves {
                        let (d0, d1) = (*sd[t][i].get_unchecked(2 * j), *sd[t][i].get_unchecked(2 * j + 1));
                        _mm512_setr_ps(d0, d0, d0, d0, d1, d1, d1, d1, d0, d0, d0, d0, d1, d1, d1, d1)
                    } else {
                        _mm512_set1_ps(*sd[t][i].get_unchecked(j))
                    };
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, *a);
                }
            }
        }
        return crate::simd::halves4(acc);
    }
    let n = steps.div_ceil(2);
    assert!(sd.iter().all(|sd| sd.iter().all(|s| s.len() >= n)), "block scales for {n} blocks");
    // `ahead` ([`crate::simd::Ahead4`]); a block's 16 B bytes are at most a line.
    for b in 0..steps / 2 {
        let j = 2 * b;
        // A loop, not a closure: a closure's intrinsics compile without this function's target features.
        let mut c = [[_mm512_setzero_si512(); 2]; ROWS4];
        for (i, c) in c.iter_mut().enumerate() {
            crate::simd::prefetch_line(rp[0].wrapping_add(ahead + (ROWS4 * b + i) * 16 * B));
            *c = [bits::codes_avx512::<B>(rp[i], j), bits::codes_avx512::<B>(rp[i], j + 1)];
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let (h, l) = (hp[t].add(j * SPLIT), lp[t].add(j * SPLIT));
            let (h0, h1, l0, l1) = (ld(h), ld(h.add(SPLIT)), ld(l), ld(l.add(SPLIT)));
            for (i, a) in acc.iter_mut().enumerate() {
                let sums = block_sums_avx512::<VNNI>(c[i], [h0, h1], [l0, l1]);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(*sd[t][i].get_unchecked(b)), *a);
            }
        }
    }
    if steps % 2 == 1 {
        // A last block of one step, as in the one-row loop.
        let (j, z) = (steps - 1, _mm512_setzero_si512());
        let mut c = [z; ROWS4];
        for (i, c) in c.iter_mut().enumerate() {
            *c = bits::codes_avx512::<B>(rp[i], j);
        }
        for (t, acc) in acc.iter_mut().enumerate() {
            let (h0, l0) = (ld(hp[t].add(j * SPLIT)), ld(lp[t].add(j * SPLIT)));
            for (i, a) in acc.iter_mut().enumerate() {
                let sums = block_sums_avx512::<VNNI>([c[i], z], [h0, z], [l0, z]);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(sd[t][i][steps / 2]), *a);
            }
        }
    }
    crate::simd::halves4(acc)
}

/// [`row_sum8_avx512`] for [`ROWS4`] rows and `T` tokens at once, as [`rows4_split_avx512`]
/// does for 3- and 4-bit codes: each step's codes widened once for the tokens, each token's
/// activations loaded once for the four rows, and the caller folds each token's four rows' lane
/// sums together ([`crate::simd::sums4`]) where a row alone paid a reduction and a scalar
/// zero-point term of its own (the LM head: 49152 rows of 576 codes). `ahead` as
/// [`rows4_split_avx512`]'s.
///
/// # Safety
/// As [`row_sum8_avx512`] for each row; `x[t].block` is 32, 64 or 128, the same for every token.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_8_avx512<const VNNI: bool, const T: usize>(
    rows: [&[u8]; ROWS4],
    x: [&Q16; T],
    cols: usize,
    sd: [[&[f32]; ROWS4]; T],
    ahead: usize,
) -> [[std::arch::x86_64::__m256; ROWS4]; T] {
    use std::arch::x86_64::*;
    let steps = cols / QB;
    let n = x[0].block / QB;
    assert!(matches!(n, 1 | 2 | 4), "int16 blocks of {} values", x[0].block);
    assert!(
        rows.iter().all(|row| steps * QB <= row.len())
            && x.iter().all(|x| steps * QB <= x.q.len() && x.block == n * QB),
        "packed row too short for its codes"
    );
    let blocks = steps.div_ceil(n);
    assert!(sd.iter().all(|sd| sd.iter().all(|s| s.len() >= blocks)), "block scales for {blocks} blocks");
    let (rp, qp) = (rows.map(|row| row.as_ptr()), x.map(|x| x.q.as_ptr()));
    let mut acc = [[_mm512_setzero_ps(); ROWS4]; T];
    for b in 0..blocks {
        let mut sums = [[_mm512_setzero_si512(); ROWS4]; T];
        for j in b * n..(b * n + n).min(steps) {
            // A loop, not a closure: a closure's intrinsics compile without this function's target features.
            let mut c = [_mm512_setzero_si512(); ROWS4];
            for (i, c) in c.iter_mut().enumerate() {
                crate::simd::prefetch_line(rp[0].wrapping_add(ahead + (ROWS4 * j + i) * QB));
                *c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(rp[i].add(j * QB) as *const __m256i));
            }
            for (t, sums) in sums.iter_mut().enumerate() {
                let a = _mm512_loadu_si512(qp[t].add(j * QB) as *const _);
                for (i, s) in sums.iter_mut().enumerate() {
                    *s = if VNNI {
                        _mm512_dpwssd_epi32(*s, c[i], a)
                    } else {
                        _mm512_add_epi32(*s, _mm512_madd_epi16(c[i], a))
                    };
                }
            }
        }
        for t in 0..T {
            for i in 0..ROWS4 {
                acc[t][i] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(sums[t][i]),
                    _mm512_set1_ps(*sd[t][i].get_unchecked(b)),
                    acc[t][i],
                );
            }
        }
    }
    crate::simd::halves4(acc)
}

/// [`ROWS4`] per-OC rows from `r` on for `T` tokens ([`row_oc`] for each, the kernel
/// [`rows4_split_avx512`], or [`rows4_8_avx512`] for 8-bit codes).
///
/// # Safety
/// AVX2, FMA, AVX-512 F and BW (and VNNI if `VNNI`); `B` 3, 4 or 8, every `x[t].block` `2 SPLIT`,
/// `SPLIT` or `QB` (one of them for all), at most [`SHORT`] blocks; rows `r..r + ROWS4` exist.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows4_oc<const B: usize, const VNNI: bool, const T: usize>(
    p: &PackedLinear,
    x: [&Q16; T],
    sums: [(&[f32], &ZeroTail); T],
    per: usize,
    r: usize,
    ahead: Ahead4,
    scratch: &mut [Scales4; T],
) -> [[f32; ROWS4]; T] {
    let (cols, pc, g) = (p.cols, sums[0].0.len(), p.layout.group);
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let params = |i: usize| (&p.scales[(r + i) * pc..(r + i + 1) * pc], &p.zeros[(r + i) * pc..(r + i + 1) * pc]);
    // 8-bit rows hold no split activations: no steps of [`SPLIT`] (their kernel checks its own).
    let steps = x[0].hi.len() / SPLIT;
    assert!(rows.iter().all(|row| steps * SPLIT * B / 8 <= row.len()), "packed row too short for its codes");
    let n = x[0].d.len();
    crate::simd::prefetch_params4(p, r + ahead.rows, pc);
    for (t, Scales4(sd)) in scratch.iter_mut().enumerate() {
        for (i, sd) in sd.iter_mut().enumerate() {
            block_scales(params(i).0, &x[t].d, per, sd);
        }
    }
    let sd: [[&[f32]; ROWS4]; T] = std::array::from_fn(|t| std::array::from_fn(|i| &scratch[t].0[i][..n]));
    let (lanes, done) = if B == 8 {
        (rows4_8_avx512::<VNNI, T>(rows, x, cols, sd, ahead.bytes), cols / QB * QB)
    } else {
        (rows4_split_avx512::<B, VNNI, T>(rows.map(|row| row.as_ptr()), x, sd, ahead.bytes), steps * SPLIT)
    };
    let mut out = [[0f32; ROWS4]; T];
    for (t, (o, lanes)) in out.iter_mut().zip(lanes).enumerate() {
        let (xsum, tail) = sums[t];
        *o = crate::simd::oc_sums4(p, r, lanes, xsum, tail);
        if done < cols {
            for (i, y) in o.iter_mut().enumerate() {
                *y += dot_scalar(rows[i], B as u8, x[t], done, cols, |c| params(i).0[c / g]);
            }
        }
    }
    out
}

/// [`ROWS4`] per-IC rows of one row group from `r` on for `T` tokens ([`row_ic`] for each).
///
/// # Safety
/// As [`rows4_oc`], but any number of blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows4_ic<const B: usize, const VNNI: bool, const T: usize>(
    p: &PackedLinear,
    v: [&Q16; T],
    bias: [f32; T],
    r: usize,
    ahead: Ahead4,
) -> [[f32; ROWS4]; T] {
    let cols = v[0].q.len();
    let rows: [&[u8]; ROWS4] = std::array::from_fn(|i| p.row_codes(r + i));
    let sd: [[&[f32]; ROWS4]; T] = std::array::from_fn(|t| [&v[t].d[..]; ROWS4]);
    let (lanes, done) = if B == 8 {
        (rows4_8_avx512::<VNNI, T>(rows, v, cols, sd, ahead.bytes), cols / QB * QB)
    } else {
        let steps = v[0].hi.len() / SPLIT;
        assert!(rows.iter().all(|row| steps * SPLIT * B / 8 <= row.len()), "packed row too short for its codes");
        (rows4_split_avx512::<B, VNNI, T>(rows.map(|row| row.as_ptr()), v, sd, ahead.bytes), steps * SPLIT)
    };
    let mut out = [[0f32; ROWS4]; T];
    for (t, (o, lanes)) in out.iter_mut().zip(lanes).enumerate() {
        *o = crate::simd::sums4(lanes);
        for (y, row) in o.iter_mut().zip(rows) {
            *y += dot_scalar(row, B as u8, v[t], done, cols, |_| 1.0) - bias[t];
        }
    }
    out
}

/// One row's kernel sum as 8 lane sums (per-OC: `s` the row's group scales, `per` blocks per
/// group; per-IC `s = [1]`, `per = usize::MAX`) and how many of its codes it covered (the
/// caller adds the rest).
///
/// # Safety
/// As [`row_sum`]; `row` holds the row's codes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn body<const B: usize, const AVX512: bool, const VNNI: bool>(
    row: &[u8],
    x: &Q16,
    cols: usize,
    s: &[f32],
    per: usize,
) -> (std::arch::x86_64::__m256, usize) {
    let split = B != 8;
    let steps = if split { x.hi.len() / SPLIT } else { cols / QB };
    if split {
        assert!(steps * SPLIT <= cols && steps * SPLIT * B / 8 <= row.len(), "packed row too short for its codes");
    } else {
        assert!(steps == 0 || (steps - 1) * 4 * B + 16 <= row.len(), "packed row too short for its codes");
    }
    let sum = if per == usize::MAX {
        // Per-IC: the blocks' own steps.
        row_sum::<B, AVX512, VNNI>(row, x, cols, &x.d)
    } else if x.d.len() <= SHORT {
        // Short rows (SmolLM2's: 5 to 12 blocks) on the stack: the thread-local buffer's
        // bookkeeping cost 5% of a decode.
        let mut sd = [0f32; SHORT];
        block_scales(s, &x.d, per, &mut sd);
        row_sum::<B, AVX512, VNNI>(row, x, cols, &sd[..x.d.len()])
    } else {
        let mut sd = SCALES.take();
        sd.resize(x.d.len(), 0.0);
        block_scales(s, &x.d, per, &mut sd);
        let r = row_sum::<B, AVX512, VNNI>(row, x, cols, &sd);
        SCALES.set(sd);
        r
    };
    (sum, steps * if split { SPLIT } else { QB })
}

/// The kernel for `B`-bit codes with block scales `sd`: 2-, 3- and 4-bit blocks of 128 and 8-bit
/// steps in 512-bit registers where `AVX512` (with `vpdpbusd` / `vpdpwssd` where `VNNI`), as
/// the row loop's wrapper chose ([`rows`]).
///
/// # Safety
/// AVX2 and FMA; as [`body`], which checked the row's length; AVX-512 F and BW if `AVX512`, VNNI if
/// `VNNI`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sum<const B: usize, const AVX512: bool, const VNNI: bool>(
    row: &[u8],
    x: &Q16,
    cols: usize,
    sd: &[f32],
) -> std::arch::x86_64::__m256 {
    match B {
        2..=4 if AVX512 && x.block == 2 * SPLIT => row_sum_split_avx512::<B, VNNI>(row.as_ptr(), x, sd),
        8 if AVX512 => row_sum8_avx512::<VNNI>(row, x, cols, sd),
        2..=4 => row_sum_split_avx2::<B>(row.as_ptr(), x, sd),
        _ => row_sum8_avx2(row.as_ptr(), x, cols, sd),
    }
}

/// One per-OC output row, from the rounded `x` and its group sums.
///
/// # Safety
/// As [`body`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(
    p: &PackedLinear,
    x: &Q16,
    xsum: &[f32],
    per: usize,
    r: usize,
    row: &[u8],
) -> f32 {
    let (cols, pc, g) = (p.cols, xsum.len(), p.layout.group);
    let (s, z) = (&p.scales[r * pc..(r + 1) * pc], &p.zeros[r * pc..(r + 1) * pc]);
    let (body, done) = body::<B, AVX512, VNNI>(row, x, cols, s, per);
    let tail = dot_scalar(row, B as u8, x, done, cols, |c| s[c / g]);
    hsum(body) + tail - crate::simd::zero_term_avx2(s, z, xsum, 0.0)
}

/// One per-IC output row, from its row group's rounded `s x` and zero-point sum.
///
/// # Safety
/// As [`body`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(row: &[u8], v: &Q16, bias: f32) -> f32 {
    let cols = v.q.len();
    let (body, done) = body::<B, AVX512, VNNI>(row, v, cols, &[1.0], usize::MAX);
    hsum(body) + dot_scalar(row, B as u8, v, done, cols, |_| 1.0) - bias
}

/// Whether the kernel reads `b`-bit codes as bytes, even and odd halves of steps of 64, against
/// split activations ([`Q16::split`]): 4-bit codes (low and high nibbles), 3-bit ones
/// (planar chunks, [`bits::chunk3_avx2`]) and 2-bit ones ([`bits::step_codes_avx2`]): all but
/// 8-bit codes.
fn splits(bits: u8) -> bool {
    matches!(bits, 2..=4)
}

thread_local! {
    /// The per-IC matvec's row-group slots, reused from call to call.
    static SLOTS: std::cell::Cell<Vec<(Q16, f32)>> = const { std::cell::Cell::new(Vec::new()) };
    /// The batched per-IC matvec's.
    static BATCH_SLOTS: std::cell::Cell<Vec<Vec<(Q16, f32)>>> = const { std::cell::Cell::new(Vec::new()) };
}

impl IntActs for Q16 {
    #[cfg(target_arch = "x86_64")]
    type Ctx = Wide;
    /// Four rows' block scales, on the stack.
    type Scratch4 = Scales4;
    /// Two: with four, sixteen accumulators beside eight registers of codes and four of split
    /// activations spilled, and four tokens ran slower than two passes of two.
    const TOKENS: usize = 2;

    /// 2, 3, 4 or 8 bits, per-OC groups of whole steps.
    fn supported(p: &PackedLinear) -> bool {
        let l = p.layout;
        matches!(l.bits, 2 | 3 | 4 | 8) && (l.axis == Axis::Ic || l.group.is_multiple_of(QB))
    }

    fn slots() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<(Self, f32)>>> {
        &SLOTS
    }

    fn batch_slots() -> &'static crate::matvec_int::SlotsKey<Vec<(Self, f32)>> {
        &BATCH_SLOTS
    }

    /// Rounded in blocks ([`block_size`]), split for 2-, 3- and 4-bit codes.
    fn prepare_oc(p: &PackedLinear, x: &[f32]) -> (Q16, Vec<f32>) {
        let (cols, l, block) = (p.cols, p.layout, block_size(p));
        let x = Q16::rounded(&p.stored_order(x), block, splits(l.bits));
        let xsum = crate::matvec_int::group_sums(&x, cols, l.group);
        (x, xsum)
    }

    /// In blocks of [`MAX_BLOCK`], split for 2-, 3- and 4-bit codes.
    fn prepare_ic(p: &PackedLinear, x: &[f32], kr: usize, slot: &mut (Q16, f32)) {
        let cols = p.cols;
        slot.1 = slot.0.scaled_into(
            &p.scales[kr * cols..(kr + 1) * cols],
            x,
            &p.zeros[kr * cols..(kr + 1) * cols],
            MAX_BLOCK,
            splits(p.layout.bits),
        );
    }

    fn four_rows(bits: usize) -> bool {
        matches!(bits, 2 | 3 | 4 | 8)
    }

    /// Blocks of two steps, one (groups of 64) or half of one (groups of 32), and few enough
    /// of them for the stack's block scales.
    fn four_rows_oc(x: &Q16) -> bool {
        (x.block == 2 * SPLIT || x.block == SPLIT || x.block == QB) && x.d.len() <= SHORT
    }

    fn four_rows_ic(v: &Q16) -> bool {
        v.block == 2 * SPLIT
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn ctx() -> Wide {
        Wide::detect()
    }

    /// Every width takes the AVX-512 loops where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows(p: &PackedLinear, jobs: &[Job<Q16>], r0: usize, out: Outs, t: &Wide) {
        match (p.layout.bits, *t) {
            (3, Wide::Vnni) => rows_vnni::<Q16, 3>(p, jobs, r0, out, t),
            (4, Wide::Vnni) => rows_vnni::<Q16, 4>(p, jobs, r0, out, t),
            (3, Wide::Avx512) => rows_avx512bw::<Q16, 3>(p, jobs, r0, out, t),
            (4, Wide::Avx512) => rows_avx512bw::<Q16, 4>(p, jobs, r0, out, t),
            (8, Wide::Vnni) => rows_vnni::<Q16, 8>(p, jobs, r0, out, t),
            (8, Wide::Avx512) => rows_avx512bw::<Q16, 8>(p, jobs, r0, out, t),
            (2, Wide::Vnni) => rows_vnni::<Q16, 2>(p, jobs, r0, out, t),
            (2, Wide::Avx512) => rows_avx512bw::<Q16, 2>(p, jobs, r0, out, t),
            (2, _) => rows_avx2::<Q16, 2>(p, jobs, r0, out, t),
            (3, _) => rows_avx2::<Q16, 3>(p, jobs, r0, out, t),
            (4, _) => rows_avx2::<Q16, 4>(p, jobs, r0, out, t),
            _ => rows_avx2::<Q16, 8>(p, jobs, r0, out, t),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(
        p: &PackedLinear,
        x: &Q16,
        xsum: &[f32],
        per: usize,
        r: usize,
        row: &[u8],
        _: &Wide,
    ) -> f32 {
        row_oc::<B, AVX512, VNNI>(p, x, xsum, per, r, row)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(
        row: &[u8],
        v: &Q16,
        bias: f32,
        _: &Wide,
    ) -> f32 {
        row_ic::<B, AVX512, VNNI>(row, v, bias)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows4_oc<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        x: [&Q16; T],
        sums: [(&[f32], &ZeroTail); T],
        per: usize,
        r: usize,
        ahead: Ahead4,
        scratch: &mut [Scales4; T],
    ) -> [[f32; ROWS4]; T] {
        rows4_oc::<B, VNNI, T>(p, x, sums, per, r, ahead, scratch)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn rows4_ic<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        v: [&Q16; T],
        bias: [f32; T],
        r: usize,
        ahead: Ahead4,
    ) -> [[f32; ROWS4]; T] {
        rows4_ic::<B, VNNI, T>(p, v, bias, r, ahead)
    }
}

/// `y = W' x` on int16 activations where this CPU and layout have the kernel (true); false
/// with `y` untouched otherwise.
pub(crate) fn matvec(p: &PackedLinear, x: &[f32], y: &mut [f32]) -> bool {
    crate::matvec_int::matvec::<Q16>(p, x, y)
}

/// [`matvec`] for `t` tokens at once, each token's numbers exactly its matvec's
/// ([`crate::matvec_int::matvec_batch`]).
pub(crate) fn matvec_batch(p: &PackedLinear, x: &[f32], t: usize, y: &mut [f32]) -> bool {
    crate::matvec_int::matvec_batch::<Q16>(p, x, t, y)
}

/// Whether [`matvec`] runs the int16 kernel for `p` on this CPU.
pub(crate) fn runs(p: &PackedLinear) -> bool {
    crate::matvec_int::runs::<Q16>(p)
}

/// Whether the int16 kernel handles this layout (on a CPU with AVX2): 2, 3, 4 or 8 bits,
/// per-OC groups of whole steps.
pub fn supported(p: &PackedLinear) -> bool {
    <Q16 as IntActs>::supported(p)
}

/// The definition of the int16 product, in f64 from the same rounded activations, and per row
/// the bound of its distance from the exact product (`matvec_int::matvec_ref`).
pub fn matvec_ref(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    crate::matvec_int::matvec_ref::<Q16>(p, x)
}
