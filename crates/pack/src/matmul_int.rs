//! Prefill on integers: `Y = X W'^T` for many tokens with the activations rounded as the decode
//! matvec rounds them (int16 per block, [`crate::matvec_i16`], or int8 per block of 32, [`crate::matvec_i8`]),
//! the codes widened once per panel of [`NR`] output channels, and the products summed by
//! AVX-512 VNNI: `vpdpwssd` (32 int16 products per instruction) or `vpdpbusd` (64 products of an
//! unsigned code byte and a signed activation byte), where an f32 FMA does 16: where all three
//! issue at the same rate, int16 has twice and int8 four times the f32 GEMM's ceiling.
//!
//! Why: the f32 path ([`crate::matmul_f32`]) dequantizes panels into an f32 GEMM and runs at
//! that GEMM's rate, which left prompt processing below llama.cpp's (whose Q4 × Q8 products
//! are integer). Evaluation keeps the f32 path (perplexity of the packed model equals that of
//! the dequantized one); `generate` prefills its prompt here.
//!
//! The product, both axes through the same tile kernel `Y[t, r] = sum_b d[t, b] ws[r, b] I[t, r, b]`
//! (`I` the integer dot product of block `b` of token `t`'s rounded activations with row `r`'s codes):
//! * per-OC: the activations are `x` (in stored column order); `ws[r, b]` is the scale of the
//!   group holding block `b`, and the zero points come off afterwards:
//!   `- sum_k s[r,k] z[r,k] sum_{c in k} x̂[c]`;
//! * per-IC: the activations are `s[kr, c] x[c]`, rounded per token and row group, `ws = 1`,
//!   and each row loses the group's `sum_c z[kr,c] v̂[c]`.
//!
//! Layout: a panel holds, per step of `KL` columns (4 for int8, 2 for int16: one 32-bit lane),
//! the [`NR`] rows' `KL` codes side by side (bytes, or int16 little-endian), 128 bytes per step:
//! two registers, each 16 rows. A tile of up to [`MR`] tokens broadcasts each token's step (4
//! bytes of its rounded activations) and multiplies it with both registers: 2 x MR products per
//! step in int32 accumulators, converted and scaled into f32 ones at each block's end.
//!
//! Sums stay inside int32: a lane adds `block` products of at most 255 x 32767 (int16, blocks
//! of at most 128: < 2^31) or 255 x 127 (int8).
//! [`tile_ref`] is the tile in plain Rust (the same operations, in the same order, so the test
//! holds the kernel to it bit for bit); the tests hold the whole product to the decode matvec's
//! f64 definition ([`crate::matvec_i16::matvec_ref`], [`crate::matvec_i8::matvec_ref`]) token by token.

// Index loops over registers and steps mirror the vector layout the intrinsics use.
#![allow(clippy::needless_range_loop)]

use adadim_quantize::Axis;
use rayon::prelude::*;

use crate::bits;
use crate::format::PackedLinear;
use crate::matvec_i16 as q16;
use crate::matvec_i8::{self as q8, Q8};
use crate::round_i16::{self, Q16};
use crate::ActBits;

/// Output channels per panel: two registers of 16 int32 lanes.
pub const NR: usize = 32;

/// Tokens per tile: 2 x 6 int32 and 2 x 6 f32 accumulators, two panel registers, a broadcast
/// and two scale registers fit the 32 registers.
pub const MR: usize = 6;

/// Bytes of one panel step: [`NR`] rows x 4 bytes.
const STEP_BYTES: usize = NR * 4;

/// Which integer product a layout gets under `act` on this CPU, or `None` for the f32 path:
/// int8 where the decode matvec would round to int8 ([`q8::supported`]), int16 where it would
/// round to int16 ([`q16::supported`]); whole 4-column steps; per-IC row groups of whole panels;
/// AVX-512 with VNNI.
pub fn kind(p: &PackedLinear, act: ActBits) -> Option<ActBits> {
    let l = p.layout();
    let shape = p.cols().is_multiple_of(4) && (l.axis == Axis::Oc || l.group.is_multiple_of(NR));
    if !shape || !crate::simd::avx512_vnni_available() {
        return None;
    }
    match act {
        ActBits::F32 => None,
        ActBits::I8 if q8::supported(p) => Some(ActBits::I8),
        _ if q16::supported(p) => Some(ActBits::I16),
        _ => None,
    }
}

/// Tokens' rounded activations, row-major in one buffer each (allocated once per product, and
/// per-IC refilled for every row group): token `i`'s integers at `q[i * row..]` (bytes of i8
/// or int16 little-endian, as x86 stores them), its block steps at `d[i * nb..]`, its zero-point
/// terms at `zero[i * nz..]` (per-OC: `sum_{c in k} x̂[c]` per group `k`; per-IC:
/// `sum_c z[c] v̂[c]`).
struct Acts {
    q: Vec<u8>,
    d: Vec<f32>,
    zero: Vec<f32>,
    /// Bytes per token, values per block (one step each), blocks and zero terms per token.
    row: usize,
    block: usize,
    nb: usize,
    nz: usize,
}

