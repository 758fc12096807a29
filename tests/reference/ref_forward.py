#!/usr/bin/env python3
"""Independent numpy reference for SmolLM2-135M-Instruct (GGUF, LLaMA arch).

Produces golden logits for a fixed prompt and the WikiText-2 perplexity
(GPTQ protocol: non-overlapping 2048-token windows, no BOS) and writes them,
with the GGUF file's sha256, to a JSON file. Only gguf + numpy + tokenizers;
no llama.cpp, no transformers, no code shared with the Rust implementation.

    python3 ref_forward.py --gguf MODEL.gguf --wikitext wiki.test.raw \
        --out smollm2_reference.json [--max-windows N]
    python3 ref_forward.py --gguf MODEL.gguf --wikitext x --out x --self-check
"""
import os

# Stay polite on a shared 2-core box: cap BLAS threads before numpy loads.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "2")

import argparse
import hashlib
import json
import math
import platform
import sys
import time

import numpy as np
import gguf
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

PROMPT = "The capital of France is Paris. 12345 apples, isn't it?\n\nHello   world"
WINDOW = 2048


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# GGUF loading

def field(reader, key):
    return reader.fields[key].contents()


def load_model(path):
    r = gguf.GGUFReader(path)
    cfg = dict(
        n_layer=field(r, "llama.block_count"),            # 30
        dim=field(r, "llama.embedding_length"),           # 576
        hidden=field(r, "llama.feed_forward_length"),     # 1536
        n_head=field(r, "llama.attention.head_count"),    # 9
        n_kv_head=field(r, "llama.attention.head_count_kv"),  # 3
        eps=float(field(r, "llama.attention.layer_norm_rms_epsilon")),  # 1e-5
        theta=float(field(r, "llama.rope.freq_base")),    # 100000
    )
    cfg["head_dim"] = cfg["dim"] // cfg["n_head"]         # 64

    # gguf.quants.dequantize returns numpy (row-major) order: for a ggml tensor
    # with ne = [in, out] (reader's tensor.shape) we get an array [out, in].
    t = {}
    for ten in r.tensors:
        w = gguf.quants.dequantize(ten.data, ten.tensor_type).astype(np.float32)
        t[ten.name] = w.reshape([int(x) for x in reversed(ten.shape)])

    def unpermute(w, n_head):
        # llama.cpp's convert_hf_to_gguf permutes q/k rows so that ggml's
        # "normal" RoPE (adjacent pairs) matches HF's rotate_half RoPE.
        # Invert it, so we can apply rotate_half (first half / second half).
        rows, cols = w.shape
        return (w.reshape(n_head, rows // n_head // 2, 2, cols)
                 .swapaxes(1, 2).reshape(rows, cols))

    d, hd = cfg["dim"], cfg["head_dim"]
    nq, nkv, ff = cfg["n_head"], cfg["n_kv_head"], cfg["hidden"]
    W = dict(
        tok_emb=t["token_embd.weight"],                  # [vocab=49152, d=576] (Q8_0) also the LM head (tied)
        norm=t["output_norm.weight"],                    # [d]
        layers=[],
    )
    assert "output.weight" not in t  # tied embeddings
    for i in range(cfg["n_layer"]):
        p = f"blk.{i}."
        L = dict(
            attn_norm=t[p + "attn_norm.weight"],                 # [d]
            wq=unpermute(t[p + "attn_q.weight"], nq),            # [nq*hd=576, d=576]
            wk=unpermute(t[p + "attn_k.weight"], nkv),           # [nkv*hd=192, d=576]
            wv=t[p + "attn_v.weight"],                           # [nkv*hd=192, d=576]
            wo=t[p + "attn_output.weight"],                      # [d=576, nq*hd=576]
            ffn_norm=t[p + "ffn_norm.weight"],                   # [d]
            w_gate=t[p + "ffn_gate.weight"],                     # [ff=1536, d=576]
            w_up=t[p + "ffn_up.weight"],                         # [ff=1536, d=576]
            w_down=t[p + "ffn_down.weight"],                     # [d=576, ff=1536]
        )
        assert L["wq"].shape == (nq * hd, d) and L["wk"].shape == (nkv * hd, d)
        assert L["wv"].shape == (nkv * hd, d) and L["wo"].shape == (d, nq * hd)
        assert L["w_gate"].shape == (ff, d) and L["w_down"].shape == (d, ff)
        W["layers"].append(L)
    return r, cfg, W


def build_tokenizer(r):
    """Byte-level BPE rebuilt from GGUF metadata (tokenizer.ggml.pre = smollm)."""
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    tokens = field(r, "tokenizer.ggml.tokens")            # 49152 strings (byte-level alphabet)
    types = field(r, "tokenizer.ggml.token_type")         # 1 normal, 3 control
    merges = [tuple(m.split(" ")) for m in field(r, "tokenizer.ggml.merges")]  # "a b"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(len(tokens)) if types[i] == 3])
    assert not field(r, "tokenizer.ggml.add_bos_token")  # no BOS is prepended
    return tk


def encode(tk, text):
    return tk.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------
# Forward pass (float32 throughout)

def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_tables(T, hd, theta):
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)  # [hd/2]
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]       # [T, hd/2]
    ang = np.concatenate([ang, ang], axis=-1)                               # [T, hd]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
    # x: [heads, T, hd]; HF rotate_half: (x1, x2) -> (-x2, x1)
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(cfg, W, ids):
    """Returns logits [T, vocab] float32 for token ids (positions 0..T-1)."""
    T = len(ids)
    nq, nkv, hd, eps = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"], cfg["eps"]
    rep = nq // nkv                                   # 3 query heads per kv head
    cos, sin = rope_tables(T, hd, cfg["theta"])
    mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)  # causal
    scale = np.float32(1.0 / math.sqrt(hd))

    x = W["tok_emb"][np.asarray(ids)]                 # [T, d]
    for L in W["layers"]:
        # --- attention ---
        h = rmsnorm(x, L["attn_norm"], eps)
        q = (h @ L["wq"].T).reshape(T, nq, hd).transpose(1, 0, 2)   # [nq, T, hd]
        k = (h @ L["wk"].T).reshape(T, nkv, hd).transpose(1, 0, 2)  # [nkv, T, hd]
        v = (h @ L["wv"].T).reshape(T, nkv, hd).transpose(1, 0, 2)  # [nkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head j uses kv head j // rep. Group the rep query heads of
        # each kv head along the row axis: [nkv, rep*T, hd].
        qg = q.reshape(nkv, rep * T, hd)
        s = (qg @ k.transpose(0, 2, 1)) * scale                      # [nkv, rep*T, T]
        s = s.reshape(nkv, rep, T, T) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = s.reshape(nkv, rep * T, T) @ v                           # [nkv, rep*T, hd]
        o = o.reshape(nq, T, hd).transpose(1, 0, 2).reshape(T, nq * hd)
        x = x + o @ L["wo"].T
        del s, qg, q, k, v, o
        # --- SwiGLU MLP ---
        h = rmsnorm(x, L["ffn_norm"], eps)
        x = x + (silu(h @ L["w_gate"].T) * (h @ L["w_up"].T)) @ L["w_down"].T
    x = rmsnorm(x, W["norm"], eps)
    return x @ W["tok_emb"].T                          # [T, vocab] (tied head)


