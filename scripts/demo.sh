#!/usr/bin/env bash
# The main job on built-in defaults: fine-tune SmolLM2-135M on MovieLens TALLRec data, erase, retrain, compare.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
exec .venv/bin/llmeraser demo "$@"
