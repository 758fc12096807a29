//! Causal softmax over attention scores, fused with the mask.
//!
//! Scores are `[n, t, t]` (query rows, key columns). Row `i` of each `t x t` block may only see
//! keys `0..=i`: we take the softmax over that prefix and write zeros after it. Fusing the mask
//! saves a `t x t` broadcast add per head and half the `exp`s; rows run in parallel (rayon).
//! [`causal_softmax_ref`] is the plain reference the fast path is tested against.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct CausalSoftmax;

/// Softmax of one row over its first `len` entries; zeros after.
#[inline]
fn softmax_prefix(src: &[f32], dst: &mut [f32], len: usize) {
    let max = src[..len].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (d, s) in dst[..len].iter_mut().zip(&src[..len]) {
        *d = (*s - max).exp();
        sum += *d;
    }
    let inv = 1.0 / sum;
    dst[..len].iter_mut().for_each(|d| *d *= inv);
    dst[len..].iter_mut().for_each(|d| *d = 0.0);
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = storage else { candle_core::bail!("causal_softmax: f32 only") };
        let Some((o1, o2)) = layout.contiguous_offsets() else { candle_core::bail!("causal_softmax: input must be contiguous") };
        let src = &src[o1..o2];
        let dims = layout.shape().dims();
        let (t_q, t_k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        // Queries are the last t_q positions of t_k keys (t_q < t_k once a KV cache is used).
        let offset = t_k - t_q;
        let mut dst = vec![0f32; src.len()];
        src.par_chunks(t_k).zip(dst.par_chunks_mut(t_k)).enumerate().for_each(|(r, (s, d))| {
            softmax_prefix(s, d, offset + r % t_q + 1)
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Fused causal softmax over the last dim of `[.., t_q, t_k]` (t_q <= t_k) f32 scores.
pub fn causal_softmax(scores: &Tensor) -> Result<Tensor> {
    let dims = scores.dims();
    if dims.len() < 2 || dims[dims.len() - 2] > dims[dims.len() - 1] {
        candle_core::bail!("causal_softmax: expected [.., t_q, t_k] with t_q <= t_k, got {dims:?}")
    }
    scores.contiguous()?.apply_op1_no_bwd(&CausalSoftmax)
}

/// Reference: add a -inf mask above the diagonal, then candle's softmax.
pub fn causal_softmax_ref(scores: &Tensor) -> Result<Tensor> {
    let dims = scores.dims();
    let (t_q, t_k) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let offset = t_k - t_q;
    let mask: Vec<f32> = (0..t_q)
        .flat_map(|i| (0..t_k).map(move |j| if j <= offset + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (t_q, t_k), scores.device())?;
    candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_reference() {
        for (n, tq, tk) in [(3, 17, 17), (2, 1, 9), (4, 5, 12), (1, 64, 64)] {
            let x = Tensor::randn(0f32, 3.0, (n, tq, tk), &Device::Cpu).unwrap();
            let a = causal_softmax(&x).unwrap();
            let b = causal_softmax_ref(&x).unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "shape ({n},{tq},{tk}): max diff {diff}");
        }
    }
}
