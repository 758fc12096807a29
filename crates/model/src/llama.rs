//! The LLaMA-family decoder (LLaMA, Mistral, Qwen2), f32 on the CPU with candle.
//!
//! The forward pass is written as independent decoder blocks, each mapping hidden states
//! `[t, d]` to `[t, d]`, so a caller can run the whole model ([`Model::forward_hidden`]) or one
//! block at a time on captured inputs (what layer-by-layer quantization needs). Every forward
//! takes the [`DecodeSettings`] it multiplies with; [`Model`] holds one and passes it down.
//! Shapes below: `t` tokens, `d` hidden size, `h`/`kvh` query/KV heads, `hd` head dim, `f` MLP size.

use crate::attention::causal_attention;
use crate::error::{Ctx, ModelError, Result};
use crate::kernels::silu_mul;
use crate::linear::{dense_product, with_f32, Linear, Weight, MATVEC_TOKENS};
use crate::settings::{DecodeSettings, KvType};
use crate::source::WeightSource;
use adadim_load::LlamaConfig;
use adadim_pack::PackedLinear;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// `out = x / sqrt(mean(x^2) + eps) * w`, as candle's `rms_norm` computes it.
pub(crate) fn rms_norm_into(x: &[f32], w: &Tensor, eps: f32, out: &mut [f32]) -> candle_core::Result<()> {
    let sum2 = x.iter().map(|v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    with_f32(w, |w| {
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            *o = v / m * w;
        }
    })
}

/// What a forward-pass tap asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// The seven linears of a decoder block, in the order true-sequential quantization visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearKind {
    pub const ALL: [LinearKind; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];
    /// The module path inside a block, as in the checkpoint (`self_attn.q_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }
    /// Short name used on the command line and in reports (`q`, `down`, ...).
    pub fn short(self) -> &'static str {
        match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
            Self::O => "o",
            Self::Gate => "gate",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
    /// The kind whose [`LinearKind::short`] name is `name`.
    pub fn from_short(name: &str) -> Option<LinearKind> {
        Self::ALL.into_iter().find(|k| k.short() == name)
    }
    /// The kind whose [`LinearKind::module`] path is `module`.
    pub fn from_module(module: &str) -> Option<LinearKind> {
        Self::ALL.into_iter().find(|k| k.module() == module)
    }
}

// ---------------------------------------------------------------- rotary embedding

/// cos/sin tables for RoPE in the "rotate half" (NeoX / Hugging Face) layout.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor, // (max_t, hd/2)
    sin: Tensor, // (max_t, hd/2)
}