/// Rounded values as bytes (int16 little-endian), steps, the zero-point terms.
type Out<'a> = (&'a mut [u8], &'a mut [f32], &'a mut [f32]);

impl Acts {
    fn new(p: &PackedLinear, kind: ActBits, t: usize) -> Self {
        let (cols, l) = (p.cols(), p.layout());
        let (esize, block) = match (kind, l.axis) {
            (ActBits::I8, _) => (1, q8::BLOCK),
            (_, Axis::Oc) => (2, round_i16::block_size(p)),
            (_, Axis::Ic) => (2, round_i16::MAX_BLOCK),
        };
        let (row, nb) = (cols * esize, cols.div_ceil(block));
        let nz = if l.axis == Axis::Oc { cols.div_ceil(l.group) } else { 1 };
        Acts { q: vec![0; t * row], d: vec![0.0; t * nb], zero: vec![0.0; t * nz], row, block, nb, nz }
    }

    /// Rounds every token's `x` (rows of `cols`) with `round`, tokens in parallel.
    fn fill(&mut self, x: &[f32], cols: usize, round: impl Fn(&[f32], Out) + Sync + Send) {
        let Acts { q, d, zero, row, nb, nz, .. } = self;
        q.par_chunks_mut(*row)
            .zip(d.par_chunks_mut(*nb))
            .zip(zero.par_chunks_mut(*nz))
            .zip(x.par_chunks(cols))
            .for_each(|(((q, d), z), x)| round(x, (q, d, z)));
    }

    /// Per-OC: `x` in stored column order, rounded as the decode matvec rounds it, and its
    /// group sums.
    fn oc(p: &PackedLinear, kind: ActBits, x: &[f32], t: usize) -> Self {
        let (cols, g) = (p.cols(), p.layout().group);
        let mut acts = Acts::new(p, kind, t);
        let block = acts.block;
        acts.fill(x, cols, |x, (q, d, z)| {
            let x = p.stored_order(x);
            let sums = match kind {
                ActBits::I8 => {
                    let v = Q8::new(&x);
                    store(&v.q, &v.d, q, d);
                    crate::matvec_int::group_sums(&v, cols, g)
                }
                _ => {
                    let v = Q16::rounded(&x, block, false);
                    store(&v.q, &v.d, q, d);
                    crate::matvec_int::group_sums(&v, cols, g)
                }
            };
            z.copy_from_slice(&sums);
        });
        acts
    }

    /// Per-IC: row group `kr`'s `s x` per token, rounded as the decode matvec rounds it, and its
    /// zero-point sum, into `self`.
    fn ic(&mut self, p: &PackedLinear, kind: ActBits, x: &[f32], kr: usize) {
        let cols = p.cols();
        let (s, zp) = (&p.scales[kr * cols..(kr + 1) * cols], &p.zeros[kr * cols..(kr + 1) * cols]);
        let (block, qmax) = if kind == ActBits::I8 { (q8::BLOCK, 127.0) } else { (round_i16::MAX_BLOCK, 32767.0) };
        self.fill(x, cols, |x, (q, d, z)| {
            #[cfg(target_arch = "x86_64")]
            if crate::simd::avx512_available() {
                // SAFETY: AVX-512 F and BW were detected.
                z[0] = unsafe { round_scaled_avx512(s, x, zp, block, qmax, q, d) };
                return;
            }
            // (Not reached where kind() chose this path, which requires AVX-512 VNNI.)
            z[0] = round_scaled_ref(kind, s, x, zp, q, d);
        });
    }
}

/// [`round_scaled_avx512`]'s outputs by the definitions ([`Q8::scaled_ref`], [`Q16::scaled_ref`]).
fn round_scaled_ref(kind: ActBits, s: &[f32], x: &[f32], z: &[f32], q: &mut [u8], d: &mut [f32]) -> f32 {
    match kind {
        ActBits::I8 => {
            let (v, bias) = Q8::scaled_ref(s, x, z);
            store(&v.q, &v.d, q, d);
            bias
        }
        _ => {
            let (v, bias) = Q16::scaled_ref(s, x, z, round_i16::MAX_BLOCK, false);
            store(&v.q, &v.d, q, d);
            bias
        }
    }
}

