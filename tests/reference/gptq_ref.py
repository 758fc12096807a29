#!/usr/bin/env python3
"""Independent float64 numpy port of GPTQ, to check adadim-quantize's `gptq` against.

Per-OC: a line-by-line port of IST-DASLab gptq.py `GPTQ.fasterquant` and quant.py
`Quantizer` (asymmetric, perchannel, no MSE search), including its quirks: dead inputs,
act-order by `diag(H)`, dynamic groups fitted on `W[:, j:j+g]` as it stands when the group
starts (earlier blocks' updates only), static groups fitted before reordering.
Per-IC: written from the AdaDim paper (§3.3): each input column's groups of g output rows
are fitted (AWQ-style min-max) on the error-compensated column right before quantizing it.

Data is chosen so that f32 and f64 agree exactly on the inputs: W is a multiple of 2^-12,
X is integer, and H = (2/256) X^T X stays below 2^24, so the Rust side can accumulate H in
f32 (two batches of 128 tokens) and get this script's H bit for bit.

Writes gptq_fixture.json next to this file: W, X, and for each case the settings, the
loss, and W' in factored form (codes, scales, zeros, g_idx: W' = scale * (code - zero)).
Run: python3 tests/reference/gptq_ref.py
"""
import json
import os

import numpy as np

ROWS, COLS, TOKENS, W_DENOM = 48, 96, 256, 4096
DEAD, OUTLIERS = 7, (3, 29, 61, 90)


def f16(scale):
    """Scales are stored as float16: rounded up to the next float16 value before any code is
    chosen (so the grid still covers the group), kept within float16's positive finite range."""
    scale = np.clip(scale, 2.0**-24, 65504.0)
    h = scale.astype(np.float16)
    h = np.where(h.astype(np.float64) < scale, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def fit_gptq(x, maxq):
    """quant.py find_params, sym=False, per row of x: range widened to include 0."""
    xmin = np.minimum(x.min(1), 0)
    xmax = np.maximum(x.max(1), 0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1, +1
    scale = f16((xmax - xmin) / maxq)
    return scale, np.minimum(np.round(-xmin / scale), maxq)


def fit_awq(x, maxq):
    """AWQ-style min-max per row of x: no widening, zero clamped to the grid."""
    xmin, xmax = x.min(1), x.max(1)
    scale = f16(np.maximum(xmax - xmin, 1e-5) / maxq)
    return scale, np.clip(np.round(-xmin / scale), 0, maxq)


def quantize(x, scale, zero, maxq):
    """quant.py quantize, also returning the code."""
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q


def hinv_upper(H, percdamp):
    """Damped H -> cholesky -> cholesky_inverse -> upper cholesky (gptq.py)."""
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))
    L_inv = np.linalg.inv(np.linalg.cholesky(H))
    return np.linalg.cholesky(L_inv.T @ L_inv).T


def gptq(W, H, axis, bits, g, act_order, static_groups, blocksize, percdamp=0.01):
    maxq = 2**bits - 1
    rows, cols = W.shape
    W, H = W.copy(), H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    fit = fit_gptq if axis == "oc" else fit_awq
    # params laid out as the Rust QuantizedMatrix: oc [rows, ceil(cols/g)], ic [ceil(rows/g), cols]
    n_groups = -(-cols // g) if axis == "oc" else -(-rows // g)
    scales = np.zeros((rows, n_groups) if axis == "oc" else (n_groups, cols))
    zeros = np.zeros_like(scales)
    if static_groups:
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = fit(W[:, k * g:(k + 1) * g], maxq)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = hinv_upper(H, percdamp)
    codes = np.zeros((rows, cols), dtype=np.int64)
    g_idx = np.zeros(cols, dtype=np.int64)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Err1 = W[:, i1:i2].copy(), np.zeros((rows, i2 - i1))
        for i in range(i2 - i1):
            j, c = i1 + i, perm[i1 + i]
            w, d = W1[:, i], Hinv[j, j]
            if axis == "oc":
                if not static_groups and j % g == 0:
                    scales[:, j // g], zeros[:, j // g] = fit(W[:, j:j + g], maxq)
                g_idx[c] = c // g if static_groups else j // g
                s, z = scales[:, g_idx[c]], zeros[:, g_idx[c]]
            else:
                for k in range(n_groups):
                    s, z = fit(w[None, k * g:(k + 1) * g], maxq)
                    scales[k, c], zeros[k, c] = s[0], z[0]
                s, z = np.repeat(scales[:, c], g)[:rows], np.repeat(zeros[:, c], g)[:rows]
            q, codes[:, c] = quantize(w, s, z, maxq)
            loss += np.sum((w - q) ** 2 / d**2) / 2
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv[j, j:i2])
            Err1[:, i] = err1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return loss, codes, scales, zeros, g_idx


def data():
    rng = np.random.default_rng(20240607)
    W = np.round(rng.normal(0, 0.05, (ROWS, COLS)) * W_DENOM)
    W[:, OUTLIERS[:2]] *= 4  # a few wide input channels, as in real layers
    factors = rng.normal(0, 1, (TOKENS, 6)) @ rng.normal(0, 1.2, (6, COLS))
    X = np.round(factors + rng.normal(0, 1, (TOKENS, COLS)))
    X[:, list(OUTLIERS)] *= 20  # activation outlier channels
    X[:, DEAD] = 0
    # Every partial sum of X^T X must stay an exact f32 integer.
    assert (np.abs(X).T @ np.abs(X)).max() < 2**24
    return W, X


CASES = [  # name, axis, zero, bits, group, act_order, static_groups, blocksize
    ("oc_b4_g32", "oc", "gptq", 4, 32, False, False, 128),
    ("oc_b3_g32_bs64", "oc", "gptq", 3, 32, False, False, 64),
    ("oc_b3_g32_act_bs64", "oc", "gptq", 3, 32, True, False, 64),
    ("oc_b3_g32_act_static_bs64", "oc", "gptq", 3, 32, True, True, 64),
    ("ic_b3_g32_bs64", "ic", "awq", 3, 32, False, False, 64),
    ("ic_b3_g32_act", "ic", "awq", 3, 32, True, False, 128),
]


def main():
    W_int, X = data()
    W = W_int / W_DENOM
    H = 2 / TOKENS * X.T @ X
    out = {
        "about": "float64 numpy GPTQ reference (tests/reference/gptq_ref.py); W' = scale * (code - zero)",
        "rows": ROWS, "cols": COLS, "tokens": TOKENS, "percdamp": 0.01,
        "w_denominator": W_DENOM, "w_int": W_int.astype(int).ravel().tolist(),
        "x": X.astype(int).ravel().tolist(), "h_diag": np.diag(H).tolist(), "cases": [],
    }
    for name, axis, zero, bits, g, act, static, bs in CASES:
        loss, codes, scales, zeros, g_idx = gptq(W, H, axis, bits, g, act, static, bs)
        out["cases"].append({
            "name": name, "axis": axis, "zero": zero, "bits": bits, "group": g,
            "act_order": act, "static_groups": static, "blocksize": bs, "loss": loss,
            "codes": codes.ravel().tolist(), "scales": scales.ravel().tolist(),
            "zeros": zeros.ravel().tolist(), "g_idx": g_idx.tolist() if axis == "oc" else None,
        })
        print(f"{name:28s} loss {loss:.6e}")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptq_fixture.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
