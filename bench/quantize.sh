#!/usr/bin/env bash
# quantize throughput and peak memory on the `small` preset (Qwen3-0.6B's shape).
# usage: bench/quantize.sh [WORKDIR]   (needs ~4 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
X=$PWD/build/bin/xprec
W=${1:-build/bench}
mkdir -p "$W"
[ -f "$W/small/model.safetensors" ] || $X synth --preset small --seed 1 --out "$W/small"
in_bytes=$(stat -c %s "$W/small/model.safetensors")
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for fmt in qwen compressed-tensors; do
    rm -rf "$W/small-fp8"
    sync
    /usr/bin/time -f '%e %M' -o "$W/time.txt" $X quantize --in "$W/small" --out "$W/small-fp8" --format "$fmt"
    read -r secs kb <"$W/time.txt"
    awk -v s="$secs" -v kb="$kb" -v b="$in_bytes" -v f="$fmt" 'BEGIN {
        printf "quantize --format %-18s %.2f s, %.0f MB/s of BF16 input, peak RSS %.0f MB\n", f, s, b / s / 1e6, kb / 1024 }'
done
rm -rf "$W/small-bridge"
/usr/bin/time -f '%e %M' -o "$W/time.txt" $X dequantize --in "$W/small-fp8" --out "$W/small-bridge"
read -r secs kb <"$W/time.txt"
awk -v s="$secs" -v kb="$kb" -v b="$in_bytes" 'BEGIN {
    printf "dequantize                        %.2f s, %.0f MB/s of BF16 output, peak RSS %.0f MB\n", s, b / s / 1e6, kb / 1024 }'
