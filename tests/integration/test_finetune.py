"""bench/finetune at toy size: train a general Qwen3 and its domain fine-tune with PyTorch, read
the checkpoints back with the independent NumPy reference and the engine, and run the whole
cross-precision pipeline (quantize, extract, fidelity with held-out text, analyze)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TOKENIZER_DIR, XPREC, run

sys.path.insert(0, os.path.join(ROOT, "bench", "finetune"))
import corpus  # noqa: E402
import qwen3_ref  # noqa: E402
import qwen3_torch as q3  # noqa: E402
import train as tr  # noqa: E402

RUN = os.path.join(ROOT, "bench", "finetune", "run.py")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    work = tmp_path_factory.mktemp("finetune")
    env = dict(os.environ, XPREC_BIN=XPREC, XPREC_TOKENIZER=TOKENIZER_DIR)
    p = subprocess.run([sys.executable, RUN, "--preset", "micro", "--work", str(work), "--threads", "1"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.load(open(work / "results.json"))
    return work, res, p


def rows(res):
    return {(r["method"], r.get("energy") or r["rank"]): r for r in res["fidelity"]["methods"]}


def heldout_docs(work, part):
    return json.load(open(work / "data" / "tokens.json"))[part]["heldout"]


def test_checkpoint_reads_back_equal_in_trainer_reference_and_engine(micro, tmp_path):
    work, _, _ = micro
    d = work / "domain"
    m = q3.load_checkpoint(str(d))
    ids = [q3.ENDOFTEXT] + heldout_docs(work, "domain")[0]
    with torch.no_grad():
        mine = m.full_logits(torch.tensor([ids]))[0].double().numpy()
    # the trainer keeps K and V in float32; the engine, by default, in BF16 (the reference
    # rounds its cache the same way when told)
    ref = qwen3_ref.Model(str(d), kv="f32").logits(ids)
    assert mine.shape == ref.shape == (len(ids), 151936)
    scale = np.abs(ref).max()
    # float32 against float64 on the same BF16 weights
    assert np.abs(mine - ref).max() < 1e-5 * scale
    ref_bf16 = qwen3_ref.Model(str(d)).logits(ids)
    run("score", "--model", d, "--tokens", ",".join(map(str, ids)), "--out", tmp_path / "s.npy")
    eng = np.load(tmp_path / "s.npy")
    assert np.abs(eng - ref_bf16).max() < 1e-4 * scale


def test_restricted_loss_is_the_full_vocabulary_loss(micro):
    """The trainer's shared-row loss equals cross-entropy over all 151936 logits."""
    work, _, _ = micro
    m = q3.load_checkpoint(str(work / "general"))
    docs = heldout_docs(work, "general")[:3]
    full, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            x = torch.tensor([[q3.ENDOFTEXT] + d[:-1]])
            z = m.full_logits(x)[0].double()
            full += (torch.logsumexp(z, -1) - z[torch.arange(len(d)), torch.tensor(d)]).sum().item()
            n += len(d)
    assert tr.heldout_loss(m, docs) == pytest.approx(full / n, rel=1e-5)


def test_fine_tune_moves_only_the_linear_modules(micro):
    work, res, _ = micro
    base = q3.read_safetensors(str(work / "general" / "model.safetensors"))
    tuned = q3.read_safetensors(str(work / "domain" / "model.safetensors"))
    assert base.keys() == tuned.keys()
    for name in base:
        same = torch.equal(base[name], tuned[name])
        assert same == (not name.endswith("_proj.weight")), name
    # and it lowers the domain loss, in the trainer's own evaluation and in the engine's
    f = res["finetune"]
    assert f["heldout_domain_loss"] < res["general"]["heldout_domain_loss"] - 0.05
    h = res["fidelity"]["heldout"]
    assert h["loss_tuned"] == pytest.approx(f["heldout_domain_loss"], abs=1e-3)
    assert h["loss_base"] == pytest.approx(res["general"]["heldout_domain_loss"], abs=1e-3)
    # the engine read the same documents as the trainer wrote
    docs = heldout_docs(work, "domain")
    assert h["documents"] == len(docs) and h["tokens"] == sum(map(len, docs))


