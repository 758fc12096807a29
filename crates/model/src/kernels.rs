//! Element-wise kernels of the forward pass that candle runs slowly on the CPU (single-threaded,
//! libm `exp` and `erf`): a vectorizable `exp`, row softmax, fused `silu(g) * u` and BERT's
//! exact (erf) GELU.
//!
//! Each is a plain loop compiled three times (AVX-512, AVX2+FMA, baseline) and chosen at run
//! time; `*_ref` versions with `f64` libm math sit beside them and the tests hold them together.

/// `e^x` for f32 with relative error below 2e-7 on [-87, 88] (Cephes `expf` polynomial):
/// `x = n ln2 + r`, `|r| <= ln2/2`, `e^x = 2^n * P(r)`. Branch-free so loops vectorize.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    #[allow(clippy::manual_clamp)] // max/min send NaN to -87 (clamp would keep it)
    let x = x.max(-87.0).min(88.0);
    // Round to nearest with the 1.5 * 2^23 trick: `k`'s low mantissa bits hold the integer
    // n = round(x log2 e), readable with integer ops only (float->int casts do not vectorize).
    let k = x * LOG2E + 12_582_912.0;
    let n = k - 12_582_912.0;
    let n_int = k.to_bits() as i32 - 0x4B40_0000;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    f32::from_bits(((n_int + 127) << 23) as u32) * p
}

/// Lanes for explicit reductions: float sums do not auto-vectorize (addition order matters),
/// so we keep `LANES` partial sums and let LLVM map them onto one vector register.
const LANES: usize = 16;

#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    tail.iter().chain(m.iter()).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `sum(exp(x - shift))`; with `store`, also writes the exponentials back into `x`.
#[inline(always)]
fn sum_exp_lanes(x: &mut [f32], shift: f32, store: bool) -> f32 {
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_fast(c[l] - shift);
            if store {
                c[l] = e;
            }
            s[l] += e;
        }
    }
    let mut total: f32 = 0.0;
    for v in chunks.into_remainder() {
        let e = exp_fast(*v - shift);
        if store {
            *v = e;
        }
        total += e;
    }
    total + s.iter().sum::<f32>()
}

macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { body($($arg),*) }
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { v4($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

multiversion! {
    /// In place: `row[..len] = softmax(row[..len])`, `row[len..] = 0` (the causal mask).
    pub fn softmax_prefix(row: &mut [f32], len: usize) {
        let (live, dead) = row.split_at_mut(len);
        let max = max_lanes(live);
        let sum = sum_exp_lanes(live, max, true);
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|v| *v *= inv);
        dead.iter_mut().for_each(|v| *v = 0.0);
    }
}

multiversion! {
    /// `out[i] = silu(g[i]) * u[i]` with `silu(x) = x / (1 + e^-x)`.
    pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_fast(-g)) * u;
        }
    }
}

multiversion! {
    /// In place: `x = 0.5 x (1 + erf(x / sqrt 2))`, BERT's exact GELU, with `erf` from
    /// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7; branch-free, so it vectorizes)
    /// and [`exp_fast`].
    pub fn gelu_erf(x: &mut [f32]) {
        for v in x.iter_mut() {
            let a = (*v * std::f32::consts::FRAC_1_SQRT_2).abs();
            let t = 1.0 / (1.0 + 0.327_591_1 * a);
            let poly =
                t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
            let erf = (1.0 - poly * exp_fast(-a * a)).copysign(*v);
            *v = 0.5 * *v * (1.0 + erf);
        }
    }
}

multiversion! {
    /// `*out = log(sum(exp(row)))`, computed stably around the row maximum.
    pub fn logsumexp(row: &mut [f32], out: &mut f32) {
        let max = max_lanes(row);
        *out = max + sum_exp_lanes(row, max, false).ln();
    }
}

/// `sum_i a[i] b[i]` in `LANES` partial sums.
#[inline(always)]
fn dot_lanes<E: Kv>(a: &[f32], b: &[E]) -> f32 {
    let mut s = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.f32()).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            s[l] += x[l] * y[l].f32();
        }
    }
    tail + s.iter().sum::<f32>()
}

