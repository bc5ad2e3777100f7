"""An independent Qwen3 forward pass in NumPy (float64), reading the same checkpoint files through
tests/ref/st_numpy.py, following Hugging Face's modeling_qwen3 as documented: RMSNorm, per-head
q_norm/k_norm before rotate-half RoPE, GQA, SwiGLU, tied or untied lm_head. FP8 weights are
dequantized block by block; a PEFT adapter is merged as W + scale * B A. For parity tests only:
it recomputes everything per call and holds the model in float64.

The KV cache is the one place the engine rounds on purpose: kv="bf16" (its default) or "fp8"
rounds K (after norm and RoPE) and V as the engine stores them, so the reference is the model
served with that cache; kv="f32" keeps them exact."""
import json
import math
import os

import numpy as np

import st_numpy as st


class Model:
    def __init__(self, model_dir, adapter_dir=None, kv="bf16", lm_head="stored"):
        self.kv, self.lm_head = kv, lm_head
        self.cfg = json.load(open(os.path.join(model_dir, "config.json")))
        qc = self.cfg.get("quantization_config") or {}
        if qc.get("quant_method") == "fp8":
            self.block, self.suffix = qc["weight_block_size"], "weight_scale_inv"
        elif qc.get("quant_method") == "compressed-tensors":
            g = next(iter(qc["config_groups"].values()))
            self.block, self.suffix = g["weights"]["block_structure"], "weight_scale"
        else:
            self.block, self.suffix = None, None
        self.t = st.read_dir(model_dir)
        self.lora = self._read_adapter(adapter_dir) if adapter_dir else {}

    def _read_adapter(self, d):
        c = json.load(open(os.path.join(d, "adapter_config.json")))
        ts = st.read_dir(d, "adapter_model")
        out = {}
        for name, t in ts.items():
            if not name.endswith(".lora_A.weight"):
                continue
            mod = name[len("base_model.model."):-len(".lora_A.weight")]
            a = t.array().astype(np.float64)
            b = ts[name.replace("lora_A", "lora_B")].array().astype(np.float64)
            r = a.shape[0]
            alpha = c["lora_alpha"]
            for k, v in (c.get("alpha_pattern") or {}).items():
                if mod == k or mod.endswith("." + k):
                    alpha = v
            scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
            out[mod] = scale * (b @ a)
        return out

    def weight(self, name):
        t = self.t[name]
        w = t.array().astype(np.float64)
        if t.dtype == "F8_E4M3":
            s = self.t[name[:-len("weight")] + self.suffix].array().astype(np.float64)
            br, bc = self.block
            w = w * np.repeat(np.repeat(s, br, 0), bc, 1)[: w.shape[0], : w.shape[1]]
        mod = name[:-len(".weight")]
        if mod in self.lora:
            w = w + self.lora[mod]
        return w

    def logits(self, tokens):
        c = self.cfg
        H, KV, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        eps = c["rms_norm_eps"]
        n = len(tokens)

        def rms(x, w):
            return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

        inv, att_factor = rope_parameters(c)
        ang = np.arange(n)[:, None] * inv[None, :]
        cos = np.cos(np.concatenate([ang, ang], -1)) * att_factor
        sin = np.sin(np.concatenate([ang, ang], -1)) * att_factor

        def rope(x):  # x [n, heads, d]
            half = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
            return x * cos[:, None, :] + half * sin[:, None, :]

        x = self.t["model.embed_tokens.weight"].array().astype(np.float64)[tokens]
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for l in range(c["num_hidden_layers"]):
            p = f"model.layers.{l}."
            g = lambda s: self.t[p + s].array().astype(np.float64)
            h = rms(x, g("input_layernorm.weight"))
            q = (h @ self.weight(p + "self_attn.q_proj.weight").T).reshape(n, H, d)
            k = (h @ self.weight(p + "self_attn.k_proj.weight").T).reshape(n, KV, d)
            v = (h @ self.weight(p + "self_attn.v_proj.weight").T).reshape(n, KV, d)
            q = rope(rms(q, g("self_attn.q_norm.weight")))
            k = rope(rms(k, g("self_attn.k_norm.weight")))
            k, v = kv_round(k, self.kv), kv_round(v, self.kv)
            rep = H // KV
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(d) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att = np.einsum("hij,jhd->ihd", s, v).reshape(n, H * d)
            x = x + att @ self.weight(p + "self_attn.o_proj.weight").T
            h = rms(x, g("post_attention_layernorm.weight"))
            gate = h @ self.weight(p + "mlp.gate_proj.weight").T
            up = h @ self.weight(p + "mlp.up_proj.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.weight(p + "mlp.down_proj.weight").T
        x = rms(x, self.t["model.norm.weight"].array().astype(np.float64))
        head = "model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"
        w = self.t[head].array()
        if self.lm_head == "fp8":
            w = fp8_blocks(w, 128)
        return x @ w.astype(np.float64).T


def rope_parameters(cfg):
    """RoPE's inverse frequencies and the factor cos and sin are scaled by, as transformers'
    rope utilities compute them for rope_scaling absent/"default" and "yarn" (the paper's
    NTK-by-parts blend over the correction range of beta_fast..beta_slow rotations in the
    original context, and its attention factor 0.1 ln(factor) + 1)."""
    d, base = cfg["head_dim"], cfg["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    rs = cfg.get("rope_scaling")
    kind = rs and (rs.get("rope_type") or rs.get("type"))
    if not rs or kind == "default":
        return inv, 1.0
    assert kind == "yarn", kind
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = rs.get("attention_factor")
    if att is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            att = get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"])
        else:
            att = get_mscale(factor)

    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.get("beta_fast") or 32), correction_dim(rs.get("beta_slow") or 1)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    extrapolate = 1 - np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    return inv / factor * (1 - extrapolate) + inv * extrapolate, att


def fp8_blocks(w, b):
    """w (float32) through FP8 E4M3 in b x b blocks: scale amax / 448 per block (1 for an
    all-zero block), codes rounded to nearest even, then back to code * scale in float32."""
    out = np.empty_like(w)
    for i in range(0, w.shape[0], b):
        for j in range(0, w.shape[1], b):
            blk = w[i:i + b, j:j + b]
            s = np.float32(np.abs(blk).max()) / np.float32(448)
            s = s if s > 0 else np.float32(1)
            out[i:i + b, j:j + b] = (st.e4m3_round((blk / s).astype(np.float32)) * s).astype(np.float32)
    return out


def kv_round(x, kv):
    """K or V [n, heads, d] as a KV cache of element type kv holds it: the float32 value rounded
    to BF16, or to E4M3 after dividing by the row's amax / 448 (a scale per position and head,
    as float32), then multiplied back."""
    if kv == "f32":
        return x
    x32 = x.astype(np.float32)
    if kv == "bf16":
        return st.bf16_to_f32(st.f32_to_bf16(x32)).reshape(x.shape).astype(np.float64)
    assert kv == "fp8", kv
    amax = np.abs(x32).max(-1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(448), np.float32(1)).astype(np.float32)
    y = (x32 / s).astype(np.float32)
    return (st.e4m3_round(y) * s).astype(np.float32).astype(np.float64)
