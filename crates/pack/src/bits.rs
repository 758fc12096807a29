//! Codes of `b` bits (2, 3, 4 or 8) packed little-endian into bytes, one row at a time.
//!
//! Row `r` starts at byte `r * row_bytes(cols, b)`; inside it code `c` occupies bits
//! `[c b, c b + b)` of the row's little-endian bit stream. Eight codes take exactly `b`
//! bytes, so code `8 i` always starts byte `b i` of its row: kernels read eight codes with
//! one unaligned load. 3-bit codes straddle byte borders; that is what the shifts are for.
//! The buffer carries [`PAD`] zero bytes after the last row so such a load never runs past it.

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
                let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8).collect();
                let p = pack(&codes, rows, cols, bits);
                assert_eq!(p.len(), rows * row_bytes(cols, bits) + PAD);
                assert_eq!(unpack(&p, rows, cols, bits), codes, "bits {bits} {rows}x{cols}");
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
