//! One decode step of several sequences at once: each sequence's next token at its own
//! position, attending over its own KV cache, the linears multiplying all the tokens together
//! ([`PackedLinear::matvec_batch`](adadim_pack::PackedLinear::matvec_batch): each run of rows'
//! codes read from memory once for the whole batch). What a server decoding for several
//! clients runs; each sequence's logits are exactly (bit for bit) what the same step gives it
//! alone, whatever else is in the batch.

use crate::error::{Ctx, ModelError, Result};
use crate::kernels::silu_mul;
use crate::linear::{with_f32, Linear, Weight};
use crate::llama::{rms_norm_into, Block, KvCache, LayerKv, Model, Rope};
use crate::settings::DecodeSettings;
use candle_core::{Device, Tensor};

/// The buffers of a batched step ([`Model::decode_batch`]), `tokens x width` each, kept from
/// step to step.
#[derive(Debug, Default)]
pub struct BatchScratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    y: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    logits: Vec<f32>,
}

impl Linear {
    /// `y[i] = W x[i] (+ b)` for `t` tokens (`x` `[t, in]`, `y` `[t, out]`), each token's numbers
    /// independent of the others: packed weights through the batched matvec, dense ones a
    /// matvec per token.
    pub fn matvec_batch_into(&self, x: &[f32], t: usize, y: &mut [f32], s: &DecodeSettings) -> candle_core::Result<()> {
        match &self.weight {
            Weight::Packed(p) => {
                if x.len() != t * p.cols() || y.len() != t * p.rows() {
                    candle_core::bail!(
                        "batched matvec: {} x {} weight for {t} tokens of {}",
                        p.rows(),
                        p.cols(),
                        x.len()
                    );
                }
                p.matvec_batch(s.act, x, t, y);
                if let Some(b) = &self.bias {
                    with_f32(b, |b| {
                        y.chunks_exact_mut(b.len()).for_each(|y| y.iter_mut().zip(b).for_each(|(y, b)| *y += b))
                    })?;
                }
                Ok(())
            }
            Weight::Dense(_) => {
                let (cols, rows) = (x.len() / t.max(1), y.len() / t.max(1));
                for (x, y) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                    self.matvec_into(x, y, s)?;
                }
                Ok(())
            }
        }
    }
}

impl Block {
    /// [`Block::decode_step`] for `t` tokens: `x` (`t x d`) the residual streams, updated in
    /// place; token `i` at position `pos[i]` of its own layer cache `caches[i]`.
    fn decode_batch(
        &self,
        x: &mut [f32],
        rope: &Rope,
        pos: &[usize],
        caches: &mut [&mut Option<LayerKv>],
        set: &DecodeSettings,
        s: &mut BatchScratch,
    ) -> candle_core::Result<()> {
        let t = pos.len();
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let (d, f) = (x.len() / t, self.gate.out_features());
        for (b, n) in [
            (&mut s.h, d),
            (&mut s.y, d),
            (&mut s.q, nh * hd),
            (&mut s.att, nh * hd),
            (&mut s.k, nkv * hd),
            (&mut s.v, nkv * hd),
            (&mut s.g, f),
            (&mut s.u, f),
            (&mut s.a, f),
        ] {
            b.resize(t * n, 0.0);
        }
        let norm = |x: &[f32], w: &Tensor, out: &mut [f32]| -> candle_core::Result<()> {
            x.chunks_exact(d).zip(out.chunks_exact_mut(d)).try_for_each(|(x, o)| rms_norm_into(x, w, self.eps, o))
        };
        norm(x, &self.attn_norm, &mut s.h)?;
        self.q.matvec_batch_into(&s.h, t, &mut s.q, set)?;
        self.k.matvec_batch_into(&s.h, t, &mut s.k, set)?;
        self.v.matvec_batch_into(&s.h, t, &mut s.v, set)?;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        for i in 0..t {
            let (q, k) = (&mut s.q[i * nh * hd..(i + 1) * nh * hd], &mut s.k[i * nkv * hd..(i + 1) * nkv * hd]);
            rope.rotate(q, hd, pos[i])?;
            rope.rotate(k, hd, pos[i])?;
            q.iter_mut().for_each(|q| *q *= scale);
            let k = Tensor::from_slice(k, (nkv, 1, hd), &Device::Cpu)?;
            let v = Tensor::from_slice(&s.v[i * nkv * hd..(i + 1) * nkv * hd], (nkv, 1, hd), &Device::Cpu)?;
            LayerKv::append(caches[i], &k, &v, pos[i], set.kv)?.attend_into(
                q,
                pos[i] + 1,
                nh,
                &mut s.att[i * nh * hd..(i + 1) * nh * hd],
            )?;
        }
        self.o.matvec_batch_into(&s.att, t, &mut s.y, set)?;
        x.iter_mut().zip(&s.y).for_each(|(x, y)| *x += y);
        norm(x, &self.mlp_norm, &mut s.h)?;
        self.gate.matvec_batch_into(&s.h, t, &mut s.g, set)?;
        self.up.matvec_batch_into(&s.h, t, &mut s.u, set)?;
        silu_mul(&s.g, &s.u, &mut s.a);
        self.down.matvec_batch_into(&s.a, t, &mut s.y, set)?;
        x.iter_mut().zip(&s.y).for_each(|(x, y)| *x += y);
        Ok(())
    }
}

