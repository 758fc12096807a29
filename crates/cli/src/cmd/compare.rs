//! `adadim compare`: RTN, GPTQ and GPTQ-ada at the same bits and group, and the float
//! model, evaluated by one evaluator and printed side by side.

use crate::args::{CompareArgs, DimArg, MethodArg};
use crate::cmd::eval::run_ppl;
use crate::cmd::quantize::run_quantize;
use crate::resolve::{model_dir, resolve_dataset};
use adadim_eval::datasets::data_dir_from_env;
use adadim_load::fetch::adadim_home;
use anyhow::Result;

pub fn compare(a: CompareArgs) -> Result<()> {
    let dataset_spec = a.dataset.clone().unwrap_or_else(|| {
        if data_dir_from_env().is_some() {
            "wikitext2".into()
        } else {
            "milton".into()
        }
    });
    let dataset = resolve_dataset(&dataset_spec)?;
    let dir = model_dir(&a.model.model)?;
    let q = &a.settings.for_family(crate::cmd::quantize::family_of(&dir));
    // Runs are reused by their directory: its name holds a digest of every setting, so a run
    // made with other settings (or other defaults) is never taken for this one.
    let settings = [(MethodArg::Rtn, DimArg::Oc), (MethodArg::Gptq, DimArg::Oc), (MethodArg::Gptq, DimArg::Ada)]
        .into_iter()
        .map(|(m, d)| Ok(serde_json::to_string(&crate::cmd::quantize::quantize_config(m, d, q)?)?))
        .collect::<Result<Vec<_>>>()?
        .join(" ");
    let digest = adadim_load::fetch::sha256_hex(format!("{settings} {}", q.calib).as_bytes());
    let grid = match q.bpw {
        Some(b) => format!("bpw{b}"),
        None => format!("w{}g{}", q.bits(), q.group()),
    };
    let tag = format!("{grid}-n{}x{}-s{}-{}", q.nsamples, q.calib_seqlen, q.seed, &digest[..8]);
    let work = a.work.clone().unwrap_or_else(|| {
        adadim_home().join("runs").join(format!("{}-{tag}", dir.file_name().unwrap_or_default().to_string_lossy()))
    });
    let limit = (a.windows > 0).then_some(a.windows);
    if dataset_spec == "milton" {
        eprintln!(
            "$ADADIM_DATA is not set: evaluating on Milton's works (held out from the Shakespeare calibration text)"
        );
    }
    let runs = [
        ("RTN (per-OC)", MethodArg::Rtn, DimArg::Oc, "rtn-oc"),
        ("GPTQ (per-OC)", MethodArg::Gptq, DimArg::Oc, "gptq-oc"),
        ("GPTQ-ada (AdaDim)", MethodArg::Gptq, DimArg::Ada, "gptq-ada"),
    ];
    let mut rows = vec![("FP (f32)".to_string(), run_ppl(&dir, &dataset, 2048, limit)?.ppl, String::new())];
    for (label, method, dim, name) in runs {
        let out = work.join(name);
        if !out.join(adadim_calibrate::Report::FILE).exists() {
            eprintln!("quantizing: {label} {grid} into {}", out.display());
            run_quantize(&dir, method, dim, q, adadim_calibrate::Format::Packed, &out)?;
        }
        let s = adadim_calibrate::Report::read(&out)?.summary;
        let want = serde_json::to_value(crate::cmd::quantize::quantize_config(method, dim, q)?)?;
        let c = &s.calibration;
        if serde_json::to_value(&s.settings)? != want
            || (c.nsamples, c.seqlen, c.seed) != (q.nsamples, q.calib_seqlen, q.seed)
        {
            anyhow::bail!(
                "{}: holds a {label} run made with other settings or calibration; remove it or pass another --work",
                out.display()
            );
        }
        let note = format!("{}/{} linears per-IC, quantized in {:.0} s", s.per_ic, s.linears, s.seconds);
        rows.push((label.to_string(), run_ppl(&out, &dataset, 2048, limit)?.ppl, note));
    }
    let model_note = if a.model.model == "smollm2" { " (FP = the Q4_1 GGUF dequantized to f32)" } else { "" };
    println!(
        "{}{model_note}, {grid}, {} perplexity over {} windows x 2048 tokens:",
        a.model.model, dataset.label, a.windows
    );
    for (label, ppl, note) in rows {
        println!("  {label:<20} {ppl:>10.3}   {note}");
    }
    println!("models and report.json in {}", work.display());
    Ok(())
}
