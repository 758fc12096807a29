//! What the int16 and int8 matvecs ([`crate::matvec_i16`], [`crate::matvec_i8`]) share: the
//! rounding of activations to integers per block, the per-OC group sums of the rounded values,
//! the row loop and its dispatch to the decode team, written once over `IntActs` (the
//! activation format and its row kernels), and the f64 definition the tests hold both to.
//!
//! The row loop runs inside one function compiled for the kernel's instructions (AVX2, or
//! AVX-512 with or without VNNI), so each row's kernel and its sums are inlined into it; short
//! rows are taken four at a time where the AVX-512 loop runs, for one token or (batched) up to
//! [`IntActs::TOKENS`], one such function per count of tokens.

use adadim_quantize::Axis;
use rayon::prelude::*;

use crate::bits;
use crate::format::PackedLinear;
#[cfg(target_arch = "x86_64")]
use crate::simd::{short_rows, Ahead4, ZeroTail, ROWS4};

/// A run of rows' inputs for a matvec's row loop on rounded activations `A` ([`IntActs`]): per-OC the rounded `x` and its group sums, per-IC the row group's rounded
/// `s x` and zero-point sum.
#[cfg(target_arch = "x86_64")]
pub(crate) enum Job<'a, A> {
    Oc { x: &'a A, xsum: &'a [f32] },
    Ic { v: &'a A, bias: f32 },
}

/// `ROUND`'s is `round(t)` (ties to even).
const ROUND: f32 = 12_582_912.0;

