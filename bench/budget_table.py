"""Tabulate a bench/budget.sh run directory into RESULTS.md's "Size budget" section.

Usage: python3 bench/budget_table.py OUT RESULTS.md [ABLATION_DIR]
The section between `<!-- budget -->` and `<!-- end budget -->` is replaced (appended at the
end the first time). Uniform models of the ablation (bench/ablation.sh, default
results/ablation) are listed beside the budgets at the bits per weight their layout stores.
"""
import json
import math
import pathlib
import re
import statistics
import sys
from collections import defaultdict

from runs import stat
from section import replace_section

out, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ablation = pathlib.Path(sys.argv[3] if len(sys.argv) > 3 else "results/ablation")
fp = {ds: json.loads((out / f"fp.{ds}.json").read_text())["ppl"] for ds in ("wikitext2", "ptb")}
MODULES = ["q", "k", "v", "o", "gate", "up", "down"]


def short(module):
    return module.split(".")[-1].removesuffix("_proj")


def damage(model, lin, cand):
    """A candidate's damage under each damage model (crates/calibrate/src/damage.rs)."""
    e, rows, lay = cand["error"], lin["rows"], lin["layout"]
    tiny = sys.float_info.min
    return {
        "output": e * rows,
        "relative": e / max(lay["output_energy"], tiny),
        "stream": e * rows / max(lay["stream_energy"], tiny),
        "kl": lay["sensitivity"] * e * rows,
    }[model]


def name_match(f):
    return re.match(r"bpw([\d.]+)-(.+)-(stream|relative|output|kl)-n(\d+)-s(\d+)\.ptb\.json$", f.name)


# Runs made before the table held sensitivities borrow them from a run of the same calibration
# (the table is the same measurement; only the sensitivities were added to it).
known = {}
for f in sorted(out.glob("bpw*.ptb.json")):
    m = name_match(f)
    if m:
        for lin in json.loads((out / f"{f.name[: -len('.ptb.json')]}.report.json").read_text())["linears"]:
            if "sensitivity" in lin["layout"]:
                known[(m.group(4), m.group(5), lin["layer"], lin["module"])] = lin["layout"]["sensitivity"]

runs = []
for f in sorted(out.glob("bpw*.ptb.json")):
    m = name_match(f)
    if not m:
        continue
    stem = f.name[: -len(".ptb.json")]
    wt = out / f"{stem}.wikitext2.json"
    if not wt.exists():
        continue
    report = json.loads((out / f"{stem}.report.json").read_text())
    s = report["summary"]
    lins = report["linears"]
    chosen = []
    for lin in lins:
        lay = lin["layout"]
        lay.setdefault("sensitivity", known.get((m.group(4), m.group(5), lin["layer"], lin["module"]), math.nan))
        key = (lay["bits"], lay["group"], lin["axis"], lay.get("min", False))
        c = next(c for c in lin["candidates"] if (c["bits"], c["group"], c["axis"], c.get("min", False)) == key)
        chosen.append((lin, c))
    runs.append({
        "budget": float(m.group(1)), "variant": m.group(2), "damage": m.group(3), "n": int(m.group(4)),
        "seed": int(m.group(5)), "bpw": s["allocation"]["bpw"], "seconds": s["seconds"],
        "table_s": s["allocation"]["table_s"],
        "wikitext2": json.loads(wt.read_text())["ppl"], "ptb": json.loads(f.read_text())["ppl"],
        "predicted": {d: sum(damage(d, l, c) for l, c in chosen) for d in ("output", "relative", "stream", "kl")},
        "linears": [(lin["layer"], short(lin["module"]), lin["layout"]["bits"], lin["layout"]["group"], lin["axis"]) for lin in lins],
        "min_share": sum(lin["layout"].get("min", False) for lin in lins) / len(lins),
    })


def uniform_bpw(report):
    """Bits per weight a uniform model stores: Layout::bytes (crates/pack/src/format.rs)."""
    spec = report["summary"]["settings"]["spec"]
    bits, g, fmin = spec["bits"], spec["group"], spec["zero"] == "Float"
    total = weights = 0
    for lin in report["linears"]:
        rows, cols = lin["rows"], lin["cols"]
        along = cols if lin["axis"] == "oc" else rows
        group = min(g or along, along)
        pr, pc = (rows, math.ceil(cols / group)) if lin["axis"] == "oc" else (math.ceil(rows / group), cols)
        total += rows * math.ceil(cols * bits / 8) + 2 * pr * pc + (2 * pr * pc if fmin else pr * math.ceil(pc * bits / 8))
        weights += rows * cols
    return 8 * total / weights


