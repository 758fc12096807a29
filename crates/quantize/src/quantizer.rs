//! The one quantizer that RTN, GPTQ and the dimension search share: fit a group's
//! `(scale, zero)` from its min and max, then IST-DASLab's three-line
//! `q = clamp(round(w / scale) + zero, 0, maxq)`, `w' = scale * (q - zero)`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which channel a quantization group runs along (paper Fig. 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Axis {
    /// per-OC (the usual one): each output row of `W [C_out, C_in]` is cut into groups of
    /// `g` consecutive input channels; params have shape `[C_out, ceil(C_in / g)]`.
    Oc,
    /// per-IC (the paper's): each input column is cut into groups of `g` consecutive output
    /// channels; params have shape `[ceil(C_out / g), C_in]`, so an activation outlier's
    /// damage stays inside its own column's groups.
    Ic,
}

/// How a group's zero point is chosen from its range (REFERENCE.md, "Quantizer").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Zero {
    /// AWQ-style (the authors' RTN and per-IC GPTQ): the grid spans exactly `[min, max]`,
    /// `scale = max(max - min, 1e-5) / maxq`, `zero = clamp(round(-min / scale), 0, maxq)`.
    /// The clamp means a group that does not straddle 0 is clipped at its far end.
    Awq,
    /// GPTQ-style (IST-DASLab `quant.py`): the range is first widened to include 0, so 0 is
    /// always exactly representable; an all-zero group gets the range `[-1, 1]`.
    Gptq,
    /// Symmetric: `scale = 2 max|w| / maxq`, `zero = (maxq + 1) / 2`. Unlike `quant.py`,
    /// an all-positive group also gets a symmetric range (`quant.py` keeps `min = 0` there
    /// while still centring the zero, which clips the top half of the group).
    Sym,
    /// A float minimum per group, llama.cpp's Q4_1 / k-quant form `w = d q + m`: `d` and `m`
    /// are f16 (rounded to nearest), `d = (max - min) / maxq`, `m = min`. Stored as the minimum
    /// (16 bits per group instead of `b`); held here as the fractional zero `-m / d`.
    Float,
}

/// What grid to quantize a matrix onto.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantSpec {
    /// Bits per weight code: 2, 3, 4 or 8.
    pub bits: u8,
    /// Weights per group along the axis; `None` = one group per whole channel. A last
    /// group shorter than `g` is allowed (SmolLM2's 576 = 4 x 128 + 64).
    pub group: Option<usize>,
    /// The channel groups run along.
    pub axis: Axis,
    /// How zero points are chosen.
    pub zero: Zero,
}

/// One group's quantization parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupParams {
    /// Step between grid points.
    pub scale: f32,
    /// Code that dequantizes to 0 (a whole number in f32, as GPTQ stores it).
    pub zero: f32,
}

impl GroupParams {
    /// The params of `w = scale q + min`, `scale` and `min` f16 values: the zero `-min / scale`
    /// in f32, computed the same way wherever a float minimum is read or chosen, so a packed
    /// model dequantizes to exactly the weights that were evaluated.
    pub fn from_min(scale: f32, min: f32) -> Self {
        GroupParams { scale, zero: -min / scale }
    }

    /// The f16 minimum these params were made from by [`GroupParams::from_min`] (the nearest f16
    /// to `-zero scale`, which is within an f32 rounding of it).
    pub fn min(&self) -> f32 {
        f16_nearest(-self.zero * self.scale)
    }
}

impl QuantSpec {
    /// Checks `bits` is in {2, 3, 4, 8} and `group` is not `Some(0)`.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.bits, 2 | 3 | 4 | 8) {
            return Err(Error::Bits { bits: self.bits });
        }
        if self.group == Some(0) {
            return Err(Error::ZeroGroup);
        }
        Ok(())
    }

    /// Largest code, `2^bits - 1`. Call [`QuantSpec::validate`] first: it relies on `bits <= 8`.
    pub fn maxq(&self) -> u8 {
        ((1u16 << self.bits.min(8)) - 1) as u8
    }

    /// The same grid along the other `axis`.
    pub fn with_axis(&self, axis: Axis) -> Self {
        Self { axis, ..*self }
    }

    /// Shape `(g_r, g_c)` of one group inside a `[rows, cols]` matrix: `(1, g)` per-OC,
    /// `(g, 1)` per-IC. This is the only place the axis shapes a group; everything else
    /// walks the group grid `[ceil(rows / g_r), ceil(cols / g_c)]`.
    pub fn group_shape(&self, rows: usize, cols: usize) -> (usize, usize) {
        let along = |len: usize| self.group.map_or(len, |g| g.min(len)).max(1);
        match self.axis {
            Axis::Oc => (1, along(cols)),
            Axis::Ic => (along(rows), 1),
        }
    }

    /// Fits one group's params from its values (min-max, per [`Zero`]).
    ///
    /// The scale is rounded up to an f16 value before the zero point and any code are chosen
    /// ([`f16_scale`]): packed checkpoints (ours and GPTQ's) store f16 scales, so the codes
    /// are chosen for the scale actually stored and a packed model dequantizes to exactly
    /// the weights that were evaluated.
    ///
    /// Rounding is half-to-even, as `torch.round` and `numpy.round` do, so the codes match
    /// the reference implementations bit for bit at ties.
    pub fn fit(&self, values: impl IntoIterator<Item = f32>) -> GroupParams {
        let maxq = f32::from(self.maxq());
        let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
        for v in values {
            min = min.min(v);
            max = max.max(v);
        }
        if min > max {
            // An empty group: any params will do, pick the all-zero group's.
            (min, max) = (0.0, 0.0);
        }
        match self.zero {
            Zero::Awq => {
                let scale = f16_scale((max - min).max(1e-5) / maxq);
                let zero = round_half_even(-min / scale).clamp(0.0, maxq);
                GroupParams { scale, zero }
            }
            Zero::Gptq => {
                let (mut lo, mut hi) = (min.min(0.0), max.max(0.0));
                // quant.py's all-zero group, widened to groups so close to 0 that the scale
                // would underflow and `-lo / scale` turn into 0/0.
                if (hi - lo) / maxq < f32::MIN_POSITIVE {
                    (lo, hi) = (-1.0, 1.0);
                }
                let scale = f16_scale((hi - lo) / maxq);
                GroupParams {
                    scale,
                    // The rounded scale may be a hair smaller than the range needs: the zero
                    // stays on the grid (and so packable in `bits` bits).
                    zero: round_half_even(-lo / scale).min(maxq),
                }
            }
            Zero::Float => {
                let scale = f16_nearest(((max - min) / maxq).max(F16_MIN_POSITIVE));
                GroupParams::from_min(scale, f16_nearest(min))
            }
            Zero::Sym => {
                let absmax = min.abs().max(max.abs());
                // As for GPTQ-style: an all-zero (or underflowing) group gets [-1, 1].
                let absmax = if 2.0 * absmax / maxq < f32::MIN_POSITIVE { 1.0 } else { absmax };
                GroupParams { scale: f16_scale(2.0 * absmax / maxq), zero: (maxq + 1.0) / 2.0 }
            }
        }
    }
}

