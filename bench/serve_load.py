#!/usr/bin/env python3
"""Load test of an OpenAI-compatible server on loopback (ours or llama.cpp's llama-server),
standard library only; bounded in requests and time.

Phase 1, mixed load: CLIENTS clients x REQUESTS requests each, all at once; prompts of about
10 to 1000 tokens cut from a text (seeded), every other request streamed. Every answer is
checked: status 200, a finish reason, the stream closed by [DONE], completion_tokens equal to
max_tokens unless the model stopped. Time to first token (streamed requests) and time per
output token after the first (p50 / p99).

Phase 2, throughput: for each level N, N clients each send ROUNDS non-streamed requests of the
same prompt (about 100 tokens) for MAX_TOKENS tokens; aggregate completion tokens per second
of wall time.

Prints one JSON object (and writes it to --out)."""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse


def post(url, key, body, stream, deadline):
    """One request: (status, answer JSON or list of stream events, seconds to first token,
    seconds of each later chunk)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=max(1.0, deadline - time.time()))
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    t0 = time.time()
    conn.request("POST", u.path + "/completions", json.dumps(body), headers)
    r = conn.getresponse()
    if r.status != 200:
        return r.status, r.read().decode(errors="replace"), None, []
    if not stream:
        data = json.loads(r.read())
        return 200, data, None, []
    events, first, later = [], None, []
    buf = b""
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].decode()
        now = time.time()
        if payload == "[DONE]":
            events.append(payload)
            break
        ev = json.loads(payload)
        events.append(ev)
        if ev.get("choices") and ev["choices"][0].get("text"):
            if first is None:
                first = now - t0
            else:
                later.append(now)
    conn.close()
    return 200, events, first, later


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--key", default="")
    ap.add_argument("--text", required=True, help="a text file to cut prompts from")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--throughput-tokens", type=int, default=128)
    ap.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole run")
    ap.add_argument("--label", default="")
    ap.add_argument("--out")
    a = ap.parse_args()
    deadline = time.time() + a.time_limit
    words = open(a.text, encoding="utf-8").read().split()
    rng = random.Random(0)

    def prompt(tokens):
        # About 1.3 tokens per English word (SmolLM2's tokenizer on WikiText-2).
        n = max(3, int(tokens / 1.3))
        s = rng.randrange(0, len(words) - n)
        return " ".join(words[s : s + n])

    # Phase 1: mixed load.
    plan = [[(prompt(rng.randint(10, 1000)), (c + i) % 2 == 0) for i in range(a.requests)] for c in range(a.clients)]
    results, lock = [], threading.Lock()

    def client(reqs):
        for text, stream in reqs:
            if time.time() > deadline:
                break
            body = {"model": a.model, "prompt": text, "max_tokens": a.max_tokens, "temperature": 0, "stream": stream}
            t0 = time.time()
            try:
                status, ans, first, later = post(a.url, a.key, body, stream, deadline)
                err = None
            except Exception as e:  # a failed request is a result to count, not a crash
                status, ans, first, later, err = 0, None, None, [], repr(e)
            rec = {"stream": stream, "status": status, "seconds": time.time() - t0, "error": err}
            if status == 200 and stream:
                chunks = [e for e in ans if isinstance(e, dict)]
                finish = next((c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0].get("finish_reason")), None)
                rec.update(done=ans[-1:] == ["[DONE]"], finish=finish, ttft=first, chunks=len(later) + (first is not None))
                if first is not None and later:
                    rec["tpot"] = (later[-1] - (t0 + first)) / len(later)
            elif status == 200:
                ch = ans["choices"][0]
                rec.update(done=True, finish=ch.get("finish_reason"), tokens=ans["usage"]["completion_tokens"])
            elif err is None:
                rec["error"] = str(ans)[:300]
            with lock:
                results.append(rec)

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mixed_wall = time.time() - t0
    failed = [r for r in results if r["status"] != 200]
    truncated = [
        r
        for r in results
        if r["status"] == 200
        and (not r.get("done") or r.get("finish") not in ("stop", "length") or (not r["stream"] and r.get("finish") == "length" and r.get("tokens") != a.max_tokens))
    ]
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in results if r.get("tpot") is not None]
    mixed = {
        "clients": a.clients,
        "requests": len(results),
        "planned": a.clients * a.requests,
        "failed": len(failed),
        "truncated": len(truncated),
        "errors": [r.get("error") for r in failed[:5]],
        "wall_s": mixed_wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }

    # Phase 2: throughput at each concurrency.
    fixed = prompt(100)
    levels = []
    for n in [int(x) for x in a.levels.split(",")]:
        toks, lock2, bad = [], threading.Lock(), []

        def worker():
            for _ in range(a.rounds):
                body = {"model": a.model, "prompt": fixed, "max_tokens": a.throughput_tokens, "temperature": 0, "ignore_eos": True}
                status, ans, _, _ = post(a.url, a.key, body, False, deadline)
                with lock2:
                    if status == 200:
                        toks.append(ans["usage"]["completion_tokens"])
                    else:
                        bad.append(status)

        t0 = time.time()
        ts = [threading.Thread(target=worker) for _ in range(n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.time() - t0
        levels.append({"clients": n, "tokens": sum(toks), "failed": len(bad), "wall_s": wall, "tokens_per_s": sum(toks) / wall})
    base = levels[0]["tokens_per_s"] if levels else None
    for lv in levels:
        lv["vs_one_client"] = lv["tokens_per_s"] / base if base else None
    out = {"label": a.label, "model": a.model, "max_tokens": a.max_tokens, "mixed": mixed, "throughput": levels}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        open(a.out, "w").write(text)
    sys.exit(1 if failed or truncated else 0)


if __name__ == "__main__":
    main()