uniform = defaultdict(list)  # (config, variant) -> [(bpw, seed, wikitext2, ptb)]
for f in sorted(ablation.glob("w*g*-gptq-ada*-s[0-9].ptb.json")):
    m = re.match(r"(w\d+g\d+)-(gptq-ada(?:-act)?-mse(?:-float)?)-s(\d+)\.ptb\.json$", f.name)
    stem = f.name[: -len(".ptb.json")]
    if not m or not (ablation / f"{stem}.wikitext2.json").exists():
        continue
    report = json.loads((ablation / f"{stem}.report.json").read_text())
    uniform[(m.group(1), m.group(2))].append((
        uniform_bpw(report),
        int(m.group(3)),
        json.loads((ablation / f"{stem}.wikitext2.json").read_text())["ppl"],
        json.loads(f.read_text())["ppl"],
    ))

commits = sorted({f.read_text().strip() for f in out.glob("*.commit")})
lines = [
    "<!-- budget -->",
    "## Size budget: bits, group and dimension per linear (issue 32)",
    "",
    f"Regenerated by `bench/budget.sh` (runs in `{out}`, code at commits {', '.join(f'`{c}`' for c in commits)}). "
    "`adadim quantize --bpw B` chooses each linear's bits (2, 3, 4, 8), group (32, 64, 128, 256) and axis from one table of every layout's RTN error "
    "(float model, first 32 calibration samples), minimising the summed predicted damage with the block linears' stored bits at most B. "
    "Bits per weight: what the packed file stores for the block linears (codes, f16 scales, packed zeros or f16 minima, permutations). "
    "Cells are the mean over the seeds listed ± half the range; WikiText-2 and PTB, first 8 windows of 2048 tokens; "
    f"FP (the Q4_1 GGUF dequantized: its weights lie on a 4-bit grid with an f16 scale and f16 minimum per 32-group): WikiText-2 {fp['wikitext2']:.3f}, PTB {fp['ptb']:.3f}. "
    "**`-fmin` / `-float` rows use float minima** (`w = d q + m`, f16 `d` and `m` per group): per-OC 4-bit groups of 32 with them hold the FP's own grid exactly (5.0 bits per weight), "
    "so on this model those rows can buy back the FP itself for the linears they give that layout; the min share column says for what fraction of linears a `--bpw` run chose float minima. "
    "`gptq-ada`: GPTQ with the error search on each chosen layout; `-act`: act-order with static groups. "
    "Time: quantize wall seconds on the shared 2-core machine (rough); in brackets the damage table's measurement, made once per calibration seed "
    "(its first 32 samples, so the 32- and 128-sample runs of a seed share it) and reused from the cache by the seed's other runs, whose quantize time then leaves it out.",
    "",
    "| model | damage | calib | seeds | bits/weight | WikiText-2 ppl | PTB ppl | min share | quantize s (table) |",
    "|---|---|---|---|---|---|---|---|---|",
]
groups = defaultdict(list)
for r in runs:
    groups[(r["budget"], r["variant"], r["damage"], r["n"])].append(r)
rows = []
for (b, v, d, n), rs in groups.items():
    rs.sort(key=lambda r: r["seed"])
    rows.append((statistics.fmean(r["bpw"] for r in rs), f"| `--bpw {b}` {v} | {d} | {n} x 512 | {','.join(str(r['seed']) for r in rs)} | {statistics.fmean(r['bpw'] for r in rs):.3f} | "
                 f"{stat([r['wikitext2'] for r in rs])} | {stat([r['ptb'] for r in rs])} | {statistics.fmean(r['min_share'] for r in rs):.2f} | {statistics.fmean(r['seconds'] for r in rs):.0f} ({statistics.fmean(r['table_s'] for r in rs):.0f}) |"))
