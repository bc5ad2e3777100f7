#!/usr/bin/env bash
# The linear kernels alone on Qwen3-0.6B's shapes (bench/linear_bench.c): GFLOP/s and weight
# GB/s at several row counts. usage: bench/linear.sh [threads] [rows,rows,...]
set -euo pipefail
cd "$(dirname "$0")/.."
make -s build/lib/libxprec.a
mkdir -p build/bench
cc -O2 -std=c11 -D_GNU_SOURCE -pthread -Iengine bench/linear_bench.c build/lib/libxprec.a \
    -lcjson -lpcre2-8 -lutf8proc -lm -o build/bench/linear_bench
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
build/bench/linear_bench "$@"