/// Rounds one block into `q` and returns its step `d = max|x| / qmax` (NaN when the block holds
/// a non-finite value, so the product comes out NaN as it would in f32); `cast` stores a
/// rounded value (|v| <= qmax) in `q`'s integer type.
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
pub(crate) unsafe fn round_block_avx2<const V: usize>(
    v: &[std::arch::x86_64::__m256; V],
    qmax: f32,
) -> ([std::arch::x86_64::__m256i; V], f32) {
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

/// Per-thread slots of rounded activations: one `(A, zero term)` per row group (the matvec),
/// or per row group a vector of them, one per token (the batched matvec).
pub(crate) type SlotsKey<P> = std::thread::LocalKey<std::cell::Cell<Vec<P>>>;

/// An activation format the integer matvec runs on ([`crate::round_i16::Q16`],
/// [`crate::matvec_i8::Q8`]): how a matvec rounds `x`, and one row's and four rows' kernels.
pub(crate) trait IntActs: Rounded + Default + Send + Sync + Sized + 'static {
    /// What every row's kernel needs besides the activations, built once per matvec.
    #[cfg(target_arch = "x86_64")]
    type Ctx: Sync;
    /// Scratch of the per-OC four-row kernel, kept for a run of rows.
    type Scratch4: Default;
    /// Tokens the batched four-row kernels take at once (at most [`TOKENS4`]): as many as keep
    /// their accumulators, the four rows' codes and a token's activations in registers.
    const TOKENS: usize;

    /// Whether this format's kernels handle `p`'s layout.
    fn supported(p: &PackedLinear) -> bool;
    /// The per-IC matvec's row-group slots, reused from call to call ([`adadim_team::grouped_rows`]).
    fn slots() -> &'static std::thread::LocalKey<std::cell::Cell<Vec<(Self, f32)>>>;
    /// The batched per-IC matvec's slots: one per row group, each holding every token's.
    fn batch_slots() -> &'static SlotsKey<Vec<(Self, f32)>>;
    /// Per-OC: `x` (gathered by the act-order permutation) rounded, and `sum_{c in k} x̂[c]` per
    /// group `k`.
    fn prepare_oc(p: &PackedLinear, x: &[f32]) -> (Self, Vec<f32>);
    /// Per-IC: row group `kr`'s `s x` rounded and its zero-point sum, into `slot`.
    fn prepare_ic(p: &PackedLinear, x: &[f32], kr: usize, slot: &mut (Self, f32));
    /// Whether `B`-bit rows have a four-row kernel (where AVX-512 runs).
    fn four_rows(bits: usize) -> bool;
    /// Whether these rounded per-OC activations (per-IC: `v`) suit the four-row kernel.
    fn four_rows_oc(x: &Self) -> bool;
    fn four_rows_ic(v: &Self) -> bool;

    /// # Safety
    /// AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn ctx() -> Self::Ctx;
    /// Rows `r0..r0 + out.n` of `p` for every token of `jobs` (one job each, all of one axis)
    /// into `out`, with the loop for `p`'s width and the CPU ([`run_rows`] under [`rows_avx2`],
    /// [`rows_avx512bw`] or [`rows_vnni`]).
    ///
    /// # Safety
    /// AVX2 and FMA; `p` [`IntActs::supported`]; `out` as [`Outs`] says.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows(p: &PackedLinear, jobs: &[Job<Self>], r0: usize, out: Outs, ctx: &Self::Ctx);
    /// One per-OC output row `r` (codes `row`), from the rounded `x` and its group sums; `per`
    /// activation blocks per group.
    ///
    /// # Safety
    /// AVX2 and FMA, and what `AVX512` and `VNNI` name; `row` is the row's codes followed by the
    /// next row's or the buffer's padding.
    #[cfg(target_arch = "x86_64")]
    unsafe fn row_oc<const B: usize, const AVX512: bool, const VNNI: bool>(
        p: &PackedLinear,
        x: &Self,
        xsum: &[f32],
        per: usize,
        r: usize,
        row: &[u8],
        ctx: &Self::Ctx,
    ) -> f32;
    /// One per-IC output row, from its row group's rounded `s x` and zero-point sum.
    ///
    /// # Safety
    /// As [`IntActs::row_oc`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn row_ic<const B: usize, const AVX512: bool, const VNNI: bool>(
        row: &[u8],
        v: &Self,
        bias: f32,
        ctx: &Self::Ctx,
    ) -> f32;
    /// [`ROWS4`] per-OC rows from `r` on for `T` tokens (`x[t]`, `xsum[t]`): each step's codes
    /// unpacked once for all of them, and each token's numbers exactly what it gets alone
    /// (`T = 1`: the same operations on each accumulator, in the same order).
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512 F and BW (and VNNI if `VNNI`); rows `r..r + ROWS4` exist;
    /// [`IntActs::four_rows_oc`] for every token.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows4_oc<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        x: [&Self; T],
        xsum: [(&[f32], &ZeroTail); T],
        per: usize,
        r: usize,
        ahead: Ahead4,
        scratch: &mut [Self::Scratch4; T],
    ) -> [[f32; ROWS4]; T];
    /// [`ROWS4`] per-IC rows of one row group from `r` on for `T` tokens, as
    /// [`IntActs::rows4_oc`].
    ///
    /// # Safety
    /// As [`IntActs::rows4_oc`], [`IntActs::four_rows_ic`] for every token.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows4_ic<const B: usize, const VNNI: bool, const T: usize>(
        p: &PackedLinear,
        v: [&Self; T],
        bias: [f32; T],
        r: usize,
        ahead: Ahead4,
    ) -> [[f32; ROWS4]; T];
}

/// `y = W' x` on the integers of `A` where this CPU (AVX2 + FMA) and layout have its kernel,
/// and true; false with `y` untouched otherwise. Per-IC, each row group's `s x` is rounded once
/// ([`adadim_team::grouped_rows`]).
pub(crate) fn matvec<A: IntActs>(p: &PackedLinear, x: &[f32], y: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if runs::<A>(p) {
        // SAFETY: AVX2 and FMA were detected; the layout is one the kernels handle.
        unsafe { matvec_avx2::<A>(p, x, y) };
        return true;
    }
    let _ = (p, x, y);
    false
}

/// Whether [`matvec`] runs `A`'s kernel for `p` on this CPU.
pub(crate) fn runs<A: IntActs>(p: &PackedLinear) -> bool {
    cfg!(target_arch = "x86_64") && crate::simd::simd_available() && A::supported(p)
}

