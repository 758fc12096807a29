//! The packed layouts, declared once, with what each costs in bits per weight.
//!
//! A quantized linear `W' [rows, cols]` is stored as
//!
//! | part | type | shape | bits |
//! |---|---|---|---|
//! | codes | `b`-bit, packed ([`crate::bits::pack_codes`]: a bit stream per row, 3-bit rows in planar chunks of 64) | `[rows, cols]` | `b` per weight |
//! | scales | f16 | per-OC `[rows, ceil(cols/g)]`, per-IC `[ceil(rows/g), cols]` | 16 per group |
//! | zeros | `b`-bit, packed like codes | as scales | `b` per group |
//! | or minima | f16 (`w = d q + m`, [`adadim_quantize::Zero::Float`]) | as scales | 16 per group |
//! | perm | u32 | `[cols]`, per-OC act-order only | 32 per input column |
//!
//! so `bits/weight = b + (16 + b) / g` (w4g128: 4.156, w3g128: 3.148, w2g64: 2.281), or
//! `b + 32 / g` with float minima (w4g32: 5.0, llama.cpp's Q4_1), plus
//! `32 / rows` when per-OC act-order groups need the column permutation.
//!
//! Per-OC act-order GPTQ (dynamic groups) makes each group a scattered set of columns
//! (GPTQ's `g_idx`). We store the columns in processing order instead, so every group is
//! contiguous again and kernels never look `g_idx` up; the matvec gathers `x` once by `perm`
//! (the "act-order + groups is slow at inference" complaint of GPTQ users does not apply).

use adadim_quantize::{Axis, QuantizedMatrix, Zero};

use crate::bits;

/// How one linear is laid out: the same `(bits, group, axis)` the quantizer used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 2, 3, 4 or 8.
    pub bits: u8,
    /// Weights per group along `axis` (a whole channel when the quantizer had no group size).
    pub group: usize,
    pub axis: Axis,
    /// Float (f16) minima per group instead of packed whole zero points.
    pub min: bool,
}

impl Layout {
    /// Shape of the scale / zero grid of a `[rows, cols]` matrix.
    pub fn param_shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        match self.axis {
            Axis::Oc => (rows, cols.div_ceil(self.group)),
            Axis::Ic => (rows.div_ceil(self.group), cols),
        }
    }

    /// Bytes on disk: codes + f16 scales + packed zeros or f16 minima (+ the u32 permutation).
    pub fn bytes(&self, rows: usize, cols: usize, permuted: bool) -> usize {
        let (pr, pc) = self.param_shape(rows, cols);
        rows * bits::row_bytes(cols, self.bits)
            + 2 * pr * pc
            + if self.min { 2 * pr * pc } else { pr * bits::row_bytes(pc, self.bits) }
            + if permuted { 4 * cols } else { 0 }
    }

    /// Bits per weight of the declaration above: `b + (16 + b) / g` for whole groups (`b + 32 / g`
    /// with minima).
    pub fn bits_per_weight(&self, rows: usize, cols: usize, permuted: bool) -> f64 {
        8.0 * self.bytes(rows, cols, permuted) as f64 / (rows * cols) as f64
    }
}

/// A quantized linear with its codes bit-packed: what the kernels multiply with.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedLinear {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) layout: Layout,
    /// [`bits::pack_codes`] of the codes, columns in `perm` order when there is one.
    pub(crate) codes: Vec<u8>,
    /// Row-major on [`Layout::param_shape`]; f16-exact when read from a file.
    pub(crate) scales: Vec<f32>,
    /// Whole numbers in `0..2^bits`, or with minima `-m / d` ([`adadim_quantize::GroupParams::from_min`]).
    pub(crate) zeros: Vec<f32>,
    /// Stored column `p` is input column `perm[p]` (per-OC act-order only).
    pub(crate) perm: Option<Vec<u32>>,
}

