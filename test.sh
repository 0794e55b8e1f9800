#!/usr/bin/env bash
# Lint (ruff) and type-check (mypy), then run the whole test suite, slow end-to-end tests included (what CI runs). Creates .venv on first use.
#   ./test.sh                 everything but the acceptance test (the README's demo score of ./train.sh; CI runs it)
#   ./test.sh -m acceptance   that test alone (about 6 minutes)
#   ./test.sh -m "not slow"   the fast tests only, in one process; any other pytest arguments work too (-n 2: two workers)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
echo "[alldetect] ruff check src tests bench"
.venv/bin/ruff check --quiet src tests bench || { echo "[alldetect] ruff found problems (above); fix them, or run .venv/bin/ruff check --fix" >&2; exit 1; }
echo "[alldetect] mypy (src/alldetect, settings in pyproject.toml)"
.venv/bin/mypy || { echo "[alldetect] mypy found type errors (above)" >&2; exit 1; }
# Everything but the acceptance test, on two pytest-xdist workers (one torch thread each; tests/conftest.py)
[ $# -eq 0 ] && set -- -m "not acceptance" -n 2 --dist worksteal
exec .venv/bin/python -m pytest "$@"
