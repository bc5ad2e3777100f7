"""Output directories never mix with old files: every command that writes a checkpoint or an
adapter builds it beside the target and renames it into place. A used target is refused without
--force and replaced whole with it, in every order of unsharded and sharded layouts; a failed or
interrupted run leaves the old output as it was and no temporary directory behind."""
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import TOKENIZER_DIR, XPREC, run

TINY = ["--preset", "tiny", "--vocab", 512, "--layers", 1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("outputs")
    run("synth", *TINY, "--out", d / "base", "--seed", 1)
    run("synth", "--tuned-from", d / "base", "--delta-rank", 3, "--delta-scale", 0.1,
        "--out", d / "tuned", "--seed", 2)
    run("quantize", "--in", d / "base", "--out", d / "fp8")
    return d


def snapshot(d):
    """Every file under d (names relative to d) with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".xprec-tmp-" in p.name]


# each command in two variants that write different files: one file, then shards
VARIANTS = {
    "synth": (["synth", *TINY, "--seed", 5], ["synth", *TINY, "--seed", 6, "--max-shard-mb", 1]),
    "tuned": (["synth", "--tuned-from", "{base}", "--delta-rank", 2, "--delta-scale", 0.1],
              ["synth", "--tuned-from", "{base}", "--noise", 0.1, "--max-shard-mb", 1]),
    "quantize": (["quantize", "--in", "{base}"],
                 ["quantize", "--in", "{base}", "--block", 64, "--max-shard-mb", 1]),
    "dequantize": (["dequantize", "--in", "{fp8}"],
                   ["dequantize", "--in", "{fp8}", "--dtype", "f32", "--max-shard-mb", 1]),
    "extract": (["extract", "--base", "{base}", "--tuned", "{tuned}", "--rank", 2],
                ["extract", "--base", "{fp8}", "--tuned", "{tuned}", "--rank", 4,
                 "--targets", "attn"]),
}


def args(v, src, out, *extra):
    return [str(a).format(base=src / "base", tuned=src / "tuned", fp8=src / "fp8") for a in v] + \
        ["--out", out, *extra]


@pytest.mark.parametrize("cmd", sorted(VARIANTS))
@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_rerun_into_a_used_directory(src, tmp_path, cmd, order):
    first, second = (VARIANTS[cmd][i] for i in order)
    out = tmp_path / "out"
    run(*args(first, src, out))
    before = snapshot(out)
    # without --force: refused, and the first output is untouched
    p = run(*args(second, src, out), check=False)
    assert p.returncode == 1 and "exists and is not empty" in p.stderr and "--force" in p.stderr
    assert snapshot(out) == before
    # with --force: exactly what the second run writes into a fresh directory
    run(*args(second, src, out, "--force"))
    run(*args(second, src, tmp_path / "fresh"))
    assert snapshot(out) == snapshot(tmp_path / "fresh") != before
    assert leftovers(tmp_path) == []


def test_quantize_rerun_loads(src, tmp_path):
    """The issue's case: a block-64 sharded re-quantization must be what loads afterwards."""
    out = tmp_path / "sh3"
    run("quantize", "--in", src / "base", "--out", out)
    run("quantize", "--in", src / "base", "--out", out, "--block", 64, "--max-shard-mb", 1,
        "--force")
    assert not (out / "model.safetensors").exists()
    run("score", "--model", out, "--tokens", "1,2,3", "--out", tmp_path / "l.npy")
    assert np.load(tmp_path / "l.npy").shape == (3, 512)


def test_a_users_directory_is_refused(src, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "model.safetensors").write_bytes(b"my weights")
    before = snapshot(mine)
    for v in VARIANTS.values():
        p = run(*args(v[0], src, mine), check=False)
        assert p.returncode == 1 and "mine exists and is not empty" in p.stderr, p.stderr
        assert snapshot(mine) == before


def test_targets_parents_and_odd_paths(src, tmp_path):
    # parents are created as mkdir -p would
    run("synth", *TINY, "--out", tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c" / "model.safetensors").exists()
    # an empty directory is a fine target without --force
    (tmp_path / "empty").mkdir()
    run("quantize", "--in", src / "base", "--out", tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").exists()
    # a file, a parent that is a file, and "." are refused with what is wrong
    (tmp_path / "file").write_text("x")
    p = run("synth", *TINY, "--out", tmp_path / "file", "--force", check=False)
    assert p.returncode == 1 and "is not a directory" in p.stderr
    p = run("synth", *TINY, "--out", tmp_path / "file" / "sub", check=False)
    assert p.returncode == 1 and "not a directory" in p.stderr
    p = run("synth", *TINY, "--out", ".", "--force", cwd=tmp_path / "empty", check=False)
    assert p.returncode == 1 and "name the output directory itself" in p.stderr
    # an output that is an input is refused before anything is written
    for cmd in (["quantize", "--in", src / "base"], ["synth", "--tuned-from", src / "base",
                                                    "--noise", 0.1],
                ["extract", "--base", src / "base", "--tuned", src / "tuned", "--rank", 2]):
        p = run(*cmd, "--out", src / "base", "--force", check=False)
        assert p.returncode == 2 and "must differ" in p.stderr
    assert leftovers(tmp_path) == [] and leftovers(src) == []


def test_failed_runs_leave_nothing(src, tmp_path):
    out = tmp_path / "out"
    # a bad tokenizer: refused before the weights are written, and no model without one
    p = run("synth", *TINY, "--out", out, "--tokenizer", tmp_path / "nothing", check=False)
    assert p.returncode == 1 and "tokenizer.json" in p.stderr and not out.exists()
    p = run("quantize", "--in", src / "fp8", "--out", out, check=False)
    assert p.returncode == 1 and "already FP8" in p.stderr and not out.exists()
    p = run("dequantize", "--in", src / "base", "--out", out, check=False)
    assert p.returncode == 1 and "not FP8" in p.stderr and not out.exists()
    # the same failures with --force over an earlier output leave that output as it was
    run("synth", *TINY, "--out", out, "--seed", 3, "--tokenizer", TOKENIZER_DIR)
    before = snapshot(out)
    for cmd in (["synth", *TINY, "--tokenizer", tmp_path / "nothing"],
                ["quantize", "--in", src / "fp8"], ["dequantize", "--in", src / "base"],
                ["extract", "--base", src / "base", "--tuned", src / "base", "--rank", 2]):
        p = run(*cmd, "--out", out, "--force", check=False)
        assert p.returncode == 1, (cmd, p.stderr)
        assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# a synth that runs for a few seconds, long enough to be killed mid-way
BIG = ["synth", "--preset", "tiny", "--hidden", 1024, "--intermediate", 4096, "--layers", 6,
       "--heads", 8, "--kv-heads", 4, "--head-dim", 128, "--vocab", 4096, "--max-shard-mb", 16]


def start_and_wait_for_files(tmp_path, out):
    """Starts BIG into out and returns once its temporary directory holds a weight file."""
    proc = subprocess.Popen([XPREC, *map(str, BIG), "--out", str(out), "--force"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        tmps = [tmp_path / n for n in leftovers(tmp_path)]
        if any(any(f.suffix == ".safetensors" or "safetensors" in f.name for f in t.iterdir())
               for t in tmps if t.is_dir()):
            return proc
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no temporary directory appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_interrupted_write_keeps_the_old_output(tmp_path, sig):
    out = tmp_path / "out"
    run("synth", *TINY, "--out", out)
    before = snapshot(out)
    proc = start_and_wait_for_files(tmp_path, out)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    # it died of the signal, mid-way, and took its temporary directory with it
    assert proc.returncode == -sig
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_killed_write_is_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    run("synth", *TINY, "--out", out)
    before = snapshot(out)
    proc = start_and_wait_for_files(tmp_path, out)
    proc.kill()  # SIGKILL: nothing can run in the process
    proc.wait(timeout=60)
    assert snapshot(out) == before
    assert len(leftovers(tmp_path)) == 1
    # the next run on that target removes what the killed one left
    run("synth", *TINY, "--out", out, "--seed", 9, "--force")
    assert leftovers(tmp_path) == [] and snapshot(out) != before