/// A number type of cached keys and values: f32, or f16 (half the bytes per position).
pub trait Kv: Copy {
    /// Whether it is f16 (the AVX-512 score loop loads it with `vcvtph2ps`).
    const HALF: bool;
    fn f32(self) -> f32;
}

impl Kv for f32 {
    const HALF: bool = false;
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Kv for half::f16 {
    const HALF: bool = true;
    #[inline(always)]
    fn f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
}

/// The f32 of f16 bits (exact), in integer and float operations without branches, so loops
/// over rows vectorize on every build (the `half` crate's conversion checks the CPU per call).
/// Exponent and mantissa move up 13 bits, which is the number times 2^-112 read as an f32
/// (normals and subnormals alike); multiplying by 2^112 rebiases it. Infinities and NaNs
/// (exponent all ones) keep their mantissa under an all-ones f32 exponent.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7fff) << 13;
    let finite = f32::from_bits(em) * f32::from_bits(0x7780_0000); // 2^112
    let special = f32::from_bits(em | 0x7f80_0000);
    let v = if em >= 0x7c00 << 13 { special } else { finite };
    f32::from_bits(v.to_bits() | sign)
}

multiversion! {
    /// The `g = stats.len() / 2` query heads that share one key/value head, for one new position,
    /// over one run of `n = scores.len() / g` cached positions: key / value `j` at `k[j * hd..]`
    /// / `v[j * hd..]`, `hd = q.len() / g`, `q` already scaled by 1/sqrt(hd); `scores` is
    /// scratch. Leaves head `h`'s softmax unnormalized, for [`merge_parts`]: `out[h * hd..]` =
    /// `sum_j e^(s_hj - m_h) v_j` and `stats[2h..2h + 2] = [m_h, sum_j e^(s_hj - m_h)]`, `m_h`
    /// the run's largest score. Each key and value row is read once for all `g` heads (grouped
    /// query attention: one head at a time read the cache `g` times), and a long context splits
    /// into runs that the decode team shares. A 1-row product that a GEMM library spends more
    /// time setting up than computing.
    pub fn attend_part(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
        attend_part_of(q, k, v, scores, out, stats)
    }
}

multiversion! {
    /// [`attend_part`] over an f16 cache's keys and values.
    pub fn attend_part_f16(q: &[f32], k: &[half::f16], v: &[half::f16], scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
        attend_part_of(q, k, v, scores, out, stats)
    }
}

/// The body of [`attend_part`] for either number type of the cache.
#[inline(always)]
fn attend_part_of<E: Kv>(q: &[f32], k: &[E], v: &[E], scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
    {
        let g = stats.len() / 2;
        let (hd, n) = (q.len() / g, scores.len() / g);
        for j in key_scores16(q, k, g, hd, n, scores)..n {
            let kj = &k[j * hd..(j + 1) * hd];
            for h in 0..g {
                scores[h * n + j] = dot_lanes(&q[h * hd..(h + 1) * hd], kj);
            }
        }
        for h in 0..g {
            let s = &mut scores[h * n..(h + 1) * n];
            let max = max_lanes(s);
            stats[2 * h] = max;
            stats[2 * h + 1] = sum_exp_lanes(s, max, true);
        }
        match (hd, g) {
            (64, 3) => weighted_heads::<64, 3, E>(scores, v, out),
            (64, g) if g % 4 == 0 => weighted_heads::<64, 4, E>(scores, v, out),
            (64, g) if g % 2 == 0 => weighted_heads::<64, 2, E>(scores, v, out),
            (64, _) => weighted_heads::<64, 1, E>(scores, v, out),
            (128, g) if g % 2 == 0 => weighted_heads::<128, 2, E>(scores, v, out),
            (128, _) => weighted_heads::<128, 1, E>(scores, v, out),
            _ => {
                for (h, out) in out.chunks_exact_mut(hd).enumerate() {
                    weighted_rows(&scores[h * n..(h + 1) * n], v, out);
                }
            }
        }
    }
}

