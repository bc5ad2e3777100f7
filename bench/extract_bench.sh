#!/usr/bin/env bash
# xprec extract: time of one 5120x25600 module pair (Qwen3-32B's down_proj) at rank 256,
# randomized vs exact SVD, and of the whole `small` preset (Qwen3-0.6B's shape), with achieved
# GFLOP/s against this machine's measured BLAS SGEMM peak and the residual of randomized vs exact.
# Then Method B and `xprec analyze` of both adapters on `small` against its FP8 quantization.
# usage: bench/extract_bench.sh [WORKDIR]   (needs ~8 GB of disk, ~4 GB of memory)
#        SKIP_EXACT_BIG=1 leaves out the (minutes-long) exact SVD of the 5120x25600 module.
set -euo pipefail
cd "$(dirname "$0")/.."
X=${XPREC_BIN:-$PWD/build/bin/xprec}
W=${1:-build/bench}
mkdir -p "$W"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'),"\
     "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
echo "blas: $(dpkg-query -W -f='${Package} ${Version}' libopenblas0-pthread 2>/dev/null || echo unknown)"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"

# --- the BLAS peak: best of 3 SGEMMs, square and the randomized SVD's own shape
cat >"$W/gemm_peak.c" <<'EOF'
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
static void run(int m, int n, int k, const char *what) {
    float *a = malloc(sizeof(float) * m * k), *b = malloc(sizeof(float) * k * n), *c = malloc(sizeof(float) * m * n);
    for (long i = 0; i < (long)m * k; i++) a[i] = (float)(i % 7) - 3;
    for (long i = 0; i < (long)k * n; i++) b[i] = (float)(i % 5) - 2;
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1, a, k, b, n, 0, c, n);
        t = now() - t;
        double g = 2.0 * m * n * k / t / 1e9;
        if (g > best) best = g;
    }
    printf("sgemm %-34s %dx%dx%d: %.1f GFLOP/s\n", what, m, n, k, best);
    free(a); free(b); free(c);
}
int main(void) {
    run(4096, 4096, 4096, "(square)");
    run(5120, 266, 25600, "(randomized SVD, A x Omega)");
    return 0;
}
EOF
cc -O2 -o "$W/gemm_peak" "$W/gemm_peak.c" $(pkg-config --libs openblas 2>/dev/null || echo -lopenblas)
"$W/gemm_peak"

# --- one 5120x25600 module pair: a 1-layer model of Qwen3-32B's MLP width (small attention)
B=$W/w32b
mkdir -p "$B"
if [ ! -f "$B/base/model.safetensors" ]; then
    $X synth --preset qwen3-32b --layers 1 --heads 8 --kv-heads 8 --vocab 1024 --out "$B/base" --seed 1
    $X synth --tuned-from "$B/base" --delta-rank 64 --delta-scale 0.05 --noise 0.01 --out "$B/tuned" --seed 2
