//! A linear layer `y = x W^T (+ b)` whose weight is dense f32 or packed, and the dense
//! products it runs: a row-parallel matvec per token for a few tokens (decoding), a GEMM for
//! more.

use crate::settings::DecodeSettings;
use adadim_pack::PackedLinear;
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// A linear layer's weight `[out, in]`: dense f32, or quantized and kept packed.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    /// Multiplied by the packed kernels (matvec for one token, dequantize-per-panel GEMM for more).
    Packed(Arc<PackedLinear>),
}

/// Up to this many tokens a linear runs one matvec per token; above, one product of all of them
/// (a packed weight's [`PackedLinear::matmul`], a dense weight's GEMM).
pub(crate) const MATVEC_TOKENS: usize = 8;

/// `y = x W^T (+ b)`: the weight is `[out, in]` as stored in the checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>, // (out)
}

impl Linear {
    /// `y = x W^T (+ b)` for `x` (.., in); a packed weight multiplies as `s` says (its
    /// activations' precision, and whether prompts run on integers).
    pub fn forward(&self, x: &Tensor, s: &DecodeSettings) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            // x (t, in) @ W^T (in, out); gemm reads the transposed view directly.
            Weight::Dense(w) => dense_product(x, w)?,
            Weight::Packed(p) => {
                let dims = x.dims().to_vec();
                let (cols, rows) = (p.cols(), p.rows());
                let t = x.elem_count() / cols.max(1);
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let mut y = vec![0f32; t * rows];
                if t <= MATVEC_TOKENS {
                    // A few tokens: one matvec each beats dequantizing the whole matrix.
                    for (x, y) in xv.chunks(cols).zip(y.chunks_mut(rows)) {
                        p.matvec(s.act, x, y);
                    }
                } else {
                    p.matmul(s.prefill_act(), &xv, t, &mut y);
                }
                let mut out = dims[..dims.len() - 1].to_vec();
                out.push(rows);
                Tensor::from_vec(y, out, x.device())?
            }
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
    /// Bytes of weights one token's product reads (f32 dense, or the packed codes + params).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => 4 * w.elem_count(),
            Weight::Packed(p) => p.bytes_read(),
        }
    }
    pub fn out_features(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dims()[0],
            Weight::Packed(p) => p.rows(),
        }
    }
    /// The dense weight, if this linear has one (calibration quantizes dense weights).
    pub fn dense(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Packed(_) => None,
        }
    }
}

/// `x (t, in) @ W^T` for a dense f32 `W` (out, in): for a few tokens, a row-parallel matvec
/// per token ([`crate::kernels::dense_rows`], on the decode team when there is one); up to
/// [`FEW_TOKENS`], [`dense_tokens`]; more, faer's GEMM ([`dense_gemm`]) for a block's linears,
/// candle's for a vocabulary-sized head and anything not contiguous f32 on the CPU.
pub(crate) fn dense_product(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let t = x.elem_count() / cols.max(1);
    let plain = w.is_contiguous() && w.dtype() == DType::F32 && x.dtype() == DType::F32;
    if t == 0 || !plain || x.dims().last() != Some(&cols) || (t > FEW_TOKENS && rows > FAER_MAX_ROWS) {
        return x.matmul(&w.t()?);
    }
    let (ws, wl) = w.storage_and_layout();
    let candle_core::Storage::Cpu(wc) = &*ws else {
        return x.matmul(&w.t()?);
    };
    let w = &wc.as_slice::<f32>()?[wl.start_offset()..][..rows * cols];
    let mut y = vec![0f32; t * rows];
    with_f32(x, |xv| {
        if t > FEW_TOKENS {
            dense_gemm(w, xv, t, &mut y);
        } else if t > MATVEC_TOKENS {
            dense_tokens(w, xv, t, &mut y);
        } else {
            for (x, y) in xv.chunks(cols).zip(y.chunks_mut(rows)) {
                dense_matvec(w, x, y);
            }
        }
    })?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    Tensor::from_vec(y, dims, x.device())
}

/// Weights with more rows than this (a vocabulary-sized head) multiply with candle's GEMM,
/// faster there than faer's, which is the faster on a block's linears.
const FAER_MAX_ROWS: usize = 16384;