/// [`attend_part`]'s scores `scores[h * n + j] = q_h . k_j` for the leading keys in blocks of
/// 16, with AVX-512 where the CPU has it and `hd` is a multiple of 16; returns how many keys it
/// did (0 otherwise), the caller does the rest one key at a time. One key at a time ends each
/// dot product in a horizontal sum of a vector (four shuffle-adds for one number, a quarter of
/// attention's time at 1500 positions); here 16 keys' vectors of partial sums fold into one
/// vector of 16 scores in 15 shuffle-adds.
#[inline(always)]
fn key_scores16<E: Kv>(q: &[f32], k: &[E], g: usize, hd: usize, n: usize, scores: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if hd.is_multiple_of(16) && n >= 16 && is_x86_feature_detected!("avx512f") {
            assert!(q.len() >= g * hd && k.len() >= n * hd && scores.len() >= g * n);
            // SAFETY: the feature was detected; the assert bounds every load and store.
            unsafe { key_scores16_avx512(q, k, g, hd, n, scores) };
            return n / 16 * 16;
        }
    }
    let _ = (q, k, g, hd, n, scores);
    0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn key_scores16_avx512<E: Kv>(q: &[f32], k: &[E], g: usize, hd: usize, n: usize, scores: &mut [f32]) {
    use std::arch::x86_64::*;
    let (q, k) = (q.as_ptr(), k.as_ptr());
    // 16 numbers of a key at `p`: f16 widened on the way in.
    let load = |p: *const E| {
        if E::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    };
    for j0 in (0..n / 16 * 16).step_by(16) {
        let kb = k.add(j0 * hd);
        // The block after next, one line at a time (addresses past the run are only hints).
        let ahead = (kb as *const u8).wrapping_add(32 * hd * std::mem::size_of::<E>());
        for l in (0..16 * hd * std::mem::size_of::<E>()).step_by(64) {
            adadim_pack::simd::prefetch_line(ahead.wrapping_add(l));
        }
        for h in 0..g {
            let qh = q.add(h * hd);
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in (0..hd).step_by(16) {
                let qv = _mm512_loadu_ps(qh.add(c));
                for (b, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(qv, load(kb.add(b * hd + c)), *a);
                }
            }
            // Fold pairs: within each 128-bit lane, [a0+a2, b0+b2, a1+a3, b1+b3] ...
            let mut x = [_mm512_setzero_ps(); 8];
            for (i, x) in x.iter_mut().enumerate() {
                let (a, b) = (acc[2 * i], acc[2 * i + 1]);
                *x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            }
            // ... then quads: each 128-bit lane holds its part of keys 4i..4i+4, in order ...
            let mut y = [_mm512_setzero_ps(); 4];
            for (i, y) in y.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *y = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b));
            }
            // ... then the 128-bit lanes: after two rounds lane l holds keys 4l..4l+4 in full.
            let lanes = |a: __m512, b: __m512| {
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
            };
            let s = lanes(lanes(y[0], y[1]), lanes(y[2], y[3]));
            _mm512_storeu_ps(scores.as_mut_ptr().add(h * n + j0), s);
        }
    }
}

/// `out = sum_j p[j] v[j * out.len()..][..out.len()]`.
#[inline(always)]
fn weighted_rows<E: Kv>(p: &[f32], v: &[E], out: &mut [f32]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    for (vj, &pj) in v.chunks_exact(out.len()).zip(p) {
        for (o, &x) in out.iter_mut().zip(vj) {
            *o += pj * x.f32();
        }
    }
}

