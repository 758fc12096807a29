"""The official `openai` client against `adadim serve` (started by tests/serve.rs, which passes
the base URL, the API key and the model name): completions, chat, streaming, logprobs, echo
scoring, and the errors it raises. Exits non-zero on the first mismatch."""

import sys

import openai

base_url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)

models = client.models.list()
assert [m.id for m in models.data] == [model], models

# Completions: greedy is repeatable; usage counts the tokens.
a = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0)
b = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0)
assert a.choices[0].text == b.choices[0].text, (a, b)
assert a.object == "text_completion" and a.choices[0].finish_reason in ("stop", "length"), a
assert a.usage.prompt_tokens > 0 and 0 < a.usage.completion_tokens <= 12, a.usage

# Streaming gives the same text, chunk by chunk, then the stream ends ([DONE]).
pieces = []
finish = None
for chunk in client.completions.create(model=model, prompt="the quick brown fox", max_tokens=12, temperature=0, stream=True):
    pieces.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
assert "".join(pieces) == a.choices[0].text, (pieces, a.choices[0].text)
assert finish == a.choices[0].finish_reason, finish

# Logprobs of generated tokens: one per token, the most likely alternatives (the legacy format
# keys them by text, so tokens of the same text share an entry), the chosen one the most likely
# at temperature 0.
c = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0, logprobs=3)
lp = c.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens, lp
for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
    assert p <= 0 and 1 <= len(top) <= 3, (tok, p, top)
    assert abs(max(top.values()) - p) < 1e-9, (tok, p, top)

# Echo + logprobs + max_tokens 0: the prompt scored, first token without a log probability.
e = client.completions.create(model=model, prompt="the quick brown fox jumps", max_tokens=0, echo=True, logprobs=0)
lp = e.choices[0].logprobs
assert e.choices[0].text == "the quick brown fox jumps", e.choices[0].text
assert lp.token_logprobs[0] is None and all(p is not None and p <= 0 for p in lp.token_logprobs[1:]), lp
assert "".join(lp.tokens) == "the quick brown fox jumps", lp.tokens

# Chat, whole and streamed, with logprobs.
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
content = r.choices[0].message.content
assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens, r.choices[0].logprobs
streamed = ""
usage = None
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
    if chunk.usage:
        usage = chunk.usage
assert streamed == content, (streamed, content)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage

# Sampling with a seed is repeatable.
s1 = client.completions.create(model=model, prompt="once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
s2 = client.completions.create(model=model, prompt="once", max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
assert s1.choices[0].text == s2.choices[0].text, (s1, s2)

# Errors come back as the client's typed exceptions with the server's message.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as err:
    assert "no-such-model" in str(err), err
try:
    client.completions.create(model=model, prompt="x", max_tokens=10**9)
    raise AssertionError("max_tokens past the context was accepted")
except openai.BadRequestError as err:
    assert "maximum context length" in str(err), err
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as err:
    assert "incorrect API key" in str(err), err

print("openai client: all checks passed")
