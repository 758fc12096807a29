//! llama.cpp's i-quants (IQ1_S .. IQ4_XS), dequantized to f32 for `import-gguf`, which candle
//! cannot read.
//!
//! Most i-quants store indices into fixed codebooks (lattice points of 4 or 8 values) chosen by
//! llama.cpp. The codebooks are not written into this project: they are read, with the IQ4
//! value table, from gguf-py's `quants.py` in the PyPI wheel `gguf==0.19.0` (SHA-256 pinned,
//! fetched into `$ADADIM_HOME` on first use, as the models are), which holds each codebook as
//! hex with a small map of its values. The block layouts follow the GGUF format; every decoder
//! is tested against gguf-py's own numpy dequantization (`tests/reference/iquant_ref.py`).

use crate::error::{LoadError, Result};
use std::path::{Path, PathBuf};

/// Values per super-block of the 256-value types.
const QK_K: usize = 256;

/// The i-quant types: GGML type id, name, values per block, bytes per block.
pub const TYPES: [(u32, &str, usize, usize); 9] = [
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (29, "IQ1_M", 256, 56),
];

/// `(name, values per block, bytes per block)` of GGML type `id`, when it is an i-quant.
pub fn type_info(id: u32) -> Option<(&'static str, usize, usize)> {
    TYPES.iter().find(|t| t.0 == id).map(|t| (t.1, t.2, t.3))
}

const WHEEL: (&str, &str, &str) = (
    "gguf==0.19.0",
    "gguf-0.19.0-py3-none-any.whl",
    "70bcd10edfe697fb2dad6e40af2234b9d8ece9a41a99761405121ebda1c3c1cd",
);

/// The codebooks, each as f32 values, row-major `[points, dim]`.
#[derive(Clone, Debug)]
pub struct Codebooks {
    iq2xxs: Vec<f32>,
    iq2xs: Vec<f32>,
    iq2s: Vec<f32>,
    iq3xxs: Vec<f32>,
    iq3s: Vec<f32>,
    iq1s: Vec<f32>,
    /// IQ4_NL / IQ4_XS's 16 values.
    iq4: [f32; 16],
}

/// `$ADADIM_HOME/data/gguf-quants.py`, extracted from the pinned wheel on first use.
pub fn quants_file(home: &Path) -> Result<PathBuf> {
    let out = home.join("data").join("gguf-0.19.0-quants.py");
    if out.exists() {
        return Ok(out);
    }
    let wheel = crate::fetch::pip_download(WHEEL.0, WHEEL.1, WHEEL.2, home)?;
    let dir = home.join("data");
    std::fs::create_dir_all(&dir).map_err(crate::error::io_err(&dir))?;
    let tmp = crate::fetch::partial_path(&out);
    let script = "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], 'wb') as o:\n    o.write(z.read('gguf/quants.py'))\n";
    if let Err(e) = crate::fetch::run_python(WHEEL.0, script, &[&wheel, &tmp]) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &out).map_err(crate::error::io_err(&out))?;
    Ok(out)
}

