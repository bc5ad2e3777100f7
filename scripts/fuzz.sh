#!/usr/bin/env bash
# Builds the libFuzzer targets in tests/fuzz/ with clang (ASan + UBSan + fuzzer) and runs them.
#   scripts/fuzz.sh            (make check) deterministic: each target replays its committed
#                              corpus in tests/fuzz/corpus/NAME/ and mutates from it for
#                              FUZZ_RUNS runs (default 20000) with a fixed seed
#   scripts/fuzz.sh SECONDS    open-ended, outside CI: SECONDS per target, new inputs kept in
#                              build/fuzz/NAME.corpus; a crash leaves crash-* here: add the input
#                              to tests/fuzz/corpus/NAME/ with the fix, so CI replays it forever
# A crash, leak or abort fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-}
runs=${FUZZ_RUNS:-20000}
out=build/fuzz
mkdir -p "$out"
export XPREC_NPM="${XPREC_NPM:-$PWD/build/npm/node_modules}"
srcs=$(find engine -name "*.c" -not -path "engine/cuda/*" | sort)
san="-fsanitize=address,undefined -fno-sanitize-recover=all"
flags="-std=c11 -D_GNU_SOURCE -O1 -g -Iengine $san"
libs="-lcjson -lpcre2-8 -lutf8proc -lm -pthread"
# the engine once, instrumented for coverage, shared by every target
lib="$out/libxprec-fuzz.a"
objs=()
for src in $srcs; do
    o="$out/obj/${src%.c}.o"
    objs+=("$o")
    if [ ! -f "$o" ] || [ "$src" -nt "$o" ] || [ -n "$(find engine -name '*.h' -newer "$o" | head -1)" ]; then
        mkdir -p "$(dirname "$o")"
        # shellcheck disable=SC2086
        clang $flags -fsanitize=fuzzer-no-link -c "$src" -o "$o"
    fi
done
rm -f "$lib" && ar rcs "$lib" "${objs[@]}"
passed=0 failed=0
for t in tests/fuzz/fuzz_*.c; do
    name=$(basename "$t" .c)
    extra=()
    if [ "$name" = fuzz_openai ]; then
        # the module's request parser, against nginx's headers from the module's configured tree
        ngx=build/nginx/src
        [ -f "$ngx/objs/ngx_auto_config.h" ] || {
            echo "fuzz: $name needs the module built first (make module)"
            exit 1
        }
        extra=(-Ingx_xprec_module -I"$ngx/objs" -I"$ngx/src/core" -I"$ngx/src/event"
            -I"$ngx/src/event/modules" -I"$ngx/src/os/unix" -I"$ngx/src/http"
            -I"$ngx/src/http/modules" -I"$ngx/src/http/v2" ngx_xprec_module/ngx_xprec_openai.c)
    fi
    # shellcheck disable=SC2086
    clang $flags -fsanitize=fuzzer -o "$out/$name" "$t" "${extra[@]}" "$lib" $libs
    mkdir -p "$out/$name.corpus" "tests/fuzz/corpus/$name"
    # new inputs go to the first directory only: the committed corpus is read, never written
    if [ -n "$secs" ]; then
        set -- -max_total_time="$secs"
    else
        rm -rf "$out/$name.corpus" && mkdir -p "$out/$name.corpus"
        set -- -seed=1 -runs="$runs"
    fi
    if "$out/$name" "$@" -rss_limit_mb=2048 -max_len=65536 \
        "$out/$name.corpus" "tests/fuzz/corpus/$name" >"$out/$name.log" 2>&1; then
        passed=$((passed + 1))
        echo "fuzz $name: $(grep -Eo '#[0-9]+' "$out/$name.log" | tail -1 | tr -d '#') runs, no failure"
    else
        failed=$((failed + 1))
        echo "fuzz $name: FAILED (see $out/$name.log)"
        tail -30 "$out/$name.log"
    fi
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
