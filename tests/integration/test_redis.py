"""The gateway with a real redis-server on loopback (started here, AUTH on, AOF so a kill loses
nothing it confirmed): exact quotas under concurrency, x-ratelimit headers, a cancelled stream
charged what it generated, Redis killed mid-traffic under on_error=allow and deny, the adapter
registry across two gateways and restarts, fleet residency, and /metrics parsed with Debian's
prometheus client against the usage the clients were told."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import TOKENIZER_DIR, run
from gateway import Gateway, free_port, keyhash

PASSWORD = "redis-secret"
ADMIN = "sk-admin"
KEYS = {t: f"sk-{t}" for t in ["free", "rpm", "tpm", "day", "conc", "gone", "flaky", "meter"]}
COMPL = "/v1/completions"
CHAT = "/v1/chat/completions"


class Redis:
    def __init__(self, d):
        self.dir = str(d)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--requirepass", PASSWORD, "--dir", self.dir, "--appendonly", "yes",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                if self.cli("PING") == "PONG":
                    return self
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), "-a", PASSWORD,
                               "--no-auth-warning", *map(str, args)],
                              capture_output=True, text=True, check=True).stdout.strip()

    def hgetall(self, key):
        out = subprocess.run(["redis-cli", "-p", str(self.port), "-a", PASSWORD,
                              "--no-auth-warning", "--raw", "HGETALL", key],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        out = out[:-1] if out and out[-1] == "" else out
        return dict(zip(out[0::2], out[1::2]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis-models")
    os.chmod(d, 0o755)
    run("synth", "--preset", "tiny", "--seed", 5, "--out", d / "base", "--tokenizer", TOKENIZER_DIR)
    run("synth", "--tuned-from", d / "base", "--delta-rank", 4, "--delta-scale", 0.05,
        "--seed", 6, "--out", d / "tuned")
    run("quantize", "--in", d / "base", "--out", d / "base-fp8")
    run("extract", "--base", d / "base", "--tuned", d / "tuned", "--out", d / "ad", "--rank", 4)
    return d


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path / "redis").start()
    yield r
    r.stop()


def block(models, redis, node="gw-a", on_error="allow", timeout=300, extra=""):
    return f"""
    xprec_engine {models}/base-fp8 name=base threads=2 kv_cache=64m max_batch=64;
    xprec_redis 127.0.0.1:{redis.port} password={PASSWORD} timeout={timeout} on_error={on_error} node={node};
    xprec_tenant free key_sha256={keyhash(KEYS['free'])} models=*;
    xprec_tenant rpm key_sha256={keyhash(KEYS['rpm'])} models=* rpm=10;
    xprec_tenant tpm key_sha256={keyhash(KEYS['tpm'])} models=* tpm=40;
    xprec_tenant day key_sha256={keyhash(KEYS['day'])} models=* tokens_per_day=12;
    xprec_tenant conc key_sha256={keyhash(KEYS['conc'])} models=* max_concurrent=2;
    xprec_tenant gone key_sha256={keyhash(KEYS['gone'])} models=* tpm=1000000;
    xprec_tenant flaky key_sha256={keyhash(KEYS['flaky'])} models=* rpm=100000 tpm=100000000;
    xprec_tenant meter key_sha256={keyhash(KEYS['meter'])} models=*;
    xprec_admin_key_sha256 {keyhash(ADMIN)};
    {extra}"""


def gateway(tmp_path, models, redis, name="a", **kw):
    prefix = tmp_path / f"gw-{name}"
    prefix.mkdir(exist_ok=True)
    os.chmod(prefix, 0o755)
    g = Gateway(prefix, block(models, redis, node=f"gw-{name}", **kw),
                server_extra="location = /metrics { xprec_metrics; }")
    return g.start(ADMIN)


def done(g):
    g.stop()
    assert g.bad_log_lines() == [], g.bad_log_lines()


def ask(g, tenant, max_tokens=4, prompt="hi", model="base", **kw):
    return g.request("POST", COMPL, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                     "temperature": 0, **kw}, key=KEYS[tenant])


def concurrently(n, fn):
    out = [None] * n
    def one(i):
        out[i] = fn(i)
    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


# ------------------------------------------------------------------ quotas

def test_rpm_exact_under_concurrency(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        res = concurrently(50, lambda i: ask(g, "rpm", max_tokens=1))
        codes = [r[0] for r in res]
        # never more than the limit, and the limit when demand exceeds it
        assert codes.count(200) == 10 and codes.count(429) == 40, codes
        for st, h, body in res:
            if st == 429:
                e = json.loads(body)["error"]
                assert e["code"] == "rate_limit_exceeded" and "rpm" in e["message"]
                assert int(h["retry-after"]) >= 1
                assert h["x-ratelimit-limit-requests"] == "10"
                assert h["x-ratelimit-remaining-requests"] == "0"
        # the window holds what was admitted, not what was refused
        assert sum(int(v) for v in redis.hgetall("xprec:{t:rpm}:rpm").values()) == 10
        # nothing held after the requests ended
        assert redis.cli("ZCARD", "xprec:{t:rpm}:inflight") == "0"
        assert redis.cli("HLEN", "xprec:{t:rpm}:resv") == "0"
    finally:
        done(g)


def test_tpm_exact_under_concurrency(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        st, _, body = ask(g, "free", max_tokens=4)
        u = json.loads(body)["usage"]
        assert u["completion_tokens"] == 4  # the reply runs to max_tokens: bound == usage
        bound = u["prompt_tokens"] + 4
        res = concurrently(50, lambda i: ask(g, "tpm", max_tokens=4))
        ok = [r for r in res if r[0] == 200]
        assert len(ok) == 40 // bound, [r[0] for r in res]
        used = sum(json.loads(b)["usage"]["total_tokens"] for _, _, b in ok)
        assert used <= 40
        for st, h, body in res:
            if st == 429:
                assert json.loads(body)["error"]["message"].startswith("Rate limit reached for tokens")
        # the bound alone past the limit: refused, whatever the window holds
        st, _, body = ask(g, "tpm", max_tokens=100)
        assert st == 429 and "Request too large" in json.loads(body)["error"]["message"]
    finally:
        done(g)


def test_headers_count_down(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        remaining, tokens = [], []
        for _ in range(10):
            st, h, _ = ask(g, "rpm", max_tokens=1)
            assert st == 200
            remaining.append(int(h["x-ratelimit-remaining-requests"]))
            assert h["x-ratelimit-limit-requests"] == "10"
            assert h["x-ratelimit-reset-requests"].endswith("s")
            assert "x-ratelimit-limit-tokens" not in h  # rpm only: no token headers
        assert remaining == list(range(9, -1, -1))
        st, h, body = ask(g, "rpm", max_tokens=1)
        assert st == 429 and h["x-ratelimit-remaining-requests"] == "0"
        for _ in range(3):
            st, h, _ = ask(g, "tpm", max_tokens=2)
            tokens.append(int(h["x-ratelimit-remaining-tokens"]))
        assert tokens[0] > tokens[1] > tokens[2]
        # a stream carries them too
        st, events, raw = g.stream(COMPL, {"model": "base", "prompt": "hi", "max_tokens": 2,
                                           "stream": True}, KEYS["tpm"])
        assert st in (200, 429)
    finally:
        done(g)


def test_daily_budget_and_concurrency(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        st, _, _ = ask(g, "day", max_tokens=4)
        assert st == 200
        st, h, body = ask(g, "day", max_tokens=8)
        e = json.loads(body)["error"]
        assert st == 429 and e["code"] == "insufficient_quota" and e["type"] == "insufficient_quota"
        assert "00:00 UTC" in e["message"] and int(h["retry-after"]) > 0
        # two streams in flight at most
        results = {}
        def long(i):
            results[i] = g.stream(CHAT, {"model": "base", "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": 400, "temperature": 0, "stream": True},
                                  KEYS["conc"])
        ts = [threading.Thread(target=long, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        t0 = time.time()
        while json.loads(g.request("GET", "/admin/status", key=ADMIN)[2])["tenants"][4]["in_flight"] < 2:
            time.sleep(0.02)
            assert time.time() - t0 < 30
        st, _, body = ask(g, "conc", max_tokens=1)
        assert st == 429 and "max_concurrent" in json.loads(body)["error"]["message"]
        for t in ts:
            t.join(120)
        assert all(results[i][1][-1] == "[DONE]" for i in range(2))
        assert ask(g, "conc", max_tokens=1)[0] == 200
    finally:
        done(g)


def test_cancelled_stream_is_charged_what_it_generated(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        body = json.dumps({"model": "base", "prompt": "hello there", "max_tokens": 5000,
                           "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                  KEYS["gone"].encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        got = b""
        while got.count(b"data: ") < 8:
            got += s.recv(65536)
        # the whole bound is reserved while it runs
        resv = redis.hgetall("xprec:{t:gone}:resv")
        assert len(resv) == 1 and int(list(resv.values())[0].split()[2]) > 5000
        s.close()
        t0 = time.time()
        while redis.cli("HLEN", "xprec:{t:gone}:resv") != "0" and time.time() - t0 < 10:
            time.sleep(0.05)
        use = redis.hgetall("xprec:{t:gone}:usage")
        assert use["requests|base|499"] == "1"
        gen = int(use["completion_tokens|base"])
        assert 7 <= gen < 1000
        day = list(redis.hgetall("xprec:{t:gone}:days").values())
        assert [int(x) for x in day] == [int(use["prompt_tokens|base"]) + gen]
        assert redis.cli("ZCARD", "xprec:{t:gone}:inflight") == "0"
    finally:
        done(g)


def usage_of(responses):
    p = c = 0
    for st, _, body in responses:
        if st == 200:
            u = json.loads(body)["usage"]
            p += u["prompt_tokens"]
            c += u["completion_tokens"]
    return p, c


def test_redis_killed_allow_then_back(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis, on_error="allow", timeout=300)
    told = []
    try:
        told += [ask(g, "flaky", max_tokens=3) for _ in range(5)]
        redis.kill()
        t0 = time.time()
        during = concurrently(20, lambda i: ask(g, "flaky", max_tokens=3))
        assert time.time() - t0 < 30
        assert all(st == 200 for st, _, _ in during)  # served, and counted here
        told += during
        redis.start()
        told += [ask(g, "flaky", max_tokens=3) for _ in range(5)]
        want = usage_of(told)
        t0 = time.time()
        while time.time() - t0 < 20:
            use = redis.hgetall("xprec:{t:flaky}:usage")
            got = (int(use.get("prompt_tokens|base", 0)), int(use.get("completion_tokens|base", 0)))
            if got == want:
                break
            time.sleep(0.2)
        assert got == want and int(use["requests|base|200"]) == 30
        # the day's budget counted them too, reserved or not
        day = sum(int(v) for v in redis.hgetall("xprec:{t:flaky}:days").values())
        assert day == want[0] + want[1]
    finally:
        done(g)


def test_redis_down_deny(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis, on_error="deny", timeout=300)
    try:
        assert ask(g, "rpm", max_tokens=1)[0] == 200
        redis.kill()
        t0 = time.time()
        res = concurrently(10, lambda i: ask(g, "rpm", max_tokens=1))
        assert time.time() - t0 < 20
        for st, h, body in res:
            assert st == 503
            assert json.loads(body)["error"]["code"] == "quota_unavailable"
        # a tenant without limits does not need Redis to be served
        assert ask(g, "free", max_tokens=1)[0] == 200
        redis.start()
        t0 = time.time()
        while ask(g, "rpm", max_tokens=1)[0] != 200:
            assert time.time() - t0 < 20
            time.sleep(0.2)
    finally:
        done(g)


def test_script_cache_flushed(tmp_path, models, redis):
    g = gateway(tmp_path, models, redis)
    try:
        assert ask(g, "rpm", max_tokens=1)[0] == 200
        redis.cli("SCRIPT", "FLUSH")
        st, h, _ = ask(g, "rpm", max_tokens=1)
        assert st == 200 and h["x-ratelimit-remaining-requests"] == "8"
    finally:
        done(g)


# ------------------------------------------------------------------ metrics

def test_metrics_match_usage(tmp_path, models, redis):
    from prometheus_client.parser import text_string_to_metric_families
    g = gateway(tmp_path, models, redis)
    try:
        told = [ask(g, "meter", max_tokens=k % 4 + 1) for k in range(9)]
        bad = ask(g, "meter", max_tokens=2, prompt="")  # a 400
        assert bad[0] == 400
        assert ask(g, "meter", model="made-up")[0] == 404  # no label for it
        time.sleep(0.5)
        st, _, text = g.request("GET", "/metrics")
        assert st == 200
        fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
        def value(name, **labels):
            return sum(s.value for s in fams[name].samples
                       if all(s.labels.get(k) == v for k, v in labels.items())
                       and s.name == name + ("_total" if fams[name].type == "counter" else ""))
        p, c = usage_of(told)
        assert value("xprec_requests", tenant="meter", model="base", code="200") == 9
        assert value("xprec_requests", tenant="meter", model="base", code="400") == 1
        assert value("xprec_tokens", tenant="meter", model="base", type="prompt") == p
        assert value("xprec_tokens", tenant="meter", model="base", type="completion") == c
        h = [s for s in fams["xprec_request_duration_seconds"].samples
             if s.labels.get("tenant") == "meter" and s.name.endswith("_count")]
        assert h and h[0].value == 10
        t = [s for s in fams["xprec_time_to_first_token_seconds"].samples
             if s.labels.get("tenant") == "meter" and s.name.endswith("_count")]
        assert t and t[0].value == 9
        assert not [s for f in fams.values() for s in f.samples
                    if s.labels.get("model") == "made-up"]
        assert fams["xprec_redis_up"].samples[0].value == 1
        assert fams["xprec_redis_up"].samples[0].labels["node"] == "gw-a"
        assert "xprec_engine_running_sequences" in fams and "xprec_adapter_hits" in fams
    finally:
        done(g)


# ------------------------------------------------------------------ registry and residency

def status(g):
    return json.loads(g.request("GET", "/admin/status", key=ADMIN)[2])


def serves(g, model, tenant="free"):
    return ask(g, tenant, max_tokens=1, model=model)[0] == 200


def until(cond, timeout=20):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.1)
    return True


def test_registry_across_gateways_and_restarts(tmp_path, models, redis):
    a = gateway(tmp_path, models, redis, name="a")
    b = gateway(tmp_path, models, redis, name="b")
    try:
        st, _, body = a.request("POST", "/admin/v1/load_lora_adapter",
                                {"lora_name": "chem", "lora_path": str(models / "ad"),
                                 "tenants": ["free"]}, key=ADMIN)
        assert st == 200, body
        assert json.loads(redis.hgetall("xprec:{fleet}:adapters")["chem"])["path"] == str(models / "ad")
        # the other gateway serves it, to the tenants it names
        assert until(lambda: serves(b, "chem"))
        assert not serves(b, "chem", tenant="meter")
        # both restart: still there
        a.stop()
        b.stop()
        a.start(ADMIN)
        b.start(ADMIN)
        assert until(lambda: serves(a, "chem")) and until(lambda: serves(b, "chem"))
        # residency: both nodes, in the admin status
        assert until(lambda: {"gw-a", "gw-b"} <= set(status(a)["fleet"]["nodes"]))
        assert until(lambda: {(e["node"], e["adapter"]) for e in status(a)["fleet"]["residency"]}
                     >= {("gw-a", "chem"), ("gw-b", "chem")})
        tiers = {e["node"]: e["tier"] for e in status(b)["fleet"]["residency"] if e["adapter"] == "chem"}
        assert tiers["gw-b"] in ("resident", "disk", "loading")
        # unloaded on one: gone from the other
        st, _, _ = b.request("POST", "/admin/v1/unload_lora_adapter", {"lora_name": "chem"}, key=ADMIN)
        assert st == 200
        assert until(lambda: not serves(a, "chem"))
        assert "chem" not in redis.hgetall("xprec:{fleet}:adapters")
        # a dead gateway's residency expires
        b.stop()
        assert until(lambda: "gw-b" not in status(a)["fleet"]["nodes"], timeout=30)
        assert until(lambda: all(e["node"] != "gw-b" for e in status(a)["fleet"]["residency"]),
                     timeout=30)
    finally:
        done(a)
        done(b)


def test_redis_config_errors(tmp_path, models):
    class R:
        port = 6379
    for bad, want in [("xprec_redis localhost:6379;", "an IP address"),
                      ("xprec_redis 127.0.0.1;", "ADDR:PORT"),
                      ("xprec_redis 127.0.0.1:99999;", "bad port"),
                      ("xprec_redis 127.0.0.1:6379 on_error=maybe;", "allow or deny"),
                      ("xprec_redis 127.0.0.1:6379 timeout=0;", "timeout"),
                      ("xprec_redis 127.0.0.1:6379 bogus=1;", "unknown parameter")]:
        g = Gateway(tmp_path, f"xprec_engine {models}/base-fp8; {bad}")
        p = g.test_config()
        assert p.returncode != 0 and want in p.stderr, (bad, p.stderr)
    g = Gateway(tmp_path, f"xprec_engine {models}/base-fp8; xprec_redis unix:/tmp/x.sock db=2;")
    assert g.test_config().returncode == 0
