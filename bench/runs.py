"""Reading the quantize-and-evaluate runs that bench/ablation.sh and bench/budget.sh leave in a
folder: one entry per (config, variant) and calibration seed."""
import json
import pathlib
import re
import statistics
from collections import defaultdict


def load(out):
    """(config, variant) -> seed -> {bpw, modules, wikitext2, ptb, seconds, per_ic} for every run
    in `out` evaluated on both texts; config is `wNgG` or `bpwB`."""
    out = pathlib.Path(out)
    runs = defaultdict(dict)
    for f in sorted(out.glob("*-s[0-9]*.ptb.json")):
        m = re.match(r"(w\d+g\d+|bpw[\d.]+)-(.+)-s(\d+)\.ptb\.json$", f.name)
        if not m:
            continue
        cfg, variant, seed = m.group(1), m.group(2), int(m.group(3))
        stem = f.name[: -len(".ptb.json")]
        wt = out / f"{stem}.wikitext2.json"
        if not wt.exists():
            continue
        report = json.loads((out / f"{stem}.report.json").read_text())
        summary = report["summary"]
        modules = defaultdict(list)
        for lin in report["linears"]:
            modules[lin["module"].split(".")[-1].removesuffix("_proj")].append(lin["axis"] == "ic")
        spec = summary["settings"]["spec"]
        bits, zero = spec["bits"], spec["zero"]
        st = summary["settings"]
        dynamic = st["method"] == "gptq" and st.get("act_order") and not st.get("static_groups")
        stored = 0  # bits as the packed file declares them: codes, f16 scales, zeros or f16 minima, perm
        for lin in report["linears"]:
            rows, cols, g = lin["rows"], lin["cols"], spec["group"]
            along = cols if lin["axis"] == "oc" else rows
            groups = (rows * cols // along) * -(-along // (g or along))
            stored += bits * rows * cols + groups * (16 + (16 if zero == "Float" else bits))
            stored += 32 * cols if dynamic and lin["axis"] == "oc" else 0
        if "allocation" in summary:  # a --bpw run: each linear's own layout, as its allocation counted
            stored = summary["allocation"]["bpw"] * sum(lin["rows"] * lin["cols"] for lin in report["linears"])
        runs[(cfg, variant)][seed] = {
            "bpw": stored / sum(lin["rows"] * lin["cols"] for lin in report["linears"]),
            "modules": {m: sum(v) / len(v) for m, v in modules.items()},
            "wikitext2": json.loads(wt.read_text())["ppl"],
            "ptb": json.loads(f.read_text())["ppl"],
            "seconds": summary["seconds"],
            "per_ic": summary["per_ic"] / summary["linears"],
        }
    return runs


def fp(out):
    """The float model's perplexity on both texts, as the folder's runs measured it."""
    out = pathlib.Path(out)
    return {ds: json.loads((out / f"fp.{ds}.json").read_text())["ppl"] for ds in ("wikitext2", "ptb")}


def stat(values):
    """Mean ± half the range (min to max), two decimals."""
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else f"{mean:.2f}"
