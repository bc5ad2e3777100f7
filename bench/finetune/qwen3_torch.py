"""A plain Qwen3 decoder in PyTorch for training small models on the CPU, and its Hugging Face
checkpoint (config.json, BF16 model.safetensors, the real Qwen3 tokenizer files).

The architecture is Qwen3's: RMSNorm before attention and MLP, per-head RMSNorm on q and k before
rotate-half RoPE, grouped-query attention, a SwiGLU MLP, a final RMSNorm and an lm_head tied to the
embedding, over Qwen3's whole vocabulary (151936 ids).

Training cost is dominated by that vocabulary, so the embedding keeps one row per id that occurs
in the corpora ("active" ids) and a single row shared by every other id. Because those ids share
one row they share one logit, and the full softmax over 151936 ids equals a softmax over the
active ids plus one "rest" class whose logit is the shared logit + log(number of other ids). The
loss is therefore the exact full-vocabulary cross-entropy, at the cost of the active ids only; the
checkpoint writes the shared row into every inactive id, and `full_logits` computes the
151936-wide logits the way any Qwen3 reader will.
"""
import json
import math
import os
import shutil
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

QWEN3_VOCAB = 151936
ENDOFTEXT = 151643  # <|endoftext|>: Qwen's document separator


def make_config(hidden, layers, heads, kv_heads, head_dim, intermediate, max_pos):
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": max_pos,
        "vocab_size": QWEN3_VOCAB,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": ENDOFTEXT,
        "torch_dtype": "bfloat16",
    }


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, H, KV, hd, f = (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                           c["head_dim"], c["intermediate_size"])
        eps = c["rms_norm_eps"]
        self.H, self.KV, self.hd = H, KV, hd
        self.input_layernorm = RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, KV * hd, bias=False)
        self.v_proj = nn.Linear(d, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, eps)
        self.k_norm = RMSNorm(hd, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_norm(self.q_proj(h).view(B, T, self.H, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(h).view(B, T, self.KV, self.hd)).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.KV, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.H // self.KV
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd) + mask
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, self.H * self.hd)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


