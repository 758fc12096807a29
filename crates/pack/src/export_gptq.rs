//! Export of per-OC quantized linears in the GPTQ v1 checkpoint layout (AutoGPTQ / GPTQModel
//! "gptq" format, as transformers and vLLM load it). Per linear `name`:
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `name.qweight` | I32 | `[ceil(C_in b / 32), C_out]` | codes packed along C_in: column `o` is the little-endian bit stream of `q[o, 0..C_in]` (3-bit codes straddle words) |
//! | `name.qzeros` | I32 | `[groups, ceil(C_out b / 32)]` | `zero - 1` packed along C_out, the v1 convention |
//! | `name.scales` | F16 | `[groups, C_out]` | |
//! | `name.g_idx` | I32 | `[C_in]` | group of each input column (`c / g`, or the act-order group) |
//!
//! Per-IC linears cannot be expressed (one scale per (group of output rows, input column)), and
//! v1 cannot store a zero point of 0 (it would be written as -1 and read back as 2^b): both are
//! refused with an error naming the linear.

use adadim_load::safetensors_out::StreamWriter;
use adadim_quantize::{Axis, QuantizedMatrix};
use half::f16;

use crate::bits;
use crate::checkpoint::{PackError, Result};

fn refuse(name: &str, msg: String) -> PackError {
    PackError::Tensor { path: Default::default(), tensor: name.to_string(), msg }
}

/// `[rows, cols]` codes packed row by row into little-endian i32 words, transposed to
/// `[words, rows]` (GPTQ's column-major packing along the inner dimension).
fn pack_words_transposed(codes: &[u8], rows: usize, cols: usize, b: u8) -> (usize, Vec<u8>) {
    let words = (cols * b as usize).div_ceil(32);
    let rb = bits::row_bytes(cols, b);
    let packed = bits::pack(codes, rows, cols, b);
    let mut out = vec![0u8; words * rows * 4];
    for r in 0..rows {
        for k in 0..words {
            let mut w = [0u8; 4];
            for (i, byte) in w.iter_mut().enumerate() {
                let at = 4 * k + i;
                *byte = if at < rb { packed[r * rb + at] } else { 0 };
            }
            out[(k * rows + r) * 4..(k * rows + r) * 4 + 4].copy_from_slice(&w);
        }
    }
    (words, out)
}

/// Writes linear `name` (`q` quantized per-OC) in the GPTQ v1 layout.
pub fn write_gptq_linear(out: &mut StreamWriter, name: &str, q: &QuantizedMatrix) -> Result<()> {
    let (rows, cols, spec) = (q.rows(), q.cols(), *q.spec());
    if spec.axis != Axis::Oc {
        return Err(refuse(
            name,
            "is quantized per-IC, which the GPTQ format cannot express (use the packed format, or --dim oc)".into(),
        ));
    }
    if spec.zero == adadim_quantize::Zero::Float {
        return Err(refuse(
            name,
            "has float minima, which the GPTQ format cannot express (use the packed format)".into(),
        ));
    }
    let b = spec.bits;
    let (_, pc) = q.param_shape();
    let g = spec.group_shape(rows, cols).1;
    // params [rows, pc] -> [pc, rows]
    let mut zeros = vec![0u8; pc * rows];
    let mut scales = Vec::with_capacity(pc * rows * 2);
    for k in 0..pc {
        for r in 0..rows {
            let i = r * pc + k;
            let z = q.zeros()[i];
            if z < 1.0 {
                return Err(refuse(name, format!("has a zero point of {z} (output channel {r}, group {k}); GPTQ v1 stores zero - 1 and cannot hold it")));
            }
            zeros[k * rows + r] = (z - 1.0) as u8;
            scales.extend_from_slice(&f16::from_f32(q.scales()[i]).to_le_bytes());
        }
    }
    let (words, qweight) = pack_words_transposed(q.codes(), rows, cols, b);
    out.write(&format!("{name}.qweight"), "I32", &[words, rows], &qweight)?;
    let zb = bits::row_bytes(rows, b);
    let zwords = (rows * b as usize).div_ceil(32);
    let packed = bits::pack(&zeros, pc, rows, b);
    let mut qzeros = vec![0u8; pc * zwords * 4];
    for k in 0..pc {
        qzeros[k * zwords * 4..k * zwords * 4 + zb].copy_from_slice(&packed[k * zb..(k + 1) * zb]);
    }
    out.write(&format!("{name}.qzeros"), "I32", &[pc, zwords], &qzeros)?;
    out.write(&format!("{name}.scales"), "F16", &[pc, rows], &scales)?;
    let g_idx: Vec<u8> =
        (0..cols).flat_map(|c| (q.g_idx().map_or(c / g, |gi| gi[c] as usize) as i32).to_le_bytes()).collect();
    out.write(&format!("{name}.g_idx"), "I32", &[cols], &g_idx)?;
    Ok(())
}

/// `quantize_config.json` of a GPTQ v1 checkpoint.
pub fn quantize_config(
    bits: u8,
    group: Option<usize>,
    desc_act: bool,
    static_groups: bool,
    damp_percent: f64,
) -> serde_json::Value {
    serde_json::json!({
        "bits": bits,
        "group_size": group.map_or(-1, |g| g as i64),
        "desc_act": desc_act,
        "static_groups": static_groups,
        "sym": false,
        "true_sequential": true,
        "damp_percent": damp_percent,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    })
}
