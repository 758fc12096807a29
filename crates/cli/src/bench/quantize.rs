//! `adadim bench quantize`: quantization time by phase against the FLOP bound of the same
//! work at the GEMM rates measured in the same run.

use crate::args::BenchQuantizeArgs;
use crate::cmd::quantize::run_quantize;
use crate::resolve::model_dir;
use adadim_load::fetch::adadim_home;
use anyhow::{Context, Result};

pub fn bench_quantize(a: BenchQuantizeArgs) -> Result<()> {
    let dir = model_dir(&a.job.model.model)?;
    let c = adadim_load::Checkpoint::open(&dir)?.config;
    let q = &a.job.settings;
    let threads = candle_core::utils::get_num_threads();
    // 1. The machine's rates, measured now: f32 GEMM on the shapes the calibration runs
    //    (forward and X^T X), f64 GEMM for GPTQ's inverse and sweep (faer, as GPTQ uses it).
    let t = q.calib_seqlen;
    let f32_shapes = [
        (t, c.hidden_size, c.q_dim()),
        (t, c.hidden_size, c.intermediate_size),
        (t, c.intermediate_size, c.hidden_size),
        (c.hidden_size, t, c.hidden_size),
        (c.intermediate_size, t, c.intermediate_size),
    ];
    let mut f32_peak = 0f64;
    for (m, k, n) in f32_shapes {
        f32_peak = f32_peak.max(super::gemm_gflops(m, k, n, 5)?);
    }
    let f64_peak =
        [c.hidden_size, c.intermediate_size].iter().map(|&n| super::faer_f64_gflops(n, 5)).fold(0.0, f64::max);

    // 2. The run itself, into a scratch directory removed afterwards.
    let scratch = adadim_home().join("bench").join(format!("quantize-{}", std::process::id()));
    if let Some(p) = scratch.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }
    let summary = run_quantize(&dir, a.job.method, a.job.dim, q, adadim_calibrate::Format::Packed, &scratch)?;
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?; // written by this run
    let (tm, total, rss) = (&summary.timings, summary.seconds, summary.peak_rss_mb.unwrap_or(0.0));

    // 3. The bound: the least FLOPs the job needs (one forward per block, the lower triangle of
    //    each Hessian, GPTQ's f64 work) at the peak rates above; the rest has no FLOPs to count.
    let tokens = (q.nsamples * q.calib_seqlen) as f64;
    let per_window = c.forward_flops(t) - 2.0 * (c.hidden_size * c.vocab_size * t) as f64;
    // `--qep` runs the float model beside the quantized one: a second forward.
    let streams = if summary.settings.qep.is_some() { 2.0 } else { 1.0 };
    let forward_min = streams * per_window * q.nsamples as f64;
    let bound = |flops: f64, peak: f64| flops / (peak * 1e9);
    let hessians = match summary.settings.qep {
        Some(_) => "Hessians (X^T X, lower triangle) and QEP drifts ((x - x~)^T x~)",
        None => "Hessians (X^T X, lower triangle)",
    };
    let rows = [
        ("calibration forward", tm.forward_s, tm.forward_flops, forward_min, f32_peak),
        (hessians, tm.hessian_s, tm.hessian_flops, tm.hessian_flops, f32_peak),
        ("GPTQ Cholesky + inverse (f64)", tm.cholesky_s, tm.cholesky_flops, tm.cholesky_flops, f64_peak),
        ("GPTQ column sweeps (f64)", tm.sweep_s, tm.sweep_flops, tm.sweep_flops, f64_peak),
        ("dimension choice (RTN both axes, output or block errors)", tm.select_s, 0.0, 0.0, 1.0),
        ("AWQ scale search", tm.awq_s, 0.0, 0.0, 1.0),
        ("read blocks, write output", tm.io_s, 0.0, 0.0, 1.0),
    ];
    let bound_total: f64 = rows.iter().map(|r| bound(r.3, r.4)).sum();
    let mut md = String::new();
    use std::fmt::Write;
    writeln!(md, "## Quantization time (`adadim bench quantize`)\n")?;
    let qep = summary.settings.qep.map_or(String::new(), |a| format!(", --qep {a} (the float model's stream beside)"));
    writeln!(md, "`{}` {} w{}g{} on `{}` (for smollm2 the dequantized Q4_1 GGUF), --percdamp {}{qep}, calibration {} x {} tokens of {}, {threads} threads.\n",
        summary.settings.method.name(), summary.settings.dim.name(), q.bits(), q.group(), a.job.model.model, summary.settings.gptq.percdamp, q.nsamples, q.calib_seqlen, q.calib)?;
    writeln!(md, "Machine: {}.\n", super::machine())?;
    writeln!(md, "Rates measured in this run: f32 GEMM {f32_peak:.1} GFLOP/s (best over the calibration shapes), f64 GEMM {f64_peak:.1} GFLOP/s (faer).\n")?;
    writeln!(md, "| phase | seconds | GFLOP done | GFLOP/s | least GFLOP needed | bound at peak (s) |\n|---|---|---|---|---|---|")?;
    for (name, s, done, need, peak) in rows {
        let rate = if done > 0.0 && s > 0.0 { format!("{:.1}", done / s / 1e9) } else { "-".into() };
        let (need_s, b) = if need > 0.0 {
            (format!("{:.0}", need / 1e9), format!("{:.1}", bound(need, peak)))
        } else {
            ("-".into(), "-".into())
        };
        writeln!(md, "| {name} | {s:.1} | {:.0} | {rate} | {need_s} | {b} |", done / 1e9)?;
    }
    writeln!(md, "| **total** | **{total:.1}** | | | | **{bound_total:.1}** |\n")?;
    writeln!(
        md,
        "Total time / FLOP bound: **{:.2}x** (aim: within 1.5x, issue 31). Peak RSS {rss:.0} MB. {:.0} calibration tokens/s.",
        total / bound_total,
        tokens / total
    )?;
    writeln!(md, "\nThe calibration forward needs one pass per block (each linear's input computed once, true-sequential; with --qep one more through the float block); \"GFLOP done\" exceeds it where gate/up are recomputed for down's inputs (when they do not fit the cache: a quarter of the memory available, at least {} MiB). Causal attention counts only the keys each query sees. The last block's output is never needed, so the bound is slightly generous.", adadim_calibrate::ACT_CACHE_BYTES >> 20)?;
    super::publish(&a.write, "quantize", &md)
}