/// `y[i] = W' x[i]` for `t` tokens (`x` `[t, cols]`, `y` `[t, rows]`) on rounded activations
/// `A`, each token's numbers exactly [`matvec`]'s (the same rounding, and kernels whose every
/// accumulator sees the same operations in the same order), every run of rows multiplied with
/// all the tokens while its codes are in cache (a decode step of several sequences reads the
/// weights from memory once), and the four-row kernels unpacking each step's codes once for up
/// to [`IntActs::TOKENS`] tokens. Returns false (nothing done) where [`matvec`] would.
pub(crate) fn matvec_batch<A: IntActs>(p: &PackedLinear, x: &[f32], t: usize, y: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if runs::<A>(p) {
        // SAFETY: AVX2 and FMA were detected; the layout is one the kernels handle.
        unsafe { matvec_batch_avx2::<A>(p, x, t, y) };
        return true;
    }
    let _ = (p, x, t, y);
    false
}

/// [`matvec_batch`]'s body: the row loop's tasks split token 0's rows; each task writes the
/// same rows of the other tokens (disjoint, behind `rest`).
///
/// # Safety
/// AVX2 and FMA; `A::supported(p)`.
#[cfg(target_arch = "x86_64")]
unsafe fn matvec_batch_avx2<A: IntActs>(p: &PackedLinear, x: &[f32], t: usize, y: &mut [f32]) {
    let (rows, cols, g) = (p.rows, p.cols, p.layout.group);
    let ctx = A::ctx();
    let (y0, rest) = y.split_at_mut(rows);
    let rest = RowsPtr(rest.as_mut_ptr());
    let outs = |r0: usize, y: &mut [f32]| Outs {
        first: y.as_mut_ptr(),
        rest: rest.get().wrapping_add(r0),
        stride: rows,
        n: y.len(),
    };
    if p.layout.axis == Axis::Ic {
        let prep = |kr: usize, slot: &mut Vec<(A, f32)>| {
            slot.resize_with(t, Default::default);
            for (i, s) in slot.iter_mut().enumerate() {
                A::prepare_ic(p, &x[i * cols..(i + 1) * cols], kr, s);
            }
        };
        adadim_team::with_slots(A::batch_slots(), rows.div_ceil(g), |slots| {
            adadim_team::grouped_rows(y0, g, slots, &prep, &|r0, y, slot| {
                let jobs: Vec<Job<A>> = slot[..t].iter().map(|(v, bias)| Job::Ic { v, bias: *bias }).collect();
                // SAFETY: as the caller's; each task writes its own rows of each token.
                unsafe { A::rows(p, &jobs, r0, outs(r0, y), &ctx) }
            })
        });
        return;
    }
    let prepared: Vec<(A, Vec<f32>)> = x.chunks_exact(cols).map(|x| A::prepare_oc(p, x)).collect();
    let jobs: Vec<Job<A>> = prepared.iter().map(|(x, xsum)| Job::Oc { x, xsum }).collect();
    // SAFETY: as the caller's; each task writes its own rows of each token.
    adadim_team::rows(y0, &|r0, y| unsafe { A::rows(p, &jobs, r0, outs(r0, y), &ctx) });
}

/// The other tokens' outputs, shared by the row tasks (each writes rows of its own).
#[cfg(target_arch = "x86_64")]
struct RowsPtr(*mut f32);
// SAFETY: tasks write disjoint rows through it (see `matvec_batch_avx2`).
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for RowsPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Send for RowsPtr {}
#[cfg(target_arch = "x86_64")]
impl RowsPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Where a row loop writes rows `r0..r0 + n` of each token: token 0's at `first`, token
/// `i >= 1`'s at `rest + (i - 1) stride` (a batch's outputs lie token after token).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Outs {
    first: *mut f32,
    rest: *mut f32,
    stride: usize,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl Outs {
    /// One token's rows, `y`.
    fn one(y: &mut [f32]) -> Self {
        Outs { first: y.as_mut_ptr(), rest: std::ptr::null_mut(), stride: 0, n: y.len() }
    }

    /// Row `r0 + k` of token `i`.
    ///
    /// # Safety
    /// `k < n`, and token `i`'s rows are writable where the constructor says.
    #[inline(always)]
    unsafe fn put(&self, i: usize, k: usize, v: f32) {
        debug_assert!(k < self.n);
        let at = if i == 0 { self.first } else { self.rest.add((i - 1) * self.stride) };
        at.add(k).write(v);
    }
}

