//! Quantized linears stored small and multiplied fast.
//!
//! ```text
//! QuantizedMatrix (codes u8, params f32)  --PackedLinear::from_quantized-->  PackedLinear
//!     codes bit-packed row by row (2, 3, 4 or 8 bits), params on the group grid
//! PackedLinear::matvec(x)    y = W' x without materializing W'   (decoding, batch 1)
//! PackedLinear::matmul(x)    Y = X W'^T, panels dequantized into an f32 GEMM (evaluation)
//! PackedLinear::matmul_act   Y = X W'^T on integers, rounded as the matvec (prompts, [`qgemm`])
//! PackedLinear::dequantize() W' bit for bit as the quantizer produced it
//! ```
//!
//! Both axes run through the same row kernel, `sum_c code[r, c] * v[c]`:
//! * per-OC: `v = x` group by group; `y[r] = sum_k s[r,k] (dot_k - z[r,k] sum_{c in k} x[c])`;
//! * per-IC: `v[c] = s[kr, c] x[c]` is formed once per row group `kr` (1/g of the work), then
//!   `y[r] = dot(code[r], v) - sum_c z[kr,c] v[c]`: one long dot product per row, with no
//!   group boundaries in it (the paper's appendix A.1 argument that per-IC "may be slightly
//!   more efficient").
//!
//! ```
//! use adadim_pack::PackedLinear;
//! use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
//! let (rows, cols) = (16, 64);
//! let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
//! let q = rtn(&w, rows, cols, &QuantSpec { bits: 3, group: Some(32), axis: Axis::Ic, zero: Zero::Awq })?;
//! let p = PackedLinear::from_quantized(&q);
//! assert_eq!(p.dequantize(), q.dequantize());
//! let x = vec![1.0f32; cols];
//! let mut y = vec![0.0f32; rows];
//! p.matvec(&x, &mut y);
//! # Ok::<(), adadim_quantize::Error>(())
//! ```

pub mod bits;
pub mod checkpoint;
pub mod format;
pub mod gptq;
pub mod kernels;
pub mod q16;
pub mod q8;
pub mod qgemm;
pub mod team;

pub use checkpoint::{PackError, PackedFile, PackedWriter, FORMAT_VERSION};
pub use format::{Layout, PackedLinear};
pub use kernels::ActBits;