/// `v = s x` rounded in blocks of `block` values (a multiple of 16) to integers of at most
/// `qmax` (127: int8, stored a byte each; 32767: int16, two bytes each) written straight into
/// `q`, the steps into `d`; returns `sum_c z[c] v̂[c]`. The per-IC activations of one row group
/// for one token, as [`Q16::scaled_ref`] (int16, blocks of 128) and [`Q8::scaled_ref`] (int8,
/// blocks of 32) define them: the same integers and steps bit for bit (the same operations per
/// value: the block's largest `|v|`, `d = max / qmax`, `v * (1 / d)` clamped and rounded to
/// nearest even; a block with an infinite or NaN value all zeros with a NaN step), the sum in
/// another order. 16 values to a register; a short last block that is not whole registers
/// through the definition. Per-IC prefill rounds `rows / group x tokens x cols` values: with
/// AVX2 (through the decode matvec's rounding and a copy) that took as long as the products.
///
/// # Safety
/// AVX-512 F and BW; `s`, `x`, `z` of one length `n`; `q` holds `n` values, `d` a step per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_scaled_avx512(
    s: &[f32],
    x: &[f32],
    z: &[f32],
    block: usize,
    qmax: f32,
    q: &mut [u8],
    d: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    assert!(
        s.len() == n && z.len() == n && block.is_multiple_of(16),
        "round_scaled: {} scales, {} zeros, {n} values, blocks of {block}",
        s.len(),
        z.len()
    );
    let esize = if qmax > 127.0 { 2 } else { 1 };
    assert!(q.len() == n * esize && d.len() == n.div_ceil(block), "round_scaled: output for {n} values");
    let (abs, lo, hi) = (_mm512_set1_epi32(0x7fff_ffff), _mm512_set1_ps(-qmax), _mm512_set1_ps(qmax));
    // Whole blocks, and a short last block of whole registers (SmolLM2's rows of 576: 4.5
    // blocks of 128), here; another short last block through the definition.
    let whole = if (n % block).is_multiple_of(16) { n.div_ceil(block) } else { n / block };
    let (mut bias, mut bias_lanes) = (0f32, _mm512_setzero_ps());
    let mut v = [_mm512_setzero_ps(); 8];
    for b in 0..whole {
        let o = b * block;
        let len = block.min(n - o);
        let regs = len / 16;
        let mut m = _mm512_setzero_si512();
        for i in 0..regs {
            let at = o + 16 * i;
            let vi = _mm512_mul_ps(_mm512_loadu_ps(s.as_ptr().add(at)), _mm512_loadu_ps(x.as_ptr().add(at)));
            // |v| as integers: ordered as the floats are, above f32::MAX for inf and NaN.
            m = _mm512_max_epi32(m, _mm512_and_si512(_mm512_castps_si512(vi), abs));
            if i < 8 {
                v[i] = vi;
            }
        }
        let max_bits = _mm512_reduce_max_epi32(m);
        if max_bits > f32::MAX.to_bits() as i32 {
            q[o * esize..(o + len) * esize].fill(0);
            d[b] = f32::NAN;
            bias = f32::NAN;
            continue;
        }
        let db = f32::from_bits(max_bits as u32) / qmax;
        let inv = _mm512_set1_ps(if db > 0.0 { 1.0 / db } else { 0.0 });
        let mut zq = _mm512_setzero_ps();
        for i in 0..regs {
            let at = o + 16 * i;
            let vi = if i < 8 {
                v[i]
            } else {
                _mm512_mul_ps(_mm512_loadu_ps(s.as_ptr().add(at)), _mm512_loadu_ps(x.as_ptr().add(at)))
            };
            // The default rounding (MXCSR): to nearest, ties to even, as the definition rounds.
            let r = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(vi, inv), lo), hi));
            zq = _mm512_fmadd_ps(_mm512_loadu_ps(z.as_ptr().add(at)), _mm512_cvtepi32_ps(r), zq);
            if esize == 2 {
                _mm256_storeu_si256(q.as_mut_ptr().add(2 * at) as *mut __m256i, _mm512_cvtsepi32_epi16(r));
            } else {
                _mm_storeu_si128(q.as_mut_ptr().add(at) as *mut __m128i, _mm512_cvtsepi32_epi8(r));
            }
        }
        d[b] = db;
        // The block's z q sums scaled by its step, lane by lane: one horizontal sum at the end
        // instead of one per block (blocks of 32 int8 values spent as much on it as on rounding).
        bias_lanes = _mm512_fmadd_ps(zq, _mm512_set1_ps(db), bias_lanes);
    }
    bias += _mm512_reduce_add_ps(bias_lanes);
    let o = (whole * block).min(n);
    if o < n {
        // The short last block, by the definition.
        let kind = if esize == 2 { ActBits::I16 } else { ActBits::I8 };
        bias += round_scaled_ref(kind, &s[o..], &x[o..], &z[o..], &mut q[o * esize..], &mut d[whole..]);
    }
    bias
}

/// Rounded integers (i8 or i16) and their steps into a token's rows of [`Acts`].
fn store<T: Copy>(v: &[T], steps: &[f32], q: &mut [u8], d: &mut [f32]) {
    assert_eq!(std::mem::size_of_val(v), q.len(), "rounded values for the token's row");
    // SAFETY: `v` is `q.len()` initialized bytes (checked above), i8 / i16 without padding;
    // `q` does not overlap it (a distinct &mut).
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr() as *const u8, q.as_mut_ptr(), q.len()) };
    d.copy_from_slice(steps);
}

