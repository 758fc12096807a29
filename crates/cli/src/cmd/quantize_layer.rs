//! `adadim quantize-layer`: one weight matrix and its calibration inputs from safetensors
//! files, quantized as `quantize` would, the errors printed as JSON.

use crate::args::QuantizeLayerArgs;
use crate::cmd::quantize::quantize_config;
use anyhow::{Context, Result};

/// One tensor of a safetensors file as (shape, f32 values): `name`, or the file's only tensor.
pub fn read_tensor(path: &std::path::Path, name: Option<&str>) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: corrupt or truncated safetensors file: {}",
            path.display(),
            adadim_load::safetensors_fault::explain(&bytes, &e)
        )
    })?;
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let names = st.names();
            if names.len() != 1 {
                anyhow::bail!(
                    "{}: holds {} tensors; name one ({})",
                    path.display(),
                    names.len(),
                    names.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                );
            }
            names[0].to_string()
        }
    };
    let t = st.tensor(&name).map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", path.display()))?;
    let v = adadim_load::checkpoint::bytes_to_f32(t.data(), t.dtype()).ok_or_else(|| {
        anyhow::anyhow!("{}: tensor '{name}' has unsupported type {:?} (F32, F16, BF16)", path.display(), t.dtype())
    })?;
    adadim_load::checkpoint::check_finite(path, &name, &v)?;
    Ok((t.shape().to_vec(), v))
}

pub fn quantize_layer(a: QuantizeLayerArgs) -> Result<()> {
    let cfg = quantize_config(a.method, a.dim, &a.settings)?;
    let kind = crate::resolve::module_arg(&a.module)?;
    let (wshape, w) = read_tensor(&a.weight, a.weight_name.as_deref())?;
    let [rows, cols] = wshape[..] else {
        anyhow::bail!("{}: weight must be 2-D [C_out, C_in], got {wshape:?}", a.weight.display())
    };
    let (xshape, x) = read_tensor(&a.inputs, a.inputs_name.as_deref())?;
    if xshape.last() != Some(&cols) {
        anyhow::bail!("{}: inputs have shape {xshape:?}; the last dimension must be C_in = {cols}", a.inputs.display());
    }
    let mut h = adadim_quantize::Hessian::new(cols);
    h.add_batch(&x).with_context(|| format!("{}: inputs", a.inputs.display()))?;
    let (w_hat, report) = adadim_calibrate::awq_fold::quantize_alone(&cfg, kind, &w, rows, cols, &h)?;
    if let Some(out) = &a.out {
        let tmp =
            out.with_file_name(adadim_load::state_dir::work_name(out, &format!(".partial-{}", std::process::id())));
        let mut wr = adadim_load::safetensors_out::DenseWriter::create(
            &tmp,
            &[("weight".to_string(), vec![rows, cols])],
            &[],
            adadim_load::safetensors_out::DenseDtype::F32,
        )?;
        wr.write_tensor("weight", &w_hat)?;
        wr.finish()?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    }
    let mut v = serde_json::to_value(&report)?;
    v["tokens"] = h.tokens().into();
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
