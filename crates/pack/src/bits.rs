//! Codes of `b` bits (2, 3, 4 or 8) packed little-endian into bytes, one row at a time.
//!
//! Row `r` starts at byte `r * row_bytes(cols, b)`; inside it code `c` occupies bits
//! `[c b, c b + b)` of the row's little-endian bit stream ([`pack`], [`get`]). Eight codes take
//! exactly `b` bytes, so code `8 i` always starts byte `b i` of its row: kernels read eight codes
//! with one unaligned load. 3-bit codes straddle byte borders; that is what the shifts are for.
//! The buffer carries [`PAD`] zero bytes after the last row so such a load never runs past it.
//!
//! A quantized linear's codes ([`pack_codes`], [`code`]) are that stream, except 3-bit rows:
//! each whole chunk of [`CHUNK3`] = 64 codes takes its 24 bytes as two planes, the codes' low
//! bit pairs (16 bytes, four per byte) and their high bits (8 bytes), arranged so that the int8
//! and int16 kernels split a chunk into its 32 even and 32 odd codes with a few shifts and
//! masks of whole registers (the order their activations are stored in for 4-bit codes, whose
//! low and high nibbles are the even and odd codes); the last `cols % 64` codes of a row stay a
//! bit stream. Bit-stream 3-bit codes cannot be split into bytes without a shuffle and a
//! multiply per 16 codes, which made 3-bit the slowest width. The row's size is unchanged:
//! `row_bytes(cols, 3)`.
//!
//! Code `i` of a chunk sits at position `p = 16 (i / 32) + (i % 32) / 2` of the even (`i` even)
//! or odd half-vector `v = i % 2`: its low bits are bits `2 (2 v + p / 16)` of low-plane byte
//! `p % 16`, its high bit is bit `4 v + p / 8` of high-plane byte `p % 8` ([`plane3`]).

/// Zero bytes after the last row: an 8-byte load at the last chunk stays in bounds.
pub const PAD: usize = 8;

/// Bytes of one packed row of `cols` codes.
pub fn row_bytes(cols: usize, bits: u8) -> usize {
    (cols * bits as usize).div_ceil(8)
}

/// Packs row-major `[rows, cols]` codes (each `< 2^bits`) into rows of [`row_bytes`], plus [`PAD`].
pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    assert_eq!(codes.len(), rows * cols, "codes [rows, cols]");
    let rb = row_bytes(cols, bits);
    let mut out = vec![0u8; rows * rb + PAD];
    for (r, row) in codes.chunks(cols.max(1)).enumerate().take(rows) {
        let dst = &mut out[r * rb..(r + 1) * rb];
        for (c, &q) in row.iter().enumerate() {
            debug_assert!(u32::from(q) < 1 << bits);
            let bit = c * bits as usize;
            // A code spans at most two bytes (b <= 8).
            let v = u16::from(q) << (bit % 8);
            dst[bit / 8] |= v as u8;
            if bit % 8 + bits as usize > 8 {
                dst[bit / 8 + 1] |= (v >> 8) as u8;
            }
        }
    }
    out
}

/// Code `c` of a packed row.
#[inline(always)]
pub fn get(row: &[u8], c: usize, bits: u8) -> u8 {
    let bit = c * bits as usize;
    let lo = u16::from(row[bit / 8]);
    let hi = if bit % 8 + bits as usize > 8 { u16::from(row[bit / 8 + 1]) } else { 0 };
    (((lo | hi << 8) >> (bit % 8)) & ((1u16 << bits) - 1)) as u8
}

/// Codes per planar chunk of a 3-bit row ([`pack_codes`]).
pub const CHUNK3: usize = 64;

/// Bytes of a planar 3-bit chunk: 16 of low bit pairs, then 8 of high bits.
pub const CHUNK3_BYTES: usize = 24;

