# Sourced by scripts/demo and scripts/test: makes .venv with Python 3.11+ and installs drip and its
# dev tools from pyproject.toml, again whenever pyproject.toml changes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
  python=""
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python=$candidate; break
    fi
  done
  [[ -n $python ]] || { echo "drip needs Python 3.11 or newer on PATH" >&2; exit 1; }
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
stamp=.venv/.drip-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "installing drip and its dependencies into .venv (first run only)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -U "pip>=25.1"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e . --group dev
  echo "$want" > "$stamp"
fi