/// [`matvec`]'s body.
///
/// # Safety
/// AVX2 and FMA; `A::supported(p)`.
#[cfg(target_arch = "x86_64")]
unsafe fn matvec_avx2<A: IntActs>(p: &PackedLinear, x: &[f32], y: &mut [f32]) {
    let ctx = A::ctx();
    let g = p.layout.group;
    if p.layout.axis == Axis::Ic {
        let prep = |kr: usize, slot: &mut (A, f32)| A::prepare_ic(p, x, kr, slot);
        adadim_team::with_slots(A::slots(), p.rows.div_ceil(g), |slots| {
            // SAFETY: as the caller's.
            adadim_team::grouped_rows(y, g, slots, &prep, &|r0, y, (v, bias)| unsafe {
                A::rows(p, &[Job::Ic { v, bias: *bias }], r0, Outs::one(y), &ctx)
            })
        });
        return;
    }
    let (xq, xsum) = A::prepare_oc(p, x);
    let job = [Job::Oc { x: &xq, xsum: &xsum }];
    // SAFETY: as the caller's.
    adadim_team::rows(y, &|r0, y| unsafe { A::rows(p, &job, r0, Outs::one(y), &ctx) });
}

/// Rows `r0..r0 + out.n` of every token of `jobs` into `out` ([`adadim_team::rows`]), up to
/// [`IntActs::TOKENS`] tokens at a time (the next tokens find the run's codes in cache), each count of
/// tokens through its own function compiled for the kernel's instructions (`W`: 0 AVX2, 1
/// AVX-512, 2 AVX-512 with VNNI): one function for every count, its accumulators and pointers
/// all live at once, spilled to the stack and ran the one-token loop at half speed.
///
/// # Safety
/// The instructions `W` names, AVX2 and FMA; `A::supported(p)`; `jobs` all of one axis; `out`
/// as [`Outs`] says for `jobs.len()` tokens.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run_rows<A: IntActs, const B: usize, const W: u8>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    out: Outs,
    ctx: &A::Ctx,
) {
    for (c, jobs) in jobs.chunks(A::TOKENS).enumerate() {
        let at = (out, c * A::TOKENS);
        match jobs.len() {
            1 => rows_t::<A, B, W, 1>(p, jobs, r0, at, ctx),
            2 => rows_t::<A, B, W, 2>(p, jobs, r0, at, ctx),
            3 => rows_t::<A, B, W, 3>(p, jobs, r0, at, ctx),
            _ => rows_t::<A, B, W, TOKENS4>(p, jobs, r0, at, ctx),
        }
    }
}

/// [`run_rows_t`] under the target features `W` names ([`run_rows`]).
///
/// # Safety
/// As [`run_rows_t`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_t<A: IntActs, const B: usize, const W: u8, const T: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    at: (Outs, usize),
    ctx: &A::Ctx,
) {
    match W {
        2 => rows_t_vnni::<A, B, T>(p, jobs, r0, at, ctx),
        1 => rows_t_avx512bw::<A, B, T>(p, jobs, r0, at, ctx),
        _ => rows_t_avx2::<A, B, T>(p, jobs, r0, at, ctx),
    }
}

/// [`run_rows_t`] with AVX2.
///
/// # Safety
/// As [`run_rows_t`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_t_avx2<A: IntActs, const B: usize, const T: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    at: (Outs, usize),
    ctx: &A::Ctx,
) {
    run_rows_t::<A, B, false, false, T>(p, jobs, r0, at, ctx)
}

/// [`run_rows_t`] with AVX-512, no VNNI.
///
/// # Safety
/// As [`run_rows_t`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
unsafe fn rows_t_avx512bw<A: IntActs, const B: usize, const T: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    at: (Outs, usize),
    ctx: &A::Ctx,
) {
    run_rows_t::<A, B, true, false, T>(p, jobs, r0, at, ctx)
}

/// [`run_rows_t`] with AVX-512 and VNNI.
///
/// # Safety
/// As [`run_rows_t`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn rows_t_vnni<A: IntActs, const B: usize, const T: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    at: (Outs, usize),
    ctx: &A::Ctx,
) {
    run_rows_t::<A, B, true, true, T>(p, jobs, r0, at, ctx)
}

/// The most tokens a four-row kernel multiplies at once ([`IntActs::TOKENS`]).
pub(crate) const TOKENS4: usize = 4;

