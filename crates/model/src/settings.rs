//! How a forward pass multiplies and caches: one [`DecodeSettings`] value, held by the
//! [`crate::Model`] and passed down every forward to its blocks and linears (none keeps a copy).

use adadim_pack::ActBits;
use candle_core::DType;

/// The numbers a forward pass runs on. The default is what evaluation and calibration need:
/// the exact f32 product for prompts, int16 activations in packed matvecs, an f32 KV cache and
/// the float LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSettings {
    /// The activations' precision in packed products: matvecs (up to a few tokens) always,
    /// prompts where `integer_prefill` is on (`--act-bits`).
    pub act: ActBits,
    /// Prompts through packed linears on integers, the activations rounded to `act` as the
    /// matvecs round them; off: the exact f32 GEMM (evaluation, where the packed model's
    /// perplexity must equal the dequantized one's).
    pub integer_prefill: bool,
    /// What a KV cache made for decoding stores ([`crate::Model::new_cache`]).
    pub kv: KvType,
    /// Bits of the LM head quantized for decoding ([`crate::Model::quantize_decode_head`]); 0:
    /// the float head.
    pub head_bits: u8,
}

impl DecodeSettings {
    /// The default: int16 matvecs, exact f32 prompts, an f32 cache, the float head.
    pub const DEFAULT: DecodeSettings =
        DecodeSettings { act: ActBits::I16, integer_prefill: false, kv: KvType::F32, head_bits: 0 };

    /// The activations' precision of a product of many tokens: `act` on integers where
    /// `integer_prefill` is on, else exact f32.
    pub fn prefill_act(&self) -> ActBits {
        if self.integer_prefill {
            self.act
        } else {
            ActBits::F32
        }
    }
}

impl Default for DecodeSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The number type a [`crate::KvCache`] stores keys and values in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// Exact: cached decoding gives the logits of the uncached forward pass (to rounding).
    #[default]
    F32,
    /// Half the memory and half the bytes decode attention reads per position (llama.cpp's
    /// default); keys and values rounded to 11 significant bits.
    F16,
}

impl KvType {
    pub(crate) fn dtype(self) -> DType {
        match self {
            KvType::F32 => DType::F32,
            KvType::F16 => DType::F16,
        }
    }
}
