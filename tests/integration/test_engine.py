"""The engine's forward pass against the independent NumPy reference (tests/ref/qwen3_ref.py):
BF16, both FP8 layouts, FP8 with a PEFT adapter; unmerged LoRA against the merged F32 model;
generate's sampling and stopping behaviour through the command line."""
import json
import os

import numpy as np
import pytest

import qwen3_ref
import st_numpy as st
from conftest import run

TOKENS = [9707, 11, 1879, 0, 151645, 198, 42, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
          100000, 151935, 3, 77]


def score(model, tmp_path, adapter=None, tokens=TOKENS):
    out = tmp_path / "logits.npy"
    args = ["score", "--model", model, "--tokens", ",".join(map(str, tokens)), "--out", out]
    if adapter:
        args += ["--adapter", adapter]
    run(*args)
    return np.load(out)


def rel_err(a, ref):
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def write_adapter(base, d, seed=0, rslora=False, dtype="BF16"):
    """A PEFT adapter written the way PEFT saves one, with a rank_pattern entry. The values are
    BF16-rounded whatever the file's dtype, so BF16 and F32 files hold the same numbers."""
    cfg = json.load(open(base / "config.json"))
    rng = np.random.default_rng(seed)
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qd, kvd = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (qd, h), "self_attn.v_proj": (kvd, h), "mlp.down_proj": (h, i),
              "mlp.gate_proj": (i, h), "self_attn.o_proj": (h, qd)}
    mods = [(0, "self_attn.q_proj", 8), (0, "self_attn.v_proj", 8), (0, "mlp.down_proj", 8),
            (1, "mlp.gate_proj", 4), (1, "self_attn.o_proj", 8)]
    tensors = {}
    for layer, m, r in mods:
        out_dim, in_dim = shapes[m]
        a = rng.normal(0, 0.02, (r, in_dim)).astype(np.float32)
        b = rng.normal(0, 0.02, (out_dim, r)).astype(np.float32)
        p = f"base_model.model.model.layers.{layer}.{m}"
        for name, x in ((".lora_A.weight", a), (".lora_B.weight", b)):
            bits = st.f32_to_bf16(x)
            raw = {"BF16": bits, "F32": st.bf16_to_f32(bits),
                   "F16": st.bf16_to_f32(bits).astype(np.float16)}[dtype]
            tensors[p + name] = (dtype, list(x.shape), raw.tobytes())
    os.makedirs(d, exist_ok=True)
    st.write_file(d / "adapter_model.safetensors", tensors, {"format": "pt"})
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
               "use_rslora": rslora, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
               "rank_pattern": {"model.layers.1.mlp.gate_proj": 4}, "alpha_pattern": {},
               "modules_to_save": None, "bias": "none", "lora_dropout": 0.0,
               "base_model_name_or_path": str(base)}, open(d / "adapter_config.json", "w"))
    return d