/// Where code `i` (`< CHUNK3`) of a planar 3-bit chunk lives: (low-plane byte, shift of its
/// bit pair, high-plane byte, bit), bytes counted from the chunk's start.
#[inline(always)]
pub fn plane3(i: usize) -> (usize, usize, usize, usize) {
    let (v, p) = (i % 2, 16 * (i / 32) + (i % 32) / 2);
    (p % 16, 2 * (2 * v + p / 16), 16 + p % 8, 4 * v + p / 8)
}

/// Packs a quantized linear's row-major `[rows, cols]` codes: [`pack`]'s bit stream, with the
/// whole chunks of 3-bit rows planar (module docs). Same size as [`pack`].
pub fn pack_codes(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    if bits != 3 {
        return pack(codes, rows, cols, bits);
    }
    assert_eq!(codes.len(), rows * cols, "codes [rows, cols]");
    let (rb, chunks) = (row_bytes(cols, 3), cols / CHUNK3);
    let mut out = vec![0u8; rows * rb + PAD];
    for (r, row) in codes.chunks(cols.max(1)).enumerate().take(rows) {
        let dst = &mut out[r * rb..(r + 1) * rb];
        for (ch, codes) in row.chunks_exact(CHUNK3).enumerate() {
            let d = &mut dst[ch * CHUNK3_BYTES..(ch + 1) * CHUNK3_BYTES];
            for (i, &q) in codes.iter().enumerate() {
                debug_assert!(q < 8);
                let (lb, ls, hb, hs) = plane3(i);
                d[lb] |= (q & 3) << ls;
                d[hb] |= (q >> 2) << hs;
            }
        }
        let tail = &row[chunks * CHUNK3..];
        let t = pack(tail, 1, tail.len(), 3);
        dst[chunks * CHUNK3_BYTES..].copy_from_slice(&t[..row_bytes(tail.len(), 3)]);
    }
    out
}

/// Code `c` of a packed linear row of `cols` codes ([`pack_codes`]).
#[inline(always)]
pub fn code(row: &[u8], cols: usize, c: usize, bits: u8) -> u8 {
    if bits != 3 {
        return get(row, c, bits);
    }
    let chunks = cols / CHUNK3;
    if c >= chunks * CHUNK3 {
        return get(&row[chunks * CHUNK3_BYTES..], c - chunks * CHUNK3, 3);
    }
    let d = &row[c / CHUNK3 * CHUNK3_BYTES..];
    let (lb, ls, hb, hs) = plane3(c % CHUNK3);
    (d[lb] >> ls) & 3 | ((d[hb] >> hs) & 1) << 2
}

/// Unpacks what [`pack_codes`] made.
pub fn unpack_codes(packed: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let rb = row_bytes(cols, bits);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &packed[r * rb..(r + 1) * rb];
        out.extend((0..cols).map(|c| code(row, cols, c, bits)));
    }
    out
}

/// A packed linear row of `cols` codes ([`pack_codes`]) unpacked into `out[..cols]`, a byte per
/// code: whole bytes at a time (2, 4, 8 bits), planar 3-bit chunks with AVX2 where the CPU has
/// it; what [`code`] gives code by code, far faster (dequantizing panels for prefill runs this
/// over every weight of the model).
pub fn unpack_row(row: &[u8], cols: usize, bits: u8, out: &mut [u8]) {
    let out = &mut out[..cols];
    let done = match bits {
        2 => unpack_bytes::<2, 4>(row, out),
        4 => unpack_bytes::<4, 2>(row, out),
        8 => unpack_bytes::<8, 1>(row, out),
        _ => unpack_chunks3(row, cols / CHUNK3, out),
    };
    for (c, o) in out.iter_mut().enumerate().skip(done) {
        *o = code(row, cols, c, bits);
    }
}

