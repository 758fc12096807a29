//! Quantized linears stored small and multiplied fast.
//!
//! ```text
//! QuantizedMatrix (codes u8, params f32)  --PackedLinear::from_quantized-->  PackedLinear
//!     codes bit-packed row by row (2, 3, 4 or 8 bits), params on the group grid
//! PackedLinear::matvec(act, x)     y = W' x without materializing W'   (decoding, one token)
//! PackedLinear::matmul(act, x, t)  Y = X W'^T for t tokens              (prompts, evaluation)
//! PackedLinear::dequantize()       W' bit for bit as the quantizer produced it
//! ```
//!
//! `act` ([`ActBits`]) is the precision the activations are rounded to: `F32` (none: exact),
//! `I16` or `I8` per block (integer kernels, where the layout and CPU have them). The files:
//!
//! | module | what it does |
//! |---|---|
//! | [`product`] | [`ActBits`] and the two public products, dispatching to the kernels below |
//! | [`matvec_f32`] | matvec with f32 activations (AVX2 and portable) |
//! | [`matvec_i16`] / [`matvec_i8`] | matvec on int16 / int8 activations (AVX2, AVX-512, VNNI) |
//! | [`matvec_int`] | what those two share: rounding, the row loop over one trait, the f64 definition |
//! | [`round_i16`] | activations rounded to int16 ([`round_i16::Q16`]) |
//! | [`matmul_f32`] | many tokens through dequantized panels and an f32 GEMM |
//! | [`matmul_int`] | many tokens on integers (AVX-512 VNNI) |
//! | [`simd`] | CPU feature detection and the SIMD helpers the kernels share |
//! | [`bits`], [`format`], [`checkpoint`] | code packing, the packed linear, the file format |
//! | [`export_gptq`] | export to the GPTQ v1 checkpoint layout |
//!
//! Both axes run through the same row kernel, `sum_c code[r, c] * v[c]`:
//! * per-OC: `v = x` group by group; `y[r] = sum_k s[r,k] (dot_k - z[r,k] sum_{c in k} x[c])`;
//! * per-IC: `v[c] = s[kr, c] x[c]` is formed once per row group `kr` (1/g of the work), then
//!   `y[r] = dot(code[r], v) - sum_c z[kr,c] v[c]`: one long dot product per row, with no
//!   group boundaries in it (the paper's appendix A.1 argument that per-IC "may be slightly
//!   more efficient").
//!
//! ```
//! use adadim_pack::{ActBits, PackedLinear};
//! use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
//! let (rows, cols) = (16, 64);
//! let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
//! let q = rtn(&w, rows, cols, &QuantSpec { bits: 3, group: Some(32), axis: Axis::Ic, zero: Zero::Awq })?;
//! let p = PackedLinear::from_quantized(&q);
//! assert_eq!(p.dequantize(), q.dequantize());
//! let x = vec![1.0f32; cols];
//! let mut y = vec![0.0f32; rows];
//! p.matvec(ActBits::I16, &x, &mut y);
//! # Ok::<(), adadim_quantize::Error>(())
//! ```

pub mod bits;
pub mod checkpoint;
pub mod export_gptq;
pub mod format;
pub mod matmul_f32;
pub mod matmul_int;
pub mod matvec_f32;
pub mod matvec_i16;
pub mod matvec_i8;
pub mod matvec_int;
pub mod product;
pub mod round_i16;
pub mod simd;

pub use checkpoint::{PackError, PackedFile, PackedWriter, FORMAT_VERSION};
pub use format::{Layout, PackedLinear};
pub use product::ActBits;
