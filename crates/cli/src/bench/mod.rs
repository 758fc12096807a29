//! `adadim bench ...`: one file per benchmark; here what they share: the machine's GEMM rates,
//! its description, and writing a result into its section of BENCHMARKS.md.

pub mod decode;
pub mod eval;
pub mod kernels;
pub mod llamacpp;
pub mod quality;
pub mod quantize;
pub mod scale;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Best-of-`reps` GFLOP/s of `(m,k) @ (k,n)`, the right operand a weight matrix `(n,k)`: the
/// better of candle's GEMM and a dense linear's product (faer's GEMM past a few hundred rows,
/// the path the forward passes take), so a bound built on it holds for either.
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let wt = w.t()?;
    let linear = adadim_model::Linear { weight: adadim_model::Weight::Dense(w.clone()), bias: None };
    let settings = adadim_model::DecodeSettings::DEFAULT;
    let _ = (a.matmul(&wt)?, linear.forward(&a, &settings)?); // warm up (thread pools, page faults)
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(a.matmul(&wt)?);
        best = best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(linear.forward(&a, &settings)?);
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
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    #[cfg(target_arch = "x86_64")]
    let isa = if is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else if is_x86_feature_detected!("avx2") {
        "AVX2+FMA, no AVX-512"
    } else {
        "no AVX2"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let isa = std::env::consts::ARCH;
    format!("{model}, {isa}, {} threads", candle_core::utils::get_num_threads())
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
    let old = std::fs::read_to_string(file)
        .unwrap_or_else(|_| "# Benchmarks\n\nRegenerate with `bench/run.sh` (see README).\n".into());
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