/// Rows `r0..r0 + n` (`n <= NR`) of the codes as a panel (rows past `n` zero): step `k`, row
/// `j` at bytes `k * STEP_BYTES + 4 j`, its `KL` codes as bytes (int8) or int16 (int16). The
/// rows are unpacked into `codes` (`NR` rows of `cols`), then turned into steps: 16 rows by
/// 16 steps at a time with AVX-512 ([`transpose16_avx512`]) where the CPU has it, the rest
/// word by word ([`panel_words`]), which alone was as slow as a short prompt's products.
fn fill_panel(p: &PackedLinear, kind: ActBits, r0: usize, n: usize, codes: &mut [u8], panel: &mut [u8]) {
    let (cols, b) = (p.cols(), p.layout().bits);
    let rb = bits::row_bytes(cols, b);
    for j in 0..NR {
        let row = &mut codes[j * cols..(j + 1) * cols];
        if j < n {
            let r = r0 + j;
            bits::unpack_row(&p.codes[r * rb..(r + 1) * rb], cols, b, row);
        } else {
            row.fill(0);
        }
    }
    panel_steps(kind, codes, cols, panel);
}

/// The panel's steps from [`NR`] unpacked rows of `cols` codes (see [`fill_panel`]).
fn panel_steps(kind: ActBits, codes: &[u8], cols: usize, panel: &mut [u8]) {
    let steps = panel.len() / STEP_BYTES;
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_available() {
        done = steps / 16 * 16;
        for k0 in (0..done).step_by(16) {
            for j0 in [0, 16] {
                // SAFETY: AVX-512 F and BW were detected; rows j0..j0 + 16 of `codes` hold
                // `cols` codes (steps k0..k0 + 16 of them: 64 of int8's, 32 of int16's, inside
                // `cols`), the panel `steps` steps.
                unsafe {
                    transpose16_avx512(
                        kind,
                        codes.as_ptr().add(j0 * cols),
                        cols,
                        k0,
                        panel.as_mut_ptr().add(k0 * STEP_BYTES + 4 * j0),
                    )
                };
            }
        }
    }
    panel_words(kind, codes, cols, done..steps, panel);
}

/// Steps `ks` of the panel from the unpacked rows, word by word: the definition
/// [`transpose16_avx512`] is tested against.
fn panel_words(kind: ActBits, codes: &[u8], cols: usize, ks: std::ops::Range<usize>, panel: &mut [u8]) {
    for j in 0..NR {
        let row = &codes[j * cols..(j + 1) * cols];
        for k in ks.clone() {
            // The row's 4 code bytes, or its 2 codes widened to int16.
            let word = match kind {
                ActBits::I8 => u32::from_le_bytes([row[4 * k], row[4 * k + 1], row[4 * k + 2], row[4 * k + 3]]),
                _ => u32::from(row[2 * k]) | u32::from(row[2 * k + 1]) << 16,
            };
            panel[k * STEP_BYTES + 4 * j..][..4].copy_from_slice(&word.to_le_bytes());
        }
    }
}

/// Steps `k0..k0 + 16` of 16 unpacked rows (`rows`, `cols` codes apart) into the panel at `dst`
/// (step `k0`, the first of the 16 rows): each row's 16 words in a register (int8: its 64
/// code bytes; int16: 32 codes widened), then a 16 x 16 transpose of 32-bit words, each
/// register then one step's 16 rows.
///
/// # Safety
/// AVX-512 F and BW; each of the 16 rows holds the codes of steps `k0..k0 + 16`; `dst` has
/// 16 steps of [`STEP_BYTES`] from it (64 bytes written in each).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose16_avx512(kind: ActBits, rows: *const u8, cols: usize, k0: usize, dst: *mut u8) {
    use std::arch::x86_64::*;
    let r: [__m512i; 16] = std::array::from_fn(|j| match kind {
        ActBits::I8 => _mm512_loadu_si512(rows.add(j * cols + 4 * k0) as *const _),
        _ => _mm512_cvtepu8_epi16(_mm256_loadu_si256(rows.add(j * cols + 2 * k0) as *const __m256i)),
    });
    // Words (j, k) -> (k, j). Within 128-bit lanes: a[2m] holds rows 2m, 2m + 1 at steps
    // 4L, 4L + 1 of lane L, a[2m + 1] at 4L + 2, 4L + 3; then b[4g + q] holds rows 4g..4g + 3
    // at step 4L + q of lane L.
    let a: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    let b: [__m512i; 16] = std::array::from_fn(|i| {
        let (g, q) = (i / 4, i % 4);
        let (x, y) = (a[4 * g + q / 2], a[4 * g + q / 2 + 2]);
        if q % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // Across lanes, per q: lanes L of b[q], b[4 + q], b[8 + q], b[12 + q] (rows 0-3, 4-7, 8-11,
    // 12-15 of step 4L + q) gathered into one register per step.
    for q in 0..4 {
        let (b0, b1, b2, b3) = (b[q], b[4 + q], b[8 + q], b[12 + q]);
        // [x.l0, x.l2, y.l0, y.l2] and [x.l1, x.l3, y.l1, y.l3].
        let (c0, c1) = (_mm512_shuffle_i32x4::<0x88>(b0, b1), _mm512_shuffle_i32x4::<0xdd>(b0, b1));
        let (c2, c3) = (_mm512_shuffle_i32x4::<0x88>(b2, b3), _mm512_shuffle_i32x4::<0xdd>(b2, b3));
        for (step, v) in [
            (q, _mm512_shuffle_i32x4::<0x88>(c0, c2)),
            (8 + q, _mm512_shuffle_i32x4::<0xdd>(c0, c2)),
            (4 + q, _mm512_shuffle_i32x4::<0x88>(c1, c3)),
            (12 + q, _mm512_shuffle_i32x4::<0xdd>(c1, c3)),
        ] {
            _mm512_storeu_si512(dst.add(step * STEP_BYTES) as *mut _, v);
        }
    }
}

/// One tile's inputs: the panel, per-block row scales (per-OC) and the tokens' rows.
struct Tile<'a> {
    panel: &'a [u8],
    /// `[nb][NR]`: the scale of the group holding block `b` for each row; `None` per-IC.
    ws: Option<&'a [f32]>,
    /// Each token's rounded activations (bytes) and block steps.
    a: &'a [&'a [u8]],
    d: &'a [&'a [f32]],
    /// Per-OC: `[groups][NR]`, each row's `s z` per group; `None` per-IC.
    sz: Option<&'a [f32]>,
    /// Each token's zero-point terms: per-OC its group sums, per-IC `[sum_c z[c] v̂[c]]`.
    zero: &'a [&'a [f32]],
    /// Steps (of 4 bytes) per block, and in all.
    block_steps: usize,
    steps: usize,
}

