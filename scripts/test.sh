#!/usr/bin/env bash
# The test command: sets up .venv (torch pinned first, so no CUDA build is pulled), installs the project, runs pytest offline.
# Without arguments it first runs the linter (ruff, configured in pyproject.toml) and fails on any finding; with
# arguments (a test path, -k ...) it runs just those tests, for quick checks while editing.
# Among the tests, tests/test_install.py builds the wheel, installs it into a fresh virtual environment and runs
# precompute -> train -> eval from a folder outside the checkout (what `pip install .` gives a new user).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then
  python -m ruff check .
fi
exec python -m pytest "$@"
