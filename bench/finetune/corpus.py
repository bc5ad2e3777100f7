"""Text corpora that Debian ships, as lists of documents.

General English: WordNet's glosses (package wordnet-base), one document per synset:
"lemma: gloss; "example"". Domain (biomedical): the long descriptions of the packages the Debian
Med team maintains, from apt's Translation-en index. This machine's apt is set up without
translations (Acquire::Languages "none"), so `fetch_apt_lists` runs apt-get update once into a
private lists directory (it leaves the system's lists alone).

Documents never hold blank lines: a document is one or more non-empty lines, and a text file of
documents separates them by one blank line (what `xprec fidelity --heldout` reads).
"""
import hashlib
import json
import os
import subprocess

WORDNET = "/usr/share/wordnet"
APT_HELPER = "/usr/lib/apt/apt-helper"


def wordnet_docs(wordnet_dir=WORDNET, lexfiles=None):
    """One document per synset of data.{noun,verb,adj,adv}; lexfiles: optional set of
    lexicographer file numbers to keep (e.g. {8} for noun.body)."""
    docs = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = os.path.join(wordnet_dir, "data." + pos)
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # the licence header
                fields, gloss = line.split(" | ", 1)
                head = fields.split()
                if lexfiles is not None and int(head[1]) not in lexfiles:
                    continue
                lemma = head[4].replace("_", " ")
                if lemma.endswith(")") and "(" in lemma:  # adjective markers: lemma(a)
                    lemma = lemma[:lemma.index("(")]
                docs.append(f"{lemma}: {gloss.strip()}")
    return docs


def _stanzas(text):
    """Debian control-file stanzas as dicts; continuation lines keep their leading space."""
    for block in text.split("\n\n"):
        d, key = {}, None
        for line in block.split("\n"):
            if not line:
                continue
            if line[0] in " \t" and key:
                d[key] += "\n" + line
            else:
                key, _, v = line.partition(":")
                d[key] = v.strip()
        if d:
            yield d


def description_doc(desc):
    """A Debian long description (synopsis, then lines starting with a space, " ." between
    paragraphs) as a document: the synopsis, then one line per paragraph."""
    lines = desc.split("\n")
    paras, cur = [], []
    for ln in lines[1:]:
        s = ln.strip()
        if s == ".":
            if cur:
                paras.append(" ".join(cur))
            cur = []
        elif s:
            cur.append(s)
    if cur:
        paras.append(" ".join(cur))
    return "\n".join([lines[0].strip()] + paras)


def debian_med_docs(packages_text, translation_text):
    """Long descriptions of the packages whose Maintainer is the Debian Med team, deduplicated,
    in package-name order."""
    med = set()
    for s in _stanzas(packages_text):
        if "Debian Med" in s.get("Maintainer", ""):
            med.add(s["Package"])
    seen, docs = set(), []
    for s in sorted(_stanzas(translation_text), key=lambda s: s.get("Package", "")):
        if s.get("Package") not in med or "Description-en" not in s:
            continue
        doc = description_doc(s["Description-en"])
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def fetch_apt_lists(lists_dir):
    """apt-get update into lists_dir with English translations (once; a second call finds
    them there). Returns (Packages text, Translation-en text) of bookworm main."""
    def find(suffix):
        for fn in sorted(os.listdir(lists_dir)):
            if "_dists_bookworm_main_" in fn and suffix in fn:
                return os.path.join(lists_dir, fn)
        return None

    os.makedirs(os.path.join(lists_dir, "partial"), exist_ok=True)
    if not (find("binary-amd64_Packages") and find("Translation-en")):
        p = subprocess.run(["apt-get", "update", "-qq", "-o", f"Dir::State::Lists={os.path.abspath(lists_dir)}",
                            "-o", "Acquire::Languages=en", "-o", "Debug::NoLocking=1"],
                           capture_output=True, text=True)
        if p.returncode != 0 or not find("Translation-en"):
            raise SystemExit(f"corpus: apt-get update for the Translation-en index failed:\n{p.stderr}")

    def cat(path):
        return subprocess.run([APT_HELPER, "cat-file", path], check=True, capture_output=True).stdout.decode(
            "utf-8", errors="replace")

    return cat(find("binary-amd64_Packages")), cat(find("Translation-en"))


def is_heldout(doc, every):
    """A fixed share 1/every of documents, chosen by content so it does not move when the
    corpus grows or is reordered."""
    return int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) % every == 0


def write_docs(path, docs):
    """Documents separated by one blank line."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")


def tokenize(xprec, tokenizer_dir, docs):
    """Token ids of each document with the engine's own Qwen3 tokenizer (xprec tokenize)."""
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    p = subprocess.run([xprec, "tokenize", "--model", tokenizer_dir, "--jsonl", "-"], input=lines.encode(),
                       capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"corpus: xprec tokenize failed ({p.returncode}):\n{p.stderr.decode()}")
    out = [json.loads(ln) for ln in p.stdout.decode().splitlines()]
    if len(out) != len(docs):
        raise SystemExit(f"corpus: xprec tokenize returned {len(out)} lines for {len(docs)} documents")
    return out
