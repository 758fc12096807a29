//! `adadim`: the command-line tool. `main` parses the flags ([`args`]) and dispatches to one
//! command in [`cmd`] or [`bench`]; library errors are typed, and here they become one
//! readable line on stderr and a non-zero exit code.

mod args;
mod bench;
mod cmd;
mod limits;
mod messages;
mod progress;
mod resolve;

use anyhow::Result;
use args::{BenchCmd, Cli, Cmd, EvalCmd};
use clap::Parser;

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
    if matches!(
        cli.cmd,
        Cmd::Generate(_) | Cmd::Serve(_) | Cmd::Eval(_) | Cmd::Bench(BenchCmd::Decode(_) | BenchCmd::Eval(_))
    ) {
        keep_freed_memory();
    }
    match cli.cmd {
        Cmd::ImportGguf { file, out } => cmd::import::import_gguf(&file, &out),
        Cmd::Rotate { model, out, seed, heads } => cmd::rotate::rotate(&model, &out, seed, heads),
        Cmd::Quantize(a) => cmd::quantize::quantize(a),
        Cmd::Compare(a) => cmd::compare::compare(a),
        Cmd::QuantizeLayer(a) => cmd::quantize_layer::quantize_layer(a),
        Cmd::Eval(EvalCmd::Ppl(a)) => cmd::eval::eval_ppl(a),
        Cmd::Eval(EvalCmd::Mmlu(a)) => cmd::eval_tasks::mmlu(a),
        Cmd::Eval(EvalCmd::Humaneval(a)) => cmd::eval_tasks::humaneval(a),
        Cmd::Eval(EvalCmd::Gsm8k(a)) => cmd::eval_tasks::gsm8k(a),
        Cmd::Eval(EvalCmd::Embed(a)) => cmd::embed::eval_embed(a),
        Cmd::Generate(a) => cmd::generate::generate(a),
        Cmd::Serve(a) => cmd::serve::serve(a),
        Cmd::Embed(a) => cmd::embed::embed(a),
        Cmd::Synth(a) => cmd::synth::synth(a),
        Cmd::Report(a) => cmd::report::report(a),
        Cmd::Bench(BenchCmd::Eval(a)) => bench::eval::bench_eval(a),
        Cmd::Bench(BenchCmd::Quality(a)) => bench::quality::bench_quality(a),
        Cmd::Bench(BenchCmd::Llamacpp(a)) => bench::llamacpp::bench_llamacpp(a),
        Cmd::Bench(BenchCmd::Quantize(a)) => bench::quantize::bench_quantize(a),
        Cmd::Bench(BenchCmd::Kernels(a)) => bench::kernels::bench_kernels(a),
        Cmd::Bench(BenchCmd::Decode(a)) => bench::decode::bench_decode(a),
        Cmd::Bench(BenchCmd::Scale(a)) => bench::scale::bench_scale(a),
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
