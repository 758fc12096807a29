#!/usr/bin/env python3
"""The `serve` section of BENCHMARKS.md from bench/serve.sh's results (results/serve/*.json):
per server, the best round's aggregate tokens/s at each concurrency and its ratio to one client,
the mixed load's failures and latencies, and adadim / llama-server at each concurrency.
Usage: bench/serve_table.py RESULTS_DIR BENCHMARKS.md"""

import glob
import json
import os
import sys

from section import replace_section

res_dir, md = sys.argv[1], sys.argv[2]
runs = {}
for f in sorted(glob.glob(os.path.join(res_dir, "*-r*.json"))):
    d = json.load(open(f))
    runs.setdefault(d["label"].rsplit("-r", 1)[0], []).append(d)
if not runs:
    sys.exit(f"no results in {res_dir}")


def best(rs, clients):
    return max(lv["tokens_per_s"] for r in rs for lv in r["throughput"] if lv["clients"] == clients)


levels = sorted({lv["clients"] for rs in runs.values() for r in rs for lv in r["throughput"]})
out = ["<!-- begin serve -->", "## Serving under load (`bench/serve.sh`)", ""]
any_run = next(iter(runs.values()))[0]
m = any_run["mixed"]
out.append(
    f"Both servers on loopback, one after the other, {len(next(iter(runs.values())))} round(s) each, interleaved: ours `adadim serve` "
    f"(SmolLM2 packed w4g128 RTN-ada, 8-bit LM head, int16 activations, f16 KV cache, 8 slots of 2048 positions), "
    f"llama.cpp's `llama-server` from the same sdist (the Q4_0 GGUF requantized from the shipped Q4_1, `-np 8`, "
    f"`-c 16384` = 2048 per slot, 2 threads, its repacked CPU layout, f16 KV cache). The load "
    f"(`bench/serve_load.py`): {m['clients']} clients x {m['planned'] // m['clients']} requests, prompts of about "
    f"10-1000 tokens cut from WikiText-2, every other request streamed, {any_run['max_tokens']} tokens each, greedy; "
    "then N clients each sending 3 requests of one ~100-token prompt for 128 tokens (`ignore_eos`), aggregate tokens/s."
)
out.append("")
out.append("| server | round | requests | failed | truncated | TTFT p50 / p99 (s) | per token p50 / p99 (ms) | wall (s) |")
out.append("|---|---|---|---|---|---|---|---|")
for name, rs in runs.items():
    for i, r in enumerate(rs):
        m = r["mixed"]
        f = lambda x, k=1: "-" if x is None else f"{x * k:.2f}" if k == 1 else f"{x * k:.1f}"
        out.append(
            f"| {name} | {i + 1} | {m['requests']}/{m['planned']} | {m['failed']} | {m['truncated']} | "
            f"{f(m['ttft_p50_s'])} / {f(m['ttft_p99_s'])} | {f(m['tpot_p50_s'], 1000)} / {f(m['tpot_p99_s'], 1000)} | {m['wall_s']:.0f} |"
        )
out.append("")
out.append("Aggregate decode throughput, the better of the rounds at each concurrency (tokens/s, and x one client of the same server):")
out.append("")
out.append("| server | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in levels) + " |")
out.append("|---|" + "---|" * len(levels))
for name, rs in runs.items():
    one = best(rs, levels[0])
    out.append(f"| {name} | " + " | ".join(f"{best(rs, c):.1f} ({best(rs, c) / one:.2f}x)" for c in levels) + " |")
if "adadim" in runs and "llama-server" in runs:
    out.append("")
    out.append(
        "adadim / llama-server aggregate tokens/s: "
        + ", ".join(f"{c} client{'s' if c > 1 else ''} {best(runs['adadim'], c) / best(runs['llama-server'], c):.2f}x" for c in levels)
        + "."
    )
out.append("<!-- end serve -->")
print(replace_section(md, "<!-- begin serve -->", "<!-- end serve -->", out))
