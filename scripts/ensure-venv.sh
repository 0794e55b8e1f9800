# Sourced by train.sh and test.sh: create .venv on first use, reinstall when pyproject.toml changes.
# PYTHON picks the interpreter (default python3, 3.10 or newer); ALLDETECT_TORCH overrides the torch pins.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.alldetect-installed"
want=$(sha256sum "$root/pyproject.toml" | cut -c1-16)

_pip() {  # pip, minus this machine's harmless warnings about absent local index folders
  "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$venv/bin/python" ]; then
  py=${PYTHON:-python3}
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
    echo "[alldetect] needs Python 3.10 or newer as '$py' (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
  echo "[alldetect] creating the virtual environment in .venv (first use only; a few minutes)"
  "$py" -m venv "$venv" || { echo "[alldetect] could not create .venv (is the venv module installed?)" >&2; exit 2; }
fi

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! "$venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    case "$(uname -m)" in
      aarch64|arm64) torch_pins=${ALLDETECT_TORCH:-"torch==2.9.1 torchvision==0.24.1"} ;;
      *) torch_pins=${ALLDETECT_TORCH:-"torch==2.14.1 torchvision==0.29.1"} ;;
    esac
    echo "[alldetect] installing $torch_pins"
    # shellcheck disable=SC2086
    _pip install -q $torch_pins || { echo "[alldetect] installing torch failed (see above)" >&2; exit 2; }
  fi
  echo "[alldetect] installing alldetect and its dependencies (pip install -e .[dev,weights])"
  _pip install -q -e "$root[dev,weights]" || { echo "[alldetect] installing alldetect failed (see above)" >&2; exit 2; }
  echo "$want" > "$stamp"
fi
