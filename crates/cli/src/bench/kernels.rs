//! `adadim bench kernels`: packed matrix-vector products (decoding, batch 1) from memory, as a
//! fraction of this machine's memory bandwidth measured in the same run (STREAM triad), and
//! per-IC against per-OC on the same shape.

use crate::args::BenchKernelsArgs;
use adadim_load::fetch::adadim_home;
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
pub fn time_matvec_pair(
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
    act: Act,
    working_set: usize,
    reps: usize,
) -> Result<(KernelRow, KernelRow)> {
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
    let line = text.lines().find(|l| l.contains("MUL_MAT(") && l.contains(&filter)).ok_or_else(|| {
        anyhow::anyhow!("{}: no MUL_MAT result for {filter} (status {}):\n{text}", exe.display(), out.status)
    })?;
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

/// Timings per kernel and shape in `bench kernels` (the best is kept).
pub const KERNEL_REPS: usize = 11;

/// The kernels `bench kernels` times: code width and activation precision (8-bit activations
/// are llama.cpp's precision).
pub const KERNELS: [(u8, adadim_pack::ActBits); 4] = [
    (4, adadim_pack::ActBits::I16),
    (4, adadim_pack::ActBits::I8),
    (3, adadim_pack::ActBits::I16),
    (3, adadim_pack::ActBits::I8),
];

pub fn bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    use adadim_quantize::Axis;
    let mut shapes = Vec::new();
    for s in &a.shapes {
        let (o, i) = s.split_once('x').ok_or_else(|| anyhow::anyhow!("--shapes: '{s}' is not OUTxIN"))?;
        shapes.push((
            o.parse::<usize>().with_context(|| format!("--shapes: '{s}'"))?,
            i.parse::<usize>().with_context(|| format!("--shapes: '{s}'"))?,
        ));
    }
    // The triad is measured again before every kernel pair (this workplace's bandwidth moved by
    // a third within minutes): the ratios use its best, as the kernels' times are their best.
    let mut triads = vec![triad_gbs(a.working_set / 12, 3)];
    let mut results = Vec::new();
    for &(rows, cols) in &shapes {
        for (k, &(bits, act)) in KERNELS.iter().enumerate() {
            triads.push(triad_gbs(a.working_set / 12, 1));
            let (oc, ic) = time_matvec_pair(rows, cols, bits, a.group, act, a.working_set, KERNEL_REPS)?;
            eprintln!("{rows}x{cols} w{bits} int{}: oc {:.1} GB/s, ic {:.1} GB/s", act.bits(), oc.gbs(), ic.gbs());
            results.push((rows, cols, k, oc, ic));
        }
    }
    let triad = triads.iter().fold(0f64, |a, &b| a.max(b));
    let low = triads.iter().fold(f64::MAX, |a, &b| a.min(b));
    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Packed matrix-vector kernels (`adadim bench kernels`)\n")?;
    writeln!(md, "Machine: {}. Memory bandwidth measured in this run (STREAM triad, {} MB arrays, measured again before each kernel's timings: {} measurements from {low:.1} to {triad:.1} GB/s; the ratios below use the best): **{triad:.1} GB/s**.\n", super::machine(), (a.working_set / 12) >> 18, triads.len())?;
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
            writeln!(
                md,
                "| {rows} x {cols} | {bits} | int{} | {axis} | {:.1} | {:.1} | {:.2} | {rel} |",
                act.bits(),
                r.seconds * 1e6,
                r.gbs(),
                r.gbs() / triad
            )?;
            worst[k].0 = worst[k].0.min(r.gbs() / triad);
        }
        worst[k].1 = worst[k].1.max(ratio);
    }
    writeln!(md, "\n| kernel | lowest fraction of triad (aim >= 0.8) | highest per-IC / per-OC time (aim <= 1.05) |\n|---|---|---|")?;
    for (&(bits, act), w) in KERNELS.iter().zip(&worst) {
        writeln!(md, "| {bits}-bit codes, int{} activations | **{:.2}** | **{:.3}** |", act.bits(), w.0, w.1)?;
    }
    let llama = a
        .llamacpp
        .clone()
        .or_else(|| Some(adadim_home().join("peers/llama.cpp/bin")))
        .filter(|d| d.join("test-backend-ops").exists());
    match llama {
        Some(bin) => kernels_vs_llamacpp(&bin, a.group, &mut md)?,
        None => writeln!(
            md,
            "\nllama.cpp comparison skipped: no test-backend-ops (build it with `bench/peers/build-llamacpp.sh`)."
        )?,
    }
    super::publish(&a.write, "kernels", &md)
}

