"""The offline toolkit end to end: synth, quantize (both layouts), dequantize and inspect on real
files, checked with an independent NumPy reader (tests/ref/st_numpy.py)."""
import json
import math
import os
import shutil

import numpy as np
import pytest

import st_numpy as st
from conftest import TOKENIZER_DIR, XPREC_SAN, run

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(name):
    return name.endswith("_proj.weight")


def blocks(shape, b):
    return math.ceil(shape[0] / b[0]), math.ceil(shape[1] / b[1])


def dequant(q, s, b):
    """Independent block dequantization: expand the scale grid to the weight's shape."""
    rows, cols = q.shape
    full = np.repeat(np.repeat(s, b[0], axis=0), b[1], axis=1)[:rows, :cols]
    return q.astype(np.float64) * full


def check_half_step(w, q, s, b):
    """|W - q s| <= s * step(q) / 2 for every element, step from the E4M3 format definition."""
    rows, cols = q.shape
    full = np.repeat(np.repeat(s.astype(np.float64), b[0], axis=0), b[1], axis=1)[:rows, :cols]
    err = np.abs(w.astype(np.float64) - q.astype(np.float64) * full)
    bound = 0.5 * full * st.e4m3_step(q) + 1e-6 * np.abs(w)
    worst = np.max(err - bound)
    assert worst <= 0, f"error exceeds half a quantization step by {worst}"


def test_tiny_preset_shape_and_scale(tiny):
    cfg = json.load(open(tiny / "config.json"))
    assert cfg["model_type"] == "qwen3" and cfg["vocab_size"] == 151936
    assert cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"]  # GQA
    assert cfg["hidden_size"] % 128 or cfg["intermediate_size"] % 128
    ts = st.read_dir(tiny)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    want = {"q_proj": [nq, h], "k_proj": [nkv, h], "v_proj": [nkv, h], "o_proj": [h, nq],
            "gate_proj": [i, h], "up_proj": [i, h], "down_proj": [h, i]}
    for layer in range(2):
        for m, shape in want.items():
            part = "self_attn" if m in LINEAR[:4] else "mlp"
            t = ts[f"model.layers.{layer}.{part}.{m}.weight"]
            assert t.dtype == "BF16" and t.shape == shape
        for n in ("q_norm", "k_norm"):
            assert ts[f"model.layers.{layer}.self_attn.{n}.weight"].shape == [d]
    assert ("lm_head.weight" in ts) == (not cfg["tie_word_embeddings"])
    w = ts["model.layers.0.mlp.up_proj.weight"].array()
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.001
    norm = ts["model.layers.1.input_layernorm.weight"].array()
    assert abs(norm.mean() - 1) < 0.01
    assert os.path.exists(tiny / "tokenizer.json") and os.path.exists(tiny / "generation_config.json")


def test_small_preset_is_qwen3_0_6b(tmp_path):
    # the config alone: --layers 1 keeps the file small while checking every other dimension
    run("synth", "--preset", "small", "--layers", "1", "--vocab", "1024", "--out", tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["tie_word_embeddings"]) == (
        1024, 3072, 16, 8, 128, True)
    assert "lm_head.weight" not in st.read_dir(tmp_path)


def test_synth_is_deterministic(tmp_path):
    args = ["--preset", "tiny", "--vocab", "512", "--layers", "1"]
    run("synth", *args, "--out", tmp_path / "a", "--seed", 3)
    run("synth", *args, "--out", tmp_path / "b", "--seed", 3)
    run("synth", *args, "--out", tmp_path / "c", "--seed", 4)
    a, b, c = (open(tmp_path / x / "model.safetensors", "rb").read() for x in "abc")
    assert a == b and a != c


