//! CPU features and the SIMD helpers the matvec kernels share.
//!
//! Detection (`simd_available`, [`avx512_available`], [`avx512_vnni_available`], `Wide`) is
//! decided once per process; the helpers (prefetch hints, lane sums, the per-OC zero-point term
//! and the four-row folding) are compiled into the kernels that call them.

#[cfg(target_arch = "x86_64")]
use crate::format::PackedLinear;

/// How far ahead of the bytes it is decoding a kernel asks for the row's next bytes: 4 KiB.
/// Rows lie back to back, so one thread's matvec reads one long stream, and the hardware
/// prefetcher alone left the core waiting on it; much farther ran past a thread's own part of
/// a small matrix.
pub(crate) const PREFETCH: usize = 4 << 10;

/// Asks for the cache line [`PREFETCH`] bytes past `p` (a hint: it never faults, so it may
/// point past the buffer; the address is formed with `wrapping_add`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8) {
    prefetch_line(p.wrapping_add(PREFETCH));
}

/// Asks for the cache line holding `p` (a hint, as `prefetch`; also decode attention's).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn prefetch_line(p: *const u8) {
    use std::arch::x86_64::*;
    // SAFETY: prefetch reads nothing the program sees and does not fault on any address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

/// Whether rows of `row_bytes` are short enough for the four-row kernels: four of them
/// within [`PREFETCH`]. Short rows (SmolLM2's: 576 to 1536 codes) pay as much around their
/// blocks as in them; long rows gain nothing from it and would read four streams at once.
pub(crate) fn short_rows(row_bytes: usize) -> bool {
    ROWS4 * row_bytes <= PREFETCH
}

/// How far ahead a kernel that walks [`ROWS4`] rows side by side (rows `row_bytes` apart)
/// asks for each row's bytes: whole passes of four rows, at least [`PREFETCH`], so each row
/// asks for the same place in a row of a later pass (a hint [`PREFETCH`] past each row fell on
/// the other three rows' bytes, which the pass was reading already). Worked out once per run
/// of rows.
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
/// (the rows [`Ahead4::rows`] after the ones being read): without it a four-row kernel read
/// more slowly from memory than one row at a time.
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

/// [`halves_avx512`] of every accumulator of an `R`-row kernel's `T` tokens, in a loop (mapped
/// through closures, each fold became a call).
///
/// # Safety
/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn halves4<const R: usize, const T: usize>(
    acc: [[std::arch::x86_64::__m512; R]; T],
) -> [[std::arch::x86_64::__m256; R]; T] {
    let mut out = [[std::arch::x86_64::_mm256_setzero_ps(); R]; T];
    for (o, a) in out.iter_mut().zip(&acc) {
        for (o, a) in o.iter_mut().zip(a) {
            *o = halves_avx512(*a);
        }
    }
    out
}

/// Rows the four-row kernels ([`crate::matvec_i16`], [`crate::matvec_i8`]) take together.
pub(crate) const ROWS4: usize = 4;

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
/// time (as a scalar loop it was a sizeable part of a large matvec).
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
/// into lane 0. No masked load: masked-off lanes reaching a page the process cannot read made
/// it many times slower.
///
/// # Safety
/// AVX2 and FMA; `xsum` has `n` values, `s` and `z` at least `n` (the row's first `n`), `tail`
/// was built from `xsum`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn zero_lanes(
    s: &[f32],
    z: &[f32],
    xsum: &[f32],
    offset: f32,
    tail: &ZeroTail,
) -> std::arch::x86_64::__m256 {
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
/// function of its own the four rows' lanes went through memory).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn oc_sums4(
    p: &PackedLinear,
    r: usize,
    mut lanes: [std::arch::x86_64::__m256; ROWS4],
    xsum: &[f32],
    tail: &ZeroTail,
) -> [f32; ROWS4] {
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
        ZeroTail {
            x: _mm256_loadu_ps(x.as_ptr()),
            mask: _mm256_castsi256_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i)),
        }
    }
}

