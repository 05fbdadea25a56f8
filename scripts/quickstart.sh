#!/usr/bin/env bash
# The quickstart: set up, then prune a ViT with several routings and print GFLOPs and measured images/s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python quickstart.py "$@"