impl Rope {
    pub fn new(cfg: &LlamaConfig, max_t: usize) -> candle_core::Result<Self> {
        let hd = cfg.head_dim();
        // Angles in f64, then rounded: positions up to max_t stay accurate to f32 precision.
        let inv: Vec<f64> = (0..hd / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        let mut cos = Vec::with_capacity(max_t * hd / 2);
        let mut sin = Vec::with_capacity(max_t * hd / 2);
        for p in 0..max_t {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (max_t, hd / 2), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_t, hd / 2), &Device::Cpu)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate the heads of one position `pos` in place (`x`: heads of `hd`, one after another),
    /// as [`Rope::apply`]: the halves of each head turned by the position's angles.
    pub(crate) fn rotate(&self, x: &mut [f32], hd: usize, pos: usize) -> candle_core::Result<()> {
        let half = hd / 2;
        let (cos, sin) = (self.cos.narrow(0, pos, 1)?, self.sin.narrow(0, pos, 1)?);
        with_f32(&cos, |cos| {
            with_f32(&sin, |sin| {
                for h in x.chunks_exact_mut(hd) {
                    let (a, b) = h.split_at_mut(half);
                    for (((a, b), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                        (*a, *b) = (*a * c - *b * s, *a * s + *b * c);
                    }
                }
            })
        })?
    }

    /// Rotate `x` (1, heads, t, hd) holding positions `pos0..pos0+t`.
    fn apply(&self, x: &Tensor, pos0: usize) -> candle_core::Result<Tensor> {
        let t = x.dims()[2];
        let cos = self.cos.narrow(0, pos0, t)?;
        let sin = self.sin.narrow(0, pos0, t)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

// ---------------------------------------------------------------- decoder block

#[derive(Debug, Clone)]
pub struct Block {
    pub layer: usize,
    pub attn_norm: Tensor, // (d)
    pub q: Linear,         // (h*hd, d)
    pub k: Linear,         // (kvh*hd, d)
    pub v: Linear,         // (kvh*hd, d)
    pub o: Linear,         // (d, h*hd)
    pub mlp_norm: Tensor,  // (d)
    pub gate: Linear,      // (f, d)
    pub up: Linear,        // (f, d)
    pub down: Linear,      // (d, f)
    pub(crate) n_head: usize,
    pub(crate) n_kv_head: usize,
    pub(crate) head_dim: usize,
    pub(crate) eps: f32,
}

impl Block {
    /// Read block `layer` from `src` (nothing else of the model is touched).
    pub fn load(src: &dyn WeightSource, layer: usize) -> Result<Self> {
        let cfg = src.config();
        let p = format!("model.layers.{layer}");
        let lin = |kind: LinearKind| -> Result<Linear> {
            let name = format!("{p}.{}", kind.module());
            let bias_name = format!("{name}.bias");
            let bias = if cfg.has_qkv_bias() && matches!(kind, LinearKind::Q | LinearKind::K | LinearKind::V) {
                Some(src.tensor(&bias_name)?)
            } else {
                None
            };
            Ok(Linear { weight: src.linear(&name)?, bias })
        };
        Ok(Block {
            layer,
            attn_norm: src.tensor(&format!("{p}.input_layernorm.weight"))?,
            q: lin(LinearKind::Q)?,
            k: lin(LinearKind::K)?,
            v: lin(LinearKind::V)?,
            o: lin(LinearKind::O)?,
            mlp_norm: src.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
            gate: lin(LinearKind::Gate)?,
            up: lin(LinearKind::Up)?,
            down: lin(LinearKind::Down)?,
            n_head: cfg.num_attention_heads,
            n_kv_head: cfg.n_kv_heads(),
            head_dim: cfg.head_dim(),
            eps: cfg.rms_norm_eps as f32,
        })
    }

    pub fn linear(&self, kind: LinearKind) -> &Linear {
        match kind {
            LinearKind::Q => &self.q,
            LinearKind::K => &self.k,
            LinearKind::V => &self.v,
            LinearKind::O => &self.o,
            LinearKind::Gate => &self.gate,
            LinearKind::Up => &self.up,
            LinearKind::Down => &self.down,
        }
    }

    pub fn linear_mut(&mut self, kind: LinearKind) -> &mut Linear {
        match kind {
            LinearKind::Q => &mut self.q,
            LinearKind::K => &mut self.k,
            LinearKind::V => &mut self.v,
            LinearKind::O => &mut self.o,
            LinearKind::Gate => &mut self.gate,
            LinearKind::Up => &mut self.up,
            LinearKind::Down => &mut self.down,
        }
    }

    /// `x` (t, d) at positions `0..t` -> (t, d), the linears multiplying as `s` says.
    pub fn forward(&self, x: &Tensor, rope: &Rope, s: &DecodeSettings) -> Result<Tensor> {
        Ok(self.forward_tapped(x, rope, s, &mut |_, _| Ok(Flow::Continue))?.expect("never stopped"))
    }

    /// As [`Block::forward`], calling `tap(kind, input)` with the input of every linear
    /// (q/k/v share one input; it is reported once, as `Q`; gate/up likewise, as `Gate`).
    /// A tap returning [`Flow::Stop`] ends the pass early (`Ok(None)`): calibration that only
    /// needs one linear's input skips the rest of the block.
    pub fn forward_tapped(
        &self,
        x: &Tensor,
        rope: &Rope,
        s: &DecodeSettings,
        tap: &mut dyn FnMut(LinearKind, &Tensor) -> Result<Flow>,
    ) -> Result<Option<Tensor>> {
        macro_rules! tap {
            ($kind:expr, $t:expr) => {
                if tap($kind, $t)? == Flow::Stop {
                    return Ok(None);
                }
            };
        }
        let h = self.attn_input(x)?;
        tap!(LinearKind::Q, &h);
        let attn = self.attention(&h, rope, s).ctx(|| format!("layer {}: attention", self.layer))?;
        tap!(LinearKind::O, &attn);
        let x = self.attn_residual(x, &attn, s)?;
        let h = self.mlp_input(&x)?;
        tap!(LinearKind::Gate, &h);
        let act = self.mlp_hidden(&h, s).ctx(|| format!("layer {}: mlp", self.layer))?;
        tap!(LinearKind::Down, &act);
        Ok(Some(self.mlp_residual(&x, &act, s)?))
    }

    // The pieces of the forward pass, in order; layer-by-layer calibration runs them one stage
    // at a time (each linear's input once, no re-run of the block from its start).

    /// The input of q/k/v: `rms_norm(x)`, (t, d) -> (t, d).
    pub fn attn_input(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.attn_norm, self.eps).ctx(|| format!("layer {}: attention norm", self.layer))
    }

    /// `x + o(attn)`: the residual stream after attention, (t, d).
    pub fn attn_residual(&self, x: &Tensor, attn: &Tensor, s: &DecodeSettings) -> Result<Tensor> {
        let l = self.layer;
        (x + self.o.forward(attn, s).ctx(|| format!("layer {l}: o_proj"))?).ctx(|| format!("layer {l}: residual"))
    }

    /// The input of gate/up: `rms_norm(x)` of the residual stream after attention.
    pub fn mlp_input(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.mlp_norm, self.eps).ctx(|| format!("layer {}: mlp norm", self.layer))
    }

    /// `x + down(act)`: the block's output, (t, d).
    pub fn mlp_residual(&self, x: &Tensor, act: &Tensor, s: &DecodeSettings) -> Result<Tensor> {
        let l = self.layer;
        (x + self.down.forward(act, s).ctx(|| format!("layer {l}: down_proj"))?).ctx(|| format!("layer {l}: residual"))
    }

    /// `silu(gate(h)) * up(h)`: (t, d) -> (t, f).
    pub fn mlp_hidden(&self, h: &Tensor, s: &DecodeSettings) -> candle_core::Result<Tensor> {
        let g = self.gate.forward(h, s)?;
        let u = self.up.forward(h, s)?;
        let shape = g.shape().clone();
        let (g, u) = (g.flatten_all()?.to_vec1::<f32>()?, u.flatten_all()?.to_vec1::<f32>()?);
        let mut out = vec![0f32; g.len()];
        // Rows in parallel; silu_mul vectorizes each.
        let cols = shape.dims()[shape.rank() - 1];
        use rayon::prelude::*;
        out.par_chunks_mut(cols * 64)
            .zip(g.par_chunks(cols * 64))
            .zip(u.par_chunks(cols * 64))
            .for_each(|((o, g), u)| silu_mul(g, u, o));
        Tensor::from_vec(out, shape, h.device())
    }

    /// [`Block::forward_cached`] for one token at position `pos`, on slices: `x` (d) is the
    /// residual stream, updated in place; `s` holds the step's buffers, reused from token to
    /// token. The same operations in the same order as the tensor path (the same numbers, bit
    /// for bit, tested), without a tensor and its allocation per operation: on SmolLM2 candle's
    /// operations and the allocator were about 7% of a decode profile's samples, all on the
    /// decode thread while the other one waited. `set` says how the linears multiply and what
    /// the cache stores.
    pub fn decode_step(
        &self,
        x: &mut [f32],
        rope: &Rope,
        pos: usize,
        cache: &mut Option<LayerKv>,
        set: &DecodeSettings,
        s: &mut DecodeScratch,
    ) -> Result<()> {
        self.decode_step_inner(x, rope, pos, cache, set, s).ctx(|| format!("layer {}: decode step", self.layer))
    }

    fn decode_step_inner(
        &self,
        x: &mut [f32],
        rope: &Rope,
        pos: usize,
        cache: &mut Option<LayerKv>,
        set: &DecodeSettings,
        s: &mut DecodeScratch,
    ) -> candle_core::Result<()> {
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let f = self.gate.out_features();
        s.size(x.len(), nh * hd, nkv * hd, f);
        rms_norm_into(x, &self.attn_norm, self.eps, &mut s.h)?;
        self.q.matvec_into(&s.h, &mut s.q, set)?;
        self.k.matvec_into(&s.h, &mut s.k, set)?;
        self.v.matvec_into(&s.h, &mut s.v, set)?;
        rope.rotate(&mut s.q, hd, pos)?;
        rope.rotate(&mut s.k, hd, pos)?;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        s.q.iter_mut().for_each(|q| *q *= scale);
        let k = Tensor::from_slice(&s.k, (nkv, 1, hd), &Device::Cpu)?;
        let v = Tensor::from_slice(&s.v, (nkv, 1, hd), &Device::Cpu)?;
        LayerKv::append(cache, &k, &v, pos, set.kv)?.attend_into(&s.q, pos + 1, nh, &mut s.att)?;
        self.o.matvec_into(&s.att, &mut s.y, set)?;
        x.iter_mut().zip(&s.y).for_each(|(x, y)| *x += y);
        rms_norm_into(x, &self.mlp_norm, self.eps, &mut s.h)?;
        self.gate.matvec_into(&s.h, &mut s.g, set)?;
        self.up.matvec_into(&s.h, &mut s.u, set)?;
        silu_mul(&s.g, &s.u, &mut s.a);
        self.down.matvec_into(&s.a, &mut s.y, set)?;
        x.iter_mut().zip(&s.y).for_each(|(x, y)| *x += y);
        Ok(())
    }

    /// As [`Block::forward`] for `x` (t, d) at positions `pos0..pos0 + t`, attending to the
    /// keys and values of the earlier positions held in `cache` (of `s.kv` numbers) and
    /// appending its own.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos0: usize,
        cache: &mut Option<LayerKv>,
        s: &DecodeSettings,
    ) -> Result<Tensor> {
        let attn = self
            .attention_cached(&self.attn_input(x)?, rope, pos0, cache, s)
            .ctx(|| format!("layer {}: attention", self.layer))?;
        let x = self.attn_residual(x, &attn, s)?;
        let act = self.mlp_hidden(&self.mlp_input(&x)?, s).ctx(|| format!("layer {}: mlp", self.layer))?;
        self.mlp_residual(&x, &act, s)
    }

    /// Attention of `t` new positions over the cached ones and themselves, (t, d) -> (t, h*hd).
    fn attention_cached(
        &self,
        h: &Tensor,
        rope: &Rope,
        pos0: usize,
        cache: &mut Option<LayerKv>,
        s: &DecodeSettings,
    ) -> candle_core::Result<Tensor> {
        let t = h.dims()[0];
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let heads = |x: Tensor, n: usize| x.reshape((1, t, n, hd))?.transpose(1, 2); // (1, n, t, hd)
        let q = rope.apply(&heads(self.q.forward(h, s)?, nh)?, pos0)?;
        let k = rope.apply(&heads(self.k.forward(h, s)?, nkv)?, pos0)?.reshape((nkv, t, hd))?;
        let v = heads(self.v.forward(h, s)?, nkv)?.contiguous()?.reshape((nkv, t, hd))?;
        let c = LayerKv::append(cache, &k, &v, pos0, s.kv)?;
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((nh, t, hd))?;
        if t == 1 {
            return c.attend(&q.flatten_all()?.to_vec1::<f32>()?, pos0 + 1, nh, h.device());
        }
        if pos0 == 0 {
            // The prompt's own keys and values, at full precision whatever the cache holds.
            return causal_attention(&q, &k, &v);
        }
        let (k, v) = c.f32_view(pos0 + t)?;
        // Query heads kv*g..kv*g+g share KV head kv: stack them, one score GEMM per KV head.
        let (group, total) = (nh / nkv, pos0 + t);
        let s = q.reshape((nkv, group * t, hd))?.matmul(&k.t()?)?; // (nkv, group*t, total)
        let s = if t > 1 {
            // Row r is position pos0 + r % t: it sees keys 0..=pos0 + r % t.
            let mask: Vec<f32> = (0..group * t)
                .flat_map(|r| (0..total).map(move |j| if j <= pos0 + r % t { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            s.broadcast_add(&Tensor::from_vec(mask, (group * t, total), h.device())?)?
        } else {
            s
        };
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        p.matmul(&v)?.reshape((nh, t, hd))?.transpose(0, 1)?.reshape((t, nh * hd))
    }

    /// Causal self-attention on normed input `h` (t, d) -> context (t, h*hd), before o_proj.
    pub fn attention(&self, h: &Tensor, rope: &Rope, s: &DecodeSettings) -> candle_core::Result<Tensor> {
        let t = h.dims()[0];
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let heads = |x: Tensor, n: usize| x.reshape((1, t, n, hd))?.transpose(1, 2); // (1, n, t, hd)
        let q = rope.apply(&heads(self.q.forward(h, s)?, nh)?, 0)?;
        let k = rope.apply(&heads(self.k.forward(h, s)?, nkv)?, 0)?;
        let v = heads(self.v.forward(h, s)?, nkv)?.contiguous()?;
        // Query heads kv*g..kv*g+g share KV head kv: fold them into the rows, no K/V copies.
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((nh, t, hd))?;
        causal_attention(&q, &k.reshape((nkv, t, hd))?, &v.reshape((nkv, t, hd))?)
    }
}

// ---------------------------------------------------------------- whole model

/// One layer's keys (after RoPE) and values, `(kv heads, capacity, head dim)` each, written in
/// place: positions `0..len` of the cache hold data, the rest is room to grow into.
///
/// Why not `Tensor::cat` per token: that copies every earlier position on every step, O(T^2)
/// over a generation (5% of decoding at 400 tokens, growing with length).
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims()[1]
    }

    /// Writes `k`, `v` (nkv, t, hd) at positions `pos0..pos0 + t`, as `kv` numbers (reallocating
    /// with twice the room when full, the earlier positions copied once) and returns the cache.
    pub(crate) fn append<'a>(
        slot: &'a mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        kv: KvType,
    ) -> candle_core::Result<&'a LayerKv> {
        let (nkv, t, hd) = k.dims3()?;
        let need = pos0 + t;
        let have = slot.as_ref().map_or(0, LayerKv::capacity);
        if have < need {
            let cap = need.max(2 * have).max(MIN_KV_CAPACITY);
            let grown = LayerKv {
                k: Tensor::zeros((nkv, cap, hd), kv.dtype(), k.device())?,
                v: Tensor::zeros((nkv, cap, hd), kv.dtype(), v.device())?,
            };
            if let Some(old) = slot.take().filter(|_| pos0 > 0) {
                grown.k.slice_set(&old.k.narrow(1, 0, pos0)?.contiguous()?, 1, 0)?;
                grown.v.slice_set(&old.v.narrow(1, 0, pos0)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(grown);
        }
        let Some(c) = slot.as_ref() else { unreachable!("filled above") };
        c.k.slice_set(&k.to_dtype(kv.dtype())?.contiguous()?, 1, pos0)?;
        c.v.slice_set(&v.to_dtype(kv.dtype())?.contiguous()?, 1, pos0)?;
        Ok(c)
    }

    /// Keys and values of positions `0..n` as f32 tensors (a view of an f32 cache, a widened
    /// copy of an f16 one): for prefill chunks after the first, which attend with GEMMs.
    fn f32_view(&self, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let view = |t: &Tensor| t.narrow(1, 0, n)?.to_dtype(DType::F32);
        Ok((view(&self.k)?, view(&self.v)?))
    }

    /// One new position's attention (`q`: its `nh` heads, rotated and scaled) over positions
    /// `0..n` of the cache -> context (1, nh*hd). Tasks (on the decode team when there is one)
    /// of one key/value head and one run of positions each, [`crate::kernels::attend_run`]
    /// for all the query heads that share it, then [`crate::kernels::merge_parts`] per
    /// key/value head. Runs of at least [`MIN_ATTENTION_RUN`] positions, up to
    /// [`ATTENTION_RUNS`] of them: SmolLM2 (3 key/value heads) gives 6 tasks at 128 positions,
    /// even for two threads.
    fn attend(&self, q: &[f32], n: usize, nh: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mut out = vec![0f32; q.len()];
        self.attend_into(q, n, nh, &mut out)?;
        Tensor::from_vec(out, (1, q.len()), device)
    }

    /// [`LayerKv::attend`] into `out` (`q.len()` floats).
    pub(crate) fn attend_into(&self, q: &[f32], n: usize, nh: usize, out: &mut [f32]) -> candle_core::Result<()> {
        let (nkv, cap, hd) = self.k.dims3()?;
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*ks, &*vs) else {
            candle_core::bail!("decode attention: the kv cache is not in CPU memory")
        };
        use crate::kernels::KvRows;
        fn rows(c: &candle_core::CpuStorage, start: usize) -> candle_core::Result<KvRows<'_>> {
            Ok(match c {
                candle_core::CpuStorage::F16(x) => KvRows::F16(&x[start..]),
                _ => KvRows::F32(&c.as_slice::<f32>()?[start..]),
            })
        }
        let (k, v) = (rows(kc, kl.start_offset())?, rows(vc, vl.start_offset())?);
        if q.len() != nh * hd
            || out.len() != q.len()
            || nkv == 0
            || !nh.is_multiple_of(nkv)
            || n == 0
            || n > cap
            || k.len() < nkv * cap * hd
            || v.len() < nkv * cap * hd
        {
            candle_core::bail!(
                "decode attention: q {} for {nh} heads of {hd}, cache ({nkv}, {cap}, {hd}) at {n}",
                q.len()
            )
        }
        let group = nh / nkv;
        let run = MIN_ATTENTION_RUN.max(n.div_ceil(ATTENTION_RUNS));
        let runs = n.div_ceil(run);
        let width = crate::kernels::part_len(group, hd);
        let mut parts = vec![0f32; nkv * runs * width];
        adadim_team::for_each_chunk(&mut parts, width, &|t, part| {
            let (kh, r) = (t / runs, t % runs);
            let head = kh * cap * hd..(kh * cap + n) * hd;
            crate::kernels::attend_run(
                &q[kh * group * hd..(kh + 1) * group * hd],
                k.slice(head.clone()),
                v.slice(head),
                hd,
                run,
                r,
                part,
            );
        });
        for (kh, o) in out.chunks_exact_mut(group * hd).enumerate() {
            crate::kernels::merge_parts(&parts[kh * runs * width..(kh + 1) * runs * width], group, hd, o);
        }
        Ok(())
    }