/// [`weighted_rows`] for every head (`out`: `g` heads of `HD`, the common head sizes; `p`: their
/// `n` weights each, head after head), `C` heads at a time (`g` a multiple of `C`): their sums
/// stay in registers instead of a load and a store of `out` per position (a third of decode
/// attention's time at 1500 positions, SmolLM2's head of 64), and each value row is loaded
/// (and widened from f16) once for `C` heads.
#[inline(always)]
fn weighted_heads<const HD: usize, const C: usize, E: Kv>(p: &[f32], v: &[E], out: &mut [f32]) {
    let (g, n) = (out.len() / HD, v.len() / HD);
    for h0 in (0..g).step_by(C) {
        let p = &p[h0 * n..(h0 + C) * n];
        let mut acc = [[0f32; HD]; C];
        for (j, vj) in v.chunks_exact(HD).enumerate() {
            // Rows 8 ahead, a line at a time (addresses past the run are only hints).
            #[cfg(target_arch = "x86_64")]
            for l in (0..HD * std::mem::size_of::<E>()).step_by(64) {
                adadim_pack::simd::prefetch_line(
                    (vj.as_ptr() as *const u8).wrapping_add(8 * HD * std::mem::size_of::<E>() + l),
                );
            }
            let mut x = [0f32; HD];
            for (x, &e) in x.iter_mut().zip(vj) {
                *x = e.f32();
            }
            for (c, acc) in acc.iter_mut().enumerate() {
                let pj = p[c * n + j];
                for (a, &x) in acc.iter_mut().zip(&x) {
                    *a += pj * x;
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            out[(h0 + c) * HD..(h0 + c + 1) * HD].copy_from_slice(acc);
        }
    }
}

/// Cached keys or values of one key/value head, `hd` numbers per position: f32, or f16 (half
/// the bytes decode attention reads per position, llama.cpp's default cache type).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> KvRows<'a> {
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(x) => x.len(),
            KvRows::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn slice(&self, r: std::ops::Range<usize>) -> KvRows<'a> {
        match self {
            KvRows::F32(x) => KvRows::F32(&x[r]),
            KvRows::F16(x) => KvRows::F16(&x[r]),
        }
    }
}

/// Run `r` of one key/value head's positions (runs of `run`, the last may be short; `k`, `v`
/// hold its `n = k.len() / hd` positions) for the `q.len() / hd` query heads that share it:
/// [`attend_part`] (or [`attend_part_f16`]) into `part` ([`part_len`] floats), ready for
/// [`merge_parts`].
pub fn attend_run(q: &[f32], k: KvRows, v: KvRows, hd: usize, run: usize, r: usize, part: &mut [f32]) {
    let (g, n) = (q.len() / hd, k.len() / hd);
    let (j0, j1) = (r * run, ((r + 1) * run).min(n));
    let mut scores = vec![0f32; g * (j1 - j0)];
    let (o, stats) = part.split_at_mut(g * hd);
    let span = j0 * hd..j1 * hd;
    match (k, v) {
        (KvRows::F32(k), KvRows::F32(v)) => attend_part(q, &k[span.clone()], &v[span], &mut scores, o, stats),
        (KvRows::F16(k), KvRows::F16(v)) => attend_part_f16(q, &k[span.clone()], &v[span], &mut scores, o, stats),
        _ => panic!("attend_run: keys and values of different number types"),
    }
}

/// Floats [`attend_part`] leaves for `g` heads of `hd`: the heads' `out`, then their `stats`.
pub fn part_len(g: usize, hd: usize) -> usize {
    g * hd + 2 * g
}

/// The runs' [`attend_part`] results (`parts`: consecutive blocks of [`part_len`] floats, one
/// per run of positions) joined into the `g` heads' attention `out` (`g * hd`): each run's
/// terms rescaled from its own maximum to the overall one, then divided by the total.
pub fn merge_parts(parts: &[f32], g: usize, hd: usize, out: &mut [f32]) {
    let width = part_len(g, hd);
    out.iter_mut().for_each(|o| *o = 0.0);
    for h in 0..g {
        let stat = |p: &[f32], i: usize| p[g * hd + 2 * h + i];
        let max = parts.chunks_exact(width).map(|p| stat(p, 0)).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        let o = &mut out[h * hd..(h + 1) * hd];
        for p in parts.chunks_exact(width) {
            let w = exp_fast(stat(p, 0) - max);
            total += w * stat(p, 1);
            for (o, &x) in o.iter_mut().zip(&p[h * hd..(h + 1) * hd]) {
                *o += w * x;
            }
        }
        let inv = 1.0 / total;
        o.iter_mut().for_each(|o| *o *= inv);
    }
}

multiversion! {
    /// `y[r] = w[r * x.len()..] . x` for each of `y.len()` rows of a row-major f32 matrix: the
    /// dense matvec of decoding (bandwidth-bound; a GEMM call spends its time in set-up).
    pub fn dense_rows(w: &[f32], x: &[f32], y: &mut [f32]) {
        let cols = x.len();
        for (r, y) in y.iter_mut().enumerate() {
            *y = dot_lanes(&w[r * cols..(r + 1) * cols], x);
        }
    }
}