def test_retention_against_the_reference(micro):
    """Retention of Method A at rank 4, recomputed from NumPy losses: (base - A) / (base - tuned)."""
    work, res, _ = micro
    docs = heldout_docs(work, "domain")

    def loss(model):
        tot, n = 0.0, 0
        for d in docs:
            z = model.logits([q3.ENDOFTEXT] + d[:-1])
            mx = z.max(1, keepdims=True)
            lse = (np.log(np.exp(z - mx).sum(1, keepdims=True)) + mx)[:, 0]
            tot += (lse - z[np.arange(len(d)), d]).sum()
            n += len(d)
        return tot / n

    r = rows(res)
    a = r[("A", 4)]
    base = loss(qwen3_ref.Model(str(work / "general")))
    tuned = loss(qwen3_ref.Model(str(work / "domain")))
    meth = loss(qwen3_ref.Model(str(work / "general-fp8"), a["adapter"]))
    assert a["heldout_loss"] == pytest.approx(meth, abs=1e-4)
    assert a["retention"] == pytest.approx((base - meth) / (base - tuned), abs=2e-3)
    # the cases that need no arithmetic: the base keeps none of the gain and forgets nothing,
    # A's adapter at full rank on the BF16 base is the fine-tune (up to BF16 factors)
    assert r[("ctrl BF16", 0)]["retention"] == 0 and r[("ctrl BF16", 0)]["forgetting"] == 0
    assert r[("ctrl A/BF16", 64)]["retention"] == pytest.approx(1, abs=0.02)
    assert r[("ctrl A/BF16", 64)]["heldout_top1"] > 0.97


def test_pipeline_reports_every_method_and_the_geometry(micro):
    work, res, p = micro
    r = rows(res)
    for key in [("A", 4), ("B", 4), ("ctrl A/BF16", 4), ("A", 64), ("B", 64), ("A", 0.9), ("B", 0.9),
                ("C", 0), ("ctrl FP8", 0), ("ctrl BF16", 0)]:
        row = r[key]
        assert math.isfinite(row["heldout_loss"]) and math.isfinite(row["general_loss"]), key
    assert set(res["geometry"]) == {"A-r4", "B-r4", "A-r64", "B-r64", "A-e0.9", "B-e0.9"}
    assert (work / "retention.png").stat().st_size > 1000
    report = (work / "report.md").read_text()
    assert "| C | fine-tune quantized to FP8 |" in report and "End to end:" in report
    for stage in range(1, 7):
        assert f"[{stage}/6]" in p.stderr


def test_second_run_reuses_the_checkpoints(micro):
    work, _, _ = micro
    sys.path.insert(0, os.path.dirname(RUN))
    import run as pipeline

    P = pipeline.PRESETS["micro"]
    data, _ = pipeline.build_corpora(P, str(work))
    key = pipeline.key_of(data["general"]["train"], data["domain"]["train"], data["active"])
    st = (work / "general" / "model.safetensors").stat().st_mtime_ns
    d, facts = pipeline.train_general(P, data, str(work), key)
    assert (work / "general" / "model.safetensors").stat().st_mtime_ns == st
    assert facts["steps"] == P["general"]["steps"]


def test_debian_descriptions_become_documents(tmp_path):
    packages = ("Package: aligner\nMaintainer: Debian Med Packaging Team <x@example.org>\n\n"
                "Package: editor\nMaintainer: Someone Else <y@example.org>\n")
    translation = ("Package: aligner\nDescription-md5: 0\nDescription-en: maps reads to a genome\n"
                   " It aligns short reads\n against a reference.\n .\n A second paragraph.\n\n"
                   "Package: editor\nDescription-md5: 1\nDescription-en: edits text\n Not biomedical.\n")
    docs = corpus.debian_med_docs(packages, translation)
    assert docs == ["maps reads to a genome\nIt aligns short reads against a reference.\nA second paragraph."]
    # the text file fidelity reads: documents between blank lines, their lines kept
    corpus.write_docs(tmp_path / "d.txt", docs + ["one more: a gloss"])
    assert (tmp_path / "d.txt").read_text().split("\n\n") == [docs[0], "one more: a gloss\n"]


def test_heldout_file_without_text_is_refused(micro, tmp_path):
    work, _, _ = micro
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    p = run("fidelity", "--base", work / "general", "--quantized", work / "general-fp8", "--tuned",
            work / "domain", "--ranks", 4, "--cache", work / "fidelity-cache", "--heldout", empty,
            check=False)
    assert p.returncode == 1 and "holds no text" in p.stderr
    p = run("fidelity", "--base", work / "general", "--quantized", work / "general-fp8", "--tuned",
            work / "domain", "--energy", "1.5", check=False)
    assert p.returncode == 2 and "--energy 1.5" in p.stderr
