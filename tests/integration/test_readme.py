"""The README's command examples, run as written and in order in an empty directory, so that the
documentation cannot drift from the code."""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import NPM, ROOT, XPREC

SECTION = "## The `xprec` command"


def readme_commands():
    """Every command of the sh blocks in the README's command section, continuation lines
    joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1]
                continue
            commands.append((pending + line).strip())
            pending = ""
        assert not pending, "a continued line ends its block"
    return commands


def test_readme_examples_run_as_written(tmp_path):
    commands = readme_commands()
    # the examples cover every command the toolkit has
    used = {c.split("|")[-1].split()[1] for c in commands}
    assert used >= {"synth", "quantize", "dequantize", "inspect", "tokenize", "extract",
                    "analyze", "fidelity", "generate", "score", "bench"}
    if any("--plot" in c for c in commands) and not shutil.which("gnuplot"):
        pytest.skip("gnuplot missing (scripts/deps.sh installs it)")
    # an empty directory, with the repository's build/npm where the examples expect it
    (tmp_path / "build").mkdir()
    os.symlink(os.path.dirname(os.path.abspath(NPM)), tmp_path / "build" / "npm")
    env = dict(os.environ, PATH=os.path.dirname(XPREC) + os.pathsep + os.environ["PATH"])
    for c in commands:
        p = subprocess.run(["bash", "-o", "pipefail", "-c", c], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"README example failed ({p.returncode}): {c}\n{p.stderr[-3000:]}"
    # what the examples say they make is there, whole, with no temporary directory left
    for made in ("m/base/tokenizer.json", "m/small2/tokenizer.json", "m/small2-fp8/config.json",
                 "m/adapter-A/adapter_config.json", "m/adapter-B/adapter_model.safetensors",
                 "a.json", "f.json", "geometry.png", "f.png"):
        assert (tmp_path / made).exists(), made
    assert np.load(tmp_path / "logits.npy").shape == (3, 151936)
    # the --force example replaced m/base-ct whole: only the sharded block-64 layout is left
    assert not (tmp_path / "m/base-ct/model.safetensors").exists()
    assert (tmp_path / "m/base-ct/model.safetensors.index.json").exists()
    leftovers = [p for p in tmp_path.rglob("*xprec-tmp*")]
    assert not leftovers, leftovers