multiversion! {
    /// [`dense_rows`] for `t` tokens at once: `x` `[t, cols]` row-major, `yt[r * t + j]` row
    /// `r`'s product with token `j`. Each weight row is read from memory once for all the
    /// tokens (two rows against four tokens at a time: eight independent sums), where a GEMM
    /// would first repack the whole weight: a short sentence's product is bound by reading it.
    pub fn dense_rows_tokens(w: &[f32], x: &[f32], t: usize, yt: &mut [f32]) {
        let cols = x.len() / t;
        for (r2, out) in yt.chunks_mut(2 * t).enumerate() {
            let (r, both) = (2 * r2, out.len() == 2 * t);
            let mut j = 0;
            if both {
                let (w0, w1) = (&w[r * cols..(r + 1) * cols], &w[(r + 1) * cols..(r + 2) * cols]);
                while j + 4 <= t {
                    let [y0, y1] = dot2x4_lanes(w0, w1, &x[j * cols..(j + 4) * cols]);
                    out[j..j + 4].copy_from_slice(&y0);
                    out[t + j..t + j + 4].copy_from_slice(&y1);
                    j += 4;
                }
            }
            for (k, out) in out.chunks_exact_mut(t).enumerate() {
                let wr = &w[(r + k) * cols..(r + k + 1) * cols];
                for (i, o) in out.iter_mut().enumerate().skip(j) {
                    *o = dot_lanes(wr, &x[i * cols..(i + 1) * cols]);
                }
            }
        }
    }
}

/// `a_i . b_k` for two rows `a0`, `a1` and the four consecutive rows `b_k` of `b` (each
/// `a0.len()` long), in `LANES` partial sums each (fused multiply-adds): eight independent sums
/// from two weight loads and four token loads per step.
#[inline(always)]
fn dot2x4_lanes(a0: &[f32], a1: &[f32], b: &[f32]) -> [[f32; 4]; 2] {
    let n = a0.len();
    let (b0, b1, b2, b3) = (&b[..n], &b[n..2 * n], &b[2 * n..3 * n], &b[3 * n..4 * n]);
    let z = [0f32; LANES];
    let (mut s00, mut s01, mut s02, mut s03) = (z, z, z, z);
    let (mut s10, mut s11, mut s12, mut s13) = (z, z, z, z);
    let whole = n - n % LANES;
    let ws = a0.chunks_exact(LANES).zip(a1.chunks_exact(LANES));
    let ys = b0.chunks_exact(LANES).zip(b1.chunks_exact(LANES)).zip(b2.chunks_exact(LANES).zip(b3.chunks_exact(LANES)));
    for ((w0, w1), ((y0, y1), (y2, y3))) in ws.zip(ys) {
        for l in 0..LANES {
            s00[l] = w0[l].mul_add(y0[l], s00[l]);
            s01[l] = w0[l].mul_add(y1[l], s01[l]);
            s02[l] = w0[l].mul_add(y2[l], s02[l]);
            s03[l] = w0[l].mul_add(y3[l], s03[l]);
            s10[l] = w1[l].mul_add(y0[l], s10[l]);
            s11[l] = w1[l].mul_add(y1[l], s11[l]);
            s12[l] = w1[l].mul_add(y2[l], s12[l]);
            s13[l] = w1[l].mul_add(y3[l], s13[l]);
        }
    }
    let finish = |a: &[f32], bk: &[f32], sk: [f32; LANES]| -> f32 {
        a[whole..].iter().zip(&bk[whole..]).map(|(x, y)| x * y).sum::<f32>() + sk.iter().sum::<f32>()
    };
    [
        [finish(a0, b0, s00), finish(a0, b1, s01), finish(a0, b2, s02), finish(a0, b3, s03)],
        [finish(a1, b0, s10), finish(a1, b1, s11), finish(a1, b2, s12), finish(a1, b3, s13)],
    ]
}

/// Reference for [`dense_rows`], in f64.
pub fn dense_rows_ref(w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    for (r, y) in y.iter_mut().enumerate() {
        *y = w[r * cols..(r + 1) * cols].iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
    }
}

