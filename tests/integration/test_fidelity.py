"""xprec fidelity on planted fine-tunes: what must hold whatever the thesis found."""
import json

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, run

SMALL = ["--preset", "tiny", "--hidden", "128", "--intermediate", "256", "--heads", "2",
         "--kv-heads", "1", "--head-dim", "64"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    run("synth", *SMALL, "--out", d / "base", "--seed", 2, "--tokenizer", TOKENIZER_DIR)
    run("quantize", "--in", d / "base", "--out", d / "fp8")
    run("synth", "--tuned-from", d / "base", "--delta-rank", 4, "--delta-scale", 0.3,
        "--out", d / "lowrank")
    run("synth", "--tuned-from", d / "base", "--noise", 0.3, "--out", d / "dense")
    return d


def fidelity(models, tuned, ranks, tmp_path):
    out = tmp_path / f"{tuned}.json"
    p = run("fidelity", "--base", models / "base", "--quantized", models / "fp8", "--tuned",
            models / tuned, "--ranks", ranks, "--tokens", 6, "--cache", tmp_path / tuned,
            "--out", out)
    rows = json.load(open(out))["methods"]
    return {(r["method"], r["rank"]): r for r in rows}, p.stdout


def test_planted_low_rank(models, tmp_path):
    r, table = fidelity(models, "lowrank", "4,8", tmp_path)
    assert "mean KL" in table and "ctrl BF16" in table
    for rank in (4, 8):
        # rank >= K on the BF16 base: only BF16 storage error is left
        assert r[("ctrl A/BF16", rank)]["mean_kl"] < 1e-5
        assert r[("ctrl A/BF16", rank)]["top1_agreement"] > 0.95
        # on the FP8 base: what remains is the base's own quantization effect, the same order
        # as quantizing the fine-tune itself (Method C)
        a, c = r[("A", rank)]["mean_kl"], r[("C", 0)]["mean_kl"]
        assert 0.3 < a / c < 3
        assert r[("A", rank)]["mean_kl"] > 10 * r[("ctrl A/BF16", rank)]["mean_kl"]
    # without the fine-tune's update the model is far from gold
    assert r[("ctrl BF16", 0)]["mean_kl"] > 10 * r[("A", 8)]["mean_kl"]
    # Method B absorbs part of the base's quantization error: never worse than A by much
    assert r[("B", 8)]["mean_kl"] <= 1.1 * r[("A", 8)]["mean_kl"]


def test_dense_delta_truncation_grows_as_rank_falls(models, tmp_path):
    r, _ = fidelity(models, "dense", "4,16,64", tmp_path)
    kl = [r[("ctrl A/BF16", k)]["mean_kl"] for k in (4, 16, 64)]
    assert kl[0] > kl[1] > kl[2]


def test_cache_is_reused(models, tmp_path):
    fidelity(models, "lowrank", "4", tmp_path)
    stamp = (tmp_path / "lowrank" / "A-r4" / "adapter_model.safetensors").stat().st_mtime_ns
    fidelity(models, "lowrank", "4", tmp_path)
    assert (tmp_path / "lowrank" / "A-r4" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_bad_prompts_file(models, tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("# nothing\n")
    p = run("fidelity", "--base", models / "base", "--quantized", models / "fp8", "--tuned",
            models / "lowrank", "--prompts", empty, "--cache", tmp_path / "c", check=False)
    assert p.returncode == 1 and "holds no prompts" in p.stderr


def test_one_cache_two_fine_tunes(models, tmp_path):
    """Each cached artifact is keyed by what it was made from: a second fine-tune in the same
    cache gets its own adapters, and its figures equal those of a fresh cache."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is FP8?\nHello\n")

    def rows(tuned, cache):
        out = tmp_path / "r.json"
        p = run("fidelity", "--base", models / "base", "--quantized", models / "fp8", "--tuned",
                models / tuned, "--ranks", 4, "--tokens", 4, "--prompts", prompts, "--cache",
                cache, "--out", out)
        r = {(x["method"], x["rank"]): (x["mean_kl"], x["top1_agreement"], x["greedy_match"])
             for x in json.load(open(out))["methods"]}
        return r, p.stderr

    shared = tmp_path / "shared"
    low, _ = rows("lowrank", shared)
    dense, log = rows("dense", shared)
    assert "made from other inputs" in log  # rebuilt, not reused
    assert dense == rows("dense", tmp_path / "fresh-dense")[0]
    assert low == rows("lowrank", tmp_path / "fresh-low")[0]
    assert low[("A", 4)] != dense[("A", 4)] and low[("C", 0)] != dense[("C", 0)]
    again, log = rows("lowrank", shared)
    assert again == low
    made = json.load(open(shared / "A-r4" / "xprec-made-from.json"))
    assert made["tuned"]["path"].endswith("lowrank") and made["rank"] == 4
    # the same inputs again: every artifact is reused as it is
    stamp = (shared / "B-r4" / "adapter_model.safetensors").stat().st_mtime_ns
    _, log = rows("lowrank", shared)
    assert "->" not in log.replace("gold continuations", "")
    assert (shared / "B-r4" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_inputs_must_be_what_the_rows_say(models, tmp_path):
    base, fp8, tuned = models / "base", models / "fp8", models / "lowrank"
    cases = [(base, base, tuned, "--quantized"), (fp8, fp8, tuned, "--base"),
             (base, fp8, fp8, "--tuned")]
    for b, q, t, want in cases:
        p = run("fidelity", "--base", b, "--quantized", q, "--tuned", t, "--cache",
                tmp_path / "c", check=False)
        assert p.returncode == 1 and want in p.stderr, p.stderr
        assert not (tmp_path / "c").exists()  # refused before anything is built
    p = run("fidelity", "--base", base, "--quantized", fp8, "--tuned", tuned, "--svd", "fast",
            check=False)
    assert p.returncode == 2 and "--svd" in p.stderr