impl Codebooks {
    /// Read from gguf-py's `quants.py` (see [`quants_file`]).
    pub fn from_quants_py(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
        let bad = |msg: String| LoadError::Gguf { path: path.to_path_buf(), msg: format!("i-quant codebooks: {msg}") };
        let class = |name: &str| -> Result<&str> {
            let start = text.find(&format!("class {name}(")).ok_or_else(|| bad(format!("no class {name}")))?;
            let rest = &text[start + 6..];
            Ok(&rest[..rest.find("\nclass ").unwrap_or(rest.len())])
        };
        // `grid_map = (a, b, ...)` and the hex strings of `grid_hex = (...)`.
        let grid = |name: &str, points: usize, dim: usize| -> Result<Vec<f32>> {
            let body = class(name)?;
            let map_src = body.split("grid_map = (").nth(1).and_then(|s| s.split(')').next());
            let map: Vec<f32> = map_src
                .ok_or_else(|| bad(format!("{name}: no grid_map")))?
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    parse_int(s.trim()).map(|v| v as f32).ok_or_else(|| bad(format!("{name}: grid_map entry '{s}'")))
                })
                .collect::<Result<_>>()?;
            let hex_src = body.split("grid_hex = (").nth(1).and_then(|s| s.split("\n    )").next());
            let hex: String =
                hex_src.ok_or_else(|| bad(format!("{name}: no grid_hex")))?.split('"').skip(1).step_by(2).collect();
            // Each byte holds 8 / bits values, at shifts of 8 / (8 / bits) (2-bit: 0, 2, 4, 6;
            // 3-bit: 0 and 4).
            let bits = (usize::BITS - (map.len() - 1).leading_zeros()) as usize;
            let per_byte = 8 / bits;
            let step = 8 / per_byte;
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad(format!("{name}: hex at {i}"))))
                .collect::<Result<_>>()?;
            let mut out = Vec::with_capacity(points * dim);
            for b in bytes {
                for k in 0..per_byte {
                    let idx = usize::from(b >> (k * step)) & ((1 << bits) - 1);
                    out.push(*map.get(idx).ok_or_else(|| bad(format!("{name}: index {idx} past its map")))?);
                }
            }
            if out.len() != points * dim {
                return Err(bad(format!("{name}: {} values, expected {points} x {dim}", out.len())));
            }
            Ok(out)
        };
        let kv_src = class("IQ4_NL")?.split("kvalues = (").nth(1).and_then(|s| s.split(')').next());
        let kv: Vec<f32> = kv_src
            .ok_or_else(|| bad("IQ4_NL: no kvalues".into()))?
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_int(s.trim()).map(|v| v as f32).ok_or_else(|| bad(format!("IQ4_NL: kvalue '{s}'"))))
            .collect::<Result<_>>()?;
        let iq4: [f32; 16] =
            kv.try_into().map_err(|v: Vec<f32>| bad(format!("IQ4_NL: {} kvalues, expected 16", v.len())))?;
        Ok(Codebooks {
            iq2xxs: grid("IQ2_XXS", 256, 8)?,
            iq2xs: grid("IQ2_XS", 512, 8)?,
            iq2s: grid("IQ2_S", 1024, 8)?,
            iq3xxs: grid("IQ3_XXS", 256, 4)?,
            iq3s: grid("IQ3_S", 512, 4)?,
            iq1s: grid("IQ1_S", 2048, 8)?,
            iq4,
        })
    }

    /// Fetched (first use) and read.
    pub fn load(home: &Path) -> Result<Self> {
        Self::from_quants_py(&quants_file(home)?)
    }
}

