//! The one public product entry: [`PackedLinear::matvec`] (one token) and
//! [`PackedLinear::matmul`] (many), each at the activation precision an [`ActBits`] names.
//!
//! | `act` | matvec | matmul |
//! |---|---|---|
//! | `F32` | [`crate::matvec_f32`]: exact up to round-off | [`crate::matmul_f32`]: exact |
//! | `I16` | [`crate::matvec_i16`] where the layout and CPU allow, else `F32` | [`crate::matmul_int`] where it applies, else `F32` |
//! | `I8` | [`crate::matvec_i8`] where the layout and CPU allow, else `I16` | as `I16`, on int8 |

use crate::format::PackedLinear;
use crate::{matmul_f32, matmul_int, matvec_f32, matvec_i16, matvec_i8};

/// The precision a product rounds the activations to: 16 bits per block ([`crate::matvec_i16`],
/// the default: within about 1e-5 of the f32 product), 8 bits per block of 32
/// ([`crate::matvec_i8`]: llama.cpp's Q8_0 precision, faster; 3-, 4- and 8-bit codes, 2-bit
/// keeps 16), or none (`F32`: the exact product, as evaluation needs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActBits {
    #[default]
    I16,
    I8,
    F32,
}

impl ActBits {
    pub fn bits(self) -> u8 {
        match self {
            ActBits::I16 => 16,
            ActBits::I8 => 8,
            ActBits::F32 => 32,
        }
    }

    /// From a rounding width (16 or 8: what `--act-bits` accepts).
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            16 => Some(ActBits::I16),
            8 => Some(ActBits::I8),
            _ => None,
        }
    }
}

impl PackedLinear {
    /// `y = W' x` (`x` has `cols` values, `y` gets `rows`) from the packed codes, the
    /// activations rounded as `act` says where this layout and CPU have that kernel (see the
    /// module's table).
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows` (a caller's bug, not bad input).
    pub fn matvec(&self, act: ActBits, x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "matvec: x has {} values for {} input channels", x.len(), self.cols);
        assert_eq!(y.len(), self.rows, "matvec: y has {} values for {} output channels", y.len(), self.rows);
        if act == ActBits::I8 && matvec_i8::matvec(self, x, y) {
            return;
        }
        if act != ActBits::F32 && matvec_i16::matvec(self, x, y) {
            return;
        }
        matvec_f32::matvec(self, x, y);
    }

    /// [`PackedLinear::matvec`] of `t` tokens (`x` `[t, cols]`, `y` `[t, rows]`), each token's
    /// result exactly (bit for bit) its own matvec's whatever else is in the batch, the integer
    /// kernels multiplying every run of rows with all the tokens while its codes are in cache
    /// (a decode step of several sequences reads the weights once) and unpacking each step's
    /// codes once for up to four tokens. The f32 kernel runs token by token.
    ///
    /// # Panics
    /// If `x` is not `[t, cols]` or `y` not `[t, rows]` (a caller's bug).
    pub fn matvec_batch(&self, act: ActBits, x: &[f32], t: usize, y: &mut [f32]) {
        assert_eq!(x.len(), t * self.cols, "matvec_batch: x is not [{t}, {}]", self.cols);
        assert_eq!(y.len(), t * self.rows, "matvec_batch: y is not [{t}, {}]", self.rows);
        if t == 0 {
            return;
        }
        // Where the matvec would fall back from int8 to int16 (or f32), so does each token here.
        if act == ActBits::I8 && matvec_i8::matvec_batch(self, x, t, y) {
            return;
        }
        if act != ActBits::F32 && matvec_i16::matvec_batch(self, x, t, y) {
            return;
        }
        for (x, y) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.rows)) {
            self.matvec(act, x, y);
        }
    }

    /// Whether [`PackedLinear::matvec`] at `I16` rounds the activations to int16 on this CPU.
    pub fn matvec_rounds_activations(&self) -> bool {
        matvec_i16::runs(self)
    }

    /// `Y = X W'^T` for `t` tokens (`x` row-major `[t, cols]`, `y` `[t, rows]`): at `F32` through
    /// dequantized f32 panels ([`crate::matmul_f32`], exact; evaluation); at `I16` / `I8` on
    /// integers with the activations rounded as [`PackedLinear::matvec`] rounds them
    /// ([`crate::matmul_int`]) where [`matmul_int::kind`] gives a kind, else as at `F32`.
    /// Token `i` of an integer product is the matvec's of `x[i]` up to f32 round-off.
    pub fn matmul(&self, act: ActBits, x: &[f32], t: usize, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), t * cols, "matmul: x is not [{t}, {cols}]");
        assert_eq!(y.len(), t * rows, "matmul: y is not [{t}, {rows}]");
        match matmul_int::kind(self, act) {
            Some(kind) => matmul_int::matmul(self, kind, x, t, y),
            None => matmul_f32::matmul(self, x, t, y),
        }
    }

    /// One thread, no SIMD: the portable f32 loop, for tests of the SIMD kernels.
    #[doc(hidden)]
    pub fn matvec_portable(&self, x: &[f32], y: &mut [f32]) {
        assert_eq!((x.len(), y.len()), (self.cols, self.rows));
        matvec_f32::matvec_portable(self, x, y);
    }
}