impl Model {
    /// Token `ids[i]` of sequence `i` through the model at the next position of `caches[i]`
    /// (which grows by it): the logits, `ids.len() x vocab` in `s`. Sequence `i`'s logits are
    /// [`Model::decode_step`]'s for it alone, bit for bit. On an error no cache has grown.
    pub fn decode_batch<'s>(
        &self,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        s: &'s mut BatchScratch,
    ) -> Result<&'s [f32]> {
        let (t, vocab, d) = (ids.len(), self.config.vocab_size, self.config.hidden_size);
        if caches.len() != t {
            return Err(ModelError::Tensor {
                context: format!("batched decode of {t} tokens"),
                source: candle_core::Error::Msg(format!("{} caches", caches.len())),
            });
        }
        self.check_tokens(ids)?;
        let pos: Vec<usize> = caches.iter().map(|c| c.len).collect();
        for &p in &pos {
            self.check_positions(p + 1)?;
        }
        if let Some(c) = caches.iter().find(|c| c.kv != caches[0].kv) {
            return Err(ModelError::Tensor {
                context: "batched decode".into(),
                source: candle_core::Error::Msg(format!("caches of {:?} and {:?} numbers", caches[0].kv, c.kv)),
            });
        }
        let set = DecodeSettings { kv: caches.first().map_or(self.settings.kv, |c| c.kv), ..self.settings };
        let mut x = std::mem::take(&mut s.x);
        x.resize(t * d, 0.0);
        for (&id, x) in ids.iter().zip(x.chunks_exact_mut(d)) {
            let row = self.embed.narrow(0, id as usize, 1).ctx(|| "embedding".into())?;
            with_f32(&row, |e| x.copy_from_slice(&e[..d])).ctx(|| "embedding".into())?;
        }
        for c in caches.iter_mut() {
            c.layers.resize_with(self.blocks.len(), || None);
        }
        let stepped = self.blocks.iter().enumerate().try_for_each(|(l, b)| {
            let mut layer: Vec<&mut Option<LayerKv>> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            b.decode_batch(&mut x, &self.rope, &pos, &mut layer, &set, s)
                .ctx(|| format!("layer {}: batched decode step", b.layer))
        });
        s.x = x;
        stepped?;
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let mut h = std::mem::take(&mut s.h);
        h.resize(t * d, 0.0);
        let eps = self.config.rms_norm_eps as f32;
        let head =
            s.x.chunks_exact(d)
                .zip(h.chunks_exact_mut(d))
                .try_for_each(|(x, h)| rms_norm_into(x, &self.norm, eps, h))
                .and_then(|()| {
                    s.logits.resize(t * vocab, 0.0);
                    let weight = match &self.decode_head {
                        Some(p) => Weight::Packed(p.clone()),
                        None => Weight::Dense(self.lm_head.as_ref().unwrap_or(&self.embed).clone()),
                    };
                    Linear { weight, bias: None }.matvec_batch_into(&h, t, &mut s.logits, &self.settings)
                });
        s.h = h;
        head.ctx(|| "lm head".into())?;
        Ok(&s.logits)
    }
}
