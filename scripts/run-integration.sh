#!/usr/bin/env bash
# Integration tests: pytest with Debian's python3 (numpy, pytest), against build/bin/xprec.
set -euo pipefail
cd "$(dirname "$0")/.."
export XPREC_BIN="$PWD/build/bin/xprec" XPREC_SAN_BIN="$PWD/build/san/bin/xprec"
export XPREC_NPM="$PWD/build/npm/node_modules"
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration "$@"
