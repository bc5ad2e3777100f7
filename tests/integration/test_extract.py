"""xprec extract (Methods A and B) and xprec analyze on small planted fine-tunes, checked with
NumPy: the truncated SVD's optimality, the Eckart-Young ordering of Method B vs Method A on the
FP8 base, energy rank selection, the PEFT layout, the report of what sanitization drops, and the
geometry numbers of analyze against a direct computation."""
import json
import math
import os
import shutil

import numpy as np
import pytest

import st_numpy as st
from conftest import XPREC_SAN, run

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
K = 6  # planted delta rank
PREFIX = "base_model.model."


def modules(layers=2):
    for layer in range(layers):
        for m in LINEAR:
            part = "self_attn" if m in LINEAR[:4] else "mlp"
            yield f"model.layers.{layer}.{part}.{m}"


def f64(t):
    return t.array().astype(np.float64)


def dequant(ts, path, block=(128, 128)):
    """dequant(W_fp8) from codes and weight_scale_inv, independently of the C code."""
    q = f64(ts[path + ".weight"])
    s = f64(ts[path + ".weight_scale_inv"])
    full = np.repeat(np.repeat(s, block[0], axis=0), block[1], axis=1)[:q.shape[0], :q.shape[1]]
    return q * full


def lora_update(ad, path):
    """scale * B A of one module, from the adapter as written."""
    a = f64(ad[PREFIX + path + ".lora_A.weight"])
    b = f64(ad[PREFIX + path + ".lora_B.weight"])
    return b @ a, a.shape[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-layer tiny-shaped base (vocab 1024), a planted rank-K fine-tune that also moves norms
    and embeddings, and the FP8 base."""
    d = tmp_path_factory.mktemp("extract")
    base, ft, fp8 = d / "base", d / "ft", d / "fp8"
    run("synth", "--preset", "tiny", "--vocab", 1024, "--out", base, "--seed", 11)
    run("synth", "--tuned-from", base, "--delta-rank", K, "--delta-scale", 0.05, "--norm-delta",
        0.01, "--embed-delta", 0.02, "--out", ft, "--seed", 12)
    run("quantize", "--in", base, "--out", fp8)
    return {"base": base, "ft": ft, "fp8": fp8, "dir": d,
            "B": st.read_dir(base), "T": st.read_dir(ft), "Q": st.read_dir(fp8)}


def extract(models, out, *args, base="base"):
    report = str(out) + ".json"
    run("extract", "--base", models[base], "--tuned", models["ft"], "--out", out, "--report",
        report, *args)
    return st.read_dir(out, "adapter_model"), json.load(open(report))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("rank", [K, K + 4])
def test_recovers_planted_delta(models, tmp_path, svd, rank):
    ad, rep = extract(models, tmp_path / "ad", "--rank", rank, "--svd", svd)
    by_name = {m["name"]: m for m in rep["modules"]}
    assert rep["method"] == "A" and len(by_name) == 14
    for path in modules():
        dw = f64(models["T"][path + ".weight"]) - f64(models["B"][path + ".weight"])
        ba, r = lora_update(ad, path)
        assert r == rank
        sv = np.linalg.svd(dw, compute_uv=False)
        optimal = math.sqrt(np.sum(sv[rank:] ** 2))
        norm = np.linalg.norm(dw)
        got = np.linalg.norm(dw - ba)
        # the optimal truncation up to the BF16 rounding of the stored factors (~2^-9 relative)
        assert optimal * (1 - 1e-6) <= got <= optimal + 2 ** -8 * norm, (path, got, optimal)
        # rank >= K: what is left is the BF16 storage noise of the tuned weights, not signal
        assert got / norm < 0.05, path
        m = by_name[path]
        assert m["rank"] == rank and m["svd"] == svd
        assert abs(m["relative_residual"] - got / norm) < 1e-3 * got / norm + 1e-6, path
        assert abs(m["delta_norm"] - norm) < 1e-5 * norm


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_method_b_is_never_worse_than_a_on_the_fp8_base(models, tmp_path, svd):
    ada, ra = extract(models, tmp_path / "a", "--rank", K, "--svd", svd)
    adb, rb = extract(models, tmp_path / "b", "--rank", K, "--svd", svd, base="fp8")
    assert ra["method"] == "A" and rb["method"] == "B"
    for path in modules():
        wt = f64(models["T"][path + ".weight"])
        deq = dequant(models["Q"], path)
        err_a = np.linalg.norm(wt - (deq + lora_update(ada, path)[0]))
        err_b = np.linalg.norm(wt - (deq + lora_update(adb, path)[0]))
        # Eckart-Young: B's factors are the best rank-K fit of exactly this difference
        assert err_b <= err_a, (path, err_b, err_a)
        # and B's report measures the difference to the dequantized base
        m = next(x for x in rb["modules"] if x["name"] == path)
        assert abs(m["delta_norm"] - np.linalg.norm(wt - deq)) < 1e-4 * m["delta_norm"]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("energy", [0.6, 0.9])
def test_energy_picks_the_smallest_rank(models, tmp_path, svd, energy):
    ad, rep = extract(models, tmp_path / "ad", "--energy", energy, "--svd", svd)
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    for m in rep["modules"]:
        path = m["name"]
        dw = f64(models["T"][path + ".weight"]) - f64(models["B"][path + ".weight"])
        sv = np.linalg.svd(dw, compute_uv=False)
        share = np.cumsum(sv ** 2) / np.sum(sv ** 2)
        want = int(np.argmax(share >= energy)) + 1
        # a share within float rounding of the threshold could honestly go either way
        near = abs(share[want - 1] - energy) < 1e-5 or (want > 1 and abs(share[want - 2] - energy) < 1e-5)
        assert m["rank"] == want or near, (path, m["rank"], want, share[:8])
        assert m["energy"] >= energy - 1e-6
        _, r = lora_update(ad, path)
        assert r == m["rank"]
        # the rank pattern tells PEFT about every module whose rank is not r
        rp = cfg["rank_pattern"].get(path, cfg["r"])
        assert rp == r and cfg.get("alpha_pattern", {}).get(path, cfg["lora_alpha"]) == r


def test_adapter_layout_and_peft_validation(models, tmp_path):
    out = tmp_path / "ad"
    ad, _ = extract(models, out, "--rank", 4)
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert sorted(cfg["target_modules"]) == sorted(LINEAR)
    assert not cfg["use_rslora"] and cfg["bias"] == "none" and not cfg["modules_to_save"]
    for name, t in ad.items():
        assert name.startswith(PREFIX + "model.layers.") and t.dtype == "BF16"
        leaf = name.split(".")[-3]
        assert leaf in LINEAR and name.split(".")[-2] in ("lora_A", "lora_B"), name
        assert "norm" not in name and "embed" not in name and "lm_head" not in name
    assert len(ad) == 2 * 14
    # our own PEFT reader validates it (config, names, ranks, finite values)
    p = run("inspect", out)
    assert "peft-lora" in p.stdout and "r=4" in p.stdout


def test_report_lists_what_sanitization_drops(models, tmp_path):
    _, rep = extract(models, tmp_path / "ad", "--rank", K, "--targets", "attn")
    dropped = {d["name"]: d for d in rep["not_in_adapter"]}
    B, T = models["B"], models["T"]
    changed = [n for n in T if not n.endswith("_proj.weight") and T[n].bits() != B[n].bits()]
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(n.endswith("q_norm.weight") for n in changed)
    for n in changed:
        want = np.linalg.norm(f64(T[n]) - f64(B[n])) / np.linalg.norm(f64(B[n]))
        assert abs(dropped[n]["relative_change"] - want) < 1e-4 * want, n
    kinds = {n: d["kind"] for n, d in dropped.items()}
    assert kinds["model.embed_tokens.weight"] == "embedding" and kinds["lm_head.weight"] == "lm_head"
    assert kinds["model.norm.weight"] == "norm"
    # the MLP modules left out by --targets are listed too, and only they besides the above
    mlp = [p + ".weight" for p in modules() if ".mlp." in p]
    assert all(kinds[n] == "untargeted module" for n in mlp)
    assert set(dropped) == set(changed) | set(mlp)
    assert {m["module"] for m in rep["modules"]} == set(LINEAR[:4])
    assert rep["summary"]["not_in_adapter"] == len(dropped)


def test_randomized_is_deterministic_for_a_seed(models, tmp_path):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run("extract", "--base", models["base"], "--tuned", models["ft"], "--out",
            tmp_path / name, "--rank", K, "--svd", "randomized", "--seed", seed)
        outs.append(open(tmp_path / name / "adapter_model.safetensors", "rb").read())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_unchanged_and_bad_input(models, tmp_path):
    base, ft, fp8 = models["base"], models["ft"], models["fp8"]
    p = run("extract", "--base", base, "--tuned", base, "--out", tmp_path / "x", "--rank", 4,
            check=False)
    assert p.returncode == 1 and "nothing to extract" in p.stderr
    # a failed run leaves no empty output directory behind, and never removes one it did not make
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    p = run("extract", "--base", base, "--tuned", base, "--out", mine, "--rank", 4, check=False)
    assert p.returncode == 1 and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(f.name for f in mine.iterdir()) == ["notes.txt"]
    p = run("extract", "--base", base, "--tuned", fp8, "--out", tmp_path / "x", "--rank", 4,
            check=False)
    assert p.returncode == 1 and "xprec extract:" in p.stderr and "FP8" in p.stderr
    other = tmp_path / "other"
    run("synth", "--preset", "tiny", "--vocab", 1024, "--layers", 1, "--out", other)
    p = run("extract", "--base", other, "--tuned", ft, "--out", tmp_path / "x", "--rank", 4,
            check=False)
    assert p.returncode == 1 and "architecture" in p.stderr
    for bad in (["--rank", 4, "--energy", 0.9], [], ["--rank", 0], ["--energy", 1.5],
                ["--rank", 4, "--targets", "lm_head"], ["--rank", 4, "--svd", "fast"]):
        p = run("extract", "--base", base, "--tuned", ft, "--out", tmp_path / "x", *bad,
                check=False)
        assert p.returncode == 2, (bad, p.stderr)
    assert run("extract", "--help").stdout.startswith("usage: xprec extract")


def test_extract_under_sanitizers(models, tmp_path):
    if not os.path.exists(XPREC_SAN):
        pytest.skip("sanitizer build missing")
    # the second run replaces the first one's adapter (--force), under the sanitizers too
    for args in (["--rank", K, "--svd", "randomized"], ["--energy", 0.8, "--svd", "exact"]):
        p = run("extract", "--base", models["fp8"], "--tuned", models["ft"], "--out",
                tmp_path / "ad", "--report", tmp_path / "r.json", "--force", *args,
                binary=XPREC_SAN)
        assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr


# ---------------------------------------------------------------- analyze

def write_adapter(d, factors, rank):
    """A PEFT adapter from NumPy factors {module path: (A [r, in], B [out, r])}, lora_alpha = r."""
    os.makedirs(d, exist_ok=True)
    tensors = {}
    for path, (a, b) in sorted(factors.items()):
        for name, x in (("lora_A", a), ("lora_B", b)):
            tensors[f"{PREFIX}{path}.{name}.weight"] = (
                "BF16", list(x.shape), st.f32_to_bf16(x.astype(np.float32)).tobytes())
    st.write_file(os.path.join(d, "adapter_model.safetensors"), tensors)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(LINEAR),
           "bias": "none", "use_rslora": False, "base_model_name_or_path": "",
           "task_type": "CAUSAL_LM"}
    json.dump(cfg, open(os.path.join(d, "adapter_config.json"), "w"))


def analyze(models, adapter, out):
    p = run("analyze", "--base", models["base"], "--quantized", models["fp8"], "--adapter", adapter,
            "--json", out)
    return json.load(open(out)), p.stdout


def noise(models, path):
    return dequant(models["Q"], path) - f64(models["B"][path + ".weight"])


def test_analyze_matches_a_direct_computation(models, tmp_path):
    ad, _ = extract(models, tmp_path / "ad", "--rank", K)
    rep, out = analyze(models, tmp_path / "ad", tmp_path / "an.json")
    assert "summary:" in out and len(rep["modules"]) == 14
    for m in rep["modules"]:
        path = m["name"]
        n = noise(models, path)
        lo, r = lora_update(ad, path)
        u = np.linalg.svd(lo, full_matrices=False)[0][:, :r]
        cos = np.sum(lo * n) / (np.linalg.norm(lo) * np.linalg.norm(n))
        leak = np.linalg.norm(u.T @ n) ** 2 / np.linalg.norm(n) ** 2
        assert m["rank"] == r and m["d_out"] == n.shape[0]
        assert abs(m["cosine"] - cos) < 1e-4, (path, m["cosine"], cos)
        assert abs(m["leakage"] - leak) < 1e-4 * leak, (path, m["leakage"], leak)
        assert abs(m["leakage_random"] - r / n.shape[0]) < 1e-12
        ratio = np.linalg.norm(n) / np.linalg.norm(lo)
        assert abs(m["noise_to_adapter"] - ratio) < 1e-4 * ratio
    layers = {x["layer"]: x for x in rep["layers"]}
    assert set(layers) == {0, 1}
    mean0 = np.mean([m["cosine"] for m in rep["modules"] if m["layer"] == 0])
    assert abs(layers[0]["mean_cosine"] - mean0) < 1e-12
    assert rep["summary"]["modules"] == 14


def test_analyze_known_pair_and_random_subspace(models, tmp_path):
    r = 16
    top, neg, rnd, share = {}, {}, {}, {}
    rng = np.random.default_rng(3)
    for path in modules():
        n = noise(models, path)
        u, s, vt = np.linalg.svd(n, full_matrices=False)
        a, b = np.sqrt(s[:r])[:, None] * vt[:r], u[:, :r] * np.sqrt(s[:r])
        top[path], neg[path] = (a, b), (a, -b)
        share[path] = np.sum(s[:r] ** 2) / np.sum(s ** 2)
        rnd[path] = (rng.standard_normal((r, n.shape[1])), rng.standard_normal((n.shape[0], r)))
    for name, f in (("top", top), ("neg", neg), ("rnd", rnd)):
        write_adapter(tmp_path / name, f, r)
    got = {name: {m["name"]: m for m in analyze(models, tmp_path / name, tmp_path / (name + ".json"))[0]["modules"]}
           for name in ("top", "neg", "rnd")}
    ratios = []
    for path in modules():
        # L is N's own best rank-r part: cos = sqrt(share), leakage = share (up to BF16 factors)
        assert abs(got["top"][path]["cosine"] - math.sqrt(share[path])) < 2e-3
        assert abs(got["neg"][path]["cosine"] + math.sqrt(share[path])) < 2e-3
        assert abs(got["top"][path]["leakage"] - share[path]) < 2e-3 * share[path] + 1e-4
        # an unrelated random subspace catches r/d_out of the noise, within sampling error
        m = got["rnd"][path]
        d = m["d_out"]
        assert m["leakage_random"] == r / d
        ratios.append(m["leakage"] / m["leakage_random"])
        assert abs(ratios[-1] - 1) < 0.2, (path, ratios[-1])
        assert abs(m["cosine"]) < 5 / math.sqrt(d * noise(models, path).shape[1])
    assert abs(np.mean(ratios) - 1) < 0.05


def test_method_b_adapter_points_at_minus_the_noise(models, tmp_path):
    extract(models, tmp_path / "a", "--rank", K)
    extract(models, tmp_path / "b", "--rank", K, base="fp8")
    sa = analyze(models, tmp_path / "a", tmp_path / "a.json")[0]["summary"]
    sb = analyze(models, tmp_path / "b", tmp_path / "b.json")[0]["summary"]
    assert sb["mean_cosine"] < 0 and abs(sb["mean_cosine"]) > 5 * sa["mean_abs_cosine"]
    assert sb["mean_leakage_ratio"] > sa["mean_leakage_ratio"]


def test_analyze_plot(models, tmp_path):
    extract(models, tmp_path / "ad", "--rank", K)
    args = ["analyze", "--base", models["base"], "--quantized", models["fp8"], "--adapter",
            tmp_path / "ad", "--plot", tmp_path / "geo.png"]
    if shutil.which("gnuplot"):
        run(*args)
        assert open(tmp_path / "geo.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # without gnuplot: a clear error before any work, no crash, no file
    env = dict(os.environ, PATH=str(tmp_path / "empty"))
    p = run(*args[:-1], tmp_path / "none.png", check=False, env=env)
    assert p.returncode == 1 and "gnuplot" in p.stderr and "xprec analyze:" in p.stderr
    assert not os.path.exists(tmp_path / "none.png")


def test_analyze_bad_input(models, tmp_path):
    extract(models, tmp_path / "ad", "--rank", 2)
    base, fp8, ad = models["base"], models["fp8"], tmp_path / "ad"
    p = run("analyze", "--base", fp8, "--quantized", fp8, "--adapter", ad, check=False)
    assert p.returncode == 1 and "BF16" in p.stderr
    p = run("analyze", "--base", base, "--quantized", base, "--adapter", ad, check=False)
    assert p.returncode == 1 and "FP8" in p.stderr
    other = tmp_path / "other"
    run("synth", "--preset", "tiny", "--vocab", 1024, "--layers", 1, "--hidden", 256,
        "--out", other)
    run("quantize", "--in", other, "--out", tmp_path / "other8")
    p = run("analyze", "--base", other, "--quantized", tmp_path / "other8", "--adapter", ad,
            check=False)
    assert p.returncode == 1 and "adapter" in p.stderr
    assert run("analyze", "--base", base, check=False).returncode == 2
    assert run("analyze", "--help").stdout.startswith("usage: xprec analyze")
    if os.path.exists(XPREC_SAN):
        p = run("analyze", "--base", base, "--quantized", fp8, "--adapter", ad, "--json",
                tmp_path / "s.json", binary=XPREC_SAN)
        assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr


def test_ranks_the_engine_would_refuse_are_refused(models, tmp_path):
    base, ft = models["base"], models["ft"]
    for bad in (["--rank", 320], ["--rank", 257], ["--energy", 0.9, "--max-rank", 300]):
        p = run("extract", "--base", base, "--tuned", ft, "--out", tmp_path / "x", *bad,
                check=False)
        assert p.returncode == 2 and "[1, 256]" in p.stderr, (bad, p.stderr)
        assert not (tmp_path / "x").exists()
    # --energy 1 alone stops at the engine's limit and says so; tiny's MLP modules (800 x 320)
    # would need rank 320
    out = tmp_path / "ad"
    p = run("extract", "--base", base, "--tuned", ft, "--out", out, "--energy", 1, "--report",
            tmp_path / "r.json")
    ranks = [m["rank"] for m in json.load(open(tmp_path / "r.json"))["modules"]]
    assert max(ranks) == 256
    assert "stop at rank 256" in p.stdout and "the most the engine serves" in p.stdout
    # and the adapter is one the engine takes
    run("score", "--model", models["fp8"], "--adapter", out, "--tokens", "1,2,3", "--out",
        tmp_path / "l.npy")


def test_summary_says_where_changes_are(models, tmp_path):
    """"Nothing outside the targeted modules changed" is about where the fine-tune changed the
    model, whatever the residual; norms that changed are listed instead."""
    only_linear = tmp_path / "lin"
    run("synth", "--tuned-from", models["base"], "--delta-rank", 2, "--delta-scale", 0.05,
        "--noise", 0.01, "--out", only_linear)
    p = run("extract", "--base", models["base"], "--tuned", only_linear, "--out",
            tmp_path / "a", "--rank", 1)
    assert "nothing outside the targeted modules changed" in p.stdout
    assert "every change" not in p.stdout
    p = run("extract", "--base", models["base"], "--tuned", models["ft"], "--out",
            tmp_path / "b", "--rank", 2)
    assert "changed but not in the adapter" in p.stdout and "nothing outside" not in p.stdout
