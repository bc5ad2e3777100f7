"""YaRN: rope_scaling from config.json or the --rope-scaling override against the NumPy
reference of transformers' formula (tests/ref/qwen3_ref.py rope_parameters) at positions well
beyond the original context; other rope types refused, never served as plain RoPE."""
import json
import os

import numpy as np
import pytest

import qwen3_ref
from conftest import run

N = 200
TOKENS = [int(t) for t in np.random.default_rng(3).integers(0, 151936, N)]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def with_rope(src, dst, rope):
    """src's checkpoint with config.json's rope_scaling set to rope (the weights linked)."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "config.json":
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def score(model, tmp_path, *extra, check=True, kv=None):
    out = tmp_path / "logits.npy"
    env = dict(os.environ, XPREC_KV_DTYPE=kv) if kv else None
    p = run("score", "--model", model, "--tokens", ",".join(map(str, TOKENS)), "--out", out,
            *extra, check=check, env=env)
    return np.load(out) if check else p


def rel_err(a, ref):
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.3, "beta_fast": 16, "beta_slow": 2},
                                   {"mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
                                   {"type": "yarn", "factor": 2.5}])
def test_yarn_matches_reference(extra, tiny_fp8, tmp_path):
    """With an F32 cache the rotary math alone is compared, and agrees to F32 rounding (measured
    about 1e-6); the default BF16 cache within the engine tests' tolerance."""
    rope = dict(YARN, **extra)
    model = with_rope(tiny_fp8, tmp_path / "m", rope)
    ref = qwen3_ref.Model(str(model), kv="f32").logits(TOKENS)
    assert rel_err(score(model, tmp_path, kv="f32"), ref) < 1e-5
    assert rel_err(score(model, tmp_path), qwen3_ref.Model(str(model)).logits(TOKENS)) < 1e-3
    # beyond the original 64 positions YaRN moves the logits far more than the tolerance
    plain = qwen3_ref.Model(str(tiny_fp8), kv="f32").logits(TOKENS)
    assert rel_err(plain[64:], ref[64:]) > 1e-2


def test_override_is_the_config(tiny_fp8, tmp_path):
    model = with_rope(tiny_fp8, tmp_path / "m", YARN)
    from_config = score(model, tmp_path)
    overridden = score(tiny_fp8, tmp_path, "--rope-scaling", json.dumps(YARN))
    assert np.array_equal(from_config, overridden)
    assert np.array_equal(score(model, tmp_path, "--rope-scaling", "null"), score(tiny_fp8, tmp_path))


@pytest.mark.parametrize("rope,msg", [
    ({"rope_type": "linear", "factor": 2.0}, 'rope_scaling type "linear" is not supported'),
    ({"rope_type": "dynamic", "factor": 2.0}, 'rope_scaling type "dynamic" is not supported'),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, 'type "llama3" is not supported'),
    ({"rope_type": "yarn"}, "has no factor"),
    ({"rope_type": "yarn", "factor": 0.5}, "factor must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, '"low_freq_factor" is not a YaRN parameter'),
    ({"rope_type": "yarn", "type": "linear", "factor": 2.0}, 'rope_type "yarn" and type "linear"'),
    ({"factor": 2.0}, "rope_scaling has no rope_type"),
])
def test_other_rope_types_refused(rope, msg, tiny_fp8, tmp_path):
    model = with_rope(tiny_fp8, tmp_path / "m", rope)
    p = score(model, tmp_path, check=False)
    assert p.returncode == 1 and msg in p.stderr, p.stderr
    p = score(tiny_fp8, tmp_path, "--rope-scaling", json.dumps(rope), check=False)
    assert p.returncode == 1 and msg in p.stderr and "rope scaling override" in p.stderr, p.stderr


def test_default_rope_type_is_plain(tiny_fp8, tmp_path):
    model = with_rope(tiny_fp8, tmp_path / "m", {"rope_type": "default"})
    assert np.array_equal(score(model, tmp_path), score(tiny_fp8, tmp_path))


def test_engine_takes_the_override(tiny_fp8):
    base = ["generate", "--model", tiny_fp8, "--prompt", "The capital of France is", "--max-tokens", 4]
    assert run(*base, "--rope-scaling", json.dumps(YARN)).returncode == 0
    p = run(*base, "--rope-scaling", '{"rope_type":"linear","factor":2}', check=False)
    assert p.returncode == 1 and 'rope_scaling type "linear" is not supported' in p.stderr