def nll_next_token(logits, ids, chunk=256):
    """-log p(ids[t+1] | ids[..t]) for t = 0..T-2, log-softmax in float64."""
    T = len(ids)
    out = np.empty(T - 1, dtype=np.float64)
    tgt = np.asarray(ids[1:])
    for a in range(0, T - 1, chunk):
        b = min(a + chunk, T - 1)
        z = logits[a:b].astype(np.float64)
        m = z.max(axis=-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=-1))
        out[a:b] = lse - z[np.arange(b - a), tgt[a:b]]
    return out


def forward_naive(cfg, W, ids):
    """Cross-check (--self-check): float64, one token at a time with a KV cache,
    per-head loops, llama.cpp-style RoPE on adjacent pairs (2i, 2i+1) applied to
    the *raw* GGUF q/k rows (re-permuted back), i.e. no rotate_half/unpermute."""
    nq, nkv, hd, eps = cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"], cfg["eps"]
    permute = lambda w, n: (w.reshape(n, 2, w.shape[0] // n // 2, w.shape[1])
                             .swapaxes(1, 2).reshape(w.shape))  # converter's permute
    inv = 1.0 / cfg["theta"] ** (np.arange(0, hd, 2) / hd)
    norm = lambda x, w: x / np.sqrt((x * x).mean() + eps) * w

    def rope_pairs(v, pos):
        c, s, o = np.cos(pos * inv), np.sin(pos * inv), v.copy()
        o[0::2] = v[0::2] * c - v[1::2] * s
        o[1::2] = v[0::2] * s + v[1::2] * c
        return o

    raw = [(permute(L["wq"], nq), permute(L["wk"], nkv)) for L in W["layers"]]
    K = [[] for _ in W["layers"]]
    V = [[] for _ in W["layers"]]
    out = []
    for pos, t in enumerate(ids):
        x = W["tok_emb"][t].astype(np.float64)
        for l, L in enumerate(W["layers"]):
            h = norm(x, L["attn_norm"])
            q, k = raw[l][0] @ h, raw[l][1] @ h
            q = np.concatenate([rope_pairs(q[i * hd:(i + 1) * hd], pos) for i in range(nq)])
            k = np.concatenate([rope_pairs(k[i * hd:(i + 1) * hd], pos) for i in range(nkv)])
            K[l].append(k)
            V[l].append(L["wv"] @ h)
            Ks, Vs, o = np.array(K[l]), np.array(V[l]), np.zeros(nq * hd)
            for j in range(nq):
                g = j // (nq // nkv)
                sc = Ks[:, g * hd:(g + 1) * hd] @ q[j * hd:(j + 1) * hd] / math.sqrt(hd)
                p = np.exp(sc - sc.max())
                o[j * hd:(j + 1) * hd] = (p / p.sum()) @ Vs[:, g * hd:(g + 1) * hd]
            x = x + L["wo"] @ o
            h = norm(x, L["ffn_norm"])
            a = L["w_gate"] @ h
            x = x + L["w_down"] @ (a / (1 + np.exp(-a)) * (L["w_up"] @ h))
        out.append(W["tok_emb"] @ norm(x, W["norm"]))
    return np.array(out)


def sig6(a):
    return [float(f"{v:.6g}") for v in np.asarray(a, dtype=np.float64)]


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--wikitext", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = all windows")
    ap.add_argument("--self-check", action="store_true",
                    help="only compare forward() with forward_naive() on the prompt")
    args = ap.parse_args()

    if args.self_check:
        r, cfg, W = load_model(args.gguf)
        ids = encode(build_tokenizer(r), PROMPT)
        a, b = forward(cfg, W, ids), forward_naive(cfg, W, ids)
        print(f"max|forward - forward_naive| = {np.abs(a - b).max():.3g}, "
              f"max|logit| = {np.abs(b).max():.3g}, argmax equal: "
              f"{bool((a.argmax(-1) == b.argmax(-1)).all())}, logit sums "
              f"{a.astype(np.float64).sum():.6f} vs {b.sum():.6f}")
        return

    t0 = time.time()
    log("sha256", args.gguf)
    res = dict(model=dict(path=os.path.basename(args.gguf), sha256=sha256_file(args.gguf)))
    r, cfg, W = load_model(args.gguf)
    tk = build_tokenizer(r)
    res["config"] = cfg
    log("config", cfg)

    # 1. Golden logits for a fixed prompt
    ids = encode(tk, PROMPT)
    assert tk.decode(ids) == PROMPT
    logits = forward(cfg, W, ids)
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    res["prompt"] = dict(
        text=PROMPT,
        token_ids=ids,
        tokens=[tk.id_to_token(i) for i in ids],
        im_start_ids=encode(tk, "<|im_start|>user\nHi<|im_end|>"),
        logits_sum=float(logits.astype(np.float64).sum()),
        logits_abs_sum=float(np.abs(logits.astype(np.float64)).sum()),
        top5_ids=top5.tolist(),
        top5_logits=[sig6(logits[t, top5[t]]) for t in range(len(ids))],
        first16_logits=[sig6(logits[t, :16]) for t in range(len(ids))],
        prompt_nll_mean=float(nll_next_token(logits, ids).mean()),
        last_logits=sig6(logits[-1]),
    )
    log("prompt ids", ids)
    log("logits sum", res["prompt"]["logits_sum"], "last top5", top5[-1].tolist(),
        sig6(logits[-1, top5[-1]]))

    # 2. WikiText-2 perplexity (GPTQ protocol)
    with open(args.wikitext, "r", encoding="utf-8") as f:
        text = f.read()
    t1 = time.time()
    toks = encode(tk, text)
    log(f"tokenized {len(text)} chars -> {len(toks)} tokens in {time.time()-t1:.1f}s")
    n_win = len(toks) // WINDOW
    n_eval = min(n_win, args.max_windows) if args.max_windows > 0 else n_win
    win_nll = []
    for w in range(n_eval):
        t1 = time.time()
        seg = toks[w * WINDOW:(w + 1) * WINDOW]
        nll = nll_next_token(forward(cfg, W, seg), seg)
        win_nll.append(float(nll.mean()))
        log(f"window {w+1}/{n_eval} nll={win_nll[-1]:.6f} "
            f"running ppl={math.exp(np.mean(win_nll)):.4f} ({time.time()-t1:.1f}s)")
    res["wikitext2"] = dict(
        file=os.path.basename(args.wikitext),
        file_sha256=sha256_file(args.wikitext),
        n_chars=len(text),
        n_tokens=len(toks),
        token_ids_sha256=hashlib.sha256(",".join(map(str, toks)).encode()).hexdigest(),
        first32_token_ids=toks[:32],
        window=WINDOW,
        n_windows=n_win,
        n_windows_evaluated=n_eval,
        predictions_per_window=WINDOW - 1,
        # every window has the same number of predictions, so mean of window
        # means == mean over all predictions
        ppl_first8=math.exp(np.mean(win_nll[:8])) if n_eval >= 8 else None,
        ppl_all=math.exp(np.mean(win_nll)) if n_eval == n_win else None,
        ppl_evaluated=math.exp(np.mean(win_nll)),
        window_mean_nll=win_nll,
    )
    res["env"] = dict(python=platform.python_version(), numpy=np.__version__,
                      gguf=getattr(gguf, "__version__", None) or _pkg_version("gguf"),
                      tokenizers=tokenizers.__version__,
                      runtime_s=round(time.time() - t0, 1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log("wrote", args.out, {k: v for k, v in res["wikitext2"].items() if k != "window_mean_nll"})


def _pkg_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
