#!/usr/bin/env bash
# Run the whole test suite, slow end-to-end tests included (what CI runs). Creates .venv on first use.
#   ./test.sh                 everything
#   ./test.sh -m "not slow"   the fast tests only; any other pytest arguments work too
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
[ $# -eq 0 ] && set -- -m "slow or not slow"
exec .venv/bin/python -m pytest "$@"