/// One query head's attention over `n` positions (`out = softmax(K q) V`), in f64: the
/// reference for [`attend_part`] and [`merge_parts`].
pub fn attend_one_ref(q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
    let hd = q.len();
    let s: Vec<f64> = (0..n).map(|j| q.iter().zip(&k[j * hd..]).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
    let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    for (c, o) in out.iter_mut().enumerate() {
        *o = ((0..n).map(|j| e[j] * v[j * hd + c] as f64).sum::<f64>() / sum) as f32;
    }
}

/// Reference for [`logsumexp`].
pub fn logsumexp_ref(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

/// Reference for [`softmax_prefix`].
pub fn softmax_prefix_ref(row: &mut [f32], len: usize) {
    let max = row[..len].iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row[..len].iter().map(|&v| (v as f64 - max).exp()).sum();
    for (i, v) in row.iter_mut().enumerate() {
        *v = if i < len { ((*v as f64 - max).exp() / sum) as f32 } else { 0.0 };
    }
}

/// Reference for [`silu_mul`].
pub fn silu_mul_ref(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = (g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64) as f32;
    }
}

/// [`gelu_erf`]'s reference: candle's `gelu_erf` (libm's `erf`).
pub fn gelu_erf_ref(x: &[f32]) -> Vec<f32> {
    let t = candle_core::Tensor::from_slice(x, x.len(), &candle_core::Device::Cpu).expect("a vector");
    t.gelu_erf().and_then(|t| t.to_vec1::<f32>()).expect("gelu of a vector")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_erf_matches_libm() {
        let x: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 1e-4).chain([-1e4, 1e4, 0.0, -0.0]).collect();
        let (mut got, want) = (x.clone(), gelu_erf_ref(&x));
        gelu_erf(&mut got);
        for ((x, g), w) in x.iter().zip(&got).zip(&want) {
            // A-S's 1.5e-7 on erf, times |x| / 2, plus f32 rounding of the products.
            let tol = 2e-7 * x.abs().max(1.0) + 2.0 * f32::EPSILON * w.abs();
            assert!((g - w).abs() <= tol, "gelu({x}) = {g}, libm {w}");
        }
    }

    #[test]
    fn exp_fast_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = ((exp_fast(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
            x += 0.000_97;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
        assert!(exp_fast(0.0) == 1.0);
    }

    #[test]
    fn dense_rows_match_reference() {
        let mut rng = adadim_load::synth::Rng::new(6);
        for (rows, cols) in [(1, 1), (7, 576), (33, 45), (5, 1536)] {
            let (w, x) = (rng.normals(rows * cols, 1.0), rng.normals(cols, 1.0));
            let (mut a, mut b) = (vec![0f32; rows], vec![0f32; rows]);
            dense_rows(&w, &x, &mut a);
            dense_rows_ref(&w, &x, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-5 * (cols as f32).sqrt(), "{rows}x{cols}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn dense_rows_tokens_match_reference_token_by_token() {
        let mut rng = adadim_load::synth::Rng::new(7);
        // Odd row counts (a last row without a pair), token counts around the groups of four,
        // widths with and without a tail past the lanes.
        for (rows, cols, t) in [(1, 1, 1), (7, 576, 9), (33, 45, 4), (6, 384, 13), (5, 1536, 3), (64, 40, 27)] {
            let (w, x) = (rng.normals(rows * cols, 1.0), rng.normals(t * cols, 1.0));
            let mut yt = vec![f32::NAN; rows * t];
            dense_rows_tokens(&w, &x, t, &mut yt);
            for j in 0..t {
                let mut want = vec![0f32; rows];
                dense_rows_ref(&w, &x[j * cols..(j + 1) * cols], &mut want);
                for (r, q) in want.iter().enumerate() {
                    let p = yt[r * t + j];
                    assert!(
                        (p - q).abs() <= 1e-5 * (cols as f32).sqrt(),
                        "{rows}x{cols} t {t}: row {r} token {j}: {p} vs {q}"
                    );
                }
            }
        }
    }

    #[test]
    fn decode_attention_matches_reference() {
        let mut rng = adadim_load::synth::Rng::new(5);
        // Heads per key/value head, head size, positions, positions per run (the last run
        // short, one run, runs of one position).
        for (g, hd, n, run) in [
            (1, 64, 1, 1),
            (3, 64, 37, 16),
            (3, 64, 700, 88),
            (2, 48, 5, 5),
            (1, 20, 9, 1),
            (4, 20, 130, 64),
            (2, 128, 50, 20),
            (8, 64, 90, 32),
            (2, 64, 17, 17),
            (6, 64, 40, 40),
            (1, 128, 33, 16),
            (3, 128, 20, 7),
        ] {
            let q = rng.normals(g * hd, 0.3);
            let (k, v) = (rng.normals(n * hd, 1.0), rng.normals(n * hd, 1.0));
            let width = part_len(g, hd);
            let mut parts = vec![f32::NAN; n.div_ceil(run) * width];
            for (r, part) in parts.chunks_exact_mut(width).enumerate() {
                attend_run(&q, KvRows::F32(&k), KvRows::F32(&v), hd, run, r, part);
            }
            let mut got = vec![f32::NAN; g * hd];
            merge_parts(&parts, g, hd, &mut got);
            for h in 0..g {
                let mut want = vec![0f32; hd];
                attend_one_ref(&q[h * hd..(h + 1) * hd], &k, &v, n, &mut want);
                for (x, y) in got[h * hd..(h + 1) * hd].iter().zip(&want) {
                    assert!(
                        (x - y).abs() <= 2e-6 * (n as f32).sqrt().max(1.0),
                        "g {g} hd {hd} n {n} run {run} head {h}: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn f16_decode_matches_the_half_crate_for_every_value() {
        for bits in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(bits), half::f16::from_bits(bits).to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#06x}: {got} vs {want}");
        }
    }

    #[test]
    fn decode_attention_over_f16_rows_equals_f32_rows_of_the_same_values() {
        let mut rng = adadim_load::synth::Rng::new(8);
        for (g, hd, n, run) in [(3, 64, 130, 64), (4, 64, 40, 40), (2, 128, 33, 16), (2, 48, 21, 8), (1, 20, 9, 4)] {
            let q = rng.normals(g * hd, 0.3);
            let half_of = |x: Vec<f32>| x.into_iter().map(half::f16::from_f32).collect::<Vec<_>>();
            let (k16, v16) = (half_of(rng.normals(n * hd, 1.0)), half_of(rng.normals(n * hd, 1.0)));
            let wide = |x: &[half::f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
            let (k32, v32) = (wide(&k16), wide(&v16));
            let width = part_len(g, hd);
            for r in 0..n.div_ceil(run) {
                let (mut a, mut b) = (vec![f32::NAN; width], vec![f32::NAN; width]);
                attend_run(&q, KvRows::F16(&k16), KvRows::F16(&v16), hd, run, r, &mut a);
                attend_run(&q, KvRows::F32(&k32), KvRows::F32(&v32), hd, run, r, &mut b);
                assert_eq!(a, b, "g {g} hd {hd} n {n} run {r}");
            }
        }
    }

    #[test]
    fn softmax_and_silu_match_reference() {
        let mut rng = adadim_load::synth::Rng::new(3);
        for n in [1, 7, 16, 33, 1000, 2049] {
            let src = rng.normals(n, 6.0);
            for len in [1, n / 2 + 1, n] {
                let (mut a, mut b) = (src.clone(), src.clone());
                softmax_prefix(&mut a, len);
                softmax_prefix_ref(&mut b, len);
                // f32 summation over `len` terms: error grows like eps * sqrt(len).
                let tol = 1e-6 + 4.0 * f32::EPSILON * (len as f32).sqrt();
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= tol * y.abs().max(1e-3), "n={n} len={len}: {x} vs {y}");
                }
                assert!(a[len..].iter().all(|&v| v == 0.0));
            }
            let mut lse = 0.0;
            logsumexp(&mut src.clone(), &mut lse);
            let want = logsumexp_ref(&src);
            assert!((lse as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "lse n={n}: {lse} vs {want}");
            let u = rng.normals(n, 1.0);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            silu_mul(&src, &u, &mut a);
            silu_mul_ref(&src, &u, &mut b);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * y.abs().max(1e-3), "silu: {x} vs {y}");
            }
        }
    }
}