/// Our matvec against llama.cpp's (test-backend-ops perf, MUL_MAT with n = 1) on the one
/// decode shape that tool times, with the same thread count and the same method (one matrix,
/// repeated; mean per run).
pub fn kernels_vs_llamacpp(bin: &std::path::Path, group: usize, md: &mut String) -> Result<()> {
    use adadim_quantize::Axis;
    use std::fmt::Write;
    let (m, k) = (4096, 14336);
    let mut peers = Vec::new();
    for ty in ["q4_0", "q4_K", "q3_K"] {
        let (us, threads) = llamacpp_matmul_us(bin, ty, m, 1, k)?;
        peers.push((ty, us, threads));
    }
    let threads = peers[0].2;
    writeln!(md, "\n### Against llama.cpp's plain layouts (same run)\n")?;
    writeln!(md, "**Peer layout: llama.cpp's plain block layouts** (`test-backend-ops` times `q4_0` / `q4_K` / `q3_K` as stored in a file); its model loader repacks Q4_0 and Q4_K into interleaved CPU layouts on this machine, which are faster than the plain ones. These rows compare kernels against the plain layouts only; the fair end-to-end ratios are the decode and prompt-processing sections, where `llama-bench` runs its repacked path.\n")?;
    writeln!(md, "`{m} x {k}` (out x in; the only matrix-vector shape `test-backend-ops perf -o MUL_MAT` times), {threads} thread(s) each (test-backend-ops gives its CPU backend half the hardware threads; ours runs on a pool of the same size). One matrix repeated, mean time per run, as test-backend-ops measures (the ~30 MB matrix about fills L3). llama.cpp rounds the activations to 8 bits (Q8_0 / Q8_K); ours to 16, or to 8 in blocks of 32 (`int8`, as Q8_0).\n")?;
    writeln!(md, "| kernel | bits / weight | us / matvec |\n|---|---|---|")?;
    let bpw = |ty: &str| match ty {
        "q4_0" => 4.5,
        "q4_K" => 4.5,
        _ => 3.4375,
    };
    for &(ty, us, _) in &peers {
        writeln!(md, "| llama.cpp {ty} (plain) | {} | {us:.1} |", bpw(ty))?;
    }
    let mut ours = Vec::new();
    for (bits, act) in KERNELS {
        for axis in [Axis::Oc, Axis::Ic] {
            let p = packed_matrix(m, k, bits, group, axis)?;
            let s = time_matvec_repeated(&p, act, threads, 100)?;
            let name = format!(
                "adadim w{bits}g{group} {} int{}",
                if axis == Axis::Oc { "per-OC" } else { "per-IC" },
                act.bits()
            );
            writeln!(md, "| {name} | {:.3} | {:.1} |", p.layout().bits_per_weight(m, k, false), s * 1e6)?;
            ours.push((bits, name, s * 1e6));
        }
    }
    writeln!(md)?;
    for (bits, name, us) in &ours {
        let vs: Vec<String> = peers
            .iter()
            .filter(|(ty, _, _)| if *bits == 4 { ty.starts_with("q4") } else { ty.starts_with("q3") })
            .map(|(ty, pus, _)| format!("{:.2}x plain {ty}'s speed", pus / us))
            .collect();
        writeln!(md, "- {name}: {}", vs.join(", "))?;
    }
    kernels_prefill_vs_llamacpp(bin, group, threads, md)
}

/// Prefill products (`n` = 512 tokens, the GEMM size `test-backend-ops perf` times for this
/// shape) against llama.cpp's and against the dense f32 GEMM of the same size, on as many
/// threads as test-backend-ops uses.
pub fn kernels_prefill_vs_llamacpp(bin: &std::path::Path, group: usize, threads: usize, md: &mut String) -> Result<()> {
    use adadim_quantize::Axis;
    use std::fmt::Write;
    let (m, n, k) = (4096, 512, 14336);
    let flop = 2.0 * (m * n * k) as f64;
    let mut peers = Vec::new();
    for ty in ["q4_0", "q4_K", "q3_K"] {
        let (us, _) = llamacpp_matmul_us(bin, ty, m, n, k)?;
        peers.push((ty, us));
    }
    // The f32 GEMM the forward pass runs (the better of candle's and faer's), on as many threads.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let dense = flop / (pool.install(|| super::gemm_gflops(n, k, m, 3))? * 1e9);
    writeln!(md, "\n### Prefill products against llama.cpp's plain layouts (same run)\n")?;
    writeln!(md, "`{m} x {k}` times {n} tokens (test-backend-ops' MUL_MAT n = {n} case), {threads} thread(s) each; best of 3 for ours, test-backend-ops' mean. Ours: on integers (`matmul` at int16 / int8: activations rounded as the decode matvec rounds them, codes widened per panel, AVX-512 VNNI), and through dequantized f32 panels (`matmul` at f32, what evaluation runs); against the dense f32 GEMM of the same size (the better of candle's and faer's, as the forward pass runs it) on f32 weights.\n")?;
    writeln!(md, "| product | GFLOP/s | of the f32 GEMM |\n|---|---|---|")?;
    writeln!(md, "| dense f32 GEMM | {:.1} | 1.00 |", flop / dense / 1e9)?;
    for &(ty, us) in &peers {
        writeln!(md, "| llama.cpp {ty} (plain) | {:.1} | {:.2} |", flop / us / 1e3, dense / (us * 1e-6))?;
    }
    let mut ours = Vec::new();
    for bits in [4u8, 3] {
        for axis in [Axis::Oc, Axis::Ic] {
            let p = packed_matrix(m, k, bits, group, axis)?;
            let ax = if axis == Axis::Oc { "per-OC" } else { "per-IC" };
            for act in [Some(adadim_pack::ActBits::I16), Some(adadim_pack::ActBits::I8), None] {
                let sec = time_matmul(&p, act, n, threads, 3)?;
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
            .map(|(ty, us)| format!("{:.2}x plain {ty}'s speed", us * 1e-6 / sec))
            .collect();
        writeln!(md, "- {name}: {}", vs.join(", "))?;
    }
    Ok(())
}
