//! `adadim bench decode`: decode tokens/s of float and packed models against the memory
//! bandwidth bound and llama.cpp's llama-bench on GGUFs of the same model.

use crate::args::BenchDecodeArgs;
use crate::resolve::{act_bits, apply_head_bits, model_dir};
use adadim_load::fetch::adadim_home;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    use std::fmt::Write;
    let threads = candle_core::utils::get_num_threads();
    let rounds = a.reps.max(1);
    // Every model loaded first, then measured once per round in turn, llama-bench included: on
    // a shared machine the bandwidth moved by half between runs an hour apart (triad 30 to 47
    // GB/s), and timing all of ours before all of llama.cpp's gave one side the better minutes.
    let acts = a.act_bits.iter().map(|&b| act_bits(b)).collect::<Result<Vec<_>>>()?;
    let mut models = Vec::new();
    // Per model: a packed model, and one whose layouts `--bpw` chose.
    let (mut packed_model, mut mixed) = (Vec::new(), Vec::new());
    // (model index, activations, label, depth, best decode tokens/s, best prefill tokens/s of
    // the depth's prompt)
    let mut ours: Vec<(usize, adadim_pack::ActBits, String, usize, f64, f64)> = Vec::new();
    let deepest = a.depth.iter().copied().chain([a.batch_depth]).max().unwrap_or(0);
    if a.batch.contains(&0) {
        anyhow::bail!("--batch: 0 sequences (give counts of at least 1, e.g. 1,2,4,8)");
    }
    for spec in &a.models {
        let dir = model_dir(spec)?;
        let src = adadim_model::open(&dir)?;
        crate::limits::check_positions(
            src.config(),
            &dir.join("config.json"),
            deepest + a.tokens + 2,
            "--depth + --tokens",
        )?;
        let mut model = adadim_model::Model::load(src.as_ref(), deepest + a.tokens + 2, &mut |_, _| {})?;
        let packed = adadim_model::is_packed(&dir);
        apply_head_bits(&mut model, Some(if packed { a.head_bits } else { 0 }), packed)?;
        // The prompt as `generate` multiplies it: on integers at the measured precision.
        // f16 keys and values: llama-bench's default cache type, so both read the same bytes.
        model.set_settings(adadim_model::DecodeSettings {
            integer_prefill: true,
            kv: adadim_model::KvType::F16,
            ..model.settings()
        })?;
        let head = if packed && a.head_bits > 0 { format!(", head {}-bit", a.head_bits) } else { String::new() };
        // What the run recorded, read once; "?" for a model without (a readable) report.json.
        let report = if packed { adadim_calibrate::Report::read(&dir).ok() } else { None };
        let (method, dim, layout) = match &report {
            Some(r) => {
                let st = &r.summary.settings;
                let layout = match &r.summary.allocation {
                    Some(al) => format!("--bpw {:.2}", al.bpw),
                    None => {
                        format!("w{}g{}", st.spec.bits, st.spec.group.map_or("null".to_string(), |g| g.to_string()))
                    }
                };
                (st.method.name(), st.dim.name(), layout)
            }
            None => ("?", "?", "w?g?".to_string()),
        };
        for &act in if packed { &acts[..] } else { &[adadim_pack::ActBits::I16][..] } {
            let label = if packed {
                format!(
                    "{} packed ({method}-{dim} {layout}{head}, int{} activations)",
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    act.bits()
                )
            } else {
                format!("{} f32", dir.file_name().unwrap_or_default().to_string_lossy())
            };
            for &d in &a.depth {
                ours.push((models.len(), act, label.clone(), d, 0.0, 0.0));
            }
        }
        mixed.push(report.is_some_and(|r| r.summary.allocation.is_some()));
        packed_model.push(packed);
        models.push(model);
    }
    let llama = a
        .llamacpp
        .clone()
        .or_else(|| Some(adadim_home().join("peers/llama.cpp/bin")))
        .filter(|d| d.join("llama-bench").exists());
    let bin = match (a.gguf.is_empty(), llama) {
        (true, _) => None,
        (false, Some(bin)) => Some(bin),
        (false, None) => {
            anyhow::bail!("--gguf given but no llama-bench found (bench/peers/build-llamacpp.sh, or --llamacpp DIR)")
        }
    };
    // (gguf, label, depth, best tokens/s, file bytes)
    let mut peers: Vec<(&PathBuf, String, usize, f64, u64)> = a
        .gguf
        .iter()
        .flat_map(|g| {
            a.depth
                .iter()
                .map(move |&d| (g, g.file_stem().unwrap_or_default().to_string_lossy().to_string(), d, 0.0, 0))
        })
        .collect();
    // llama-bench pp D per GGUF and nonzero depth D, best tokens/s.
    let pp_depths: Vec<usize> = a.depth.iter().copied().filter(|&d| d > 0).collect();
    let mut peers_pp: Vec<Vec<f64>> = vec![vec![0.0; pp_depths.len()]; a.gguf.len()];
    // Batched decode: (index into `ours` of the model and activations, batch, best tokens/s), and
    // llama-batched-bench's per GGUF and batch.
    let mut batched: Vec<(usize, usize, f64)> = Vec::new();
    for (i, o) in ours.iter().enumerate() {
        let first = ours.iter().position(|p| p.0 == o.0 && p.1 == o.1) == Some(i);
        if first && packed_model[o.0] {
            batched.extend(a.batch.iter().map(|&n| (i, n, 0.0)));
        }
    }
    let mut peers_batched: Vec<Vec<f64>> = vec![vec![0.0; a.batch.len()]; a.gguf.len()];
    let mut triad = 0f64;
    // Every round's tokens/s of each of `ours`, for the mixed models' ratios within a round.
    let mut each_round: Vec<Vec<f64>> = vec![Vec::new(); ours.len()];
    let settings = adadim_run::Settings { max_tokens: a.tokens, temperature: 0.0, seed: 0 };
    for round in 1..=rounds {
        triad = triad.max(super::kernels::triad_gbs((512 << 20) / 12, 3));
        for ((m, act, label, depth, best, pp), rounds_ts) in ours.iter_mut().zip(&mut each_round) {
            let s = adadim_model::DecodeSettings { act: *act, ..models[*m].settings() };
            models[*m].set_settings(s)?;
            // The context: `depth` tokens of one id (prefill, not timed), or the one-token prompt.
            let prompt = vec![1u32; (*depth).max(1)];
            let stats = adadim_run::generate(&models[*m], &prompt, &[], &settings, &mut |_| {})?;
            *best = best.max(stats.decode_tokens_per_s());
            rounds_ts.push(stats.decode_tokens_per_s());
            if *depth > 0 {
                // The context's prefill: prompt processing of `depth` tokens.
                *pp = pp.max(stats.prefill_tokens_per_s());
            }
            eprintln!("round {round}/{rounds}: {label} @ {depth}: {:.1} tokens/s", stats.decode_tokens_per_s());
        }
        for (i, n, best) in &mut batched {
            let (m, act) = (ours[*i].0, ours[*i].1);
            let s = adadim_model::DecodeSettings { act, ..models[m].settings() };
            models[m].set_settings(s)?;
            let ts = batched_tokens_per_s(&models[m], *n, a.batch_depth, a.tokens)?;
            *best = best.max(ts);
            eprintln!("round {round}/{rounds}: batch of {n}, {}: {ts:.1} tokens/s", ours[*i].2);
        }
        if let (Some(bin), false) = (&bin, a.batch.is_empty()) {
            for (g, bests) in a.gguf.iter().zip(&mut peers_batched) {
                let ts = llama_batched_bench(bin, g, a.batch_depth, a.tokens, &a.batch, threads)?;
                for ((best, t), n) in bests.iter_mut().zip(ts).zip(&a.batch) {
                    *best = best.max(t);
                    eprintln!("round {round}/{rounds}: llama.cpp {} batch {n}: {t:.1} tokens/s", g.display());
                }
            }
        }
        if let Some(bin) = &bin {
            for (g, label, depth, best, size) in &mut peers {
                let (ts, bytes) = llama_bench(bin, g, 0, a.tokens, *depth, threads, 1)?;
                (*best, *size) = (best.max(ts), bytes);
                eprintln!("round {round}/{rounds}: llama.cpp {label} @ {depth}: {ts:.1} tokens/s");
            }
            for (g, bests) in a.gguf.iter().zip(&mut peers_pp) {
                for (&d, best) in pp_depths.iter().zip(bests) {
                    let (ts, _) = llama_bench(bin, g, d, 0, 0, threads, 1)?;
                    *best = best.max(ts);
                    eprintln!("round {round}/{rounds}: llama.cpp {} pp{d}: {ts:.1} tokens/s", g.display());
                }
            }
        }
    }
    let mut md = String::new();
    writeln!(md, "## Decode speed (`adadim bench decode`)\n")?;
    writeln!(
        md,
        "Machine: {}. Memory bandwidth measured in this run (STREAM triad, best of the rounds): **{triad:.1} GB/s**.\n",
        super::machine()
    )?;
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
        writeln!(
            md,
            "| adadim: {label} | {depth} | {:.1} | {best:.1} | {bound:.0} | {:.2} |",
            bytes / 1e6,
            best / bound
        )?;
    }
    // A `--bpw` model mixes layouts: its fraction of the bound against the uniform packed
    // models' at the same depth and precision, interpolated at its bytes per token (issue 32:
    // a mixed model should decode at the speed its bytes predict).
    // (bytes per token, fraction of the bound) of model `m` decoding `ts` tokens/s at `depth`.
    let frac = |m: usize, depth: usize, ts: f64| {
        let bytes = models[m].weight_bytes_per_token() as f64 + kv_bytes(&models[m], depth);
        (bytes, ts / (triad * 1e9 / bytes))
    };
    // The uniform models' fraction interpolated at `bytes`, from (bytes, fraction) points.
    let interpolate = |uniform: &[(f64, f64)], bytes: f64| {
        let below = uniform.iter().filter(|u| u.0 <= bytes).max_by(|a, b| a.0.total_cmp(&b.0));
        let above = uniform.iter().filter(|u| u.0 >= bytes).min_by(|a, b| a.0.total_cmp(&b.0));
        match (below, above) {
            (Some(&(b0, f0)), Some(&(b1, f1))) => {
                Some(if b1 > b0 { f0 + (f1 - f0) * (bytes - b0) / (b1 - b0) } else { f0 })
            }
            _ => None,
        }
    };
    let mut mixed_lines = Vec::new();
    for (i, o) in ours.iter().enumerate().filter(|(_, o)| mixed[o.0]) {
        let (bytes, f) = frac(o.0, o.3, o.4);
        let peers_of: Vec<usize> = (0..ours.len())
            .filter(|&j| {
                let u = &ours[j];
                !mixed[u.0] && packed_model[u.0] && u.1 == o.1 && u.3 == o.3
            })
            .collect();
        let uniform: Vec<(f64, f64)> = peers_of.iter().map(|&j| frac(ours[j].0, ours[j].3, ours[j].4)).collect();
        if let Some(want) = interpolate(&uniform, bytes) {
            // The same comparison within each round (the machine's state moves between rounds
            // more than this difference): median and range of the rounds' differences.
            let mut per_round: Vec<f64> = (0..each_round[i].len())
                .filter_map(|r| {
                    let at = |j: usize| frac(ours[j].0, ours[j].3, each_round[j][r]);
                    let points: Vec<(f64, f64)> = peers_of.iter().map(|&j| at(j)).collect();
                    interpolate(&points, bytes).map(|w| 100.0 * (at(i).1 / w - 1.0))
                })
                .collect();
            per_round.sort_by(f64::total_cmp);
            let within = match (per_round.first(), per_round.last()) {
                (Some(lo), Some(hi)) => format!(
                    "; within each round: median {:+.1}%, {lo:+.1}% to {hi:+.1}% over {} rounds",
                    per_round[per_round.len() / 2],
                    per_round.len()
                ),
                _ => String::new(),
            };
            mixed_lines.push(format!(
                "- {} @ {}: {f:.2} of its bound; uniform models around its {:.1} MB / token: {want:.2}; {:+.1}% (best rounds){within}",
                o.2,
                o.3,
                bytes / 1e6,
                100.0 * (f / want - 1.0),
            ));
        }
    }
    for (_, label, depth, ts, size) in &peers {
        // The same model's keys and values (the GGUFs are of the models measured above).
        let kv = models.first().map_or(0.0, |m| kv_bytes(m, *depth));
        let bytes = *size as f64 + kv;
        let bound = triad * 1e9 / bytes;
        writeln!(
            md,
            "| llama.cpp llama-bench tg{}: {label} | {depth} | {:.1} (file + KV) | {ts:.1} | {bound:.0} | {:.2} |",
            a.tokens,
            bytes / 1e6,
            ts / bound
        )?;
    }
    if !mixed_lines.is_empty() {
        writeln!(md, "\nMixed layouts (`--bpw`) against uniform ones: each `--bpw` model's fraction of its bound beside the fraction the uniform packed models measured at the same depth and precision reach, interpolated at its bytes per token; from the best round of each, and round by round (each round's models measured one after another, so a difference within a round is not the machine's state moving between rounds):\n")?;
        writeln!(md, "{}", mixed_lines.join("\n"))?;
    }
    if !peers.is_empty() {
        writeln!(md, "\nadadim / llama.cpp decode speed, at the same depth:\n")?;
        for (_, _, label, depth, t, _) in &ours {
            let vs: Vec<String> =
                peers.iter().filter(|p| p.2 == *depth).map(|(_, p, _, pt, _)| format!("{:.2}x {p}", t / pt)).collect();
            writeln!(md, "- {label} @ {depth}: {}", vs.join(", "))?;
        }
    }
    if !pp_depths.is_empty() {
        let lengths: Vec<String> = pp_depths.iter().map(|d| d.to_string()).collect();
        writeln!(md, "\n### Prompt processing: {} tokens\n", lengths.join(", "))?;
        writeln!(md, "Each nonzero depth's context prefill, timed as `generate` times it (the prompt through the model, the last position's logits included); llama.cpp: `llama-bench -p N -n 0`, in the same rounds. Prefill is compute-bound: packed models multiply the prompt on integers (`adadim_pack::matmul_int`, AVX-512 VNNI: activations rounded as the decode matvecs round them, int16 or int8 as labelled), the f32 model with faer's GEMM; llama.cpp multiplies int8-rounded activations with its integer kernels.\n")?;
        writeln!(
            md,
            "| model | {} |\n|---|{}",
            pp_depths.iter().map(|d| format!("{d} tokens, tokens/s")).collect::<Vec<_>>().join(" | "),
            "---|".repeat(pp_depths.len())
        )?;
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
                    let vs: Vec<String> = a
                        .gguf
                        .iter()
                        .zip(&peers_pp)
                        .map(|(g, p)| {
                            format!("{:.2}x {}", pp / p[i], g.file_stem().unwrap_or_default().to_string_lossy())
                        })
                        .collect();
                    format!("{pp:.1}{}", if vs.is_empty() { String::new() } else { format!(" ({})", vs.join(", ")) })
                })
                .collect();
            writeln!(md, "| adadim: {label} | {} |", cells.join(" | "))?;
        }
        for (g, p) in a.gguf.iter().zip(&peers_pp) {
            writeln!(
                md,
                "| llama.cpp llama-bench pp: {} | {} |",
                g.file_stem().unwrap_or_default().to_string_lossy(),
                p.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | ")
            )?;
        }
    }
    if !batched.is_empty() {
        writeln!(md, "\n### Batched decode: several sequences stepped together\n")?;
        writeln!(md, "Aggregate tokens/s of N sequences decoding together, each after its own prompt of {} tokens (not timed), {} steps, greedy: ours `Model::decode_batch` (what `serve` runs for N clients: every linear multiplies all N tokens while its codes are in cache, each sequence attending over its own KV cache), llama.cpp `llama-batched-bench -npp {} -ntg {} -npl N` (prompts not shared), in the same rounds; best round of each. In brackets: x the same side's one sequence. A step reads the weights once whatever N, so the aggregate grows with N until the arithmetic per token binds.\n", a.batch_depth, a.tokens, a.batch_depth, a.tokens)?;
        let head: Vec<String> = a.batch.iter().map(|n| format!("N = {n}")).collect();
        writeln!(md, "| model | {} |\n|---|{}", head.join(" | "), "---|".repeat(a.batch.len()))?;
        let row = |ts: &[f64]| -> String {
            ts.iter().map(|t| format!("{t:.1} ({:.2}x)", t / ts[0])).collect::<Vec<_>>().join(" | ")
        };
        for i in batched.iter().map(|b| b.0).collect::<std::collections::BTreeSet<_>>() {
            let ts: Vec<f64> = batched.iter().filter(|b| b.0 == i).map(|b| b.2).collect();
            writeln!(md, "| adadim: {} | {} |", ours[i].2, row(&ts))?;
        }
        for (g, ts) in a.gguf.iter().zip(&peers_batched) {
            writeln!(
                md,
                "| llama.cpp llama-batched-bench: {} | {} |",
                g.file_stem().unwrap_or_default().to_string_lossy(),
                row(ts)
            )?;
        }
    }
    writeln!(md, "\nllama.cpp's bound uses its whole file size (all weights, quantized embeddings included) as bytes per token. Threads: {threads} each.")?;
    let packed: Vec<PathBuf> =
        a.models.iter().filter_map(|m| model_dir(m).ok()).filter(|d| adadim_model::is_packed(d)).collect();
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
            let dense: usize = cfg
                .expected_tensors()
                .iter()
                .filter(|(n, _)| !names.iter().any(|l| n == &format!("{l}.weight")))
                .map(|(n, s)| f.dense_value_bytes(n).unwrap_or(4) * s.iter().product::<usize>())
                .sum();
            let file = std::fs::metadata(dir.join("model.safetensors"))?.len() as usize;
            writeln!(
                md,
                "| {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                dir.file_name().unwrap_or_default().to_string_lossy(),
                8.0 * lin_bytes as f64 / weights as f64,
                lin_bytes as f64 / 1e6,
                dense as f64 / 1e6,
                (lin_bytes + dense) as f64 / 1e6,
                file as f64 / 1e6,
                file as i64 - (lin_bytes + dense) as i64
            )?;
        }
    }
    super::publish(&a.write, "decode", &md)
}