for (cfg, v), us in uniform.items():
    rows.append((statistics.fmean(u[0] for u in us), f"| uniform {cfg} {v} (ablation) | – | 128 x 512 | {','.join(str(u[1]) for u in sorted(us, key=lambda u: u[1]))} | {statistics.fmean(u[0] for u in us):.3f} | "
                 f"{stat([u[2] for u in us])} | {stat([u[3] for u in us])} | {1.0 if v.endswith('-float') else 0.0:.2f} | |"))
# llama.cpp's files, made and evaluated by `adadim bench llamacpp` (same evaluator, same texts).
llama_json = out / "llamacpp" / "points.json"
llama = json.loads(llama_json.read_text()) if llama_json.exists() else {"points": [], "not_made": []}
for p in llama["points"]:
    rows.append((p["bpw"], f"| llama.cpp {p['name']} | – | – | – | {p['bpw']:.3f} | {p['ppl']['wikitext2']:.2f} | {p['ppl']['ptb']:.2f} | | |"))
lines += [r[1] for r in sorted(rows)]

# Ours (3 seeds, the default damage model, and the uniform ablation models) against every
# llama.cpp file: the best of ours at no more bits, per file; points for the frontier plot.
ours = []
for (b, v, d, n), rs in groups.items():
    if d == "kl" and n == 128 and len(rs) >= 3:
        ours.append({"name": f"--bpw {b} {v}", "bpw": statistics.fmean(r["bpw"] for r in rs),
                     "ppl": {ds: statistics.fmean(r[ds] for r in rs) for ds in ("wikitext2", "ptb")},
                     "spread": {ds: stat([r[ds] for r in rs]) for ds in ("wikitext2", "ptb")}})
for (cfg, v), us in uniform.items():
    if len(us) >= 3:
        ours.append({"name": f"uniform {cfg} {v}", "bpw": statistics.fmean(u[0] for u in us),
                     "ppl": {"wikitext2": statistics.fmean(u[2] for u in us), "ptb": statistics.fmean(u[3] for u in us)},
                     "spread": {"wikitext2": stat([u[2] for u in us]), "ptb": stat([u[3] for u in us])}})