/// The tile in plain Rust, the definition [`tile_vnni`] is held to: `out[m][j] = sum_b
/// fma(I[m, j, b], ws[b][j] d[m][b], ...)`, with `I` the exact integer dot product of block `b`,
/// then the zero points off: per-OC `fma(-sz[k][j], zero[m][k], ...)` group by group, per-IC
/// `- zero[m][0]`.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn tile_ref(kind: ActBits, t: &Tile, out: &mut [[f32; NR]]) {
    for (m, out) in out.iter_mut().enumerate() {
        for (j, out) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, k0) in (0..t.steps).step_by(t.block_steps).enumerate() {
                let mut sum = 0i32;
                for k in k0..(k0 + t.block_steps).min(t.steps) {
                    let (w, a) = (&t.panel[k * STEP_BYTES + 4 * j..][..4], &t.a[m][4 * k..][..4]);
                    sum += match kind {
                        ActBits::I8 => (0..4).map(|i| i32::from(w[i]) * i32::from(a[i] as i8)).sum::<i32>(),
                        _ => (0..2)
                            .map(|i| {
                                i32::from(i16::from_le_bytes([w[2 * i], w[2 * i + 1]]))
                                    * i32::from(i16::from_le_bytes([a[2 * i], a[2 * i + 1]]))
                            })
                            .sum::<i32>(),
                    };
                }
                let scale = t.ws.map_or(1.0, |ws| ws[b * NR + j]) * t.d[m][b];
                acc = (sum as f32).mul_add(scale, acc);
            }
            match t.sz {
                Some(sz) => {
                    for (k, &xs) in t.zero[m].iter().enumerate() {
                        acc = (-sz[k * NR + j]).mul_add(xs, acc);
                    }
                }
                None => acc -= t.zero[m][0],
            }
            *out = acc;
        }
    }
}