/// Aggregate decode tokens/s of `n` sequences stepped together ([`adadim_model::Model::decode_batch`]
/// on the decode team, as `serve` runs it), each after its own `depth`-token prompt (prefill
/// not timed), `tokens` greedy steps.
fn batched_tokens_per_s(model: &adadim_model::Model, n: usize, depth: usize, tokens: usize) -> Result<f64> {
    let vocab = model.config.vocab_size.max(2);
    let mut caches: Vec<adadim_model::KvCache> = (0..n).map(|_| model.new_cache()).collect();
    for (i, c) in caches.iter_mut().enumerate() {
        // Different prompts, so the sequences do not decode the same tokens.
        let prompt: Vec<u32> = (0..depth.max(1)).map(|p| ((p * 7 + i * 13) % (vocab - 1) + 1) as u32).collect();
        model.forward_cached(&prompt, c)?;
    }
    let mut ids: Vec<u32> = (0..n).map(|i| (i % (vocab - 1) + 1) as u32).collect();
    let mut scratch = adadim_model::BatchScratch::default();
    // Temperature 0: the argmax, as `generate` picks it.
    let mut greedy = adadim_run::Sampler::new(0.0, 1.0, 0);
    let helpers = rayon::current_num_threads().saturating_sub(1);
    let start = std::time::Instant::now();
    adadim_team::with_team(helpers, || -> Result<()> {
        for _ in 0..tokens {
            let mut refs: Vec<&mut adadim_model::KvCache> = caches.iter_mut().collect();
            let logits = model.decode_batch(&ids, &mut refs, &mut scratch)?;
            for (id, l) in ids.iter_mut().zip(logits.chunks_exact(vocab)) {
                *id = greedy.next(l);
            }
        }
        Ok(())
    })?;
    Ok((n * tokens) as f64 / start.elapsed().as_secs_f64())
}