fn parse_int(s: &str) -> Option<i64> {
    let (neg, s) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
    let v = match s.strip_prefix("0x") {
        Some(h) => i64::from_str_radix(h, 16).ok()?,
        None => s.parse().ok()?,
    };
    Some(if neg { -v } else { v })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[2 * i], b[2 * i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// The 8 signs of a 7-bit sign index: bit 7 makes the count of minus signs even.
fn signs7(i: u32) -> u8 {
    let i = (i & 0x7f) as u8;
    i | (((i.count_ones() & 1) as u8) << 7)
}

/// `out[j] = d * point[j] * (-1 if sign bit j)` for one codebook point of `dim` values.
fn put(out: &mut [f32], grid: &[f32], dim: usize, index: usize, d: f32, signs: u8) {
    for (j, o) in out[..dim].iter_mut().enumerate() {
        let s = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
        *o = d * grid[index * dim + j] * s;
    }
}

impl Codebooks {
    /// Dequantize `data` (whole blocks of GGML type `id`) into `out` (values per block each).
    pub fn dequantize(&self, id: u32, data: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
        let (name, per, bytes) = type_info(id).ok_or_else(|| format!("type {id} is not an i-quant"))?;
        if !data.len().is_multiple_of(bytes) || out.len() != data.len() / bytes * per {
            return Err(format!("{name}: {} bytes for {} values", data.len(), out.len()));
        }
        for (b, o) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
            match id {
                16 => self.iq2_xxs(b, o),
                17 => self.iq2_xs(b, o),
                18 => self.iq3_xxs(b, o),
                19 => self.iq1_s(b, o),
                20 => self.iq4_nl(b, o),
                21 => self.iq3_s(b, o),
                22 => self.iq2_s(b, o),
                23 => self.iq4_xs(b, o),
                _ => self.iq1_m(b, o),
            }
        }
        Ok(())
    }

    fn iq2_xxs(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let qs = &b[2..];
        // 8 sub-blocks of 32: 4 grid indices (bytes) and a word of 4 x 7 sign bits + 4 scale bits.
        for ib in 0..QK_K / 32 {
            let (idx, aux) = (u32_at(qs, 2 * ib).to_le_bytes(), u32_at(qs, 2 * ib + 1));
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (l, &index) in idx.iter().enumerate() {
                put(&mut o[ib * 32 + l * 8..], &self.iq2xxs, 8, usize::from(index), db, signs7(aux >> (7 * l)));
            }
        }
    }

    fn iq2_xs(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let (qs, scales) = (&b[2..2 + QK_K / 4], &b[2 + QK_K / 4..]);
        // 32 groups of 8: a u16 each, 9 bits of grid index and 7 of signs; a 4-bit scale per 16.
        for g in 0..QK_K / 8 {
            let q = u32::from(u16_at(qs, g));
            let sc = (scales[g / 4] >> (4 * (g / 2 % 2))) & 0x0f;
            let db = d * (0.5 + f32::from(sc)) * 0.25;
            put(&mut o[g * 8..], &self.iq2xs, 8, (q & 511) as usize, db, signs7(q >> 9));
        }
    }

    fn iq2_s(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let qs = &b[2..2 + QK_K / 8];
        let signs = &b[2 + QK_K / 8..2 + QK_K / 4];
        let qh = &b[2 + QK_K / 4..2 + QK_K / 4 + QK_K / 32];
        let scales = &b[2 + QK_K / 4 + QK_K / 32..];
        // 32 groups of 8: 8 low bits of index in qs, 2 high bits in qh, an explicit sign byte.
        for g in 0..QK_K / 8 {
            let index = usize::from(qs[g]) | (usize::from(qh[g / 4] >> (2 * (g % 4)) & 3) << 8);
            let sc = (scales[g / 4] >> (4 * (g / 2 % 2))) & 0x0f;
            let db = d * (0.5 + f32::from(sc)) * 0.25;
            put(&mut o[g * 8..], &self.iq2s, 8, index, db, signs[g]);
        }
    }

    fn iq3_xxs(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let (qs, sc) = (&b[2..2 + QK_K / 4], &b[2 + QK_K / 4..]);
        // 8 sub-blocks of 32: 8 grid indices of 4 values, a word of 4 x 7 sign bits + 4 scale bits.
        for ib in 0..QK_K / 32 {
            let aux = u32_at(sc, ib);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for l in 0..4 {
                let s = signs7(aux >> (7 * l));
                let at = ib * 32 + l * 8;
                put(&mut o[at..], &self.iq3xxs, 4, usize::from(qs[ib * 8 + 2 * l]), db, s);
                put(&mut o[at + 4..], &self.iq3xxs, 4, usize::from(qs[ib * 8 + 2 * l + 1]), db, s >> 4);
            }
        }
    }

    fn iq3_s(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let qs = &b[2..2 + QK_K / 4];
        let qh = &b[2 + QK_K / 4..2 + QK_K / 4 + QK_K / 32];
        let signs = &b[2 + QK_K / 4 + QK_K / 32..2 + QK_K / 4 + QK_K / 32 + QK_K / 8];
        let scales = &b[2 + QK_K / 4 + QK_K / 32 + QK_K / 8..];
        // 64 points of 4: 8 low index bits in qs, the 9th in qh; a sign byte per 8 values; a
        // 4-bit scale per 32 (odd multiples of d).
        for p in 0..QK_K / 4 {
            let index = usize::from(qs[p]) | (usize::from(qh[p / 8] >> (p % 8) & 1) << 8);
            let sc = (scales[p / 16] >> (4 * (p / 8 % 2))) & 0x0f;
            let db = d * (1.0 + 2.0 * f32::from(sc));
            put(&mut o[p * 4..], &self.iq3s, 4, index, db, signs[p / 2] >> (4 * (p % 2)));
        }
    }

    fn iq1_s(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let (qs, qh) = (&b[2..2 + QK_K / 8], &b[2 + QK_K / 8..]);
        // 8 sub-blocks of 32: a u16 with 4 x 3 high index bits, a 3-bit scale and the delta's sign.
        for ib in 0..QK_K / 32 {
            let h = u16_at(qh, ib);
            let dl = d * (2.0 * f32::from((h >> 12) & 7) + 1.0);
            let delta = if h & 0x8000 == 0 { 0.125 } else { -0.125 };
            for l in 0..4 {
                let index = usize::from(qs[ib * 4 + l]) | (usize::from((h >> (3 * l)) & 7) << 8);
                for j in 0..8 {
                    o[ib * 32 + l * 8 + j] = dl * (self.iq1s[index * 8 + j] + delta);
                }
            }
        }
    }

    fn iq1_m(&self, b: &[u8], o: &mut [f32]) {
        let qs = &b[..QK_K / 8];
        let qh = &b[QK_K / 8..QK_K / 8 + QK_K / 16];
        let sc = &b[QK_K / 8 + QK_K / 16..];
        // The f16 scale is spread over the top nibbles of the four scale words.
        let words: Vec<u16> = (0..4).map(|i| u16_at(sc, i)).collect();
        let d_bits = (words[0] >> 12) | ((words[1] >> 8) & 0x00f0) | ((words[2] >> 4) & 0x0f00) | (words[3] & 0xf000);
        let d = half::f16::from_bits(d_bits).to_f32();
        // 32 groups of 8: 8 low index bits, 3 high ones and the delta's sign in a nibble of qh; a
        // 3-bit scale per 16 values.
        for g in 0..QK_K / 8 {
            let nib = (qh[g / 2] >> (4 * (g % 2))) & 0x0f;
            let index = usize::from(qs[g]) | (usize::from(nib & 7) << 8);
            let delta = if nib & 8 == 0 { 0.125 } else { -0.125 };
            let s = (words[g / 8] >> (3 * (g / 2 % 4))) & 7;
            let dl = d * (2.0 * f32::from(s) + 1.0);
            for j in 0..8 {
                o[g * 8 + j] = dl * (self.iq1s[index * 8 + j] + delta);
            }
        }
    }

    fn iq4_nl(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        for (j, &q) in b[2..18].iter().enumerate() {
            o[j] = d * self.iq4[usize::from(q & 0x0f)];
            o[j + 16] = d * self.iq4[usize::from(q >> 4)];
        }
    }

    fn iq4_xs(&self, b: &[u8], o: &mut [f32]) {
        let d = f16(b);
        let scales_h = u16_at(b, 1);
        let scales_l = &b[4..4 + QK_K / 64];
        let qs = &b[4 + QK_K / 64..];
        // 8 sub-blocks of 32 with a 6-bit signed scale each (4 low bits, 2 high bits).
        for ib in 0..QK_K / 32 {
            let lo = (scales_l[ib / 2] >> (4 * (ib % 2))) & 0x0f;
            let hi = ((scales_h >> (2 * ib)) & 3) as u8;
            let dl = d * (f32::from(lo | (hi << 4)) - 32.0);
            for (j, &q) in qs[ib * 16..ib * 16 + 16].iter().enumerate() {
                o[ib * 32 + j] = dl * self.iq4[usize::from(q & 0x0f)];
                o[ib * 32 + j + 16] = dl * self.iq4[usize::from(q >> 4)];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_indices_carry_an_even_parity_bit() {
        assert_eq!(signs7(0), 0);
        assert_eq!(signs7(1), 0x81);
        assert_eq!(signs7(3), 0x03);
        assert_eq!(signs7(0x7f), 0xff);
        for i in 0..128 {
            assert_eq!(signs7(i).count_ones() % 2, 0);
        }
    }

    #[test]
    fn block_sizes_are_the_formats() {
        for (id, name, per, bytes) in TYPES {
            assert_eq!(type_info(id), Some((name, per, bytes)));
        }
        assert_eq!(type_info(2), None);
    }
}
