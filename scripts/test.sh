#!/usr/bin/env bash
# The test command: set up, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CUDA_VISIBLE_DEVICES="" .venv/bin/python -m pytest -q "$@"
