#!/usr/bin/env bash
# The test command: sets up .venv (torch pinned first, so no CUDA build is pulled), installs the project, runs pytest offline.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest "$@"
