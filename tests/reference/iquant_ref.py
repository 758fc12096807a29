#!/usr/bin/env python3
"""gguf-py's own dequantization of every i-quant type (IQ1_S .. IQ4_XS) on random blocks, to
check adadim-load's `iquant` decoders against.

Random bytes are valid blocks of every i-quant (grid indices, signs and scales are all in
range); only the f16 super-block scales are set, to finite values of a plausible size. Uses the
PyPI wheel gguf==0.19.0 (the one the importer reads its codebooks from) and numpy.
Writes iquant_fixture.json next to this file: per type its GGML id, the blocks (hex) and the
dequantized values. Run: pip install gguf==0.19.0 numpy; python3 tests/reference/iquant_ref.py
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

BLOCKS = 3
rng = np.random.default_rng(2026)
out = {"gguf": "0.19.0", "types": []}
for t in [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_NL, T.IQ4_XS]:
    block, size = quants.GGML_QUANT_SIZES[t]
    data = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    d = rng.uniform(0.002, 0.05, size=BLOCKS).astype(np.float16)
    if t == T.IQ1_M:
        # The f16 scale is the top nibbles of the four scale words (bytes 48..55).
        bits = d.view(np.uint16)
        words = data[:, 48:56].copy().view(np.uint16)
        for i in range(4):
            words[:, i] = (words[:, i] & 0x0FFF) | (((bits >> (4 * i)) & 0xF) << 12)
        data[:, 48:56] = words.view(np.uint8)
    else:
        data[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    values = quants.dequantize(data.reshape(-1), t).reshape(-1)
    assert np.all(np.isfinite(values)), t.name
    out["types"].append({
        "name": t.name,
        "id": int(t),
        "blocks": data.reshape(-1).tobytes().hex(),
        "values": [float(v) for v in values.astype(np.float32)],
    })
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "iquant_fixture.json"), "w") as f:
    json.dump(out, f)
print("wrote", sum(len(t["values"]) for t in out["types"]), "values of", len(out["types"]), "types")