/// [`run_rows`] for `T` tokens (`jobs`, written as tokens `i..i + T` of `out`: `at = (out, i)`):
/// four rows at a time where the AVX-512 loop runs and the rows are short, their codes unpacked
/// once for the `T` tokens; other rows token by token while their codes are in cache.
///
/// # Safety
/// As [`run_rows`]; `jobs.len() == T`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run_rows_t<A: IntActs, const B: usize, const AVX512: bool, const VNNI: bool, const T: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    (out, first): (Outs, usize),
    ctx: &A::Ctx,
) {
    assert_eq!(jobs.len(), T, "{} jobs for {T} tokens", jobs.len());
    let rb = bits::row_bytes(p.cols, B as u8);
    let four = AVX512 && A::four_rows(B) && short_rows(rb);
    let ahead = if four { Ahead4::new(rb) } else { Ahead4::default() };
    let end = r0 + out.n;
    let mut r = r0;
    // Token t's output row r.
    let put = |t: usize, r: usize, y: f32| out.put(first + t, r - r0, y);
    match jobs[0] {
        Job::Oc { x: x0, .. } => {
            let acts: [(&A, &[f32]); T] = std::array::from_fn(|t| match jobs[t] {
                Job::Oc { x, xsum } => (x, xsum),
                Job::Ic { .. } => unreachable!("a batch's jobs are all of one axis"),
            });
            let (x, xsum) = (acts.map(|a| a.0), acts.map(|a| a.1));
            // Activation blocks per group (a division per row cost a small matrix 1%).
            let per = p.layout.group / x0.block();
            if four && x.iter().all(|x| A::four_rows_oc(x)) {
                // SAFETY: AVX (the caller's AVX2).
                let tails: [ZeroTail; T] = std::array::from_fn(|t| unsafe { ZeroTail::new(xsum[t]) });
                let sums: [(&[f32], &ZeroTail); T] = std::array::from_fn(|t| (xsum[t], &tails[t]));
                let mut scratch: [A::Scratch4; T] = std::array::from_fn(|_| Default::default());
                while end - r >= ROWS4 {
                    let y = A::rows4_oc::<B, VNNI, T>(p, x, sums, per, r, ahead, &mut scratch);
                    for (t, y) in y.iter().enumerate() {
                        for (q, &y) in y.iter().enumerate() {
                            put(t, r + q, y);
                        }
                    }
                    r += ROWS4;
                }
            }
            for r in r..end {
                let row = p.row_codes(r);
                for t in 0..T {
                    put(t, r, A::row_oc::<B, AVX512, VNNI>(p, x[t], xsum[t], per, r, row, ctx));
                }
            }
        }
        Job::Ic { .. } => {
            let acts: [(&A, f32); T] = std::array::from_fn(|t| match jobs[t] {
                Job::Ic { v, bias } => (v, bias),
                Job::Oc { .. } => unreachable!("a batch's jobs are all of one axis"),
            });
            let (v, bias) = (acts.map(|a| a.0), acts.map(|a| a.1));
            if four && v.iter().all(|v| A::four_rows_ic(v)) {
                while end - r >= ROWS4 {
                    let y = A::rows4_ic::<B, VNNI, T>(p, v, bias, r, ahead);
                    for (t, y) in y.iter().enumerate() {
                        for (q, &y) in y.iter().enumerate() {
                            put(t, r + q, y);
                        }
                    }
                    r += ROWS4;
                }
            }
            for r in r..end {
                let row = p.row_codes(r);
                for t in 0..T {
                    put(t, r, A::row_ic::<B, AVX512, VNNI>(row, v[t], bias[t], ctx));
                }
            }
        }
    }
}

/// [`run_rows`] with AVX2.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_avx2<A: IntActs, const B: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    out: Outs,
    ctx: &A::Ctx,
) {
    run_rows::<A, B, 0>(p, jobs, r0, out, ctx)
}

/// [`run_rows`] with AVX-512, no VNNI.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_avx512bw<A: IntActs, const B: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    out: Outs,
    ctx: &A::Ctx,
) {
    run_rows::<A, B, 1>(p, jobs, r0, out, ctx)
}

