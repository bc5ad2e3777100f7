"""The gateway end to end: Debian's nginx with ngx_xprec_module, the tiny model with two
adapters, tenants with keys, on loopback. Every test also checks that the error log holds no
[alert], [crit] or [emerg]; the core request tests run twice to catch state that leaks from one
request into the next."""
import asyncio
import json
import os
import resource
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import NPM, ROOT, TOKENIZER_DIR, run
from gateway import Gateway, keyhash, stream_text

KEYS = {"alpha": ["sk-alpha-1", "sk-alpha-2"], "beta": ["sk-beta"]}
ADMIN = "sk-admin"
A, B = KEYS["alpha"][0], KEYS["beta"][0]
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gw-models")
    os.chmod(d, 0o755)
    run("synth", "--preset", "tiny", "--seed", 3, "--out", d / "base", "--tokenizer", TOKENIZER_DIR)
    run("synth", "--tuned-from", d / "base", "--delta-rank", 8, "--delta-scale", 0.05,
        "--seed", 4, "--out", d / "tuned")
    run("quantize", "--in", d / "base", "--out", d / "base-fp8")
    run("extract", "--base", d / "base", "--tuned", d / "tuned", "--out", d / "bio", "--rank", 8)
    run("extract", "--base", d / "base-fp8", "--tuned", d / "tuned", "--out", d / "law", "--rank", 4)
    return d


def http_block(models, engine_extra="", extra=""):
    keys_a = " ".join(f"key_sha256={keyhash(k)}" for k in KEYS["alpha"])
    return f"""
    xprec_engine {models}/base-fp8 name=qwen-tiny threads=2 kv_cache=32m {engine_extra};
    xprec_adapter bio {models}/bio;
    xprec_adapter law {models}/law pinned;
    xprec_tenant alpha {keys_a} models=*;
    xprec_tenant beta key_sha256={keyhash(B)} models=qwen-tiny,law rpm=100 tpm=10000;
    xprec_admin_key_sha256 {keyhash(ADMIN)};
    log_format xprec '$xprec_tenant|$xprec_model|$xprec_prompt_tokens|$xprec_completion_tokens|$xprec_ttft_ms|$status';
    {extra}"""


