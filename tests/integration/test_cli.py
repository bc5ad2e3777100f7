"""The command line as a whole: one option parser, so every command documents its options the
same way, shares one set of limits, and takes a chat in the same two forms."""
import json
import re

import pytest

from conftest import run

COMMANDS = ["synth", "inspect", "quantize", "dequantize", "tokenize", "extract", "analyze",
            "fidelity", "generate", "bench", "score"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_is_usage_on_stdout(cmd):
    p = run(cmd, "--help")
    assert p.stdout.startswith(f"usage: xprec {cmd}") and p.stderr == ""
    assert "\noptions:\n" in p.stdout and "  --help" in p.stdout
    # the same for an unknown option, on stderr and with exit status 2
    p = run(cmd, "--no-such-option", check=False)
    assert p.returncode == 2 and "unknown option --no-such-option" in p.stderr
    assert f"usage: xprec {cmd}" in p.stderr


@pytest.mark.parametrize("cmd", ["generate", "score", "bench", "fidelity"])
def test_threads_has_one_limit(cmd, tmp_path):
    for bad in ("0", "257", "many"):
        p = run(cmd, "--threads", bad, check=False)
        assert p.returncode == 2
        assert f'xprec {cmd}: --threads needs an integer in [1, 256], got "{bad}"' in p.stderr
    assert "--threads N" in run(cmd, "--help").stdout


def test_missing_options_are_named():
    p = run("quantize", "--in", "x", check=False)
    assert p.returncode == 2 and "xprec quantize: --out DIR is missing" in p.stderr
    p = run("extract", "--base", "a", "--tuned", "b", "--out", "c", check=False)
    assert p.returncode == 2 and "give exactly one of --rank and --energy" in p.stderr


def test_generate_says_what_is_missing(tiny):
    p = run("generate", "--model", tiny, check=False)
    assert p.returncode == 2
    assert "xprec generate: nothing to answer: give --prompt TEXT or --chat JSON" in p.stderr
    p = run("generate", "--model", tiny, "--prompt", "a", "--chat", "[]", check=False)
    assert p.returncode == 2 and "not both" in p.stderr


def prompt_tokens(stderr):
    return int(re.search(r"prompt tokens (\d+)", stderr).group(1))


def test_chat_forms_are_the_same_in_generate_and_tokenize(tiny):
    msgs = [{"role": "user", "content": "Hello"}]
    for form in (msgs, {"messages": msgs}, {"messages": msgs, "enable_thinking": True}):
        chat = json.dumps(form)
        thinking = isinstance(form, dict) and form.get("enable_thinking", False)
        g = run("generate", "--model", tiny, "--chat", chat, "--max-tokens", 1)
        # generate's default is thinking off; tokenize's is on: give it explicitly
        t = {"messages": msgs, "enable_thinking": thinking}
        ids = json.loads(run("tokenize", "--model", tiny, "--chat", json.dumps(t)).stdout)
        assert prompt_tokens(g.stderr) == len(ids), form
    for bad, want in (("[]", "non-empty list"), ('{"msgs": []}', 'unknown key "msgs"'),
                      ('[{"role": "user"}]', "message 1 needs")):
        for cmd in ("generate", "tokenize"):
            p = run(cmd, "--model", tiny, "--chat", bad, check=False)
            assert p.returncode == 1 and want in p.stderr, (cmd, bad, p.stderr)
    p = run("generate", "--model", tiny, "--chat",
            json.dumps({"messages": msgs, "add_generation_prompt": False}), check=False)
    assert p.returncode == 1 and "add_generation_prompt" in p.stderr


def test_bench_blames_the_model(tmp_path):
    p = run("bench", "--model", tmp_path / "nodir", "--adapters", 2, check=False)
    assert p.returncode == 1 and "nodir/config.json" in p.stderr and "adapters" not in p.stderr