/// The whole bytes of a `B`-bit row (`PER = 8 / B` codes each) into `out`, a byte per code;
/// returns the codes done. Both counts constant, so the compiler unrolls the byte's codes and
/// vectorizes the loop (with the count a run-time value it stayed one code at a time, a third
/// of a 96-token prefill's time).
#[inline]
fn unpack_bytes<const B: usize, const PER: usize>(row: &[u8], out: &mut [u8]) -> usize {
    let whole = out.len() / PER;
    let mask = ((1u16 << B) - 1) as u8;
    for (o, &b) in out.chunks_exact_mut(PER).zip(&row[..whole]) {
        for (j, o) in o.iter_mut().enumerate() {
            *o = (b >> (j * B)) & mask;
        }
    }
    whole * PER
}

/// The whole planar chunks of a 3-bit row into `out` (natural order); returns the codes done.
fn unpack_chunks3(row: &[u8], chunks: usize, out: &mut [u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected; each chunk's bytes and its 64 outputs are in bounds.
        unsafe { unpack_chunks3_avx2(row, chunks, out) };
        return chunks * CHUNK3;
    }
    unpack_chunks3_portable(row, chunks, out)
}

/// [`unpack_chunks3`] in plain Rust (the reference for the AVX2 one).
fn unpack_chunks3_portable(row: &[u8], chunks: usize, out: &mut [u8]) -> usize {
    for ch in 0..chunks {
        let d = &row[ch * CHUNK3_BYTES..(ch + 1) * CHUNK3_BYTES];
        for (i, o) in out[ch * CHUNK3..(ch + 1) * CHUNK3].iter_mut().enumerate() {
            let (lb, ls, hb, hs) = plane3(i);
            *o = (d[lb] >> ls) & 3 | ((d[hb] >> hs) & 1) << 2;
        }
    }
    chunks * CHUNK3
}

/// [`unpack_chunks3`] with AVX2: even and odd codes interleaved back into natural order.
///
/// # Safety
/// AVX2; `row` holds `chunks` chunks, `out` `chunks * CHUNK3` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_chunks3_avx2(row: &[u8], chunks: usize, out: &mut [u8]) {
    use std::arch::x86_64::*;
    assert!(row.len() >= chunks * CHUNK3_BYTES && out.len() >= chunks * CHUNK3);
    for ch in 0..chunks {
        let [e, o] = chunk3_avx2(row.as_ptr().add(ch * CHUNK3_BYTES));
        // Per 128-bit lane: codes 0-15 and 16-31 (lane 0), 32-47 and 48-63 (lane 1).
        let (lo, hi) = (_mm256_unpacklo_epi8(e, o), _mm256_unpackhi_epi8(e, o));
        let dst = out.as_mut_ptr().add(ch * CHUNK3) as *mut __m256i;
        _mm256_storeu_si256(dst, _mm256_permute2x128_si256::<0x20>(lo, hi));
        _mm256_storeu_si256(dst.add(1), _mm256_permute2x128_si256::<0x31>(lo, hi));
    }
}

/// AVX2: the 64 codes of the planar 3-bit chunk at `p` as bytes, in two registers: the even
/// codes (positions 0-15: codes 0, 2, .., 30; positions 16-31: codes 32, 34, .., 62) and the
/// odd ones (each code one more), as the 4-bit kernels get them from low and high nibbles.
/// Each 128-bit lane shifts the low plane (broadcast) to its own bit pair, each 64-bit lane the
/// high plane (broadcast) to its own bit.
///
/// # Safety
/// AVX2; `p` has [`CHUNK3_BYTES`] readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn chunk3_avx2(p: *const u8) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    let hi = _mm256_set1_epi64x((p.add(16) as *const i64).read_unaligned());
    // Five constants only (more spill registers in the kernels' loops): 128-bit lane h moves
    // low-plane bit pair h (even codes) and 2 + h (odd) to bits 0-1 and 4-5 of each byte, 64-bit
    // lane q high-plane bit q (even) and 4 + q (odd) to bits 0 and 4, then to 2 and 6: each
    // byte then holds its even code in bits 0-2 and its odd one in bits 4-6.
    let low = _mm256_srlv_epi64(lo, _mm256_setr_epi64x(0, 0, 2, 2));
    let high = _mm256_slli_epi64::<2>(_mm256_srlv_epi64(hi, _mm256_setr_epi64x(0, 1, 2, 3)));
    let both =
        _mm256_or_si256(_mm256_and_si256(low, _mm256_set1_epi8(0x33)), _mm256_and_si256(high, _mm256_set1_epi8(0x44)));
    let m7 = _mm256_set1_epi8(7);
    let (even, odd) = (_mm256_and_si256(both, m7), _mm256_and_si256(_mm256_srli_epi64::<4>(both), m7));
    [even, odd]
}