    /// A copy of positions `0..len` in storage of its own.
    fn fork(&self, len: usize) -> candle_core::Result<LayerKv> {
        let own = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = t.narrow(1, 0, len)?;
            // `contiguous` copies a strided view but returns the same storage for a whole one.
            if t.is_contiguous() {
                t.copy()
            } else {
                t.contiguous()
            }
        };
        Ok(LayerKv { k: own(&self.k)?, v: own(&self.v)? })
    }
}

/// Fewest positions in one decode attention task ([`LayerKv::attend`]).
const MIN_ATTENTION_RUN: usize = 64;
/// Most runs of positions per key/value head in decode attention: enough to share a long
/// context evenly on a few threads; each run costs a rescale of its heads in the merge.
const ATTENTION_RUNS: usize = 8;

/// Positions a layer's cache holds at first.
const MIN_KV_CAPACITY: usize = 16;

/// Keys (after RoPE) and values of every position processed so far, per layer ([`LayerKv`]).
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    pub(crate) len: usize,
    pub(crate) kv: KvType,
}

impl KvCache {
    /// An empty cache that will hold `kv` numbers.
    pub fn new(kv: KvType) -> KvCache {
        KvCache { kv, ..KvCache::default() }
    }

    /// Bytes of keys and values of the positions held (its allocation may have room for more).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| 2 * l.k.dims()[0] * self.len * l.k.dims()[2] * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keep only the first `len` positions (no-op when it holds fewer): a cache built over a
    /// shared prefix serves every prompt that starts with those tokens. The later positions
    /// are overwritten by the next tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A cache of its own holding this one's first `keep` positions (at most all of them): to
    /// continue a shared prefix without touching it.
    pub fn fork(&self, keep: usize) -> Result<KvCache> {
        let len = self.len.min(keep);
        if len == 0 {
            return Ok(KvCache::default());
        }
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|l| l.fork(len)).transpose())
            .collect::<candle_core::Result<_>>()
            .ctx(|| "copying the kv cache".into())?;
        Ok(KvCache { layers, len, kv: self.kv })
    }
}

