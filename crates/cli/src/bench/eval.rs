//! `adadim bench eval`: evaluation throughput, side by side in one run with
//! (a) this machine's f32 GEMM rate measured on the model's own matmul shapes and a large square,
//! (b) llama.cpp's `llama-perplexity` on the same model file and text, when its binaries are given.

use crate::args::BenchEvalArgs;
use crate::resolve::{model_dir, resolve_dataset};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub fn bench_eval(a: BenchEvalArgs) -> Result<()> {
    let dataset = resolve_dataset(&a.dataset)?;
    let dir = model_dir(&a.model.model)?;
    let src = adadim_model::open(&dir)?;
    let cfg = src.config().clone();
    let tok = adadim_load::tokenizer::load(&dir)?;
    let ids = adadim_eval::ppl::tokenize(&tok, &dataset.read_text()?, &dataset.label)?;
    crate::limits::check_positions(&cfg, &dir.join("config.json"), a.seqlen, "--seqlen")?;
    let model = adadim_model::Model::load(src.as_ref(), a.seqlen, &mut |_, _| {})?;
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
        gemm.push((name, m, k, n, super::gemm_gflops(m, k, n, 5)?));
    }
    let peak = gemm.iter().map(|g| g.4).fold(0.0, f64::max);

    // 2. Our evaluation.
    let mut bar = crate::progress::Bar::new("bench", a.windows);
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
        (Some(bin), Some(g)) => Some(llama_perplexity(bin, g, &dataset.path, a.seqlen, r.windows, threads)?),
        _ => None,
    };

    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Perplexity evaluation throughput (`adadim bench eval`)\n")?;
    writeln!(md, "Model `{}` (f32; for smollm2 the dequantized Q4_1 GGUF, our full-precision baseline), {} on {} windows x {} tokens, {threads} threads.\n", a.model.model, dataset.label, r.windows, a.seqlen)?;
    writeln!(md, "Machine: {}.\n", super::machine())?;
    writeln!(md, "f32 GEMM rate measured in this run (the better of candle's and faer's, best of 5):\n")?;
    writeln!(md, "| matmul | m x k x n | GFLOP/s |\n|---|---|---|")?;
    for (name, m, k, n, g) in &gemm {
        writeln!(md, "| {name} | {m} x {k} x {n} | {g:.1} |")?;
    }
    writeln!(md, "\n| evaluator | tokens/s | model GFLOP/s | fraction of GEMM peak ({peak:.1} GFLOP/s) | ppl reported |\n|---|---|---|---|---|")?;
    writeln!(
        md,
        "| adadim (GPTQ protocol: all {} predictions per window) | {:.1} | {achieved:.1} | {:.2} | {:.4} |",
        a.seqlen - 1,
        r.tokens_per_s,
        achieved / peak,
        r.ppl
    )?;
    match &peer {
        Some(p) => writeln!(md, "| llama.cpp `llama-perplexity` (scores 2nd half of each window; same GGUF, Q4_1 kernels) | {:.1} | | | {:.4} |\n\nadadim / llama.cpp throughput: **{:.2}x**. llama.cpp command: `{}`.", p.tokens_per_s, p.ppl, r.tokens_per_s / p.tokens_per_s, p.command)?,
        None => writeln!(md, "\nllama.cpp not run (pass --llama-cpp DIR or set ADADIM_LLAMA_CPP).")?,
    }
    writeln!(md, "\nModel FLOPs per token: {:.1} MFLOP (linears + causal attention, each position attending to the keys before it + LM head, at seqlen {}).", flops_per_token / 1e6, a.seqlen)?;
    super::publish(&a.write, "eval", &md)
}

pub struct PeerRun {
    pub ppl: f64,
    pub tokens_per_s: f64,
    pub command: String,
}

/// Run llama.cpp's `llama-perplexity` on `gguf` and `text` with `ctx`, `chunks` windows.
pub fn llama_perplexity(
    bin_dir: &Path,
    gguf: &Path,
    text: &Path,
    ctx: usize,
    chunks: usize,
    threads: usize,
) -> Result<PeerRun> {
    let exe = bin_dir.join("llama-perplexity");
    if !exe.exists() {
        bail!("{}: not found (build it with bench/peers/build-llamacpp.sh)", exe.display());
    }
    let args = [
        "-m".to_string(),
        gguf.display().to_string(),
        "-f".into(),
        text.display().to_string(),
        "-c".into(),
        ctx.to_string(),
        "-b".into(),
        ctx.to_string(),
        "--chunks".into(),
        chunks.to_string(),
        "-t".into(),
        threads.to_string(),
        "--no-repack".into(),
    ];
    let command = format!("llama-perplexity {}", args.join(" "));
    let t = Instant::now();
    let out = Command::new(&exe).args(&args).output().with_context(|| format!("running {}", exe.display()))?;
    let seconds = t.elapsed().as_secs_f64();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{command} failed: {}", log.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    }
    // "Final estimate: PPL = 17.1234 +/- 0.12"
    let ppl = log
        .lines()
        .find_map(|l| l.split("Final estimate: PPL = ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| {
            format!(
                "no 'Final estimate' in llama-perplexity output: {}",
                log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            )
        })?;
    // "llama_perf_context_print: prompt eval time = 1234.5 ms / 16384 tokens (... ms per token, 123.4 tokens per second)"
    let tps = log
        .lines()
        .filter(|l| l.contains("prompt eval time"))
        .find_map(|l| {
            l.split(" ms per token, ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or((chunks * ctx) as f64 / seconds);
    Ok(PeerRun { ppl, tokens_per_s: tps, command })
}