/// [`zero_term_avx2`] in plain Rust: the definition it is tested against.
pub(crate) fn zero_term_ref(s: &[f32], z: &[f32], xsum: &[f32], offset: f32) -> f32 {
    s.iter().zip(z).zip(xsum).map(|((s, z), x)| s * (z - offset) * x).sum()
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

/// Whether the AVX-512 kernels run (3- and 4-bit codes: the int16 blocks of 128,
/// [`crate::matvec_i16`], and every int8 step, [`crate::matvec_i8`]): this CPU has AVX-512 F and BW besides AVX2 and FMA, and
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
            simd_available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && std::env::var("ADADIM_AVX512").map_or(true, |v| v != "0")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether the int8 and int16 kernels' AVX-512 loops use VNNI (`vpdpbusd`,
/// [`crate::matvec_i8`], [`crate::matvec_i16`]): [`avx512_available`], the CPU has it, and `ADADIM_VNNI` is not `0` in the
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
            avx512_available()
                && is_x86_feature_detected!("avx512vnni")
                && std::env::var("ADADIM_VNNI").map_or(true, |v| v != "0")
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

/// Makes [`avx512_available`] true whatever the CPU says (and [`avx512_vnni_available`] false):
/// for running the AVX-512 kernels on an emulator that has the instructions when the host has not (the tests' `avx512_emulated`).
///
/// # Safety
/// Every kernel called afterwards, on any thread, runs on a CPU (or emulator) with AVX-512 F
/// and BW, AVX2 and FMA; otherwise it executes instructions the CPU does not have.
#[doc(hidden)]
pub unsafe fn assume_avx512() {
    AVX512_ASSUMED.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn zero_term_avx2_sums_as_the_definition() {
        if !super::simd_available() {
            return;
        }
        let v = |n: usize, seed: usize| {
            (0..n).map(|i| ((((i + seed) * 2654435761usize) >> 9) % 1000) as f32 / 100.0 - 3.0).collect::<Vec<f32>>()
        };
        for n in [0, 1, 5, 7, 8, 9, 12, 15, 16, 17, 112, 115] {
            let (s, z, x) = (v(n, 1), v(n, 2), v(n, 3));
            for off in [0.0, 128.0] {
                let want: f64 = (0..n).map(|k| f64::from(s[k]) * (f64::from(z[k]) - off) * f64::from(x[k])).sum();
                let scale: f64 =
                    (0..n).map(|k| (f64::from(s[k]) * (f64::from(z[k]) - off) * f64::from(x[k])).abs()).sum();
                // SAFETY: AVX2 and FMA were detected.
                let got = unsafe { super::zero_term_avx2(&s, &z, &x, off as f32) };
                assert!((f64::from(got) - want).abs() <= 1e-6 * scale.max(1.0), "n {n} offset {off}: {got} vs {want}");
                // The four-row kernels' lanes: the row alone (the last n % 8 in plain Rust), and
                // followed by another row's params, some not finite (the last n % 8 from one
                // more load, the lanes past the row masked).
                let after = |v: &[f32]| {
                    [v, &[f32::NAN, f32::INFINITY, -1e30, 7.0, f32::NEG_INFINITY, 0.0, 3.0, f32::NAN]].concat()
                };
                let (s2, z2) = (after(&s), after(&z));
                for (s, z, how) in [(&s[..], &z[..], "alone"), (&s2[..], &z2[..], "followed")] {
                    // SAFETY: as above.
                    let got =
                        unsafe { super::hsum(super::zero_lanes(s, z, &x, off as f32, &super::ZeroTail::new(&x))) };
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-6 * scale.max(1.0),
                        "lanes, {how}, n {n} offset {off}: {got} vs {want}"
                    );
                }
                assert!(
                    (f64::from(super::zero_term_ref(&s, &z, &x, off as f32)) - want).abs() <= 1e-6 * scale.max(1.0)
                );
            }
        }
    }
}
