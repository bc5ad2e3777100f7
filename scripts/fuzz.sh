#!/usr/bin/env bash
# Builds the libFuzzer targets in tests/fuzz/ with clang (ASan + UBSan + fuzzer) and runs each for
# SECONDS (default 20) from an empty corpus plus the seeds the tests leave nothing to. A crash,
# leak or abort fails the script. usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
out=build/fuzz
mkdir -p "$out"
export XPREC_NPM="${XPREC_NPM:-$PWD/build/npm/node_modules}"
srcs=$(find engine -name "*.c" -not -path "engine/cuda/*" | sort)
flags="-std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Iengine"
libs="-lcjson -lpcre2-8 -lutf8proc -lm -pthread"
# seeds: a valid file of each kind, so mutation starts from the real structure
mkdir -p "$out/fuzz_safetensors.corpus" "$out/fuzz_config.corpus" "$out/fuzz_tokenizer.corpus"
/usr/bin/python3 - "$out" <<'PY'
import json, struct, sys
out = sys.argv[1]
h = {"__metadata__": {"format": "pt"},
     "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
     "b.weight": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [12, 16]}}
hb = json.dumps(h).encode()
hb += b" " * (-len(hb) % 8)
open(f"{out}/fuzz_safetensors.corpus/seed", "wb").write(struct.pack("<Q", len(hb)) + hb + bytes(range(16)))
cfg = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
       "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
       "tie_word_embeddings": True,
       "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                               "modules_to_not_convert": ["lm_head", "re:.*down_proj$"]}}
open(f"{out}/fuzz_config.corpus/seed", "w").write(json.dumps(cfg))
open(f"{out}/fuzz_tokenizer.corpus/seed", "w").write("Hello, wörld! 你好 <|im_start|>user\n  x=1;\r\n")
PY
passed=0 failed=0
for t in tests/fuzz/fuzz_*.c; do
    name=$(basename "$t" .c)
    # shellcheck disable=SC2086
    clang $flags -o "$out/$name" "$t" $srcs $libs
    mkdir -p "$out/$name.corpus"
    if "$out/$name" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 \
        "$out/$name.corpus" >"$out/$name.log" 2>&1; then
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