/// `y = x W^T` (`x` `[t, cols]`, `y` `[t, rows]`, row-major; `W` `[rows, cols]`) by faer's
/// GEMM on all threads (on the calibration forward's shapes faster than candle's).
fn dense_gemm(w: &[f32], x: &[f32], t: usize, y: &mut [f32]) {
    use faer::{Accum, MatMut, MatRef, Par};
    let (rows, cols) = (y.len() / t, x.len() / t);
    let x = MatRef::from_row_major_slice(x, t, cols);
    let w = MatRef::from_row_major_slice(w, rows, cols);
    let y = MatMut::from_row_major_slice_mut(y, t, rows);
    faer::linalg::matmul::matmul(y, Accum::Replace, x, w.transpose(), 1.0f32, Par::rayon(0));
}

/// Up to this many tokens a dense product runs as [`dense_tokens`]: a GEMM repacks the
/// whole weight on every call, which costs more than the product itself for a short sentence.
pub(crate) const FEW_TOKENS: usize = 256;

/// `y = x W^T` (`x` `[t, cols]`, `y` `[t, rows]`, row-major; `W` `[rows, cols]`) reading each
/// weight row once for all the tokens ([`crate::kernels::dense_rows_tokens`]), runs of rows in
/// parallel, into a row-major `[rows, t]` buffer then transposed into `y`.
fn dense_tokens(w: &[f32], x: &[f32], t: usize, y: &mut [f32]) {
    let (cols, rows) = (x.len() / t, y.len() / t);
    let mut yt = vec![0f32; rows * t];
    adadim_team::for_each_chunk(&mut yt, DENSE_ROWS_PER_TASK * t, &|i, yt| {
        crate::kernels::dense_rows_tokens(&w[i * DENSE_ROWS_PER_TASK * cols..], x, t, yt)
    });
    for (r, yr) in yt.chunks_exact(t).enumerate() {
        for (j, &v) in yr.iter().enumerate() {
            y[j * rows + r] = v;
        }
    }
}

/// Rows of a dense matvec per parallel task.
const DENSE_ROWS_PER_TASK: usize = 64;

/// `y = W x` for a row-major f32 `W` (`y.len()` rows of `x.len()`): runs of rows in parallel
/// ([`crate::kernels::dense_rows`], on the decode team when there is one).
fn dense_matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    adadim_team::for_each_chunk(y, DENSE_ROWS_PER_TASK, &|i, y| {
        crate::kernels::dense_rows(&w[i * DENSE_ROWS_PER_TASK * cols..], x, y)
    });
}

/// `f` on the numbers of `t` in place (a contiguous f32 CPU tensor), or on a copy of them.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        let (s, l) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(c) = &*s {
            return Ok(f(&c.as_slice::<f32>()?[l.start_offset()..][..t.elem_count()]));
        }
    }
    Ok(f(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

impl Linear {
    /// `y = W x (+ b)` for one token, slices in and out: [`Linear::forward`]'s matvec without
    /// the tensors around it (the decode step, [`crate::Model::decode_step`]).
    pub fn matvec_into(&self, x: &[f32], y: &mut [f32], s: &DecodeSettings) -> candle_core::Result<()> {
        match &self.weight {
            Weight::Packed(p) => p.matvec(s.act, x, y),
            Weight::Dense(w) => {
                let cols = x.len();
                if w.dims2()? != (y.len(), cols) {
                    candle_core::bail!("matvec: weight {:?} for {cols} inputs and {} outputs", w.dims(), y.len());
                }
                with_f32(w, |w| dense_matvec(w, x, y))?;
            }
        }
        if let Some(b) = &self.bias {
            with_f32(b, |b| y.iter_mut().zip(b).for_each(|(y, b)| *y += b))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_dense_linear_gives_candles_product_for_every_token_count() {
        let mut rng = adadim_load::synth::Rng::new(11);
        let (rows, cols) = (70, 48);
        let w = Tensor::from_vec(rng.normals(rows * cols, 1.0), (rows, cols), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(rng.normals(rows, 1.0), rows, &Device::Cpu).unwrap();
        let lin = Linear { weight: Weight::Dense(w.clone()), bias: Some(b.clone()) };
        // Matvecs, the few-token path on both sides of its groups, faer's GEMM past it.
        for t in [1, MATVEC_TOKENS, MATVEC_TOKENS + 1, 25, FEW_TOKENS, FEW_TOKENS + 1, 700] {
            let x = Tensor::from_vec(rng.normals(t * cols, 1.0), (t, cols), &Device::Cpu).unwrap();
            let got = lin.forward(&x, &DecodeSettings::DEFAULT).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
            assert_eq!(got.dims(), [t, rows]);
            let diff =
                (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "t {t}: max difference {diff}");
        }
    }
}
