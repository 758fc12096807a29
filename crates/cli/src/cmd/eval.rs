//! `adadim eval ppl`: perplexity under the GPTQ protocol, held in memory or streamed block
//! by block. (`eval mmlu` and `eval humaneval` are in [`super::eval_tasks`].)

use crate::args::PplArgs;
use crate::resolve::{act_bits, model_dir, resolve_dataset};
use adadim_eval::datasets::Dataset;
use anyhow::{Context, Result};

pub fn eval_ppl(a: PplArgs) -> Result<()> {
    crate::messages::check_limit(a.limit)?;
    let dataset = resolve_dataset(&a.dataset)?;
    let dir = model_dir(&a.model.model)?;
    let act = a.act_bits.map(act_bits).transpose()?;
    if act.is_some() && a.stream {
        anyhow::bail!("--act-bits with --stream: integer products apply to a model held in memory (packed models are not streamed)");
    }
    // Integer products apply to packed linears only.
    let act = act.filter(|_| {
        adadim_model::is_packed(&dir) || {
            eprintln!("note: {} is not packed: --act-bits changes nothing, its products stay f32", dir.display());
            false
        }
    });
    let r = run_ppl_with(&dir, &dataset, a.seqlen, a.limit, a.stream, act)?;
    let activations = act.map_or("f32".to_string(), |act| format!("int{}", act.bits()));
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = dir.display().to_string().into();
        v["dataset"] = dataset.label.clone().into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        v["activations"] = activations.clone().into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{} on {}: ppl {:.4} ({} windows x {} tokens of {}; {:.0} tokens/s; {activations} activations)",
            dir.display(),
            dataset.label,
            r.ppl,
            r.windows,
            r.seqlen,
            r.tokens,
            r.tokens_per_s
        );
    }
    Ok(())
}

/// Perplexity of the model in `dir` on `dataset`, with a progress bar.
pub fn run_ppl(
    dir: &std::path::Path,
    dataset: &Dataset,
    seqlen: usize,
    limit: Option<usize>,
) -> Result<adadim_eval::ppl::PplReport> {
    run_ppl_with(dir, dataset, seqlen, limit, false, None)
}

/// Hidden states of one batch of windows when streaming.
pub const STREAM_BATCH_BYTES: usize = 1 << 30;

/// As [`run_ppl`]; `stream` (or a float model whose blocks would take more than half of the
/// available memory in f32) runs the decoder block by block from the checkpoint; held in
/// memory, `act` (packed linears) multiplies on integers at that activation precision.
pub fn run_ppl_with(
    dir: &std::path::Path,
    dataset: &Dataset,
    seqlen: usize,
    limit: Option<usize>,
    stream: bool,
    act: Option<adadim_pack::ActBits>,
) -> Result<adadim_eval::ppl::PplReport> {
    let src = adadim_model::open(dir)?;
    crate::limits::check_positions(src.config(), &dir.join("config.json"), seqlen, &format!("--seqlen {seqlen}"))?;
    let tok = adadim_load::tokenizer::load(dir)?;
    let text = dataset.read_text()?;
    let ids = adadim_eval::ppl::tokenize(&tok, &text, &dataset.path.display().to_string())?;
    let cfg = src.config();
    let f32_blocks = 4 * cfg.linear_params_per_block() * cfg.num_hidden_layers;
    let stream = stream
        || (!adadim_model::is_packed(dir)
            && crate::limits::available_memory().is_some_and(|m| f32_blocks as u64 > m / 2));
    let r = if stream {
        eprintln!(
            "streaming the {} blocks from {} ({:.1} GB in f32), windows in batches of {} MB of hidden states",
            cfg.num_hidden_layers,
            dir.display(),
            f32_blocks as f64 / 1e9,
            STREAM_BATCH_BYTES >> 20
        );
        let model = adadim_model::Model::load_shell(src.as_ref(), seqlen)
            .with_context(|| format!("loading {}", dir.display()))?;
        let mut bar = crate::progress::Bar::new("ppl (blocks)", 0);
        let r = adadim_eval::ppl::perplexity_streaming(
            &model,
            src.as_ref(),
            &ids,
            seqlen,
            limit,
            STREAM_BATCH_BYTES,
            &mut |d, t| bar.update(d, t),
        )?;
        bar.finish();
        r
    } else {
        let mut bar = crate::progress::Bar::new("load", cfg.num_hidden_layers);
        let mut model = adadim_model::Model::load(src.as_ref(), seqlen, &mut |d, t| bar.update(d, t))
            .with_context(|| format!("loading {}", dir.display()))?;
        bar.finish();
        if let Some(act) = act {
            model.set_settings(adadim_model::DecodeSettings { act, integer_prefill: true, ..model.settings() })?;
        }
        let mut bar = crate::progress::Bar::new("ppl", 0);
        let r = adadim_eval::ppl::perplexity(&model, &ids, seqlen, limit, &mut |d, t| bar.update(d, t))?;
        bar.finish();
        r
    };
    Ok(r)
}