fi
module_row() { # report label
    python3 - "$1" "$2" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["modules"][0]
g = m.get("gemm_gflops")
print(f"{sys.argv[2]:<11} {m['name']} {m['shape'][0]}x{m['shape'][1]} rank {m['rank']}: "
      f"{m['seconds']:.2f} s" + (f", {g:.1f} GFLOP/s (BLAS-3 flops / module time)" if g else "") +
      f", relative residual {m['relative_residual']:.6f}")
EOF
}
# randomized with the default 2 power iterations, with 4, and exact
for run in randomized:2 randomized:4 exact:0; do
    svd=${run%:*} q=${run#*:} label=$svd
    [ "$svd" = randomized ] && label="rand q=$q"
    [ "$svd" = exact ] && [ "${SKIP_EXACT_BIG:-0}" = 1 ] && continue
    /usr/bin/time -f '%e %M' -o "$W/time.txt" $X extract --base "$B/base" --tuned "$B/tuned" \
        --out "$B/ad-$svd" --force --rank 256 --targets down_proj --svd "$svd" --power-iters "$q" \
        --report "$B/$svd-$q.json" >/dev/null
    read -r secs kb <"$W/time.txt"
    module_row "$B/$svd-$q.json" "$label"
    echo "            whole command ${secs} s, peak RSS $((kb / 1024)) MB"
done
if [ -f "$B/exact-0.json" ]; then
    python3 - "$B/exact-0.json" "$B/randomized-2.json" "$B/randomized-4.json" <<'EOF'
import json, sys
e, *rs = (json.load(open(p))["modules"][0] for p in sys.argv[1:])
for q, r in zip((2, 4), rs):
    print(f"randomized (q={q}) vs exact residual: {r['relative_residual']:.6f} vs "
          f"{e['relative_residual']:.6f} (ratio {r['relative_residual'] / e['relative_residual']:.5f}); "
          f"speed-up {e['seconds'] / r['seconds']:.1f}x")
EOF
fi

# --- the whole small preset (28 layers x 7 modules), rank 64
S=$W/small
[ -f "$S/model.safetensors" ] || $X synth --preset small --seed 1 --out "$S"
[ -f "$W/small-tuned/model.safetensors" ] ||
    $X synth --tuned-from "$S" --delta-rank 32 --delta-scale 0.05 --noise 0.01 --norm-delta 0.01 \
        --out "$W/small-tuned" --seed 2
for svd in randomized exact; do
    /usr/bin/time -f '%e %M' -o "$W/time.txt" $X extract --base "$S" --tuned "$W/small-tuned" \
        --out "$W/small-ad-$svd" --force --rank 64 --svd "$svd" --report "$W/small-$svd.json" >/dev/null
    read -r secs kb <"$W/time.txt"
    python3 - "$W/small-$svd.json" "$svd" "$secs" "$kb" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s, mods = r["summary"], r["modules"]
svd_s = sum(m["seconds"] for m in mods)
g = s.get("randomized_gemm_gflops")
print(f"small preset, --svd {sys.argv[2]:<10} rank 64, {s['modules']} modules: {float(sys.argv[3]):.1f} s "
      f"(SVD work {svd_s:.1f} s" + (f", {g:.1f} GFLOP/s" if g else "") +
      f"), peak RSS {int(sys.argv[4]) // 1024} MB, relative residual mean {s['mean_relative_residual']:.6f} "
      f"max {s['max_relative_residual']:.6f}")
EOF
done

# --- Method B on the same fine-tune, and analyze for both adapters against the FP8 base
[ -f "$W/small-fp8/model.safetensors" ] || $X quantize --in "$S" --out "$W/small-fp8" >/dev/null
/usr/bin/time -f '%e %M' -o "$W/time.txt" $X extract --base "$W/small-fp8" --tuned "$W/small-tuned" \
    --out "$W/small-ad-B" --force --rank 64 --report "$W/small-B.json" >/dev/null
read -r secs kb <"$W/time.txt"
python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print(f'small preset, Method B (FP8 base) rank 64: {float(sys.argv[2]):.1f} s, peak RSS {int(sys.argv[3])//1024} MB, relative residual mean {s[\"mean_relative_residual\"]:.4f}')" \
    "$W/small-B.json" "$secs" "$kb"
for m in randomized:A B:B; do
    ad=$W/small-ad-${m%:*}
    /usr/bin/time -f '%e %M' -o "$W/time.txt" $X analyze --base "$S" --quantized "$W/small-fp8" \
        --adapter "$ad" --json "$W/analyze-${m#*:}.json" --plot "$W/analyze-${m#*:}.png" >/dev/null
    read -r secs kb <"$W/time.txt"
    python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print(f'analyze Method {sys.argv[4]}: {float(sys.argv[2]):.1f} s, peak RSS {int(sys.argv[3])//1024} MB, mean cos {s[\"mean_cosine\"]:+.5f}, max |cos| {s[\"max_abs_cosine\"]:.4f}, leakage/random {s[\"mean_leakage_ratio\"]:.3f}, |N|/|L| {s[\"mean_noise_to_adapter\"]:.3f}')" \
        "$W/analyze-${m#*:}.json" "$secs" "$kb" "${m#*:}"
done
