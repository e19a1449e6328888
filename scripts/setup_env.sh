# Sourced by test.sh and demo.sh: create .venv if absent, install torch pinned first, then the project.
# Pinning torch before anything else matters: an unpinned torch (or a package that pulls one) downloads a CUDA build.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)" >&2
  python -m pip install -q torch==2.13.0
fi
stamp=.venv/.distill-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing offline-distill and its dependencies" >&2
  python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