/// The buffers of one decode step ([`Model::decode_step`]), kept from token to token.
#[derive(Debug, Default)]
pub struct DecodeScratch {
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

impl DecodeScratch {
    /// Buffers for a block of width `d`, `q` query and `kv` key/value numbers, `f` hidden.
    fn size(&mut self, d: usize, q: usize, kv: usize, f: usize) {
        for (b, n) in [
            (&mut self.h, d),
            (&mut self.y, d),
            (&mut self.q, q),
            (&mut self.att, q),
            (&mut self.k, kv),
            (&mut self.v, kv),
            (&mut self.g, f),
            (&mut self.u, f),
            (&mut self.a, f),
        ] {
            b.resize(n, 0.0);
        }
    }
}

#[derive(Debug)]
pub struct Model {
    pub config: LlamaConfig,
    pub embed: Tensor, // (vocab, d)
    pub blocks: Vec<Block>,
    pub norm: Tensor,            // (d)
    pub lm_head: Option<Tensor>, // (vocab, d); None when tied to `embed`
    pub rope: Rope,
    /// The LM head quantized for decoding ([`Model::quantize_decode_head`]): used for up to
    /// [`MATVEC_TOKENS`] positions at a time; evaluation keeps the float head.
    pub decode_head: Option<Arc<PackedLinear>>,
    /// How the forward passes multiply and cache, passed down to every block and linear.
    pub(crate) settings: DecodeSettings,
}

impl Model {
    /// How the forward passes multiply and cache ([`DecodeSettings`]).
    pub fn settings(&self) -> DecodeSettings {
        self.settings
    }