/// [`tile_ref`] on AVX-512 VNNI for `M` tokens (`t.a.len() == M`).
///
/// # Safety
/// AVX-512 F, BW and VNNI; the panel holds `t.steps` steps, each token row `4 t.steps` bytes and
/// `ceil(steps / block_steps)` steps; per-OC `sz` holds a row of [`NR`] per zero term of the
/// tokens (who all have as many), per-IC each token has one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const I8: bool, const M: usize>(t: &Tile, out: &mut [[f32; NR]]) {
    use std::arch::x86_64::*;
    debug_assert!(t.a.len() == M && t.d.len() == M && out.len() == M);
    let a: [*const u8; M] = std::array::from_fn(|m| t.a[m].as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let (mut k0, mut b) = (0, 0);
    while k0 < t.steps {
        let k1 = (k0 + t.block_steps).min(t.steps);
        let mut sum = [[_mm512_setzero_si512(); 2]; M];
        let mut w = t.panel.as_ptr().add(k0 * STEP_BYTES);
        for k in k0..k1 {
            let (w0, w1) = (_mm512_loadu_si512(w as *const _), _mm512_loadu_si512(w.add(64) as *const _));
            for m in 0..M {
                let v = _mm512_set1_epi32((a[m].add(4 * k) as *const i32).read_unaligned());
                if I8 {
                    sum[m][0] = _mm512_dpbusd_epi32(sum[m][0], w0, v);
                    sum[m][1] = _mm512_dpbusd_epi32(sum[m][1], w1, v);
                } else {
                    sum[m][0] = _mm512_dpwssd_epi32(sum[m][0], w0, v);
                    sum[m][1] = _mm512_dpwssd_epi32(sum[m][1], w1, v);
                }
            }
            w = w.add(STEP_BYTES);
        }
        let ws =
            t.ws.map(|ws| [_mm512_loadu_ps(ws.as_ptr().add(b * NR)), _mm512_loadu_ps(ws.as_ptr().add(b * NR + 16))]);
        for m in 0..M {
            let d = _mm512_set1_ps(*t.d[m].get_unchecked(b));
            for h in 0..2 {
                let scale = match ws {
                    Some(ws) => _mm512_mul_ps(ws[h], d),
                    None => d,
                };
                acc[m][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[m][h]), scale, acc[m][h]);
            }
        }
        (k0, b) = (k1, b + 1);
    }
    match t.sz {
        Some(sz) => {
            for (k, sz) in sz.chunks_exact(NR).take(t.zero[0].len()).enumerate() {
                let sz = [_mm512_loadu_ps(sz.as_ptr()), _mm512_loadu_ps(sz.as_ptr().add(16))];
                for m in 0..M {
                    let xs = _mm512_set1_ps(*t.zero[m].get_unchecked(k));
                    for h in 0..2 {
                        acc[m][h] = _mm512_fnmadd_ps(sz[h], xs, acc[m][h]);
                    }
                }
            }
        }
        None => {
            for m in 0..M {
                let bias = _mm512_set1_ps(*t.zero[m].get_unchecked(0));
                for h in 0..2 {
                    acc[m][h] = _mm512_sub_ps(acc[m][h], bias);
                }
            }
        }
    }
    for m in 0..M {
        _mm512_storeu_ps(out[m].as_mut_ptr(), acc[m][0]);
        _mm512_storeu_ps(out[m].as_mut_ptr().add(16), acc[m][1]);
    }
}

/// [`tile_vnni`] for however many tokens `t.a` has (1 to [`MR`]).
///
/// # Safety
/// As [`tile_vnni`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile(kind: ActBits, t: &Tile, out: &mut [[f32; NR]]) {
    macro_rules! by_m {
        ($i8:literal) => {
            match t.a.len() {
                1 => tile_vnni::<$i8, 1>(t, out),
                2 => tile_vnni::<$i8, 2>(t, out),
                3 => tile_vnni::<$i8, 3>(t, out),
                4 => tile_vnni::<$i8, 4>(t, out),
                5 => tile_vnni::<$i8, 5>(t, out),
                6 => tile_vnni::<$i8, 6>(t, out),
                m => unreachable!("a tile of {m} tokens"),
            }
        };
    }
    match kind {
        ActBits::I8 => by_m!(true),
        _ => by_m!(false),
    }
}

/// A pointer the panel tasks share; each writes its own columns only.
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the buffer behind it (see `panels`).
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Output channels `rows` (whole panels but the last) of `y` (`t x p.rows()`, row-major) from
/// `acts`, panels in parallel. Per-OC the zero points come off each row with its groups'
/// `s z`; per-IC (`rows` inside one row group) each token's zero term comes off every row.
fn panels(p: &PackedLinear, kind: ActBits, acts: &Acts, rows: std::ops::Range<usize>, t: usize, y: &mut [f32]) {
    let (cols, l, all_rows) = (p.cols(), p.layout(), p.rows());
    let (_, pc) = l.param_shape(all_rows, cols);
    let esize = if kind == ActBits::I8 { 1 } else { 2 };
    let steps = cols * esize / 4;
    let block_steps = acts.block * esize / 4;
    let nb = steps.div_ceil(block_steps);
    let y_ptr = SendPtr(y.as_mut_ptr());
    let starts: Vec<usize> = rows.clone().step_by(NR).collect();
    starts.into_par_iter().for_each_init(
        || (vec![0u8; NR * cols], vec![0u8; steps * STEP_BYTES]),
        |(codes, panel), r0| {
            let (n, y_ptr) = ((rows.end - r0).min(NR), &y_ptr);
            fill_panel(p, kind, r0, n, codes, panel);
            // The next panel's codes (this thread's, as rayon splits the range) start coming
            // from memory while this one's tiles run.
            let rb = bits::row_bytes(cols, l.bits);
            let next = (r0 + NR).min(all_rows) * rb..(r0 + 2 * NR).min(all_rows) * rb;
            for at in next.step_by(64) {
                crate::simd::prefetch_line(p.codes[at..].as_ptr());
            }
            // Per-OC: each block's group scale and each group's s z, per row.
            let (mut ws, mut sz) = (Vec::new(), Vec::new());
            if l.axis == Axis::Oc {
                ws = vec![0f32; nb * NR];
                sz = vec![0f32; pc * NR];
                let group_of: Vec<usize> = (0..nb).map(|b| b * acts.block / l.group).collect();
                for j in 0..n {
                    let r = r0 + j;
                    for (b, &k) in group_of.iter().enumerate() {
                        ws[b * NR + j] = p.scales[r * pc + k];
                    }
                    for k in 0..pc {
                        sz[k * NR + j] = p.scales[r * pc + k] * p.zeros[r * pc + k];
                    }
                }
            }
            let mut out = [[0f32; NR]; MR];
            for i0 in (0..t).step_by(MR) {
                let m = (t - i0).min(MR);
                let a: [&[u8]; MR] =
                    std::array::from_fn(|i| acts.q.get((i0 + i) * acts.row..(i0 + i + 1) * acts.row).unwrap_or(&[]));
                let d: [&[f32]; MR] =
                    std::array::from_fn(|i| acts.d.get((i0 + i) * acts.nb..(i0 + i + 1) * acts.nb).unwrap_or(&[]));
                let zero: [&[f32]; MR] =
                    std::array::from_fn(|i| acts.zero.get((i0 + i) * acts.nz..(i0 + i + 1) * acts.nz).unwrap_or(&[]));
                let oc = l.axis == Axis::Oc;
                let tl = Tile {
                    panel,
                    ws: oc.then_some(&ws[..]),
                    a: &a[..m],
                    d: &d[..m],
                    sz: oc.then_some(&sz[..]),
                    zero: &zero[..m],
                    block_steps,
                    steps,
                };
                // SAFETY: `kind` came from `kind()`, which checked AVX-512 VNNI; the panel holds
                // `steps` steps, each token `cols` values (`4 steps` bytes), `nb` steps and
                // per-OC `pc` group sums (`sz` `pc` rows), per-IC one zero term.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    tile(kind, &tl, &mut out[..m])
                };
                #[cfg(not(target_arch = "x86_64"))]
                tile_ref(kind, &tl, &mut out[..m]);
                for (mi, out) in out[..m].iter().enumerate() {
                    let i = i0 + mi;
                    // SAFETY: row i, columns r0..r0 + n of the row-major (t x all_rows) `y`,
                    // which no other task writes.
                    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), y_ptr.0.add(i * all_rows + r0), n) };
                }
            }
        },
    );
}