def test_tuned_from_plants_a_rank_k_delta(tiny, tmp_path):
    ft = tmp_path / "ft"
    run("synth", "--tuned-from", tiny, "--delta-rank", 4, "--delta-scale", 0.1, "--out", ft,
        "--seed", 9, "--norm-delta", 0.01)
    base, tuned = st.read_dir(tiny), st.read_dir(ft)
    assert base.keys() == tuned.keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w = base[name].array().astype(np.float64)
        d = tuned[name].array().astype(np.float64) - w
        assert abs(np.linalg.norm(d) / np.linalg.norm(w) - 0.1) < 0.01
        sv = np.linalg.svd(d, compute_uv=False)
        # rank 4 up to BF16 storage rounding of the tuned weights
        assert sv[4] < 0.05 * sv[3]
    assert base["model.norm.weight"].bits() != tuned["model.norm.weight"].bits()
    assert base["model.embed_tokens.weight"].bits() == tuned["model.embed_tokens.weight"].bits()


@pytest.mark.parametrize("fmt", ["qwen", "compressed-tensors"])
def test_quantize_bounds_and_layout(tiny, tmp_path, fmt):
    out = tmp_path / "q"
    args = ["quantize", "--in", tiny, "--out", out, "--format", fmt]
    if fmt == "compressed-tensors":
        args += ["--ignore", "model.layers.1.mlp.down_proj"]
    run(*args)
    cfg = json.load(open(out / "config.json"))
    qc = cfg["quantization_config"]
    base, q = st.read_dir(tiny), st.read_dir(out)
    if fmt == "qwen":
        assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
        suffix, sdt = "weight_scale_inv", "F32"
    else:
        assert qc["quant_method"] == "compressed-tensors"
        w = qc["config_groups"]["group_0"]["weights"]
        assert w["strategy"] == "block" and w["block_structure"] == [128, 128]
        assert "model.layers.1.mlp.down_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
        suffix, sdt = "weight_scale", "BF16"
    b = (128, 128)
    for name, t in base.items():
        if not is_linear(name) or (fmt != "qwen" and name.startswith("model.layers.1.mlp.down")):
            # norms, embeddings, lm_head and ignored modules: bit-identical
            assert q[name].dtype == t.dtype and q[name].bits() == t.bits(), name
            assert name[:-len("weight")] + suffix not in q
            continue
        qt, sc = q[name], q[name[:-len("weight")] + suffix]
        assert qt.dtype == "F8_E4M3" and qt.shape == t.shape
        assert sc.dtype == sdt and list(sc.shape) == list(blocks(t.shape, b))
        w, codes, s = t.array(), qt.array(), sc.array()
        check_half_step(w, codes, s, b)
        # the scale of each block is amax/448 (rounded up where stored narrower), block by block,
        # the ragged edge blocks included
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                blk = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
                want = np.float32(np.abs(blk).max()) / np.float32(448)
                if sdt == "F32":
                    assert s[bi, bj] == want
                else:
                    assert s[bi, bj] >= want and s[bi, bj] <= want * (1 + 2 ** -7)
    for k in cfg:
        if k != "quantization_config":
            assert cfg[k] == json.load(open(tiny / "config.json"))[k]
    assert open(out / "tokenizer.json", "rb").read() == open(tiny / "tokenizer.json", "rb").read()


def test_dequantize_round_trip(tiny, tiny_fp8, tmp_path):
    out = tmp_path / "deq"
    run("dequantize", "--in", tiny_fp8, "--out", out)
    cfg = json.load(open(out / "config.json"))
    assert "quantization_config" not in cfg
    base, q, d = st.read_dir(tiny), st.read_dir(tiny_fp8), st.read_dir(out)
    assert base.keys() == d.keys()
    for name, t in base.items():
        if not is_linear(name):
            assert d[name].bits() == t.bits(), name
            continue
        assert d[name].dtype == "BF16"
        s = q[name[:-len("weight")] + "weight_scale_inv"].array()
        exact = dequant(q[name].array(), s, (128, 128)).astype(np.float32)
        # BF16 of the exact dequantized value, rounded independently
        assert np.array_equal(np.frombuffer(d[name].bits(), dtype=np.uint16), st.f32_to_bf16(exact).ravel())
        # and within the FP8 bound of the original (plus BF16 rounding)
        err = np.abs(d[name].array().astype(np.float64) - t.array())
        full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:t.shape[0], :t.shape[1]]
        assert np.all(err <= 0.5 * full * st.e4m3_step(q[name].array()) + 2 ** -8 * np.abs(exact))