    /// Sets how the forward passes multiply and cache; quantizes the decode head to
    /// `s.head_bits` (or drops it for 0) where that differs from the head held.
    pub fn set_settings(&mut self, s: DecodeSettings) -> Result<()> {
        if s.head_bits != self.settings.head_bits {
            match s.head_bits {
                0 => self.decode_head = None,
                bits => self.quantize_decode_head(bits)?,
            }
        }
        self.settings = s;
        Ok(())
    }

    /// An empty KV cache of the settings' number type ([`DecodeSettings::kv`]).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.settings.kv)
    }

    /// An empty KV cache with room for `positions` positions allocated now (a server reserves
    /// its slots' memory up front): it grows only past them.
    pub fn reserved_cache(&self, positions: usize) -> Result<KvCache> {
        let (nkv, hd) = (self.config.n_kv_heads(), self.config.head_dim());
        let kv = self.settings.kv;
        let layer = || -> candle_core::Result<Option<LayerKv>> {
            Ok(Some(LayerKv {
                k: Tensor::zeros((nkv, positions, hd), kv.dtype(), &Device::Cpu)?,
                v: Tensor::zeros((nkv, positions, hd), kv.dtype(), &Device::Cpu)?,
            }))
        };
        let layers = (0..self.blocks.len()).map(|_| layer()).collect::<candle_core::Result<_>>();
        Ok(KvCache { layers: layers.ctx(|| format!("reserving a kv cache of {positions} positions"))?, len: 0, kv })
    }

