#!/usr/bin/env bash
# Lint (ruff), then the whole test suite (slow end-to-end tests included) with the type check (mypy) running beside
# it: what CI runs, bar the acceptance test. Creates .venv on first use.
#   ./test.sh                 everything but the acceptance test (the README's demo score of ./train.sh; CI runs it)
#   ./test.sh -m acceptance   that test alone (about 6 minutes)
#   ./test.sh -m "not slow"   the fast tests only, in one process; any other pytest arguments work too (-n 2: two workers)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure-venv.sh
echo "[alldetect] ruff check src tests bench"
.venv/bin/ruff check --quiet src tests bench || { echo "[alldetect] ruff found problems (above); fix them, or run .venv/bin/ruff check --fix" >&2; exit 1; }
# mypy's first run in a fresh clone takes about 40 s of one core (later runs read .mypy_cache): it runs beside the
# tests, and its verdict is printed after theirs.
echo "[alldetect] mypy (src/alldetect, settings in pyproject.toml), beside the tests"
mypy_out=$(mktemp)
trap 'rm -f "$mypy_out"' EXIT
.venv/bin/mypy >"$mypy_out" 2>&1 &
mypy_pid=$!
# Everything but the acceptance test, on two pytest-xdist workers (one torch thread each; tests/conftest.py)
[ $# -eq 0 ] && set -- -m "not acceptance" -n 2 --dist worksteal
tests=0
.venv/bin/python -m pytest "$@" || tests=$?
types=0
wait "$mypy_pid" || types=$?
if [ "$types" -ne 0 ]; then
  cat "$mypy_out"
  echo "[alldetect] mypy found type errors (above)" >&2
else
  echo "[alldetect] mypy: $(tail -n 1 "$mypy_out")"
fi
[ "$tests" -eq 0 ] || exit "$tests"
exit "$types"