def test_dequantize_f32_is_exact(tiny_fp8, tmp_path):
    out = tmp_path / "deq32"
    run("dequantize", "--in", tiny_fp8, "--out", out, "--dtype", "f32")
    q, d = st.read_dir(tiny_fp8), st.read_dir(out)
    name = "model.layers.0.self_attn.o_proj.weight"
    s = q[name[:-len("weight")] + "weight_scale_inv"].array()
    assert np.array_equal(d[name].array(), dequant(q[name].array(), s, (128, 128)).astype(np.float32))


def test_non_default_block_and_sharded_checkpoint(tiny, tmp_path):
    sharded = tmp_path / "sharded"
    run("synth", "--preset", "tiny", "--out", sharded, "--seed", 7, "--max-shard-mb", 40)
    index = json.load(open(sharded / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) >= 3
    one = st.read_dir(tiny)
    many = st.read_dir(sharded)
    assert one.keys() == many.keys()
    assert all(one[k].bits() == many[k].bits() for k in one)
    out = tmp_path / "q64"
    run("quantize", "--in", sharded, "--out", out, "--block", "64x32")
    q = st.read_dir(out)
    name = "model.layers.0.mlp.down_proj.weight"
    sc = q[name[:-len("weight")] + "weight_scale_inv"]
    assert list(sc.shape) == list(blocks(one[name].shape, (64, 32)))
    check_half_step(one[name].array(), q[name].array(), sc.array(), (64, 32))
    assert json.load(open(out / "config.json"))["quantization_config"]["weight_block_size"] == [64, 32]


def test_zero_block_gives_finite_scales(tmp_path):
    src = tmp_path / "zero"
    run("synth", "--preset", "tiny", "--vocab", "256", "--layers", "1", "--out", src)
    ts = st.read_dir(src)
    name = "model.layers.0.mlp.gate_proj.weight"
    w = ts[name].array().copy()
    w[:128, :128] = 0  # one all-zero block
    tensors = {k: (t.dtype, t.shape, t.raw) for k, t in ts.items()}
    tensors[name] = ("BF16", w.shape, st.f32_to_bf16(w).tobytes())
    os.remove(src / "model.safetensors")
    st.write_file(src / "model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "q"
    run("quantize", "--in", src, "--out", out)
    q = st.read_dir(out)
    s = q[name[:-len("weight")] + "weight_scale_inv"].array()
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    deq = dequant(q[name].array(), s, (128, 128))
    assert np.all(deq[:128, :128] == 0) and np.all(np.isfinite(deq))


def test_inspect_reports_format_and_stats(tiny_fp8):
    p = run("inspect", "--json", tiny_fp8)
    r = json.loads(p.stdout)
    assert r["format"] == "fp8" and r["block_size"] == [128, 128]
    assert r["config"]["hidden_size"] == 320 and r["warnings"] == []
    byname = {t["name"]: t for t in r["tensors"]}
    up = byname["model.layers.0.mlp.up_proj.weight"]
    assert up["dtype"] == "F8_E4M3"
    # statistics are of dequantized values, not raw codes
    assert abs(up["stats"]["std"] - 0.02) < 0.002
    text = run("inspect", tiny_fp8).stdout
    assert "fp8, block 128x128" in text and "model.norm.weight" in text


def test_inspect_warns_about_nan_and_zeroed(tmp_path):
    f = tmp_path / "bad.safetensors"
    w = np.full((4, 4), 0.01, dtype=np.float32)
    w[1, 2] = np.nan
    st.write_file(f, {"model.layers.0.mlp.up_proj.weight": ("F32", [4, 4], w.tobytes()),
                      "model.layers.0.input_layernorm.weight": ("F32", [4], np.zeros(4, np.float32).tobytes())})
    r = json.loads(run("inspect", "--json", f).stdout)
    joined = "\n".join(r["warnings"])
    assert "model.layers.0.mlp.up_proj.weight holds 1 NaN" in joined
    assert "input_layernorm" in joined


def test_inspect_foreign_file_with_metadata_and_compressed_tensors_names(tmp_path):
    # a file we did not write with our writer: unsorted keys, __metadata__, no config.json
    f = tmp_path / "ct.safetensors"
    codes = np.arange(256, dtype=np.uint8).reshape(2, 128)
    codes[codes == 0x7F] = 0
    codes[codes == 0xFF] = 0
    scale = np.array([[0.5]], dtype=np.float32)
    st.write_file(f, {"z.weight": ("F8_E4M3", [2, 128], codes.tobytes()),
                      "z.weight_scale": ("F32", [1, 1], scale.tobytes())}, {"format": "pt", "x": "y"})
    r = json.loads(run("inspect", "--json", f).stdout)
    assert r["format"] == "fp8-compressed-tensors"
    z = {t["name"]: t for t in r["tensors"]}["z.weight"]
    vals = st.E4M3[codes.ravel()] * 0.5
    assert z["stats"]["max"] == pytest.approx(vals.max()) and z["stats"]["min"] == pytest.approx(vals.min())


# ---------------------------------------------------------------- bad input through the CLI

def corrupt_copies(src, tmp_path):
    """Model directories each with one defect in model.safetensors."""
    blob = open(src / "model.safetensors", "rb").read()
    n = int.from_bytes(blob[:8], "little")
    cases = {
        "truncated": blob[: len(blob) // 2],
        "huge_header": (10 ** 12).to_bytes(8, "little") + blob[8:64],
        "not_json": blob[:8] + b"\x00" * n + blob[8 + n:],
        "short": blob[:5],
    }
    out = []
    for name, data in cases.items():
        d = tmp_path / name
        d.mkdir()
        for aux in ("config.json",):
            shutil.copy(src / aux, d / aux)
        open(d / "model.safetensors", "wb").write(data)
        out.append((name, d))
    return out


@pytest.mark.parametrize("binary", ["plain", "sanitized"])
def test_malformed_checkpoints_are_refused(tiny, tmp_path, binary):
    exe = None if binary == "plain" else XPREC_SAN
    if exe and not os.path.exists(exe):
        pytest.skip("sanitizer build missing")
    want = {"truncated": "past", "huge_header": "exceeds", "not_json": "JSON", "short": "too short"}
    for name, d in corrupt_copies(tiny, tmp_path):
        for cmd in (["quantize", "--in", d, "--out", tmp_path / ("o_" + name)], ["inspect", d]):
            p = run(*cmd, binary=exe, check=False)
            assert p.returncode == 1, (name, cmd[0], p.stderr)
            assert "model.safetensors" in p.stderr and want[name] in p.stderr, (name, p.stderr)
            assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr
        assert not os.path.exists(tmp_path / ("o_" + name) / "model.safetensors")


def test_contradictory_config_is_refused(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] += 1
    json.dump(cfg, open(d / "config.json", "w"))
    p = run("quantize", "--in", d, "--out", tmp_path / "o", check=False)
    assert p.returncode == 1 and "mlp.gate_proj.weight has shape [800, 320]" in p.stderr
    del cfg["head_dim"]
    json.dump(cfg, open(d / "config.json", "w"))
    p = run("quantize", "--in", d, "--out", tmp_path / "o", check=False)
    assert p.returncode == 1 and '"head_dim" is missing' in p.stderr


def test_usage_errors(tiny, tmp_path):
    assert run("quantize", "--in", tiny, "--out", tiny, check=False).returncode == 2
    assert run("quantize", "--in", tiny, "--out", tmp_path / "o", "--block", "0", check=False).returncode == 2
    p = run("quantize", "--in", tiny, "--out", tmp_path / "o", "--ignore", "model.layers.9.mlp.up_proj", check=False)
    assert p.returncode == 1 and "matches no linear module" in p.stderr
    p = run("dequantize", "--in", tiny, "--out", tmp_path / "o2", check=False)
    assert p.returncode == 1 and "not FP8" in p.stderr
    assert run("synth", "--preset", "huge", "--out", tmp_path / "x", check=False).returncode == 2
    assert run("nonsense", check=False).returncode == 2
