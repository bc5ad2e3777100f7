"""What the engine's lossy options cost in fidelity: the next-token distributions of a few texts
(teacher-forced, every position) with each option, against the most exact configuration (an F32
KV cache and lm_head as stored), through `xprec score`. Prints mean and p95 KL(exact || option)
in nats and the share of positions whose argmax agrees.

usage: /usr/bin/python3 bench/options_fidelity.py MODEL_DIR [XPREC]   (bench/fidelity.sh runs it)
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

TEXTS = [
    "The history of the printing press begins with movable type in East Asia and continues "
    "through Gutenberg's workshop in Mainz, where metal type, oil-based ink and a screw press "
    "came together around 1450. Within fifty years presses were running in more than two hundred "
    "cities, and the price of books fell so far that reading spread beyond monasteries and courts.",
    "def merge_sort(xs):\n    if len(xs) <= 1:\n        return xs\n    mid = len(xs) // 2\n"
    "    left, right = merge_sort(xs[:mid]), merge_sort(xs[mid:])\n    out = []\n"
    "    while left and right:\n        out.append((left if left[0] <= right[0] else right).pop(0))\n"
    "    return out + left + right\n\nprint(merge_sort([5, 3, 9, 1, 7, 2, 8]))\n",
    "Question: A train leaves at 9:40 and arrives at 13:05. How long is the journey? Answer: From "
    "9:40 to 12:40 is three hours, and from 12:40 to 13:05 is twenty-five minutes, so the journey "
    "takes three hours and twenty-five minutes. Question: what is 17 times 23? Answer: 391.",
    "Die Stadtbibliothek bleibt am Montag geschlossen. 图书馆周一闭馆，周二至周日开放。 "
    "La bibliothèque municipale est fermée le lundi. 図書館は月曜日が休館です。",
]

OPTIONS = [
    ("KV BF16 (default)", {"XPREC_KV_DTYPE": "bf16"}, []),
    ("KV FP8 E4M3", {"XPREC_KV_DTYPE": "fp8"}, []),
    ("lm_head FP8 (KV BF16)", {"XPREC_KV_DTYPE": "bf16"}, ["--lm-head", "fp8"]),
    ("KV FP8 + lm_head FP8", {"XPREC_KV_DTYPE": "fp8"}, ["--lm-head", "fp8"]),
]


def score(xprec, model, text, env, extra, out):
    subprocess.run([xprec, "score", "--model", model, "--text", text, "--out", out, *extra],
                   env=dict(os.environ, **env), check=True, capture_output=True)
    return np.load(out).astype(np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(model, xprec="build/bin/xprec"):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "l.npy")
        gold = [log_softmax(score(xprec, model, t, {"XPREC_KV_DTYPE": "f32"}, [], out)) for t in TEXTS]
        n = sum(len(g) for g in gold)
        print(f"model {model}: {len(TEXTS)} texts, {n} positions; reference: KV F32, lm_head as stored")
        print(f"{'option':<26} {'mean KL':>10} {'p95 KL':>10} {'top-1 =':>8}")
        for name, env, extra in OPTIONS:
            kls, same = [], 0
            for t, g in zip(TEXTS, gold):
                lp = log_softmax(score(xprec, model, t, env, extra, out))
                kls.append((np.exp(g) * (g - lp)).sum(-1))
                same += int((g.argmax(-1) == lp.argmax(-1)).sum())
            kl = np.concatenate(kls)
            print(f"{name:<26} {kl.mean():10.2e} {np.percentile(kl, 95):10.2e} {100 * same / n:7.1f}%")


if __name__ == "__main__":
    main(*sys.argv[1:])
