#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, so no CUDA build is pulled in) and run the tests offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -ra "$@"