impl PackedLinear {
    /// Packs a quantized matrix. Zero points are whole numbers below `2^bits` for every
    /// quantizer style but [`Zero::Float`], which is what lets them be packed like codes; a float
    /// minimum is stored as itself.
    pub fn from_quantized(q: &QuantizedMatrix) -> Self {
        let (rows, cols, spec) = (q.rows(), q.cols(), *q.spec());
        let (gr, gc) = spec.group_shape(rows, cols);
        let layout = Layout {
            bits: spec.bits,
            group: if spec.axis == Axis::Oc { gc } else { gr },
            axis: spec.axis,
            min: spec.zero == Zero::Float,
        };
        // Act-order: stored column p holds the p-th column in group order (stable, so the
        // columns of a group keep their processing order), params re-indexed to match.
        let perm = q.g_idx().map(|g| {
            let mut p: Vec<u32> = (0..cols as u32).collect();
            p.sort_by_key(|&c| g[c as usize]);
            p
        });
        let codes = match &perm {
            None => q.codes().to_vec(),
            Some(p) => q.codes().chunks(cols).flat_map(|row| p.iter().map(|&c| row[c as usize])).collect(),
        };
        let (pr, pc) = layout.param_shape(rows, cols);
        let (mut scales, mut zeros) = (vec![0f32; pr * pc], vec![0f32; pr * pc]);
        for kr in 0..pr {
            for kc in 0..pc {
                // A weight of group (kr, kc) in stored order, and its params in `q`.
                let (r, p) = match layout.axis {
                    Axis::Oc => (kr, kc * layout.group),
                    Axis::Ic => (kr * layout.group, kc),
                };
                let c = perm.as_ref().map_or(p, |perm| perm[p] as usize);
                let gp = q.params(r, c);
                scales[kr * pc + kc] = gp.scale;
                zeros[kr * pc + kc] = gp.zero;
            }
        }
        PackedLinear { rows, cols, layout, codes: bits::pack_codes(&codes, rows, cols, spec.bits), scales, zeros, perm }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Whether columns are stored permuted (per-OC act-order).
    pub fn permuted(&self) -> bool {
        self.perm.is_some()
    }

    /// `x` in stored column order: gathered by the act-order permutation, or `x` itself.
    pub(crate) fn stored_order<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.perm {
            Some(perm) => perm.iter().map(|&c| x[c as usize]).collect::<Vec<_>>().into(),
            None => x.into(),
        }
    }

    /// Row `r`'s packed codes and the [`bits::PAD`] bytes after them (the next row's, or the
    /// buffer's padding after the last row), which some kernels' wide loads reach into.
    pub(crate) fn row_codes(&self, r: usize) -> &[u8] {
        let rb = bits::row_bytes(self.cols, self.layout.bits);
        &self.codes[r * rb..((r + 1) * rb + bits::PAD).min(self.codes.len())]
    }

    /// Bytes this linear takes on disk, as its layout declares them.
    pub fn stored_bytes(&self) -> usize {
        self.layout.bytes(self.rows, self.cols, self.permuted())
    }

    /// Bytes the kernels stream per matvec: packed codes + params as held (f32) + permutation.
    pub fn bytes_read(&self) -> usize {
        self.rows * bits::row_bytes(self.cols, self.layout.bits)
            + 8 * self.scales.len()
            + self.perm.as_ref().map_or(0, |p| 4 * p.len())
    }

    /// `W'` row-major `[rows, cols]` in the original column order: `scale * (code - zero)`,
    /// the quantizer's own formula, so it equals `QuantizedMatrix::dequantize` bit for bit.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut w);
        w
    }

    /// Rows `r0..r0 + out.len() / cols` of `W'` into `out` (row-major, original column order).
    /// Each row's codes are unpacked to bytes first ([`bits::unpack_row`]) and the formula runs
    /// over whole groups (per-OC) or whole rows of params (per-IC), loops the compiler vectorizes.
    pub fn dequantize_rows(&self, r0: usize, out: &mut [f32]) {
        let (cols, l) = (self.cols, self.layout);
        let (_, pc) = l.param_shape(self.rows, cols);
        let rb = bits::row_bytes(cols, l.bits);
        let mut codes = vec![0u8; cols];
        // Stored order, before the act-order permutation scatters it.
        let mut stored = if self.perm.is_some() { vec![0f32; cols] } else { Vec::new() };
        for (i, w) in out.chunks_mut(cols).enumerate() {
            let r = r0 + i;
            bits::unpack_row(&self.codes[r * rb..(r + 1) * rb], cols, l.bits, &mut codes);
            let dst: &mut [f32] = if self.perm.is_some() { &mut stored } else { w };
            match l.axis {
                Axis::Oc => {
                    for (k, (d, q)) in dst.chunks_mut(l.group).zip(codes.chunks(l.group)).enumerate() {
                        let (s, z) = (self.scales[r * pc + k], self.zeros[r * pc + k]);
                        for (d, &q) in d.iter_mut().zip(q) {
                            *d = s * (f32::from(q) - z);
                        }
                    }
                }
                Axis::Ic => {
                    let kr = r / l.group;
                    let (s, z) = (&self.scales[kr * pc..(kr + 1) * pc], &self.zeros[kr * pc..(kr + 1) * pc]);
                    for (((d, &q), &s), &z) in dst.iter_mut().zip(&codes).zip(s).zip(z) {
                        *d = s * (f32::from(q) - z);
                    }
                }
            }
            if let Some(perm) = &self.perm {
                for (&c, &v) in perm.iter().zip(&stored) {
                    w[c as usize] = v;
                }
            }
        }
    }
}
