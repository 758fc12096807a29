//! `adadim bench kernels`: packed matrix-vector products (decoding, batch 1) from memory, as a
//! fraction of this machine's memory bandwidth measured in the same run (STREAM triad), and
//! per-IC against per-OC on the same shape.

pub use adadim_pack::ActBits as Act;
use adadim_pack::PackedLinear;
use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
use anyhow::{Context, Result};
use rayon::prelude::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Best-of-`reps` STREAM triad `a = b + s c` over three arrays of `n` f32, in GB/s (counting
/// 12 bytes per element, STREAM's convention).
pub fn triad_gbs(n: usize, reps: usize) -> f64 {
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..reps + 1 {
        let t = Instant::now();
        a.par_chunks_mut(1 << 16).zip(b.par_chunks(1 << 16)).zip(c.par_chunks(1 << 16)).for_each(|((a, b), c)| {
            for i in 0..a.len() {
                a[i] = b[i] + 3.0 * c[i];
            }
        });
        std::hint::black_box(&a);
        best = best.min(t.elapsed().as_secs_f64());
    }
    12.0 * n as f64 / best / 1e9
}

pub struct KernelRow {
    pub axis: Axis,
    pub bytes: usize,
    pub seconds: f64,
}

impl KernelRow {
    pub fn gbs(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }
}

/// A seeded `[rows, cols]` matrix quantized w{bits}g{group} (RTN, AWQ zeros) along `axis`, packed.
pub fn packed_matrix(rows: usize, cols: usize, bits: u8, group: usize, axis: Axis) -> Result<PackedLinear> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (rows * 31 + cols) as u64;
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let q = rtn(&w, rows, cols, &QuantSpec { bits, group: Some(group), axis, zero: Zero::Awq })?;
    Ok(PackedLinear::from_quantized(&q))
}

/// Time one matvec of a `[rows, cols]` w{bits}g{group} matrix per-OC and per-IC, streaming
/// from memory: enough copies of each are cycled through that they cannot stay in any cache.
/// The two axes are timed in alternation, best of `reps` each, so a disturbance of the
/// machine falls on both and their ratio compares like with like; on the decode team, as
/// decoding runs them.
pub fn time_matvec_pair(rows: usize, cols: usize, bits: u8, group: usize, act: Act, working_set: usize, reps: usize) -> Result<(KernelRow, KernelRow)> {
    let copies = |axis| -> Result<Vec<PackedLinear>> {
        let one = packed_matrix(rows, cols, bits, group, axis)?;
        // Half the working set each: both stay resident, and each cycle reads from memory.
        let copies = (working_set / 2).div_ceil(one.bytes_read()).max(1);
        Ok((0..copies).map(|_| one.clone()).collect())
    };
    let sets = [copies(Axis::Oc)?, copies(Axis::Ic)?];
    let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut y = vec![0f32; rows];
    for mats in &sets {
        mats[0].matvec(act, &x, &mut y); // warm up the thread pool
    }
    let mut best = [f64::MAX; 2];
    // On the team decoding runs its matvecs on (`adadim_run::generate`): rayon's other
    // workers spin, ready for the row loops, instead of being woken per matvec.
    adadim_team::with_team(rayon::current_num_threads().saturating_sub(1), || {
        for _ in 0..reps {
            for (mats, best) in sets.iter().zip(best.iter_mut()) {
                let t = Instant::now();
                for m in mats {
                    m.matvec(act, &x, &mut y);
                }
                std::hint::black_box(&y);
                *best = best.min(t.elapsed().as_secs_f64() / mats.len() as f64);
            }
        }
    });
    let row = |i: usize, axis| KernelRow { axis, bytes: sets[i][0].bytes_read(), seconds: best[i] };
    Ok((row(0, Axis::Oc), row(1, Axis::Ic)))
}

/// Mean seconds of `runs` matvecs of one matrix on a pool of `threads` threads, the way
/// llama.cpp's `test-backend-ops perf` times MUL_MAT (one matrix, repeated, mean per run).
pub fn time_matvec_repeated(p: &PackedLinear, act: Act, threads: usize, runs: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let x: Vec<f32> = (0..p.cols()).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut y = vec![0f32; p.rows()];
    Ok(pool.install(|| {
        p.matvec(act, &x, &mut y);
        let t = Instant::now();
        for _ in 0..runs {
            p.matvec(act, &x, &mut y);
        }
        std::hint::black_box(&y);
        t.elapsed().as_secs_f64() / runs as f64
    }))
}

/// Best-of-`runs` seconds of one product of a packed matrix with `t` tokens (prefill) on a pool
/// of `threads` threads: on integers at `act` ([`PackedLinear::matmul`]), or through f32
/// panels (`act` `None`: `Act::F32`).
pub fn time_matmul(p: &PackedLinear, act: Option<Act>, t: usize, threads: usize, runs: usize) -> Result<f64> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let x: Vec<f32> = (0..t * p.cols()).map(|i| ((i * 2654435761) % 2001) as f32 / 1000.0 - 1.0).collect();
    let mut y = vec![0f32; t * p.rows()];
    let mut best = f64::MAX;
    pool.install(|| {
        for _ in 0..runs + 1 {
            let s = Instant::now();
            match act {
                Some(act) => p.matmul(act, &x, t, &mut y),
                None => p.matmul(Act::F32, &x, t, &mut y),
            }
            std::hint::black_box(&y);
            best = best.min(s.elapsed().as_secs_f64());
        }
    });
    Ok(best)
}

/// llama.cpp's own MUL_MAT timing for `type_a` (q4_0, q4_K, ...) times `n` f32 columns
/// (tokens: 1 for a matvec, or another size test-backend-ops times, 512 for prefill), `m`
/// output rows, `k` inputs: microseconds per run, and the thread count it used
/// (`test-backend-ops` gives the CPU backend half the hardware threads).
pub fn llamacpp_matmul_us(bin_dir: &Path, type_a: &str, m: usize, n: usize, k: usize) -> Result<(f64, usize)> {
    let exe = bin_dir.join("test-backend-ops");
    let filter = format!("type_a={type_a},type_b=f32,m={m},n={n},k={k},");
    let out = Command::new(&exe)
        .args(["perf", "-b", "CPU", "-o", "MUL_MAT", "-p", &filter])
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("MUL_MAT(") && l.contains(&filter))
        .ok_or_else(|| anyhow::anyhow!("{}: no MUL_MAT result for {filter} (status {}):\n{text}", exe.display(), out.status))?;
    // "...:   207 runs -  5519.56 us/run - 117.44 MFLOP/run - ..."
    let us = line
        .split(" us/run")
        .next()
        .and_then(|h| h.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("{}: cannot read us/run from '{line}'", exe.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1);
    Ok((us, threads))
}