/// AVX2: step `j` of a row of `B`-bit codes (`B` 2, 3 or 4, 64 codes a step) as bytes, even codes
/// then odd ones, as the byte-product kernels ([`crate::matvec_i8`], [`crate::matvec_i16`]) read them: 4-bit,
/// the step's 32 bytes' low and high nibbles; 3-bit, its planar chunk ([`chunk3_avx2`]); 2-bit,
/// its 16 bytes widened to words ([`words2_avx2`]). Asks for the row's bytes
/// [`crate::simd::PREFETCH`] ahead first.
///
/// # Safety
/// AVX2; `rp` has the row's `64 B / 8` bytes of step `j` readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn step_codes_avx2<const B: usize>(rp: *const u8, j: usize) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    crate::simd::prefetch(rp.add(j * 64 * B / 8));
    if B == 3 {
        return chunk3_avx2(rp.add(j * CHUNK3_BYTES));
    }
    if B == 2 {
        let (w, mask) = (words2_avx2(rp.add(j * 16)), _mm256_set1_epi16(0x0303));
        return [_mm256_and_si256(w, mask), _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask)];
    }
    let (c, mask) = (_mm256_loadu_si256(rp.add(j * 32) as *const __m256i), _mm256_set1_epi8(0x0f));
    [_mm256_and_si256(c, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(c), mask)]
}

/// The 16 bytes of a step of 2-bit codes at `p` (byte `k` holds codes `4k .. 4k + 3`, two bits
/// each from bit 0) as 16-bit words `w_k = b_k | b_k << 4`: the low byte of `w_k` holds codes
/// `4k` (bits 0-1) and `4k + 1` (bits 2-3), its high byte codes `4k + 2` and `4k + 3`, so the
/// words masked with `0x0303` are the step's even codes in order as bytes, and shifted right by
/// 2 first its odd codes.
///
/// # Safety
/// AVX2; 16 bytes readable at `p`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn words2_avx2(p: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
    _mm256_or_si256(w, _mm256_slli_epi16::<4>(w))
}

/// AVX-512: step `j` of a row of `B`-bit codes (`B` 2, 3 or 4) as one register of bytes, its 32
/// even codes then its 32 odd ones, the order of a step's int8 activations ([`crate::matvec_i8`]).
/// The step's bytes are broadcast to both halves and the upper half shifted by a nibble (one
/// variable shift, no lane shuffle); 3-bit: [`chunk3_avx2`]'s decode on all four lanes, its
/// masks and `or` one `vpternlogq`; 2-bit: the step's 16 bytes twice, widened to words, each
/// shifted as [`words2_avx2`] describes (the upper half's two bits further right) and masked by
/// one `vpternlogq`. Asks for the row's bytes ahead first.
///
/// # Safety
/// AVX-512 F and BW; `rp` has the row's `64 B / 8` bytes of step `j` readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(crate) unsafe fn step_codes_avx512<const B: usize>(rp: *const u8, j: usize) -> std::arch::x86_64::__m512i {
    crate::simd::prefetch(rp.add(j * 64 * B / 8));
    codes_avx512::<B>(rp, j)
}

