#!/usr/bin/env bash
# The test suite (offline; tiny random-init model; tests marked real_model use SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/python -m pytest -q --durations=20 "$@"