class Qwen3(nn.Module):
    """active: the sorted global ids that get rows of their own; row len(active) is the rest."""

    def __init__(self, cfg, active):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("active", torch.as_tensor(sorted(active), dtype=torch.long))
        n_rest = cfg["vocab_size"] - len(self.active)
        assert n_rest > 0, "every id active: no shared row needed, but this class expects one"
        bias = torch.zeros(len(self.active) + 1)
        bias[-1] = math.log(n_rest)
        self.register_buffer("rest_bias", bias)
        d = cfg["hidden_size"]
        self.embed = nn.Parameter(torch.empty(len(self.active) + 1, d))
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(d, cfg["rms_norm_eps"])
        # global id -> row (inactive ids -> the rest row)
        lut = torch.full((cfg["vocab_size"],), len(self.active), dtype=torch.long)
        lut[self.active] = torch.arange(len(self.active))
        self.register_buffer("row_of", lut)

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                    continue
                s = std
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    s = std / math.sqrt(2 * self.cfg["num_hidden_layers"])
                p.copy_(torch.randn(p.shape, generator=g) * s)

    def hidden(self, ids):
        """ids: [B, T] global ids -> final normed hidden states [B, T, d]."""
        c = self.cfg
        T = ids.shape[1]
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        cos, sin = ang.cos().float(), ang.sin().float()
        mask = torch.full((T, T), float("-inf")).triu(1)
        x = self.embed[self.row_of[ids]]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def row_logits(self, ids):
        """Logits over the active rows plus the rest class ([B, T, n_active + 1])."""
        h = self.hidden(ids)
        z = torch.addmm(self.rest_bias, h.flatten(0, 1), self.embed.t())
        return z.view(*h.shape[:-1], -1)

    def loss(self, ids, targets, weight=None):
        """Mean next-token cross-entropy (nats) over the full vocabulary; targets: global ids,
        weight: optional 0/1 mask of the positions that count."""
        z = self.row_logits(ids)
        rows = self.row_of[targets].flatten()
        # the rest class holds n_rest ids of equal probability: an inactive target has 1/n_rest
        # of the class's probability (a constant, so gradients do not see it)
        nll = F.cross_entropy(z.flatten(0, 1), rows, reduction="none") + self.rest_bias[rows]
        if weight is None:
            return nll.mean()
        w = weight.flatten().float()
        return (nll * w).sum() / w.sum()

    def full_embedding(self):
        return self.embed[self.row_of]

    def full_logits(self, ids):
        """The 151936-wide logits, as a reader of the checkpoint computes them."""
        return self.hidden(ids) @ self.full_embedding().t()

    # -------------------------------------------------------------- Hugging Face names

    def hf_tensors(self):
        """name -> float32 tensor, in Hugging Face's Qwen3 naming."""
        out = {"model.embed_tokens.weight": self.full_embedding().detach()}
        out.update((n, p.detach()) for n, p in self.named_hf_params())
        return out

    def load_hf_tensors(self, t):
        """The inverse of hf_tensors for a checkpoint this class wrote (inactive rows equal)."""
        with torch.no_grad():
            e = t["model.embed_tokens.weight"]
            self.embed[:-1].copy_(e[self.active])
            inactive = torch.ones(self.cfg["vocab_size"], dtype=torch.bool)
            inactive[self.active] = False
            rest = e[inactive]
            if not torch.equal(rest, rest[:1].expand_as(rest)):
                raise ValueError("checkpoint's inactive embedding rows differ: not written by this trainer")
            self.embed[-1].copy_(rest[0])
            for name, p in self.named_hf_params():
                p.copy_(t[name])

    def named_hf_params(self):
        for i, l in enumerate(self.layers):
            p = f"model.layers.{i}."
            for n in ("input_layernorm", "post_attention_layernorm"):
                yield p + n + ".weight", getattr(l, n).weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
                yield p + "self_attn." + n + ".weight", getattr(l, n).weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                yield p + "mlp." + n + ".weight", getattr(l, n).weight
        yield "model.norm.weight", self.norm.weight

    def round_to_bf16(self):
        """Rounds every parameter to the nearest BF16 value (kept as float32)."""
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(p.to(torch.bfloat16).float())


# ------------------------------------------------------------------ checkpoint files

def _bf16_bytes(t):
    return t.detach().contiguous().to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def write_safetensors(path, tensors):
    """name -> float tensor, written as BF16 in one safetensors file (names sorted)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = _bf16_bytes(t)
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_safetensors(path):
    """BF16/F32 tensors of one safetensors file as float32 torch tensors."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        if e["dtype"] == "BF16":
            t = torch.frombuffer(bytearray(data[b:end]), dtype=torch.int16).view(torch.bfloat16).float()
        elif e["dtype"] == "F32":
            t = torch.frombuffer(bytearray(data[b:end]), dtype=torch.float32)
        else:
            raise ValueError(f"{path}: {name} is {e['dtype']}, expected BF16 or F32")
        out[name] = t.reshape(e["shape"])
    return out


def save_checkpoint(model, out_dir, tokenizer_dir, extra=None):
    """config.json, model.safetensors (BF16) and the tokenizer files; extra: JSON-able training
    facts written to training.json."""
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model.hf_tensors())
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.cfg, f, indent=2)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tokenizer_dir, fn), os.path.join(out_dir, fn))
    with open(os.path.join(out_dir, "active_ids.json"), "w") as f:
        json.dump(model.active.tolist(), f)
    if extra is not None:
        with open(os.path.join(out_dir, "training.json"), "w") as f:
            json.dump(extra, f, indent=2)


def load_checkpoint(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    active = json.load(open(os.path.join(d, "active_ids.json")))
    m = Qwen3(cfg, active)
    m.load_hf_tensors(read_safetensors(os.path.join(d, "model.safetensors")))
    return m
