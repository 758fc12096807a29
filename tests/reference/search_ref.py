#!/usr/bin/env python3
"""Independent numpy version of the error-optimal group fit (`--scale-search mse`) on one layer,
to check adadim-quantize's `rtn_fitted` against.

The search, as REFERENCE.md and issue 31 define it: for each group choose (scale, zero) to
minimise sum_i h_i (w_i - w'_i)^2, h_i the Hessian diagonal of the weight's input channel.
1. min-max, then clipping ratios p = 1 - 0.5 k / 40 (k = 1..40): the range [p min, p max]
   fitted by the zero style's min-max formula; the lowest error wins (ties keep the earlier);
2. up to 4 rounds of weighted least squares with the codes fixed (w ~ a q + b, or w ~ s (q - z)
   for the symmetric style), scale rounded up to float16 and zero rounded onto the grid; a round
   is kept only while the error falls.
Quantization runs in float32 as the packed file's consumer does (f16 scales, whole zeros,
round half to even); errors are summed in float64.

Writes search_fixture.json next to this file: W, diag(H), and per case the chosen scales and
zeros and the total weighted error. Run: python3 tests/reference/search_ref.py
"""
import json
import os

import numpy as np

ROWS, COLS, W_DENOM = 48, 192, 4096
STEPS, ROUNDS = 40, 4


def f16_up(s):
    """Smallest float16 value >= s (float32 in, float32 out), within [2^-24, 65504]."""
    s = np.float32(min(max(float(s), 2.0**-24), 65504.0))
    h = np.float16(s)
    if np.float32(h) < s:
        h = np.nextafter(h, np.float16(np.inf))
    return np.float32(h)


def fit_minmax(lo, hi, maxq, zero):
    lo, hi = np.float32(lo), np.float32(hi)
    mq = np.float32(maxq)
    if zero == "awq":
        scale = f16_up(max(np.float32(hi - lo), np.float32(1e-5)) / mq)
        return scale, np.float32(np.clip(np.round(-lo / scale), 0, maxq))
    if zero == "gptq":
        lo, hi = min(lo, np.float32(0)), max(hi, np.float32(0))
        if (hi - lo) / mq < np.finfo(np.float32).tiny:
            lo, hi = np.float32(-1), np.float32(1)
        scale = f16_up(np.float32(hi - lo) / mq)
        return scale, np.float32(min(np.round(-lo / scale), maxq))
    absmax = max(abs(lo), abs(hi))
    if np.float32(2) * absmax / mq < np.finfo(np.float32).tiny:
        absmax = np.float32(1)
    return f16_up(np.float32(2) * absmax / mq), np.float32((maxq + 1) / 2)


def codes(w, scale, zero, maxq):
    return np.clip(np.round(w / scale) + zero, 0, maxq).astype(np.float32)


def error(w, h, scale, zero, maxq):
    d = w.astype(np.float64) - (scale * (codes(w, scale, zero, maxq) - zero)).astype(np.float64)
    return float(np.sum(h.astype(np.float64) * d * d))


def search(w, h, maxq, zero):
    lo, hi = w.min(), w.max()
    best = fit_minmax(lo, hi, maxq, zero)
    best_err = error(w, h, *best, maxq)
    for k in range(1, STEPS + 1):
        p = np.float32(1) - np.float32(0.5) * np.float32(k) / np.float32(STEPS)
        cand = fit_minmax(p * lo, p * hi, maxq, zero)
        e = error(w, h, *cand, maxq)
        if e < best_err:
            best, best_err = cand, e
    hw = h.astype(np.float64)
    wd = w.astype(np.float64)
    for _ in range(ROUNDS):
        q = codes(w, *best, maxq).astype(np.float64)
        if zero == "sym":
            z = float(best[1])
            num, den = np.sum(hw * (q - z) * wd), np.sum(hw * (q - z) ** 2)
            if den <= 0 or num <= 0:
                break
            cand = (f16_up(np.float32(num / den)), best[1])
        else:
            sh = hw.sum()
            if sh <= 0:
                break
            mq_, mw = np.sum(hw * q) / sh, np.sum(hw * wd) / sh
            cov, var = np.sum(hw * (q - mq_) * (wd - mw)), np.sum(hw * (q - mq_) ** 2)
            if var <= 0 or cov <= 0:
                break
            scale = f16_up(np.float32(cov / var))
            b = mw - float(scale) * mq_
            cand = (scale, np.float32(np.clip(np.round(np.float32(-b / float(scale))), 0, maxq)))
        e = error(w, h, *cand, maxq)
        if not e < best_err:
            break
        best, best_err = cand, e
    return best, best_err


def main():
    rng = np.random.default_rng(31)
    # A bell-shaped weight matrix with a few large weights, exact in float32.
    w = np.round(rng.standard_t(4, size=(ROWS, COLS)) * 0.05 * W_DENOM) / W_DENOM
    w[3, 17], w[20, 100] = 3686 / W_DENOM, -2867 / W_DENOM
    w = w.astype(np.float32)
    # diag(H): most channels near 1, a few activation outliers (x100), exact in float32.
    h = np.round(rng.uniform(0.5, 2.0, COLS) * 256) / 256
    h[[5, 77, 150]] *= 100
    h = h.astype(np.float32)
    cases = []
    for axis, bits, group, zero in [
        ("oc", 3, 64, "awq"),
        ("oc", 4, 32, "gptq"),
        ("oc", 2, 64, "sym"),
        ("ic", 3, 8, "awq"),
        ("ic", 4, 16, "gptq"),
    ]:
        maxq = 2**bits - 1
        if axis == "oc":
            shape = (ROWS, COLS // group)
            blocks = [(r, slice(k * group, (k + 1) * group)) for r in range(ROWS) for k in range(shape[1])]
            get = lambda b: (w[b[0], b[1]], h[b[1]])
        else:
            shape = (ROWS // group, COLS)
            blocks = [(slice(k * group, (k + 1) * group), c) for k in range(shape[0]) for c in range(COLS)]
            get = lambda b: (w[b[0], b[1]], np.full(group, h[b[1]], np.float32))
        scales, zeros, total = [], [], 0.0
        for b in blocks:
            (s, z), e = search(*get(b), maxq, zero)
            scales.append(float(s))
            zeros.append(float(z))
            total += e
        cases.append(
            {"axis": axis, "bits": bits, "group": group, "zero": zero, "scales": scales, "zeros": zeros, "error": total}
        )
        print(f"{axis} w{bits}g{group} {zero}: weighted error {total:.6g}")
    out = {
        "rows": ROWS,
        "cols": COLS,
        "w_denominator": W_DENOM,
        "w_int": [int(v) for v in np.round(w.astype(np.float64) * W_DENOM).ravel()],
        "h_diag": [float(v) for v in h],
        "cases": cases,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "search_fixture.json")
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