    /// Load every block (dense or packed). `max_t` bounds the positions the RoPE tables cover.
    pub fn load(src: &dyn WeightSource, max_t: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let mut model = Self::load_shell(src, max_t)?;
        let n = model.config.num_hidden_layers;
        for i in 0..n {
            model.blocks.push(Block::load(src, i)?);
            progress(i + 1, n);
        }
        Ok(model)
    }

    /// Everything but the blocks (embedding, final norm, head, RoPE tables): for running the
    /// decoder one block at a time from `src` when the whole model does not fit in memory.
    pub fn load_shell(src: &dyn WeightSource, max_t: usize) -> Result<Self> {
        let cfg = src.config().clone();
        Ok(Model {
            embed: src.tensor("model.embed_tokens.weight")?,
            norm: src.tensor("model.norm.weight")?,
            lm_head: if cfg.tie_word_embeddings { None } else { Some(src.tensor("lm_head.weight")?) },
            rope: Rope::new(&cfg, max_t).ctx(|| "rope tables".into())?,
            blocks: Vec::with_capacity(cfg.num_hidden_layers),
            config: cfg,
            decode_head: None,
            settings: DecodeSettings::default(),
        })
    }

    /// An error naming the first of `ids` outside the vocabulary, if any.
    pub(crate) fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(&id) => Err(ModelError::TokenOutOfRange { id, vocab }),
            None => Ok(()),
        }
    }

    /// An error when `n` positions do not fit the RoPE tables prepared at load.
    pub(crate) fn check_positions(&self, n: usize) -> Result<()> {
        if n > self.rope.max_positions() {
            return Err(ModelError::Tensor {
                context: format!("{n} tokens exceed the {} positions prepared", self.rope.max_positions()),
                source: candle_core::Error::Msg("sequence too long".into()),
            });
        }
        Ok(())
    }

    /// Token ids -> embeddings (t, d).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.check_tokens(ids)?;
        let ids = Tensor::new(ids, &Device::Cpu).ctx(|| "token ids".into())?;
        self.embed.index_select(&ids, 0).ctx(|| "embedding".into())
    }

    /// Token ids -> final hidden states (t, d), before the final norm.
    pub fn forward_hidden(&self, ids: &[u32]) -> Result<Tensor> {
        self.forward_hidden_with(ids, &self.settings)
    }

    fn forward_hidden_with(&self, ids: &[u32], s: &DecodeSettings) -> Result<Tensor> {
        self.check_positions(ids.len())?;
        let mut x = self.embed(ids)?;
        for b in &self.blocks {
            x = b.forward(&x, &self.rope, s)?;
        }
        Ok(x)
    }

    /// `log p(ids[i + 1] | ids[..=i])` for each position but the last, as evaluation computes
    /// them (the exact f32 products and the float LM head) whatever this model decodes with:
    /// what a server returns for a prompt's tokens (echo + logprobs).
    /// With each, the `top` most likely tokens' log probabilities (most likely first).
    pub fn exact_logprobs(&self, ids: &[u32], top: usize) -> Result<Vec<TargetLogprob>> {
        if ids.len() < 2 {
            return Ok(Vec::new());
        }
        let s = DecodeSettings { integer_prefill: false, ..self.settings };
        let hidden = self.forward_hidden_with(&ids[..ids.len() - 1], &s)?;
        self.target_logprobs_with(&hidden, &ids[1..], 512, false, top)
    }

    /// Hidden states (t, d) of `ids`, the positions after those in `cache`, which grows by them
    /// (prefill with the prompt, then one token at a time). The cache keeps the number type it
    /// was made with.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let pos0 = cache.len;
        self.check_positions(pos0 + ids.len())?;
        cache.layers.resize_with(self.blocks.len(), || None);
        let mut x = self.embed(ids)?;
        let s = DecodeSettings { kv: cache.kv, ..self.settings };
        for (b, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = b.forward_cached(&x, &self.rope, pos0, c, &s)?;
        }
        cache.len += ids.len();
        Ok(x)
    }

    /// One token through the model at the cache's next position, on slices
    /// ([`Block::decode_step`]): its logits (vocab), in `s`. What [`Model::forward_cached`] and
    /// [`Model::logits`] compute for one token (to f32 rounding), without their tensors.
    pub fn decode_step<'s>(&self, id: u32, cache: &mut KvCache, s: &'s mut DecodeScratch) -> Result<&'s [f32]> {
        let (vocab, d, pos) = (self.config.vocab_size, self.config.hidden_size, cache.len);
        self.check_tokens(&[id])?;
        self.check_positions(pos + 1)?;
        let mut x = std::mem::take(&mut s.x);
        x.resize(d, 0.0);
        let row = self.embed.narrow(0, id as usize, 1).ctx(|| "embedding".into())?;
        with_f32(&row, |e| x.copy_from_slice(&e[..d])).ctx(|| "embedding".into())?;
        cache.layers.resize_with(self.blocks.len(), || None);
        let set = DecodeSettings { kv: cache.kv, ..self.settings };
        let stepped = self
            .blocks
            .iter()
            .zip(cache.layers.iter_mut())
            .try_for_each(|(b, c)| b.decode_step(&mut x, &self.rope, pos, c, &set, s));
        if stepped.is_ok() {
            cache.len += 1;
        }
        s.x = x;
        stepped?;
        let mut h = std::mem::take(&mut s.h);
        h.resize(d, 0.0);
        let head = rms_norm_into(&s.x, &self.norm, self.config.rms_norm_eps as f32, &mut h).and_then(|()| {
            s.logits.resize(vocab, 0.0);
            match &self.decode_head {
                Some(p) => Linear { weight: Weight::Packed(p.clone()), bias: None }.matvec_into(
                    &h,
                    &mut s.logits,
                    &self.settings,
                ),
                None => {
                    Linear { weight: Weight::Dense(self.lm_head.as_ref().unwrap_or(&self.embed).clone()), bias: None }
                        .matvec_into(&h, &mut s.logits, &self.settings)
                }
            }
        });
        s.h = h;
        head.ctx(|| "lm head".into())?;
        Ok(&s.logits)
    }

    /// Final norm and LM head on hidden states (t, d) -> logits (t, vocab).
    /// Bytes of weights one decoded token reads: every linear, the LM head (the embedding row
    /// and the norms are negligible). What a memory-bound decoder's speed is set by.
    pub fn weight_bytes_per_token(&self) -> usize {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let head_bytes = self.decode_head.as_ref().map_or(4 * head.elem_count(), |p| p.bytes_read());
        self.blocks
            .iter()
            .map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down].iter().map(|l| l.weight_bytes()).sum::<usize>())
            .sum::<usize>()
            + head_bytes
    }

    /// Quantize the LM head for decoding: RTN, `bits` per weight, groups of 128 along each
    /// output row (per-OC), packed; the head's logits then come from the int16 matvec. With
    /// tied embeddings the head is most of the bytes a small model reads per token (SmolLM2:
    /// 113 MB of 174 at w4g128), as llama.cpp's k-quant mixes also quantize it (Q6_K).
    /// Evaluation (more than [`MATVEC_TOKENS`] positions) keeps the float head.
    pub fn quantize_decode_head(&mut self, bits: u8) -> Result<()> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let (rows, cols) = head.dims2().ctx(|| "lm head".into())?;
        let spec = adadim_quantize::QuantSpec {
            bits,
            group: Some(128.min(cols)),
            axis: adadim_quantize::Axis::Oc,
            zero: adadim_quantize::Zero::Awq,
        };
        // On the tensor's own numbers where it is f32 (SmolLM2's 113 MB embedding was copied
        // first, raising generate's peak memory by as much).
        let q = with_f32(head, |w| adadim_quantize::rtn(w, rows, cols, &spec)).ctx(|| "lm head".into())?;
        let q = q.map_err(|e| ModelError::Tensor {
            context: "quantizing the lm head".into(),
            source: candle_core::Error::Msg(e.to_string()),
        })?;
        self.decode_head = Some(Arc::new(PackedLinear::from_quantized(&q)));
        self.settings.head_bits = bits;
        Ok(())
    }

    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_with(hidden, true)
    }

    /// [`Model::logits`], through the float head only unless `decode_head`.
    fn logits_with(&self, hidden: &Tensor, decode_head: bool) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        let h = candle_nn::ops::rms_norm(hidden, &self.norm, eps).ctx(|| "final norm".into())?;
        if let Some(p) = self.decode_head.as_ref().filter(|_| decode_head && h.dims()[0] <= MATVEC_TOKENS) {
            return Linear { weight: Weight::Packed(p.clone()), bias: None }
                .forward(&h, &self.settings)
                .ctx(|| "lm head".into());
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        dense_product(&h, head).ctx(|| "lm head".into())
    }

    /// Log-probability of `targets[i]` after position `i`, from hidden states (t, d).
    /// Evaluated `chunk` rows at a time so a (t, vocab) logits matrix is never held whole.
    pub fn target_logprobs(&self, hidden: &Tensor, targets: &[u32], chunk: usize) -> Result<Vec<f64>> {
        Ok(self.target_logprobs_with(hidden, targets, chunk, true, 0)?.into_iter().map(|(lp, _)| lp).collect())
    }

    fn target_logprobs_with(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        chunk: usize,
        decode_head: bool,
        top: usize,
    ) -> Result<Vec<TargetLogprob>> {
        let t = targets.len();
        self.check_tokens(targets)?;
        let mut out = Vec::with_capacity(t);
        let mut start = 0;
        while start < t {
            let n = chunk.min(t - start);
            let h = hidden.narrow(0, start, n).ctx(|| "hidden chunk".into())?;
            let logits = self.logits_with(&h, decode_head)?;
            let vocab = logits.dims()[1];
            let mut flat = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).ctx(|| "logits".into())?;
            // Rows in parallel: log p(target) = logit[target] - logsumexp(logits).
            use rayon::prelude::*;
            let chunk_lp: Vec<TargetLogprob> = flat
                .par_chunks_mut(vocab)
                .zip(&targets[start..start + n])
                .map(|(row, &tgt)| {
                    let mut lse = 0.0;
                    let picked = row[tgt as usize] as f64;
                    let best = top_k(row, top);
                    crate::kernels::logsumexp(row, &mut lse);
                    let lse = lse as f64;
                    (picked - lse, best.into_iter().map(|(i, l)| (i, l - lse)).collect())
                })
                .collect();
            out.extend(chunk_lp);
            start += n;
        }
        Ok(out)
    }
}

/// A target's log probability and the most likely tokens' (id, log probability), most likely
/// first ([`Model::exact_logprobs`]).
pub type TargetLogprob = (f64, Vec<(u32, f64)>);

/// The `k` largest of `row` with their indices, largest first (ties: the lower index).
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f64)> {
    let mut best: Vec<(u32, f64)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &l) in row.iter().enumerate() {
        let l = l as f64;
        if best.len() < k || l > best[best.len() - 1].1 {
            let at = best.partition_point(|b| b.1 >= l);
            best.insert(at, (i as u32, l));
            best.truncate(k);
        }
    }
    best
}
