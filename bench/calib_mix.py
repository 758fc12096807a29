"""Write a calibration text mixing Shakespeare with GSM8K's train split (never an evaluation text).

Usage: python3 bench/calib_mix.py SHAKESPEARE_TXT GSM8K_TRAIN_JSONL OUT_TXT
SHAKESPEARE_TXT is the corpus `--calib shakespeare` reads ($ADADIM_HOME/data/shakespeare.txt once
fetched); each GSM8K problem becomes "Question: ...\nAnswer: ..." with its calculator notes
removed. The two texts alternate in pieces of 2,000 characters, so that a 512-token crop holds
or borders both.
"""
import json
import os
import re
import sys

shakespeare, gsm8k, out = sys.argv[1:4]
sh = open(shakespeare, encoding="utf-8").read()
problems = []
with open(gsm8k, encoding="utf-8") as f:
    for line in f:
        r = json.loads(line)
        answer = re.sub(r"<<[^>]*>>", "", r["answer"])
        problems.append(f"Question: {r['question']}\nAnswer: {answer}\n\n")
gs = "".join(problems)


def pieces(text, n=2000):
    return [text[i : i + n] for i in range(0, len(text), n)]


a, b = pieces(sh), pieces(gs)
mixed = []
for i in range(max(len(a), len(b))):
    mixed += a[i : i + 1] + b[i : i + 1]
with open(out + ".tmp", "w", encoding="utf-8") as f:
    f.write("".join(mixed))
os.replace(out + ".tmp", out)