@pytest.fixture(scope="module")
def gw(models, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("gw")
    os.chmod(prefix, 0o755)
    g = Gateway(prefix, http_block(models, extra=f"access_log {prefix}/logs/xprec.log xprec;"),
                server_extra="client_body_timeout 2s; client_max_body_size 1m;", tls=True)
    g.start(ADMIN)
    yield g
    g.stop()
    assert g.bad_log_lines() == []


@pytest.fixture(autouse=True)
def clean_error_log(request):
    yield
    if "gw" in request.fixturenames:
        g = request.getfixturevalue("gw")
        assert g.bad_log_lines() == [], "\n".join(g.bad_log_lines())


def status(g):
    st, body = g.json("GET", "/admin/status", key=ADMIN)
    assert st == 200
    return body


def chat_body(model="bio", content="Hello", **kw):
    b = {"model": model, "messages": [{"role": "user", "content": content}]}
    b.update(kw)
    return b


def assert_error(body, code=None, param=None, type_="invalid_request_error"):
    assert set(body) == {"error"}
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["type"] == type_ and isinstance(e["message"], str) and e["message"]
    if code is not None:
        assert e["code"] == code
    if param is not None:
        assert e["param"] == param


def tokenize_chat(models, messages, enable_thinking=True):
    out = run("tokenize", "--model", models / "base", "--chat",
              json.dumps({"messages": messages, "enable_thinking": enable_thinking})).stdout
    return json.loads(out)


# ------------------------------------------------------------------ auth and models

def test_auth(gw):
    st, body = gw.json("GET", "/v1/models")
    assert st == 401
    assert_error(body, "invalid_api_key")
    for h in ["Bearer sk-nope", "Basic c2stYmV0YQ==", "Bearer", "Bearer    ", "sk-beta",
              "Bearer sk-beta extra", "Bearer " + "x" * 4000]:
        st, _, data = gw.request("GET", "/v1/models", headers={"Authorization": h})
        assert st == 401, h
        assert_error(json.loads(data), "invalid_api_key")
    # the scheme is case-insensitive, spaces around the key do not count, both keys work
    for h in ["bearer sk-beta", "Bearer    sk-beta   ", "BEARER sk-beta"]:
        assert gw.request("GET", "/v1/models", headers={"Authorization": h})[0] == 200, h
    for k in KEYS["alpha"]:
        assert gw.json("GET", "/v1/models", key=k)[0] == 200
    # POST without a key: 401 before the body matters
    st, body = gw.json("POST", CHAT, chat_body())
    assert st == 401


def test_models_per_tenant(gw, models):
    st, body = gw.json("GET", "/v1/models", key=A)
    assert st == 200 and body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["qwen-tiny", "bio", "law"]
    cards = {m["id"]: m for m in body["data"]}
    assert cards["qwen-tiny"]["parent"] is None
    assert cards["qwen-tiny"]["root"] == str(models / "base-fp8")
    assert cards["law"]["parent"] == "qwen-tiny" and cards["law"]["root"] == str(models / "law")
    assert all(m["object"] == "model" and m["max_model_len"] > 0 for m in body["data"])
    st, body = gw.json("GET", "/v1/models", key=B)
    assert [m["id"] for m in body["data"]] == ["qwen-tiny", "law"]
    st, card = gw.json("GET", "/v1/models/law", key=B)
    assert st == 200 and card["id"] == "law" and card["parent"] == "qwen-tiny"
    # another tenant's adapter and one nobody has get the same answer
    st1, b1 = gw.json("GET", "/v1/models/bio", key=B)
    st2, b2 = gw.json("GET", "/v1/models/nope", key=B)
    assert st1 == st2 == 404
    assert_error(b1, "model_not_found", "model")
    assert b1["error"]["message"].replace("bio", "X") == b2["error"]["message"].replace("nope", "X")
    st1, b1 = gw.json("POST", CHAT, chat_body("bio"), key=B)
    st2, b2 = gw.json("POST", CHAT, chat_body("nope"), key=B)
    assert st1 == st2 == 404
    assert b1["error"]["message"].replace("bio", "X") == b2["error"]["message"].replace("nope", "X")


# ------------------------------------------------------------------ chat and completions

def check_stream_shape(events, chat, include_usage):
    assert events[-1] == "[DONE]"
    body = [e for e in events if e != "[DONE]"]
    assert len({e["id"] for e in body}) == 1 and len({e["created"] for e in body}) == 1
    obj = "chat.completion.chunk" if chat else "text_completion"
    assert all(e["object"] == obj for e in body)
    if chat:
        assert body[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = None
    if include_usage:
        assert body[-1]["choices"] == [] and body[-1]["usage"]
        usage = body[-1]["usage"]
        body = body[:-1]
    fin = body[-1]["choices"][0]
    assert fin["finish_reason"] in ("stop", "length")
    assert all(e["choices"][0]["finish_reason"] is None for e in body[:-1])
    return fin["finish_reason"], usage


@pytest.mark.parametrize("rep", [0, 1])
def test_chat_stream_equals_whole(gw, models, rep):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = {"model": "bio", "messages": msgs, "max_tokens": 12, "temperature": 0.8, "seed": 5 + rep}
    st, whole = gw.json("POST", CHAT, body, key=A)
    assert st == 200, whole
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["model"] == "bio"
    ch = whole["choices"][0]
    assert ch["index"] == 0 and ch["message"]["role"] == "assistant" and ch["logprobs"] is None
    # usage is the engine's count: the prompt as the tokenizer renders it, the reply's tokens
    u = whole["usage"]
    assert u["prompt_tokens"] == len(tokenize_chat(models, msgs))
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if ch["finish_reason"] == "length":
        assert u["completion_tokens"] == 12
    st, events, _ = gw.stream(CHAT, {**body, "stream": True,
                                     "stream_options": {"include_usage": True}}, A)
    assert st == 200
    fin, usage = check_stream_shape(events, True, True)
    assert stream_text(events) == ch["message"]["content"]
    assert fin == ch["finish_reason"] and usage == u


@pytest.mark.parametrize("rep", [0, 1])
def test_completions_stream_equals_whole(gw, rep):
    body = {"model": "qwen-tiny", "prompt": "The quick brown fox", "max_tokens": 10,
            "temperature": 0, "echo": bool(rep)}
    st, whole = gw.json("POST", COMPL, body, key=B)
    assert st == 200, whole
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
    text = whole["choices"][0]["text"]
    if rep:
        assert text.startswith("The quick brown fox")
    st, events, _ = gw.stream(COMPL, {**body, "stream": True}, B)
    fin, _ = check_stream_shape(events, False, False)
    assert stream_text(events) == text
    assert fin == whole["choices"][0]["finish_reason"]
    # the default reply length of completions is OpenAI's 16 tokens
    st, d = gw.json("POST", COMPL, {"model": "qwen-tiny", "prompt": "x", "temperature": 0}, key=B)
    assert d["usage"]["completion_tokens"] == 16 or d["choices"][0]["finish_reason"] == "stop"


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_logprobs(models, ids, tmp_path):
    out = tmp_path / "l.npy"
    run("score", "--model", models / "base-fp8", "--tokens", ",".join(map(str, ids)), "--out", out)
    return log_softmax(np.load(out))


def test_logprobs_equal_score(gw, models, tmp_path):
    prompt = [9707, 11, 1879, 0, 220, 17, 42]
    st, d = gw.json("POST", COMPL, {"model": "qwen-tiny", "prompt": prompt, "max_tokens": 6,
                                    "temperature": 0, "logprobs": 5, "echo": True,
                                    "return_tokens_as_token_ids": True}, key=B)
    assert st == 200, d
    lp = d["choices"][0]["logprobs"]
    ids = [int(t.split(":")[1]) for t in lp["tokens"]]
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 6
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ls = score_logprobs(models, ids, tmp_path)
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - ls[i - 1, ids[i]]) < 1e-4, i
        tops = lp["top_logprobs"][i]
        assert len(tops) == 5
        for tok, v in tops.items():
            assert abs(v - ls[i - 1, int(tok.split(":")[1])]) < 1e-4
        want = np.argsort(-ls[i - 1])[:5]
        assert sorted(int(t.split(":")[1]) for t in tops) == sorted(want.tolist())
        if i >= len(prompt):  # greedy: the chosen token is the most likely
            assert ids[i] == int(want[0])
    # chat logprobs: the reply's tokens under the chat prompt
    msgs = [{"role": "user", "content": "Hello"}]
    st, c = gw.json("POST", CHAT, {"model": "qwen-tiny", "messages": msgs, "max_tokens": 4,
                                   "temperature": 0, "logprobs": True, "top_logprobs": 3,
                                   "return_tokens_as_token_ids": True}, key=B)
    assert st == 200, c
    content = c["choices"][0]["logprobs"]["content"]
    pids = tokenize_chat(models, msgs)
    gen = [int(e["token"].split(":")[1]) for e in content]
    ls = score_logprobs(models, pids + gen, tmp_path)
    for k, e in enumerate(content):
        assert abs(e["logprob"] - ls[len(pids) - 1 + k, gen[k]]) < 1e-4
        assert len(e["top_logprobs"]) == 3 and isinstance(e["bytes"], list)


def test_logprob_tokens_as_text(gw):
    st, d = gw.json("POST", CHAT, chat_body("law", max_tokens=3, logprobs=True, top_logprobs=2),
                    key=B)
    assert st == 200
    for e in d["choices"][0]["logprobs"]["content"]:
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"] or "\ufffd" in e["token"]
        assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2


def test_stop_strings(gw):
    base = {"model": "qwen-tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    st, d = gw.json("POST", COMPL, base, key=B)
    text = d["choices"][0]["text"]
    assert len(text) > 12
    stop = text[6:9]
    cut = text[:text.index(stop)]
    st, d2 = gw.json("POST", COMPL, {**base, "stop": [stop, "\u2603never"]}, key=B)
    assert d2["choices"][0]["text"] == cut and d2["choices"][0]["finish_reason"] == "stop"
    st, events, _ = gw.stream(COMPL, {**base, "stop": stop, "stream": True}, B)
    assert stream_text(events) == cut
    assert check_stream_shape(events, False, False)[0] == "stop"


def test_max_tokens_cap(gw, models, tmp_path):
    """xprec_max_tokens caps a location's replies and is its default."""
    g = Gateway(tmp_path, http_block(models),
                server_extra="location /capped/v1/ { xprec_openai; xprec_max_tokens 3; }")
    g.start(ADMIN)
    try:
        st, d = g.json("POST", "/capped" + COMPL, {"model": "qwen-tiny", "prompt": "a",
                                                   "max_tokens": 50, "temperature": 0}, key=B)
        assert st == 200 and d["usage"]["completion_tokens"] == 3
        st, d = g.json("POST", "/capped" + CHAT, chat_body("law", temperature=0), key=B)
        assert d["usage"]["completion_tokens"] <= 3
    finally:
        g.stop()
    assert g.bad_log_lines() == []


def test_tls(gw):
    st, _, data = gw.request("GET", "/v1/models", key=A, tls=True)
    assert st == 200 and json.loads(data)["object"] == "list"
    st, _, data = gw.request("POST", CHAT, chat_body(max_tokens=2), key=A, tls=True)
    assert st == 200


def test_log_variables(gw):
    st, d = gw.json("POST", CHAT, chat_body("law", max_tokens=4, temperature=0), key=B)
    assert st == 200
    time.sleep(0.3)
    lines = open(os.path.join(gw.prefix, "logs", "xprec.log")).read().splitlines()
    want = f"beta|law|{d['usage']['prompt_tokens']}|{d['usage']['completion_tokens']}|"
    hit = [l for l in lines if l.startswith(want)]
    assert hit, lines[-5:]
    ttft, code = hit[-1].split("|")[4:6]
    assert int(ttft) >= 0 and code == "200"


# ------------------------------------------------------------------ load

def test_concurrent_streams(gw):
    """1000 streams at once in one worker all complete."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * n), hard))
    body = json.dumps({"model": "law", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                       "stream": True}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + B.encode() +
           b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
           str(len(body)).encode() + b"\r\n\r\n" + body)

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(req)
        await w.drain()
        data = await asyncio.wait_for(r.read(), 300)
        w.close()
        return data

    async def all_of_them():
        return await asyncio.gather(*[one() for _ in range(n)])

    results = asyncio.run(all_of_them())
    texts = set()
    for data in results:
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b"data: [DONE]" in data
        texts.add(data.split(b"\r\n\r\n", 1)[1].count(b"data: "))
    assert len(texts) == 1  # the same greedy reply everywhere
    st = status(gw)
    assert st["engine"]["running"] == 0 and st["engine"]["waiting"] == 0


def wait_idle(g, timeout=20):
    t0 = time.time()
    while time.time() - t0 < timeout:
        e = status(g)["engine"]
        if e["running"] == 0 and e["waiting"] == 0 and e["kv_blocks_free"] == e["kv_blocks_total"]:
            return status(g)
        time.sleep(0.05)
    raise AssertionError(f"the engine did not go idle: {status(g)['engine']}")


def test_disconnect_frees_sequence(gw):
    body = json.dumps({"model": "bio", "messages": [{"role": "user", "content": "go"}],
                       "max_tokens": 20000, "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
              A.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 5:
        got += s.recv(65536)
    e = status(gw)["engine"]
    assert e["running"] == 1 and e["kv_blocks_free"] < e["kv_blocks_total"]
    assert status(gw)["tenants"][0]["in_flight"] == 1
    s.close()
    st = wait_idle(gw)
    assert st["tenants"][0]["in_flight"] == 0
    # and a request waiting for the engine, not yet streaming, is cancelled too
    assert gw.json("POST", CHAT, chat_body(max_tokens=2), key=A)[0] == 200


# ------------------------------------------------------------------ bad input

LONG = list(range(1000, 1000 + 40000))  # more tokens than the context (32768: 32 MB of BF16 KV)

BAD_BODIES = [
    # (path, body bytes or object, status, code, param)
    (CHAT, b"not json", 400, None, None),
    (CHAT, b'{"model": "bio", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, None),
    (CHAT, b"[1, 2]", 400, None, None),
    (CHAT, b"", 400, None, None),
    (CHAT, b'{"model": "bio", "messages": NaN}', 400, None, None),
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400, None, "model"),
    (CHAT, {"model": 5, "messages": [{"role": "user", "content": "x"}]}, 400, None, "model"),
    (CHAT, {"model": "bio"}, 400, None, "messages"),
    (CHAT, {"model": "bio", "messages": []}, 400, None, "messages"),
    (CHAT, {"model": "bio", "messages": "hello"}, 400, None, "messages"),
    (CHAT, {"model": "bio", "messages": [{"role": "user"}]}, 400, None, "messages[0]"),
    (CHAT, {"model": "bio", "messages": [{"role": "wizard", "content": "x"}]}, 400, None, "messages[0]"),
    (CHAT, {"model": "bio", "messages": [{"content": "x"}]}, 400, None, "messages[0]"),
    (CHAT, {"model": "bio", "messages": [3]}, 400, None, "messages[0]"),
    (CHAT, {"model": "bio", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None, "messages[0]"),
    (CHAT, chat_body(max_tokens="ten"), 400, None, "max_tokens"),
    (CHAT, chat_body(max_tokens=-1), 400, None, "max_tokens"),
    (CHAT, chat_body(max_tokens=0), 400, None, "max_tokens"),
    (CHAT, chat_body(max_tokens=1e30), 400, None, "max_tokens"),
    (CHAT, chat_body(max_tokens=3.5), 400, None, "max_tokens"),
    (CHAT, chat_body(max_completion_tokens=-3), 400, None, "max_completion_tokens"),
    (CHAT, chat_body(temperature=-1), 400, None, "temperature"),
    (CHAT, chat_body(temperature=3), 400, None, "temperature"),
    (CHAT, chat_body(temperature="hot"), 400, None, "temperature"),
    (CHAT, chat_body(top_p=0), 400, None, "top_p"),
    (CHAT, chat_body(top_p=1.5), 400, None, "top_p"),
    (CHAT, chat_body(top_k=-5), 400, None, "top_k"),
    (CHAT, chat_body(top_k=2.5), 400, None, "top_k"),
    (CHAT, chat_body(n=2), 400, None, "n"),
    (CHAT, chat_body(seed="x"), 400, None, "seed"),
    (CHAT, chat_body(seed=1e300), 400, None, "seed"),
    (CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, None, "stop"),
    (CHAT, chat_body(stop=[""]), 400, None, "stop"),
    (CHAT, chat_body(stop=123), 400, None, "stop"),
    (CHAT, chat_body(stream="yes"), 400, None, "stream"),
    (CHAT, chat_body(stream=True, stream_options=[]), 400, None, "stream_options"),
    (CHAT, chat_body(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    (CHAT, chat_body(top_logprobs=2), 400, None, "top_logprobs"),
    (CHAT, chat_body(logprobs="yes"), 400, None, "logprobs"),
    (CHAT, chat_body(chat_template_kwargs={"enable_thinking": "no"}), 400, None, "chat_template_kwargs.enable_thinking"),
    (CHAT, chat_body(user=7), 400, None, "user"),
    (COMPL, {"model": "qwen-tiny"}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": 123}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": []}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": ["a", "b"]}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": [-1]}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": [1.5]}, 400, None, "prompt"),
    (COMPL, {"model": "qwen-tiny", "prompt": "x", "logprobs": 30}, 400, None, "logprobs"),
    (COMPL, {"model": "qwen-tiny", "prompt": "x", "echo": 1}, 400, None, "echo"),
    # what only the engine can tell: still a 400, before any byte of a stream
    (COMPL, {"model": "qwen-tiny", "prompt": [999999999]}, 400, None, None),
    (COMPL, {"model": "qwen-tiny", "prompt": ""}, 400, None, None),
    (COMPL, {"model": "qwen-tiny", "prompt": LONG, "stream": True}, 400, "context_length_exceeded", None),
    (COMPL, {"model": "qwen-tiny", "prompt": "x", "max_tokens": 40000}, 400, None, None),
]


@pytest.mark.parametrize("case", range(len(BAD_BODIES)))
def test_bad_bodies(gw, case):
    path, body, want, code, param = BAD_BODIES[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    st, h, data = gw.request("POST", path, raw, key=A,
                             headers={"Content-Type": "application/json"})
    assert st == want, data
    assert h["content-type"] == "application/json"
    assert_error(json.loads(data), code, param)
    # and the next good request is served
    assert gw.json("POST", COMPL, {"model": "law", "prompt": "ok", "max_tokens": 1}, key=A)[0] == 200


def test_bad_protocol(gw):
    good = json.dumps({"model": "law", "prompt": "hi", "max_tokens": 2, "temperature": 0})
    # an oversize body: nginx's client_max_body_size, answered in OpenAI's format
    st, h, data = gw.request("POST", COMPL, b"x" * (2 << 20), key=A)
    assert st == 413
    assert_error(json.loads(data))
    # wrong method, unknown endpoint
    st, h, data = gw.request("GET", CHAT, key=A)
    assert st == 405 and h["allow"] == "POST"
    st, _, data = gw.request("POST", "/v1/embeddings", b"{}", key=A)
    assert st == 404
    assert_error(json.loads(data), "unknown_url")
    st, _, _ = gw.request("DELETE", "/v1/models", key=A)
    assert st == 405
    # a body that never arrives in full: client_body_timeout ends it, nothing hangs
    t0 = time.time()
    out = gw.raw(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + A.encode() +
                 b"\r\nContent-Length: 100\r\n\r\n{\"model\"", timeout=20)
    assert time.time() - t0 < 15 and (out == b"" or out.startswith(b"HTTP/1.1 408"))
    # a body cut off by the client closing
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + A.encode() +
              b"\r\nContent-Length: 100\r\n\r\n{\"mod")
    s.close()
    # pipelined requests answer in order; HTTP/1.0 (whole and streamed)
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {A}\r\n"
           f"Content-Length: {len(good)}\r\n\r\n{good}").encode()
    out = gw.raw(req + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + A.encode() +
                 b"\r\nConnection: close\r\n\r\n")
    parts = out.split(b"HTTP/1.1 200 OK")
    assert len(parts) == 3 and b"text_completion" in parts[1] and b'"object":"list"' in parts[2]
    for stream in (False, True):
        b10 = json.dumps({"model": "law", "prompt": "hi", "max_tokens": 3, "stream": stream})
        out = gw.raw((f"POST /v1/completions HTTP/1.0\r\nAuthorization: Bearer {A}\r\n"
                      f"Content-Length: {len(b10)}\r\n\r\n{b10}").encode())
        assert out.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" not in out
        assert (b"data: [DONE]" in out) == stream
    # headers nginx itself refuses: still JSON
    out = gw.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"k" * 9000 +
                 b"\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b'"error"' in out
    assert gw.json("POST", COMPL, json.loads(good), key=A)[0] == 200


# ------------------------------------------------------------------ admin

def test_admin_load_unload(gw, models):
    st, body = gw.json("GET", "/admin/status", key="wrong")
    assert st == 401
    st, body = gw.json("GET", "/admin/status", key=A)  # a tenant key is not the admin key
    assert st == 401
    s = status(gw)
    assert s["engine"]["state"] == "ready" and s["engine"]["backend"] == "cpu"
    names = {a["name"]: a for a in s["adapters"]}
    assert names["law"]["pinned"] and names["law"]["tier"] == "resident"
    # a path that is not an adapter is refused, not "loaded"
    st, _, data = gw.request("POST", "/admin/v1/load_lora_adapter",
                             {"lora_name": "x", "lora_path": str(models / "base")}, key=ADMIN)
    assert st == 400 and json.loads(data)["error"]["param"] == "lora_path"
    st, _, data = gw.request("POST", "/admin/v1/load_lora_adapter", {"lora_name": "x"}, key=ADMIN)
    assert st == 400 and b"Both 'lora_name' and 'lora_path'" in data
    st, _, data = gw.request("POST", "/admin/v1/load_lora_adapter",
                             {"lora_name": "bio", "lora_path": str(models / "bio")}, key=ADMIN)
    assert st == 400 and b"already been loaded" in data
    st, _, data = gw.request("POST", "/admin/v1/load_lora_adapter",
                             {"lora_name": "phys", "lora_path": str(models / "bio"),
                              "tenants": ["beta"]}, key=ADMIN)
    assert st == 200 and data == b"Success: LoRA adapter 'phys' added successfully."
    # beta may use it, alpha may not (it names only beta)
    assert "phys" in [m["id"] for m in gw.json("GET", "/v1/models", key=B)[1]["data"]]
    assert gw.json("POST", CHAT, chat_body("phys", max_tokens=2), key=A)[0] == 404
    st, d = gw.json("POST", CHAT, chat_body("phys", max_tokens=3, temperature=0), key=B)
    assert st == 200
    # the same weights as bio: the same greedy reply
    st, ref = gw.json("POST", CHAT, chat_body("bio", max_tokens=3, temperature=0), key=A)
    assert d["choices"][0]["message"] == ref["choices"][0]["message"]
    assert "phys" in [a["name"] for a in status(gw)["adapters"]]
    # unload: gone from the engine and the lists
    st, _, data = gw.request("POST", "/admin/v1/unload_lora_adapter", {"lora_name": "phys"}, key=ADMIN)
    assert st == 200 and data == b"Success: LoRA adapter 'phys' removed successfully."
    assert "phys" not in [a["name"] for a in status(gw)["adapters"]]
    assert gw.json("POST", CHAT, chat_body("phys", max_tokens=2), key=B)[0] == 404
    st, _, data = gw.request("POST", "/admin/v1/unload_lora_adapter", {"lora_name": "phys"}, key=ADMIN)
    assert st == 404
    st, _, data = gw.request("POST", "/admin/v1/unload_lora_adapter", {"lora_name": "bio"}, key=ADMIN)
    assert st == 400 and b"nginx.conf" in data


# ------------------------------------------------------------------ SDK

def test_openai_sdk(gw):
    script = os.path.join(ROOT, "tests", "integration", "openai_sdk.mjs")
    env = dict(os.environ, NODE_PATH=NPM, XPREC_BASE=f"http://127.0.0.1:{gw.port}/v1",
               XPREC_KEY=A, XPREC_MODEL="bio")
    p = subprocess.run(["node", script], capture_output=True, text=True, env=env, timeout=120,
                       cwd=os.path.dirname(NPM))
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["chat_text"] == out["chat_stream_text"] and out["chat_text"]
    assert out["completion_text"] and out["models"] == ["qwen-tiny", "bio", "law"]
    assert out["auth_error"] == "AuthenticationError" and out["auth_status"] == 401


# ------------------------------------------------------------------ process model

def go_on(model, max_tokens):
    """A greedy streamed chat request that runs to max_tokens or the model's end."""
    return {"model": model, "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}


def long_stream(g, key, max_tokens, results, model="bio"):
    try:
        results["stream"] = g.stream(CHAT, go_on(model, max_tokens), key, timeout=600)
    except Exception as e:  # the assertions below say what was wrong
        results["error"] = repr(e)


def wait_running(g, n=1, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if status(g)["engine"]["running"] >= n:
            return
        time.sleep(0.02)
    raise AssertionError("nothing started running")


def test_reload_while_streaming(models, tmp_path):
    g = Gateway(tmp_path, http_block(models)).start(ADMIN)
    try:
        old = status(g)["engine"]["pid"]
        res = {}
        t = threading.Thread(target=long_stream, args=(g, A, 1500, res))
        t.start()
        wait_running(g)
        g.reload(old)
        # the new worker answers new requests while the old one streams on
        assert status(g)["engine"]["pid"] != old
        g.wait_ready(ADMIN)
        assert g.json("POST", CHAT, chat_body("law", max_tokens=2), key=B)[0] == 200
        t.join(300)
        st, events, _ = res["stream"]
        assert st == 200 and events[-1] == "[DONE]"
        assert check_stream_shape(events, True, False)[0] in ("length", "stop")
    finally:
        g.stop()
    assert g.bad_log_lines() == []


def test_quit_past_shutdown_timeout(models, tmp_path):
    g = Gateway(tmp_path, http_block(models), main_extra="worker_shutdown_timeout 3s;").start(ADMIN)
    res = {}
    t = threading.Thread(target=long_stream, args=(g, A, 30000, res))
    t.start()
    wait_running(g)
    t0 = time.time()
    g.nginx("-s", "quit")
    t.join(60)
    took = time.time() - t0
    st, events, raw = res["stream"]
    # the stream ended cleanly with an error event before nginx closed the connection
    assert st == 200 and events[-1] == "[DONE]", raw[-500:]
    err = events[-2]
    assert err["error"]["code"] == "server_shutting_down"
    assert took < 10
    g.stop()
    assert g.bad_log_lines() == []


def test_quit_lets_streams_finish(models, tmp_path):
    g = Gateway(tmp_path, http_block(models)).start(ADMIN)
    res = {}
    t = threading.Thread(target=long_stream, args=(g, A, 600, res))
    t.start()
    wait_running(g)
    g.nginx("-s", "quit")
    t.join(120)
    st, events, _ = res["stream"]
    assert st == 200 and events[-1] == "[DONE]"
    assert check_stream_shape(events, True, False)[0] in ("length", "stop")
    g.stop()
    assert g.bad_log_lines() == []


def open_stream(g, key, max_tokens, model="bio"):
    """Starts a streaming request and returns its connection once the first token has come:
    the request runs until it ends or the caller closes the connection."""
    c, r = g.start_stream(CHAT, go_on(model, max_tokens), key, timeout=600)
    assert r.status == 200
    while not r.fp.readline().startswith(b"data: "):
        pass
    return c, r


def test_exclusive_engine_waits_for_the_old_one(models, tmp_path):
    """What a GPU engine does on reload, tried on the CPU with exclusive=on: the new worker's
    engine starts only once the old one is destroyed, and requests wait for it meanwhile.
    The old worker's stream lasts until the test closes it, so no machine is too fast for it."""
    lock = tmp_path / "engine.lock"
    g = Gateway(tmp_path, http_block(models, f"exclusive=on lock_file={lock}")).start(ADMIN)
    try:
        old = status(g)["engine"]["pid"]
        c, _ = open_stream(g, A, 30000)
        g.reload(old)
        # the new worker answers, but has no engine while the old one streams
        st = status(g)
        assert st["engine"]["pid"] != old
        assert st["engine"]["state"] == "starting"
        # a request now waits, then is served by the new engine (not refused)
        res = {}
        t = threading.Thread(target=lambda: res.update(
            r=g.json("POST", CHAT, chat_body("law", max_tokens=2), key=B, timeout=300)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), res
        assert status(g)["engine"]["state"] == "starting"
        c.close()  # the old request is cancelled, its worker exits, the lock passes on
        t.join(300)
        st, d = res["r"]
        assert st == 200, d
        assert status(g)["engine"]["state"] == "ready"
    finally:
        g.stop()
    assert g.bad_log_lines() == []


def test_start_wait_gives_503(models, tmp_path):
    lock = tmp_path / "engine.lock"
    # someone else holds the engine's lock: requests wait start_wait, then 503 + Retry-After
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        time.sleep(0.3)
        g = Gateway(tmp_path, http_block(models, f"exclusive=on lock_file={lock} start_wait=1s"))
        g.start(wait=False)
        g.wait_ready(None)
        st, h, data = g.request("POST", CHAT, chat_body("law", max_tokens=2), key=B)
        assert st == 503 and h.get("retry-after")
        assert_error(json.loads(data), "engine_unavailable", type_="server_error")
        assert status(g)["engine"]["state"] == "starting"
    finally:
        holder.kill()
        holder.wait()
    g.wait_ready(ADMIN)
    assert g.json("POST", CHAT, chat_body("law", max_tokens=2), key=B)[0] == 200
    g.stop()
    assert g.bad_log_lines() == []


# ------------------------------------------------------------------ configuration

def config_error(models, tmp_path, block, main_extra="", server_extra=""):
    g = Gateway(tmp_path, block, main_extra=main_extra, server_extra=server_extra)
    p = g.test_config()
    assert p.returncode != 0
    return p.stderr


def test_config_errors(models, tmp_path):
    keys = f"key_sha256={keyhash('k')}"
    e = config_error(models, tmp_path, f"xprec_engine {tmp_path}/none;")
    assert "config.json" in e and "nginx.conf:" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8 bogus=1;")
    assert 'unknown parameter "bogus=1"' in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8 threads=0;")
    assert "threads" in e
    e = config_error(models, tmp_path, f"xprec_adapter a {models}/bio;")
    assert "needs xprec_engine before it" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_adapter a {models}/base;")
    assert 'adapter "a"' in e and "adapter_config.json" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_adapter a {models}/bio; xprec_adapter a {models}/law;")
    assert "already defined" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_tenant t key_sha256=abc models=*;")
    assert "64 hexadecimal" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_tenant t {keys} models=nope;")
    assert 'model "nope"' in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_tenant t {keys};")
    assert "models=" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_tenant t {keys} models=* tpm=x;")
    assert "tpm" in e
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_tenant t {keys} models=*; xprec_tenant u {keys} models=*;")
    assert "is also tenant" in e
    # an adapter whose shapes do not fit the base
    other = tmp_path / "other"
    other.mkdir()
    run("synth", "--preset", "tiny", "--hidden", 96, "--seed", 9, "--out", other / "base",
        "--tokenizer", TOKENIZER_DIR)
    run("synth", "--tuned-from", other / "base", "--delta-rank", 4, "--delta-scale", 0.05,
        "--out", other / "tuned")
    run("extract", "--base", other / "base", "--tuned", other / "tuned", "--out", other / "ad",
        "--rank", 4)
    e = config_error(models, tmp_path, f"xprec_engine {models}/base-fp8; xprec_adapter a {other}/ad;")
    assert 'adapter "a"' in e and "nginx.conf:" in e
    # a location handler without an engine
    e = config_error(models, tmp_path, "", server_extra="location /x/ { xprec_admin; }")
    assert "needs xprec_engine" in e
    # worker processes: refused unless per_worker=on, always with a GPU backend
    g = Gateway(tmp_path, f"xprec_engine {models}/base-fp8;", workers=2)
    p = g.test_config()
    assert p.returncode != 0 and "per_worker=on" in p.stderr
    g = Gateway(tmp_path, f"xprec_engine {models}/base-fp8 per_worker=on;", workers=2)
    assert g.test_config().returncode == 0
    g = Gateway(tmp_path, f"xprec_engine {models}/base-fp8 backend=cuda per_worker=on;", workers=2)
    p = g.test_config()
    assert p.returncode != 0 and "worker_processes 1" in p.stderr


def test_per_worker_engines(models, tmp_path):
    g = Gateway(tmp_path, http_block(models, "per_worker=on"), workers=2).start(ADMIN)
    try:
        pids = set()
        for _ in range(40):
            pids.add(status(g)["engine"]["pid"])
            assert g.json("POST", COMPL, {"model": "law", "prompt": "a", "max_tokens": 1}, key=B)[0] == 200
        assert len(g.workers()) == 2
    finally:
        g.stop()
    assert g.bad_log_lines() == []


def test_keyhash():
    for key in ["sk-beta", "k" * 300, "ключ"]:
        for tail in ["", "\n"]:
            out = run("keyhash", input=key + tail).stdout.strip()
            assert out == keyhash(key)
    p = run("keyhash", input="", check=False)
    assert p.returncode == 1 and "no key" in p.stderr


def test_deploy_config_is_valid(models, tmp_path):
    """deploy/nginx.conf and its tenants file pass nginx -t once their paths are real ones."""
    text = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
    tenants = open(os.path.join(ROOT, "deploy", "xprec-tenants.conf")).read()
    crt, key = __import__("gateway").self_signed(str(tmp_path))
    (tmp_path / "logs").mkdir()
    (tmp_path / "xprec-tenants.conf").write_text(tenants)
    subst = {
        "/srv/models/Qwen3-32B-FP8": str(models / "base-fp8"),
        "backend=cuda": "backend=cpu",
        "/srv/adapters/biomed-A-r64": str(models / "bio"),
        "/srv/adapters/law-A-r32": str(models / "law"),
        "/srv/adapters/physics-B-r64": str(models / "bio"),
        "include /etc/nginx/xprec-tenants.conf": f"include {tmp_path}/xprec-tenants.conf",
        "include /etc/nginx/mime.types;": "",
        "/etc/ssl/llm.example.org/fullchain.pem": crt,
        "/etc/ssl/llm.example.org/privkey.pem": key,
        "/var/log/nginx/": f"{tmp_path}/logs/",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{__import__('gateway').free_port()} ssl;",
        "listen 80;": f"listen 127.0.0.1:{__import__('gateway').free_port()};",
        "kv_cache=40g": "kv_cache=64m",
        "xprec_redis 127.0.0.1:6379": "xprec_redis 127.0.0.1:6379",
    }
    for a, b in subst.items():
        assert a in text or a in tenants or a.startswith("xprec_redis"), a
        text = text.replace(a, b)
    conf = tmp_path / "nginx.conf"
    mod = __import__("gateway").MODULE
    conf.write_text(f"load_module {mod};\nerror_log {tmp_path}/logs/error.log;\n"
                    f"pid {tmp_path}/nginx.pid;\n" + text)
    p = subprocess.run([__import__("gateway").NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_echo_returns_the_prompt_as_sent(gw):
    """The tokenizer normalizes (NFC): decoding the ids would give another string back."""
    prompt = "Cafe\u0301 cre\u0300me"
    for stream in (False, True):
        body = {"model": "law", "prompt": prompt, "max_tokens": 2, "echo": True,
                "temperature": 0, "stream": stream}
        if stream:
            st, events, _ = gw.stream(COMPL, body, B)
            text = stream_text(events)
        else:
            st, d = gw.json("POST", COMPL, body, key=B)
            text = d["choices"][0]["text"]
        assert st == 200 and text.startswith(prompt)
