"""sentence-transformers' side of bench/bert_speed.sh: embeds the sentences of FILE with the
model in DIR at each batch size, on THREADS CPU threads, and prints one JSON line per batch
size with the sentences per second of the encode call alone (model loaded and warmed first).

Usage: python3 bench/bert_speed.py DIR FILE THREADS BATCH [BATCH ...]
"""
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

model_dir, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
sentences = [line.rstrip("\n") for line in open(path, encoding="utf-8") if line.strip()]
model = SentenceTransformer(model_dir, device="cpu")
model.encode(sentences[:64], batch_size=32)  # warm-up
for batch in map(int, sys.argv[4:]):
    t = time.perf_counter()
    with torch.inference_mode():
        model.encode(sentences, batch_size=batch, convert_to_numpy=True)
    s = time.perf_counter() - t
    print(json.dumps({"tool": "sentence-transformers", "torch": torch.__version__, "batch": batch,
                      "sentences": len(sentences), "seconds": s, "sentences_per_s": len(sentences) / s}))