/// llama.cpp's aggregate decode tokens/s for each of `batch` parallel sequences:
/// `llama-batched-bench -npp depth -ntg gen -npl ...` with `threads`.
fn llama_batched_bench(
    bin: &Path,
    gguf: &Path,
    depth: usize,
    gen: usize,
    batch: &[usize],
    threads: usize,
) -> Result<Vec<f64>> {
    let exe = bin.join("llama-batched-bench");
    let npl: Vec<String> = batch.iter().map(|n| n.to_string()).collect();
    let ctx = batch.iter().max().copied().unwrap_or(1) * (depth + gen) + 16;
    let out = std::process::Command::new(&exe)
        .arg("-m")
        .arg(gguf)
        .args(["-c", &ctx.to_string(), "-b", "2048", "-ub", "512"])
        .args(["-npp", &depth.to_string(), "-ntg", &gen.to_string(), "-npl", &npl.join(",")])
        .args(["-t", &threads.to_string(), "--output-format", "jsonl"])
        .output();
    let out = peer_output(&exe, gguf, out)?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut speeds = vec![None; batch.len()];
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("{} printed a line that is not JSON: {line}", exe.display()))?;
        let (pl, speed) = (v["pl"].as_u64(), v["speed_tg"].as_f64());
        if let (Some(pl), Some(speed)) = (pl, speed) {
            if let Some(i) = batch.iter().position(|&n| n as u64 == pl) {
                speeds[i] = Some(speed);
            }
        }
    }
    speeds
        .into_iter()
        .zip(batch)
        .map(|(s, n)| {
            s.with_context(|| format!("{} printed no result for {n} sequences on {}", exe.display(), gguf.display()))
        })
        .collect()
}