/// `Y = X W'^T` for `t` tokens (`x` row-major `[t, cols]`, `y` `[t, rows]`, checked by the
/// caller) on integers of `kind`, a kind [`kind`] gave for `p`.
pub(crate) fn matmul(p: &PackedLinear, kind: ActBits, x: &[f32], t: usize, y: &mut [f32]) {
    let (rows, l) = (p.rows(), p.layout());
    match l.axis {
        Axis::Oc => panels(p, kind, &Acts::oc(p, kind, x, t), 0..rows, t, y),
        Axis::Ic => {
            let mut acts = Acts::new(p, kind, t);
            for kr in 0..rows.div_ceil(l.group) {
                acts.ic(p, kind, x, kr);
                panels(p, kind, &acts, kr * l.group..((kr + 1) * l.group).min(rows), t, y);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A seeded stream of bytes.
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn per_ic_rounding_with_avx512_equals_its_definition() {
        if !crate::simd::avx512_available() {
            eprintln!("SKIPPED: this CPU has no AVX-512");
            return;
        }
        let f = |seed: u64, n: usize, scale: f32| -> Vec<f32> {
            bytes(seed, n).iter().map(|&b| (f32::from(b) - 127.5) / 64.0 * scale).collect()
        };
        // Whole blocks, a short last block (of whole registers and not), one short block only.
        for n in [576usize, 1536, 4096 + 64, 100, 20, 128 * 3 + 40, 48, 128 + 96] {
            let (s, mut x) = (f(n as u64, n, 0.05), f(n as u64 + 1, n, 1.0));
            let z: Vec<f32> = (0..n).map(|i| (i % 16) as f32).collect();
            x[n / 3] = 300.0; // an outlier sets its block's step
            for kind in [ActBits::I16, ActBits::I8] {
                for poison in [false, true] {
                    let mut x = x.clone();
                    if poison {
                        x[n / 2] = f32::INFINITY;
                    }
                    let (block, qmax, esize) =
                        if kind == ActBits::I8 { (q8::BLOCK, 127.0, 1) } else { (round_i16::MAX_BLOCK, 32767.0, 2) };
                    let (mut q, mut d) = (vec![7u8; n * esize], vec![-1f32; n.div_ceil(block)]);
                    // SAFETY: AVX-512 was detected; the outputs hold n values and a step per block.
                    let bias = unsafe { round_scaled_avx512(&s, &x, &z, block, qmax, &mut q, &mut d) };
                    let (wq, wd, wb): (Vec<u8>, Vec<f32>, f32) = if kind == ActBits::I8 {
                        let (t, b) = Q8::scaled_ref(&s, &x, &z);
                        (t.q.iter().map(|&v| v as u8).collect(), t.d, b)
                    } else {
                        let (t, b) = Q16::scaled_ref(&s, &x, &z, block, false);
                        (t.q.iter().flat_map(|v| v.to_le_bytes()).collect(), t.d, b)
                    };
                    let what = format!("{kind:?} n {n} poison {poison}");
                    assert_eq!(q, wq, "{what}: integers");
                    let bits = |d: &[f32]| {
                        d.iter().map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() }).collect::<Vec<_>>()
                    };
                    assert_eq!(bits(&d), bits(&wd), "{what}: steps");
                    if poison {
                        assert!(bias.is_nan() && wb.is_nan(), "{what}: a non-finite value poisons the sum");
                    } else {
                        assert!((bias - wb).abs() <= 1e-5 * wb.abs().max(1.0), "{what}: zero-point sum {bias} vs {wb}");
                    }
                }
            }
        }
    }

    #[test]
    fn panel_steps_equal_their_definition() {
        // Whole groups of 16 steps and a remainder; rows of codes up to 255.
        for kind in [ActBits::I8, ActBits::I16] {
            for cols in [576usize, 100, 64, 4, 1536] {
                let steps = cols * if kind == ActBits::I8 { 1 } else { 2 } / 4;
                let codes = bytes(cols as u64, NR * cols);
                let (mut want, mut got) = (vec![0u8; steps * STEP_BYTES], vec![1u8; steps * STEP_BYTES]);
                panel_words(kind, &codes, cols, 0..steps, &mut want);
                panel_steps(kind, &codes, cols, &mut got);
                assert_eq!(got, want, "{kind:?} cols {cols}");
                // The layout itself: step k, row j, lane i = code KL k + i of row j.
                for (k, j) in [(0, 0), (steps - 1, NR - 1), (steps / 2, 17)] {
                    let w = &want[k * STEP_BYTES + 4 * j..][..4];
                    match kind {
                        ActBits::I8 => assert_eq!(w, &codes[j * cols + 4 * k..][..4]),
                        _ => assert_eq!(w, &[codes[j * cols + 2 * k], 0, codes[j * cols + 2 * k + 1], 0]),
                    }
                }
            }
        }
    }

    #[test]
    fn the_vnni_tile_equals_its_definition_bit_for_bit() {
        if !crate::simd::avx512_vnni_available() {
            eprintln!("SKIPPED: this CPU has no AVX-512 VNNI");
            return;
        }
        for kind in [ActBits::I8, ActBits::I16] {
            // Blocks of 32 int8 values (8 steps), 128 int16 values (64 steps), 64 (32): the
            // last block whole or short.
            for (steps, block_steps) in [(144usize, 8usize), (288, 64), (40, 32), (8, 8), (3, 64)] {
                let nb = steps.div_ceil(block_steps);
                let mut panel = bytes(steps as u64, steps * STEP_BYTES);
                if kind == ActBits::I16 {
                    // Codes of up to 8 bits in each int16 (high bytes zero), some at 255.
                    for (i, v) in panel.iter_mut().enumerate() {
                        if i % 2 == 1 {
                            *v = 0;
                        } else if i % 7 == 0 {
                            *v = 255;
                        }
                    }
                }
                let rows: Vec<Vec<u8>> = (0..MR)
                    .map(|m| {
                        let mut a = bytes(100 + m as u64, 4 * steps);
                        // Activations at the ends of their range.
                        a[0] = 0x7f;
                        a[1] = 0x80;
                        a
                    })
                    .collect();
                let steps_d: Vec<Vec<f32>> =
                    (0..MR).map(|m| (0..nb).map(|b| 1e-3 * (1 + m + 3 * b) as f32).collect()).collect();
                let ws: Vec<f32> = (0..nb * NR).map(|i| 0.01 + (i % 13) as f32 * 0.003).collect();
                for m in 1..=MR {
                    let a: Vec<&[u8]> = rows[..m].iter().map(|r| &r[..]).collect();
                    let d: Vec<&[f32]> = steps_d[..m].iter().map(|r| &r[..]).collect();
                    for ws in [Some(&ws[..]), None] {
                        let sz: Vec<f32> = (0..3 * NR).map(|i| 0.02 * (i % 5) as f32).collect();
                        let zeros: Vec<Vec<f32>> =
                            (0..m).map(|i| (0..3).map(|k| 0.5 * (i + k) as f32 - 1.0).collect()).collect();
                        let zero: Vec<&[f32]> =
                            zeros.iter().map(|z| if ws.is_some() { &z[..] } else { &z[..1] }).collect();
                        let t = Tile {
                            panel: &panel,
                            ws,
                            a: &a,
                            d: &d,
                            sz: ws.map(|_| &sz[..]),
                            zero: &zero,
                            block_steps,
                            steps,
                        };
                        let (mut want, mut got) = (vec![[0f32; NR]; m], vec![[1f32; NR]; m]);
                        tile_ref(kind, &t, &mut want);
                        // SAFETY: VNNI was detected; the sizes are as the tile reads them.
                        unsafe { tile(kind, &t, &mut got) };
                        assert_eq!(
                            got,
                            want,
                            "{kind:?} steps {steps} block {block_steps} tokens {m} scaled {}",
                            ws.is_some()
                        );
                        assert!(want.iter().flatten().any(|&v| v != 0.0));
                    }
                }
            }
        }
    }
}