/// The smallest positive f16 value (a subnormal): no scale is smaller.
pub const F16_MIN_POSITIVE: f32 = 5.960_464_5e-8;

/// The nearest f16 value to `x` (ties to even), clamped to f16's finite range.
pub fn f16_nearest(x: f32) -> f32 {
    const MAX: f32 = 65504.0;
    if x.is_nan() {
        return x;
    }
    let x = x.clamp(-MAX, MAX);
    let a = x.abs();
    // f16 keeps 11 significant bits down to 2^-14 and a fixed step of 2^-24 below it.
    let step =
        if a >= 6.103_515_6e-5 { f32::from_bits((a.to_bits() & 0x7f80_0000) - (10 << 23)) } else { F16_MIN_POSITIVE };
    (round_half_even(a / step) * step).min(MAX).copysign(x)
}

/// The smallest f16 value `>= s`, within f16's positive finite range `[2^-24, 65504]` (a
/// scale never becomes 0 or infinite). Rounding up keeps the grid covering the whole group,
/// so every weight inside the range still lands within half a step of a grid point.
pub fn f16_scale(s: f32) -> f32 {
    const MIN: f32 = 5.960_464_5e-8; // 2^-24, the smallest f16 subnormal
    const MAX: f32 = 65504.0;
    if s.is_nan() {
        return s;
    }
    let s = s.clamp(MIN, MAX);
    // f16 keeps 11 significant bits down to 2^-14 and a fixed step of 2^-24 below it; the
    // division and product by a power of two are exact.
    let step = if s >= 6.103_515_6e-5 { f32::from_bits((s.to_bits() & 0x7f80_0000) - (10 << 23)) } else { MIN };
    ((s / step).ceil() * step).min(MAX)
}

/// `t.round_ties_even()`, bit for bit, without a call: the target's baseline (SSE2) has no
/// rounding instruction, so `round_ties_even` is a call into libm's `rintf`. Calling it only for
/// large values was not enough: the vectorized quantizer loops computed both sides of the
/// branch, `rintf` on every lane (15% of a short `generate`, which quantizes the 8-bit decode
/// head while loading). Below 2^23 in magnitude, `|t| + 2^23` has no fraction bits, so the
/// addition rounds `|t|` as the default mode does (to nearest, ties to even: 2^23 is even) and the
/// subtraction is exact; the sign is put back (-0.3 gives -0). From 2^23 up every float is an
/// integer, and a NaN fails the comparison: both are returned as they are.
#[inline(always)]
pub fn round_half_even(t: f32) -> f32 {
    const TWO_23: f32 = 8_388_608.0;
    let a = t.abs();
    let r = ((a + TWO_23) - TWO_23).copysign(t);
    if a < TWO_23 {
        r
    } else {
        t
    }
}

/// Code of `w` on the grid of `p`: `clamp(round(w / scale) + zero, 0, maxq)` for a whole
/// zero (GPTQ's order, bit for bit), `clamp(round(w / scale + zero), 0, maxq)` for a float
/// minimum's fractional one.
#[inline(always)]
pub fn quantize(w: f32, p: GroupParams, maxq: u8) -> u8 {
    let t = w / p.scale;
    let q = if p.zero == round_half_even(p.zero) { round_half_even(t) + p.zero } else { round_half_even(t + p.zero) };
    // The clamp bounds q to [0, maxq] <= 255, so the cast is exact.
    q.clamp(0.0, f32::from(maxq)) as u8
}

/// Value of `code` on the grid of `p`: `scale * (code - zero)`.
pub fn dequantize(code: u8, p: GroupParams) -> f32 {
    p.scale * (f32::from(code) - p.zero)
}

#[cfg(test)]
mod tests {
    use super::round_half_even;

    #[test]
    fn round_half_even_is_round_ties_even() {
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999997,
            4_194_303.5,
            4_194_304.5,
            8_388_607.5,
            8_388_608.0,
            -8_388_607.5,
            -0.3,
            -0.5,
            1e9,
            -1e9,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Values around the grid's range, ties included (multiples of 1/8).
            v.push((x % 4096) as f32 / 8.0 - 256.0);
            v.push(f32::from_bits(x));
        }
        for t in v {
            let (a, b) = (round_half_even(t), t.round_ties_even());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{t}: {a} vs {b}");
        }
    }
}
