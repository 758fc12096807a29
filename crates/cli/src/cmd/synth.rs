//! `adadim synth`: a random-weight checkpoint with a real model's shapes.

use crate::args::{SynthArgs, SynthDtype};
use anyhow::Result;

pub fn synth(a: SynthArgs) -> Result<()> {
    use adadim_load::safetensors_out::DenseDtype;
    use adadim_load::synth::{Outliers, SynthOptions};
    let mut cfg = adadim_load::synth::shape_config(&a.shape)?;
    if let Some(l) = a.layers {
        if l == 0 || l > cfg.num_hidden_layers {
            anyhow::bail!("--layers {l}: must be 1..={} for {}", cfg.num_hidden_layers, a.shape);
        }
        cfg.num_hidden_layers = l;
    }
    let outliers = match &a.outliers {
        None => None,
        Some(spec) => {
            let bad = || anyhow::anyhow!("--outliers '{spec}': expected K:SCALE, e.g. 8:30");
            let (k, s) = spec.split_once(':').ok_or_else(bad)?;
            let (channels, scale) = (k.parse::<usize>().map_err(|_| bad())?, s.parse::<f32>().map_err(|_| bad())?);
            if channels == 0 || channels > cfg.hidden_size || !(scale.is_finite() && scale > 0.0) {
                anyhow::bail!("--outliers '{spec}': K must be 1..={} and SCALE a positive number", cfg.hidden_size);
            }
            Some(Outliers { channels, scale })
        }
    };
    if !(a.shard_gb.is_finite() && a.shard_gb > 0.0) {
        anyhow::bail!("--shard-gb {}: must be a positive number", a.shard_gb);
    }
    let dtype = match a.dtype {
        SynthDtype::F16 => DenseDtype::F16,
        SynthDtype::F32 => DenseDtype::F32,
    };
    let opts = SynthOptions { dtype, seed: a.seed, outliers, shard_bytes: (a.shard_gb * 1e9) as usize };
    let start = std::time::Instant::now();
    let mut bar = crate::progress::Bar::new("synth", cfg.expected_tensors().len());
    adadim_load::synth::write_synthetic(&a.out, &cfg, &opts, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    println!(
        "{}: {} ({} layers, d {}), {:.1} s",
        a.out.display(),
        a.shape,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