@pytest.fixture(scope="module")
def tiny_ct(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ct") / "m"
    run("quantize", "--in", tiny, "--out", d, "--format", "compressed-tensors", "--block", "64x128")
    return d


@pytest.mark.parametrize("which", ["bf16", "fp8", "compressed-tensors"])
def test_score_matches_reference(which, tiny, tiny_fp8, tiny_ct, tmp_path):
    model = {"bf16": tiny, "fp8": tiny_fp8, "compressed-tensors": tiny_ct}[which]
    ref = qwen3_ref.Model(str(model)).logits(TOKENS)
    got = score(model, tmp_path)
    assert got.shape == (len(TOKENS), 151936) and got.dtype == np.float32
    assert rel_err(got, ref) < 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_score_with_adapter_matches_reference(tiny, tiny_fp8, tmp_path, rslora):
    ad = write_adapter(tiny, tmp_path / "ad", rslora=rslora)
    ref = qwen3_ref.Model(str(tiny_fp8), str(ad)).logits(TOKENS)
    got = score(tiny_fp8, tmp_path, adapter=ad)
    assert rel_err(got, ref) < 1e-3
    # and the adapter matters: without it the logits move by far more than the tolerance
    assert rel_err(score(tiny_fp8, tmp_path), ref) > 1e-2


def test_adapter_file_dtypes(tiny, tiny_fp8, tmp_path):
    """BF16 adapters run from their BF16 values and F32/F16 ones as F32: the same numbers give
    the same bits either way, and an F16 file matches the reference reading it."""
    got = {}
    for dtype in ("BF16", "F32", "F16"):
        ad = write_adapter(tiny, tmp_path / dtype, dtype=dtype)
        got[dtype] = score(tiny_fp8, tmp_path, adapter=ad)
    assert np.array_equal(got["BF16"], got["F32"])
    ref = qwen3_ref.Model(str(tiny_fp8), str(tmp_path / "F16")).logits(TOKENS)
    assert rel_err(got["F16"], ref) < 1e-3


def test_unmerged_equals_merged(tiny, tiny_fp8, tmp_path):
    """FP8 base + adapter, applied unmerged, against an F32 checkpoint holding
    dequant(W_fp8) + scale * B A: equal up to F32 summation order."""
    ad = write_adapter(tiny, tmp_path / "ad")
    ref = qwen3_ref.Model(str(tiny_fp8), str(ad))
    merged = tmp_path / "merged"
    merged.mkdir()
    tensors = {}
    for name, t in ref.t.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == "F8_E4M3":
            w = ref.weight(name).astype(np.float32)  # dequantized, plus scale * B A where adapted
            tensors[name] = ("F32", list(w.shape), w.tobytes())
        else:
            tensors[name] = (t.dtype, t.shape, t.raw)
    st.write_file(merged / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.load(open(tiny_fp8 / "config.json"))
    del cfg["quantization_config"]
    json.dump(cfg, open(merged / "config.json", "w"))
    a = score(tiny_fp8, tmp_path, adapter=ad)
    b = score(merged, tmp_path)
    assert rel_err(a, b.astype(np.float64)) < 2e-5


def test_generate_greedy_seeded_and_stops(tiny_fp8, tmp_path):
    base = ["generate", "--model", tiny_fp8, "--prompt", "The capital of France is", "--max-tokens", 12]
    g1 = run(*base)
    g2 = run(*base)
    assert g1.stdout == g2.stdout and "[finish: length" in g1.stderr
    assert "completion tokens 12" in g1.stderr
    s1 = run(*base, "--temperature", 0.9, "--top-p", 0.95, "--top-k", 50, "--seed", 5)
    s2 = run(*base, "--temperature", 0.9, "--top-p", 0.95, "--top-k", 50, "--seed", 5)
    s3 = run(*base, "--temperature", 0.9, "--top-p", 0.95, "--top-k", 50, "--seed", 6)
    assert s1.stdout == s2.stdout and s1.stdout != s3.stdout
    # a stop string taken from the greedy text ends the reply just before it
    text = g1.stdout
    assert len(text) > 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.index(stop)
    g3 = run(*base, "--stop", stop)
    assert g3.stdout == text[:cut] and "[finish: stop" in g3.stderr


def test_generate_refuses_bad_requests(tiny, tmp_path):
    p = run("generate", "--model", tiny, "--prompt", "x" * 10, "--use", "nope", check=False)
    assert p.returncode == 1 and 'adapter "nope" is not registered' in p.stderr
    bad = write_adapter(tiny, tmp_path / "bad")
    cfg = json.load(open(bad / "adapter_config.json"))
    cfg["r"] = 16  # the tensors have rank 8
    json.dump(cfg, open(bad / "adapter_config.json", "w"))
    p = run("generate", "--model", tiny, "--prompt", "hi", "--adapter", f"b={bad}", check=False)
    assert p.returncode == 1 and "rank 8 but the config says 16" in p.stderr
    p = run("generate", "--model", tiny, "--prompt", "hello " * 3000, "--kv-mb", 1, check=False)
    assert p.returncode == 1 and "the context holds" in p.stderr


def peft_config_variant(src, d, **changes):
    """A copy of the adapter src with adapter_config.json changed and written the way PEFT's
    save_pretrained writes it (json.dumps with indent=2 and sorted keys)."""
    os.makedirs(d, exist_ok=True)
    cfg = json.load(open(src / "adapter_config.json"))
    cfg.update(changes)
    os.symlink(src / "adapter_model.safetensors", d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return d


def test_string_target_modules_as_peft_reads_them(tiny, tiny_fp8, tmp_path):
    """A string target_modules is "all-linear" (every linear layer but the output layer) or a
    regex that must match the whole module path (re.fullmatch); both select exactly the modules
    the adapter holds, and give the list form's logits bit for bit."""
    ad = write_adapter(tiny, tmp_path / "ad")
    want = score(tiny_fp8, tmp_path, adapter=ad)
    strings = ["all-linear", "ALL-LINEAR", r".*\.(q_proj|v_proj|o_proj|gate_proj|down_proj)",
               r"model\.layers\.\d+\.(self_attn\.[qvo]_proj|mlp\.(gate|down)_proj)", r".*"]
    for i, tm in enumerate(strings):
        v = peft_config_variant(ad, tmp_path / f"s{i}", target_modules=tm)
        assert np.array_equal(score(tiny_fp8, tmp_path, adapter=v), want), tm
    # a string that does not fullmatch a module the adapter holds: refused, naming both
    for i, (tm, msg) in enumerate([("q_proj", "does not match"),
                                   (r"model\.layers\.0\..*", "model.layers.1."),
                                   (r".*\.(q|v)_proj", "does not match"),
                                   ("(", "not a valid regex")]):
        v = peft_config_variant(ad, tmp_path / f"bad{i}", target_modules=tm)
        p = run("score", "--model", tiny_fp8, "--adapter", v, "--tokens", "1,2", "--out",
                tmp_path / "x.npy", check=False)
        assert p.returncode == 1 and msg in p.stderr, (tm, p.stderr)