/// A llama.cpp tool's output, or an error naming the tool, the file and what it printed.
fn peer_output(exe: &Path, gguf: &Path, out: std::io::Result<std::process::Output>) -> Result<std::process::Output> {
    let out = out.with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} on {} failed ({}): {}",
            exe.display(),
            gguf.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// llama.cpp's speed on one test: `llama-bench -p PROMPT -n GEN -d DEPTH` on `gguf` with
/// `threads`, `reps` repetitions (llama-bench's own mean): decoding `gen` tokens after `depth`
/// positions (`prompt` 0, tg GEN) or processing a `prompt` of that many tokens (`gen` 0, pp
/// PROMPT). Returns (tokens/s, file size in bytes).
pub fn llama_bench(
    bin: &Path,
    gguf: &Path,
    prompt: usize,
    gen: usize,
    depth: usize,
    threads: usize,
    reps: usize,
) -> Result<(f64, u64)> {
    let exe = bin.join("llama-bench");
    let out = std::process::Command::new(&exe)
        .arg("-m")
        .arg(gguf)
        .args([
            "-p",
            &prompt.to_string(),
            "-n",
            &gen.to_string(),
            "-d",
            &depth.to_string(),
            "-t",
            &threads.to_string(),
            "-r",
            &reps.max(1).to_string(),
            "-o",
            "json",
        ])
        .output();
    let out = peer_output(&exe, gguf, out)?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{}: output is not JSON", exe.display()))?;
    let is = |r: &serde_json::Value| {
        r["n_prompt"].as_u64() == Some(prompt as u64) && r["n_gen"].as_u64() == Some(gen as u64)
    };
    let ts = v.as_array().and_then(|a| a.iter().find(|r| is(r))).and_then(|r| r["avg_ts"].as_f64());
    let ts = ts.ok_or_else(|| anyhow::anyhow!("{}: no pp{prompt} tg{gen} result in its JSON", exe.display()))?;
    let size = std::fs::metadata(gguf).with_context(|| format!("{}", gguf.display()))?.len();
    Ok((ts, size))
}
