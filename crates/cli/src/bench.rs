//! `adadim bench eval`: evaluation throughput, side by side in one run with
//! (a) this machine's f32 GEMM rate measured on the model's own matmul shapes and a large square,
//! (b) llama.cpp's `llama-perplexity` on the same model file and text, when its binaries are given.
//! The result is printed and written into BENCHMARKS.md between markers.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Best-of-`reps` GFLOP/s of `(m,k) @ (k,n)` with candle (the same path the forward uses;
/// the right operand transposed like a weight matrix).
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let wt = w.t()?;
    let _ = a.matmul(&wt)?; // warm up (thread pool, page faults)
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let c = a.matmul(&wt)?;
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Best-of-`reps` GFLOP/s of an `n x n` f64 product with faer (GPTQ's inverse and sweep run
/// in f64 on faer).
pub fn faer_f64_gflops(n: usize, reps: usize) -> f64 {
    use faer::{linalg::matmul::matmul, Accum, Mat, Par};
    let a = Mat::<f64>::from_fn(n, n, |i, j| ((i * 31 + j * 17) % 97) as f64 / 97.0);
    let mut c = Mat::<f64>::zeros(n, n);
    let mut best = f64::MAX;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        matmul(c.as_mut(), Accum::Replace, a.as_ref(), a.as_ref(), 1.0, Par::rayon(0));
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// The CPU this ran on, and the widest SIMD the kernels use on it: absolute numbers differ a
/// lot between machines (the ratios measured in one run are what carry over).
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    #[cfg(target_arch = "x86_64")]
    let isa = if is_x86_feature_detected!("avx512f") { "AVX-512" } else if is_x86_feature_detected!("avx2") { "AVX2+FMA, no AVX-512" } else { "no AVX2" };
    #[cfg(not(target_arch = "x86_64"))]
    let isa = std::env::consts::ARCH;
    format!("{model}, {isa}, {} threads", candle_core::utils::get_num_threads())
}

pub struct PeerRun {
    pub ppl: f64,
    pub tokens_per_s: f64,
    pub command: String,
}

/// Run llama.cpp's `llama-perplexity` on `gguf` and `text` with `ctx`, `chunks` windows.
pub fn llama_perplexity(bin_dir: &Path, gguf: &Path, text: &Path, ctx: usize, chunks: usize, threads: usize) -> Result<PeerRun> {
    let exe = bin_dir.join("llama-perplexity");
    if !exe.exists() {
        bail!("{}: not found (build it with bench/peers/build-llamacpp.sh)", exe.display());
    }
    let args = [
        "-m".to_string(), gguf.display().to_string(), "-f".into(), text.display().to_string(),
        "-c".into(), ctx.to_string(), "-b".into(), ctx.to_string(), "--chunks".into(), chunks.to_string(),
        "-t".into(), threads.to_string(), "--no-repack".into(),
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
        .with_context(|| format!("no 'Final estimate' in llama-perplexity output: {}", log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")))?;
    // "llama_perf_context_print: prompt eval time = 1234.5 ms / 16384 tokens (... ms per token, 123.4 tokens per second)"
    let tps = log
        .lines()
        .filter(|l| l.contains("prompt eval time"))
        .find_map(|l| l.split(" ms per token, ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or((chunks * ctx) as f64 / seconds);
    Ok(PeerRun { ppl, tokens_per_s: tps, command })
}

/// Print a benchmark's markdown and put it into its section of `file`.
pub fn publish(file: &Path, name: &str, md: &str) -> Result<()> {
    print!("{md}");
    write_section(file, name, md)?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

/// Replace the text between `<!-- begin NAME -->` and `<!-- end NAME -->` in `file`
/// (appending the section if absent), atomically.
pub fn write_section(file: &Path, name: &str, body: &str) -> Result<()> {
    let (begin, end) = (format!("<!-- begin {name} -->"), format!("<!-- end {name} -->"));
    let old = std::fs::read_to_string(file).unwrap_or_else(|_| "# Benchmarks\n\nRegenerate with `bench/run.sh` (see README).\n".into());
    let section = format!("{begin}\n{body}\n{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    let tmp = PathBuf::from(format!("{}.tmp", file.display()));
    std::fs::write(&tmp, new).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("B.md");
        write_section(&f, "a", "one").unwrap();
        write_section(&f, "b", "two").unwrap();
        write_section(&f, "a", "three").unwrap();
        let s = std::fs::read_to_string(&f).unwrap();
        assert!(s.contains("three") && s.contains("two") && !s.contains("one"), "{s}");
        assert!(s.find("three").unwrap() < s.find("two").unwrap(), "order kept: {s}");
    }

    #[test]
    fn f64_rate_is_plausible() {
        let g = faer_f64_gflops(64, 2);
        assert!(g > 0.01 && g < 1e5, "{g}");
    }

    #[test]
    fn gemm_rate_is_plausible() {
        let g = gemm_gflops(64, 64, 64, 2).unwrap();
        assert!(g > 0.1 && g < 1e5, "{g}");
    }
}

/// llama.cpp's speed on one test: `llama-bench -p PROMPT -n GEN -d DEPTH` on `gguf` with
/// `threads`, `reps` repetitions (llama-bench's own mean): decoding `gen` tokens after `depth`
/// positions (`prompt` 0, tg GEN) or processing a `prompt` of that many tokens (`gen` 0, pp
/// PROMPT). Returns (tokens/s, file size in bytes).
pub fn llama_bench(bin: &Path, gguf: &Path, prompt: usize, gen: usize, depth: usize, threads: usize, reps: usize) -> Result<(f64, u64)> {
    let exe = bin.join("llama-bench");
    let out = std::process::Command::new(&exe)
        .arg("-m")
        .arg(gguf)
        .args(["-p", &prompt.to_string(), "-n", &gen.to_string(), "-d", &depth.to_string(), "-t", &threads.to_string(), "-r", &reps.max(1).to_string(), "-o", "json"])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        anyhow::bail!("{} on {} failed ({}): {}", exe.display(), gguf.display(), out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("{}: output is not JSON", exe.display()))?;
    let is = |r: &serde_json::Value| r["n_prompt"].as_u64() == Some(prompt as u64) && r["n_gen"].as_u64() == Some(gen as u64);
    let ts = v.as_array().and_then(|a| a.iter().find(|r| is(r))).and_then(|r| r["avg_ts"].as_f64());
    let ts = ts.ok_or_else(|| anyhow::anyhow!("{}: no pp{prompt} tg{gen} result in its JSON", exe.display()))?;
    let size = std::fs::metadata(gguf).with_context(|| format!("{}", gguf.display()))?.len();
    Ok((ts, size))
}