/// [`step_codes_avx512`] without asking for bytes ahead (kernels that walk several rows ask
/// for their own, [`crate::simd::Ahead4`]).
///
/// # Safety
/// As [`step_codes_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
pub(crate) unsafe fn codes_avx512<const B: usize>(rp: *const u8, j: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    if B == 3 {
        let p = rp.add(j * CHUNK3_BYTES);
        let lo = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
        let hi = _mm512_set1_epi64((p.add(16) as *const i64).read_unaligned());
        // Each byte's code to bits 0-2 directly, the upper half's (odd codes) a nibble further
        // right: low-plane pair h of byte k (bits 8k + 2h, lane h) to bits 0-1, shifted right
        // by 2h (+ 4); high-plane bit q (lane q) to bit 2, rotated right by q - 2 (+ 4): bit
        // 8k + 2 of the result is bit 8k + q (+ 4) of the plane, and no bit that lands on a
        // bit 2 wraps around. Two shifts fewer than shifting to the AVX2 layout and then the
        // upper half.
        let low = _mm512_srlv_epi64(lo, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6));
        let high = _mm512_rorv_epi64(hi, _mm512_setr_epi64(62, 63, 0, 1, 2, 3, 4, 5));
        // Bits 0-1 from the low plane, bit 2 from the high one; the rest masked off.
        let both = _mm512_ternarylogic_epi64::<0xCA>(_mm512_set1_epi8(0x33), low, high);
        return _mm512_and_si512(both, _mm512_set1_epi8(7));
    }
    if B == 2 {
        // Words k and 16 + k hold byte k of the step: b | b << 4 masked with 0x0303 gives the
        // even codes (lower half), (b >> 2 | b << 2) the odd ones (upper half).
        let b = _mm256_broadcastsi128_si256(_mm_loadu_si128(rp.add(j * 16) as *const __m128i));
        let w = _mm512_cvtepu8_epi16(b);
        // Per-word shift counts: lower half (even codes) left 4, right 0; upper half left 2, right 2.
        let halves = |lo: i16, hi: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi));
        let (up, down) = (_mm512_sllv_epi16(w, halves(4, 2)), _mm512_srlv_epi16(w, halves(0, 2)));
        // (up | down) & 0x0303 in one instruction.
        return _mm512_ternarylogic_epi64::<0xE0>(_mm512_set1_epi16(0x0303), up, down);
    }
    let c = _mm512_broadcast_i64x4(_mm256_loadu_si256(rp.add(j * 32) as *const __m256i));
    _mm512_and_si512(_mm512_srlv_epi64(c, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4)), _mm512_set1_epi8(0x0f))
}