(out / "ours.json").write_text(json.dumps({"fp": fp, "points": [{k: o[k] for k in ("name", "bpw", "ppl")} for o in ours]}, indent=1))
if llama["points"] and ours:
    lines += [
        "",
        "**The frontier** ([docs/frontier.svg](docs/frontier.svg), both texts): for every llama.cpp file, our best model (mean of 3 seeds; "
        "`--bpw` runs with the default damage model and the uniform ablation models) at no more bits per weight. "
        "llama.cpp's files come from `adadim bench llamacpp` (the legacy, k- and i-quant types listed below the table, each with and without the importance matrix; "
        "types llama-quantize makes only with one are listed once). Lower: ours is lower on that text. "
        "Our `-fmin` / `-float` rows use float minima, the layout that on this model can reproduce the FP's own Q4_1 grid (see above).",
        "",
        "| llama.cpp file | bits/weight | WikiText-2 | PTB | ours at no more bits | bits/weight | WikiText-2 | PTB | lower on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(llama["points"], key=lambda p: (p["bpw"], p["ppl"]["wikitext2"])):
        fit = [o for o in ours if o["bpw"] <= p["bpw"] + 1e-9]
        if not fit:
            lines.append(f"| {p['name']} | {p['bpw']:.3f} | {p['ppl']['wikitext2']:.2f} | {p['ppl']['ptb']:.2f} | none | | | | |")
            continue
        o = min(fit, key=lambda o: o["ppl"]["wikitext2"])
        lower = [name for ds, name in (("wikitext2", "WikiText-2"), ("ptb", "PTB")) if o["ppl"][ds] < p["ppl"][ds]]
        lines.append(f"| {p['name']} | {p['bpw']:.3f} | {p['ppl']['wikitext2']:.2f} | {p['ppl']['ptb']:.2f} | {o['name']} | {o['bpw']:.3f} | "
                     f"{o['spread']['wikitext2']} | {o['spread']['ptb']} | {', '.join(lower) or '**neither**'} |")
    wins = sum(1 for p in llama["points"] if any(o["bpw"] <= p["bpw"] + 1e-9 and o["ppl"]["wikitext2"] < p["ppl"]["wikitext2"] for o in ours))
    lines += ["", f"Ours is lower on WikiText-2 at no more bits than {wins} of llama.cpp's {len(llama['points'])} files."]
    made = sorted({p["name"].removesuffix("-imatrix") for p in llama["points"]})
    lines += ["", f"llama.cpp types measured ({len(made)}): " + ", ".join(made) + "."]
    if llama.get("not_made"):
        lines += ["", "Not made without an importance matrix (llama-quantize refuses): " + ", ".join(n.split(":")[0] for n in llama["not_made"]) + "."]
    targets = [(4.25, 21.0), (3.5, 26.0), (3.25, 32.0)]
    cells = []
    for b, aim in targets:
        fit = [o for o in ours if o["bpw"] <= b + 1e-9]
        best = min(fit, key=lambda o: o["ppl"]["wikitext2"]) if fit else None
        if best is None:
            cells.append(f"<= {aim:g} at {b} bpw: no model")
        else:
            met = "met" if best["ppl"]["wikitext2"] <= aim else "**not met**"
            cells.append(f"<= {aim:g} at {b} bpw: {met} ({best['name']}, {best['spread']['wikitext2']})")
    lines += ["", "Issue 32's targets (WikiText-2, mean of 3 seeds): " + "; ".join(cells) + "."]

# The damage-model study: which prediction orders the measured perplexities.
study = [r for r in runs if r["variant"] == "rtn-ada"] or runs
if len(study) >= 3:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        rk = [0.0] * len(xs)
        for pos, i in enumerate(order):
            rk[i] = pos
        return rk

    def spearman(a, b):
        ra, rb = ranks(a), ranks(b)
        ma, mb = statistics.fmean(ra), statistics.fmean(rb)
        cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))

    lines += [
        "",
        f"Damage models ({len(study)} quantized models: {', '.join(sorted({r['variant'] for r in study}))}, every budget, damage model and seed above): "
        "the rank correlation (Spearman) between a model's summed predicted damage and its measured perplexity, and within each budget "
        "whether the allocation made under each damage model was the best one measured.",
        "",
        "| damage model | Spearman vs WikiText-2 | Spearman vs PTB | budgets where its allocation measured best (WikiText-2) |",
        "|---|---|---|---|",
    ]
    for d in ("kl", "stream", "relative", "output"):
        pred = [r["predicted"][d] for r in study]
        wins = 0
        budgets = sorted({(r["budget"], r["seed"], r["variant"], r["n"]) for r in study})
        for key in budgets:
            at = [r for r in study if (r["budget"], r["seed"], r["variant"], r["n"]) == key]
            if len({r["damage"] for r in at}) > 1 and min(at, key=lambda r: r["wikitext2"])["damage"] == d:
                wins += 1
        contested = sum(1 for key in budgets if len({r["damage"] for r in study if (r["budget"], r["seed"], r["variant"], r["n"]) == key}) > 1)
        lines.append(f"| {d} | {spearman(pred, [r['wikitext2'] for r in study]):.3f} | {spearman(pred, [r['ptb'] for r in study]):.3f} | {wins} of {contested} |")

# Which modules the budget gives bits to: mean bits per module, per budget (default damage).
if runs:
    lines += ["", "Mean bits chosen per module (over layers and seeds) and the share kept per-IC, `kl` damage (the default):", "",
              "| model | " + " | ".join(MODULES) + " | per-IC share |", "|---|" + "---|" * (len(MODULES) + 1)]
    for (b, v, d, n), rs in sorted(groups.items()):
        if d != "kl":
            continue
        bits = defaultdict(list)
        ic = []
        for r in rs:
            for (_, mod, nb, _, axis) in r["linears"]:
                bits[mod].append(nb)
                ic.append(axis == "ic")
        lines.append(f"| `--bpw {b}` {v} n{n} | " + " | ".join(f"{statistics.fmean(bits[m]):.2f}" for m in MODULES) + f" | {sum(ic) / len(ic):.2f} |")
pictures = sorted(pathlib.Path("docs").glob("allocation-bpw*.svg"))
if pictures:
    lines += ["", "Allocations drawn (seed 0, `adadim report`: bits per layer and module, dot size the group, color the dimension): "
              + ", ".join(f"[{p.stem.removeprefix('allocation-')}]({p})" for p in pictures) + "."]
lines.append("<!-- end budget -->")

print(replace_section(results, "<!-- budget -->", "<!-- end budget -->", lines))
