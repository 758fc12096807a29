//! Name the tensor at fault when the safetensors crate rejects a header without naming one
//! (`TensorInvalidInfo`, `ValidationOverflow`, `MisalignedSlice`): its validation walks the
//! tensors in data-offset order and stops at the first whose byte range does not fit its dtype
//! and shape; this walks them the same way and says which, and why.

use safetensors::tensor::TensorInfo;
use safetensors::SafeTensorError;

/// `e`'s message, with the tensor it concerns and the sizes involved where the crate's own
/// message names neither.
pub fn explain(bytes: &[u8], e: &SafeTensorError) -> String {
    let base = e.to_string();
    if !matches!(
        e,
        SafeTensorError::TensorInvalidInfo | SafeTensorError::ValidationOverflow | SafeTensorError::MisalignedSlice
    ) {
        return base;
    }
    match culprit(bytes) {
        Some((name, why)) => format!("tensor '{name}': {why} ({base})"),
        None => base,
    }
}

fn culprit(bytes: &[u8]) -> Option<(String, String)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let mut tensors: Vec<(String, TensorInfo)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect::<Option<_>>()?;
    tensors.sort_by_key(|(_, t)| t.data_offsets);
    tensors.into_iter().find_map(|(name, t)| {
        let (s, e) = t.data_offsets;
        let bits =
            t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(t.dtype.bitsize()));
        let why = match bits {
            None => format!("shape {:?} of {:?} overflows", t.shape, t.dtype),
            Some(b) if b % 8 != 0 => format!("{:?} {:?} is not a whole number of bytes", t.dtype, t.shape),
            Some(b) if e.checked_sub(s) != Some(b / 8) => {
                format!(
                    "data_offsets [{s}, {e}] span {} bytes, but {:?} {:?} needs {}",
                    e.saturating_sub(s),
                    t.dtype,
                    t.shape,
                    b / 8
                )
            }
            Some(_) => return None,
        };
        Some((name, why))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_tensor_whose_size_is_wrong() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b.weight":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0u8; 16]);
        let e = safetensors::SafeTensors::deserialize(&bytes).expect_err("invalid");
        let msg = explain(&bytes, &e);
        assert!(msg.contains("tensor 'b.weight'") && msg.contains("span 8 bytes") && msg.contains("needs 12"), "{msg}");
    }
}