/// Unpacks what [`pack`] made.
pub fn unpack(packed: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let rb = row_bytes(cols, bits);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &packed[r * rb..(r + 1) * rb];
        out.extend((0..cols).map(|c| get(row, c, bits)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_width_and_ragged_rows() {
        for bits in [2u8, 3, 4, 8] {
            for (rows, cols) in [(1, 1), (3, 7), (5, 64), (2, 129), (4, 576)] {
                let codes: Vec<u8> =
                    (0..rows * cols).map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8).collect();
                let p = pack(&codes, rows, cols, bits);
                assert_eq!(p.len(), rows * row_bytes(cols, bits) + PAD);
                assert_eq!(unpack(&p, rows, cols, bits), codes, "bits {bits} {rows}x{cols}");
            }
        }
    }

    #[test]
    fn linear_codes_round_trip_and_keep_the_stream_size() {
        for bits in [2u8, 3, 4, 8] {
            for (rows, cols) in [(1, 1), (3, 7), (2, 64), (5, 100), (2, 129), (4, 576), (2, 1000)] {
                let codes: Vec<u8> =
                    (0..rows * cols).map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8).collect();
                let p = pack_codes(&codes, rows, cols, bits);
                assert_eq!(p.len(), pack(&codes, rows, cols, bits).len());
                assert_eq!(unpack_codes(&p, rows, cols, bits), codes, "bits {bits} {rows}x{cols}");
            }
        }
    }

    #[test]
    fn planar_chunk_places_every_code_once_as_the_kernels_read_it() {
        // Each of the 64 codes owns a distinct bit pair and a distinct high bit.
        let (mut low, mut high) = ([false; 64], [false; 64]);
        for i in 0..CHUNK3 {
            let (lb, ls, hb, hs) = plane3(i);
            assert!(lb < 16 && ls <= 6 && ls % 2 == 0 && (16..24).contains(&hb) && hs < 8);
            assert!(
                !std::mem::replace(&mut low[lb * 4 + ls / 2], true)
                    && !std::mem::replace(&mut high[(hb - 16) * 8 + hs], true)
            );
        }
        // The kernels' reading: the even codes' half-vector takes bit pair 0 (positions 0-15)
        // and 1 (16-31) of low bytes 0-15, and bit q of high byte b at position 8 q + b.
        for p in 0..32 {
            let even = 2 * (p % 16) + 32 * (p / 16);
            assert_eq!(plane3(even), (p % 16, 2 * (p / 16), 16 + p % 8, p / 8));
            assert_eq!(plane3(even + 1), (p % 16, 2 * (2 + p / 16), 16 + p % 8, 4 + p / 8));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_chunk_decoder_gives_even_then_odd_codes() {
        if !(is_x86_feature_detected!("avx2")) {
            return;
        }
        let codes: Vec<u8> = (0..3 * CHUNK3).map(|i| ((i * 40503) >> 5) as u8 & 7).collect();
        let p = pack_codes(&codes, 1, codes.len(), 3);
        for ch in 0..3 {
            // SAFETY: AVX2 was detected; the chunk's 24 bytes are inside `p`.
            let [e, o] = unsafe { chunk3_avx2(p.as_ptr().add(ch * CHUNK3_BYTES)) };
            let (e, o): ([u8; 32], [u8; 32]) = unsafe {
                (
                    std::mem::transmute::<std::arch::x86_64::__m256i, [u8; 32]>(e),
                    std::mem::transmute::<std::arch::x86_64::__m256i, [u8; 32]>(o),
                )
            };
            let c = &codes[ch * CHUNK3..];
            for q in 0..32 {
                let even = 2 * (q % 16) + 32 * (q / 16);
                assert_eq!((e[q], o[q]), (c[even], c[even + 1]), "chunk {ch} position {q}");
            }
        }
    }

    #[test]
    fn unpack_row_gives_every_code() {
        for bits in [2u8, 3, 4, 8] {
            for cols in [1, 7, 64, 100, 129, 576, 1000] {
                let codes: Vec<u8> =
                    (0..2 * cols).map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8).collect();
                let p = pack_codes(&codes, 2, cols, bits);
                let rb = row_bytes(cols, bits);
                let mut out = vec![0u8; cols];
                for r in 0..2 {
                    unpack_row(&p[r * rb..(r + 1) * rb], cols, bits, &mut out);
                    assert_eq!(out, codes[r * cols..(r + 1) * cols], "bits {bits} cols {cols} row {r}");
                }
                if bits == 3 {
                    // The portable chunk decoder too (the AVX2 one ran above where the CPU has it).
                    let mut out = vec![0u8; cols];
                    let done = unpack_chunks3_portable(&p[..rb], cols / CHUNK3, &mut out);
                    assert_eq!(out[..done], codes[..done]);
                }
            }
        }
    }

    #[test]
    fn eight_codes_take_b_bytes() {
        // The layout kernels rely on: code 8i starts at byte b*i, bit 0.
        for bits in [2u8, 3, 4, 8] {
            let codes: Vec<u8> = (0..64).map(|i| if i % 8 == 0 { 1 } else { 0 }).collect();
            let p = pack(&codes, 1, 64, bits);
            for i in 0..8 {
                assert_eq!(p[bits as usize * i] & 1, 1, "bits {bits} chunk {i}");
            }
        }
    }
}