/// [`run_rows`] with AVX-512 and VNNI.
///
/// # Safety
/// As [`run_rows`].
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_vnni<A: IntActs, const B: usize>(
    p: &PackedLinear,
    jobs: &[Job<A>],
    r0: usize,
    out: Outs,
    ctx: &A::Ctx,
) {
    run_rows::<A, B, 2>(p, jobs, r0, out, ctx)
}

/// What every row needs from `x`, rounded once (the reference's; the per-IC matvec rounds per
/// row group as it goes).
pub(crate) fn prepare<A: IntActs>(p: &PackedLinear, x: &[f32]) -> Prepared<A> {
    let l = p.layout;
    match l.axis {
        Axis::Oc => {
            let (x, xsum) = A::prepare_oc(p, x);
            Prepared::Oc { x, xsum }
        }
        Axis::Ic => {
            let groups = p.rows.div_ceil(l.group);
            let v = (0..groups)
                .into_par_iter()
                .map(|kr| {
                    let mut slot = Default::default();
                    A::prepare_ic(p, x, kr, &mut slot);
                    slot.0
                })
                .collect();
            Prepared::Ic { v }
        }
    }
}

/// The definition of the integer product on `A`'s rounded activations, in f64, and per row
/// how far it may be from the exact product `W' x` because of that rounding (each activation
/// moved at most half its block's step `d / 2`):
/// per-OC `y[r] = sum_c s[r,k(c)] (code[r,c] - z[r,k(c)]) x̂[c]`, bound `sum_c |W'[r,c]| d(c) / 2`;
/// per-IC `y[r] = sum_c (code[r,c] - z[kr,c]) v̂[kr][c]`, bound `sum_c |code[r,c] - z[kr,c]| d(c) / 2`.
pub(crate) fn matvec_ref<A: IntActs>(p: &PackedLinear, x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    reference(p, &prepare::<A>(p, x))
}

/// `sum_{c in k} x̂[c]` for each group `k` of `g` of the `cols` rounded values (the per-OC
/// zero-point term). Each run of values inside one block and one group adds its integers
/// exactly, then one multiply by the block's step (value by value it was a float multiply and
/// a dependent add per value, on the leader alone: the per-OC matvec's serial part). With AVX2
/// the same code is compiled for it (the integer sums in 256-bit lanes).
pub(crate) fn group_sums<A: Rounded>(x: &A, cols: usize, g: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::simd_available() {
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

/// What every row needs from `x`, rounded once per call (activations `A`: [`IntActs`]).
pub(crate) enum Prepared<A> {
    /// per-OC: `x` (gathered by `perm`) rounded, and `sum_{c in k} x̂[c]` per group.
    Oc { x: A, xsum: Vec<f32> },
    /// per-IC: `v[kr][c] = s[kr, c] x[c]` rounded per row group.
    Ic { v: Vec<A> },
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
            (0..cols)
                .map(term)
                .fold((0.0, 0.0), |(y, b), (w, x, d)| (y + w * f64::from(x), b + w.abs() * f64::from(d) / 2.0))
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_sums_add_the_rounded_values() {
        for cols in [1, 31, 32, 100, 576, 1000] {
            let x: Vec<f32> = (0..cols).map(|i| (((i * 2654435761usize) >> 7) % 2001) as f32 / 100.0 - 10.0).collect();
            let (q8, q16) = (crate::matvec_i8::Q8::new(&x), crate::round_i16::Q16::new(&x, 64));
            // Groups that are and are not whole blocks (200: runs end at block and group borders).
            for g in [32, 64, 128, 200] {
                let check = |got: Vec<f32>, value: &dyn Fn(usize) -> f32, what: &str| {
                    assert_eq!(got.len(), cols.div_ceil(g));
                    for (k, got) in got.iter().enumerate() {
                        let run = k * g..((k + 1) * g).min(cols);
                        let want: f64 = run.clone().map(|c| f64::from(value(c))).sum();
                        let size: f64 = run.map(|c| f64::from(value(c)).abs()).sum();
                        assert!(
                            (f64::from(*got) - want).abs() <= 1e-6 * size.max(1.0),
                            "{what} cols {cols} g {g} group {k}: {got} vs {want}"
                        );
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
