#!/usr/bin/env bash
# The test suite (offline; tiny random-init model; tests marked real_model use SmolLM2-135M).
# Runs on pytest-xdist workers, one per CPU core up to 4 (TEST_WORKERS=N to choose; 0: in this process),
# each single-threaded (tests/conftest.py). --dist loadfile: a module's tests run on one worker (its
# module-scoped fixtures built once), except for the long tests of SPREAD_BY_TEST in tests/conftest.py,
# each sent to whichever worker is free. Extra arguments pass through to pytest (after these: -n 0 overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
cores=$(nproc 2>/dev/null || echo 2)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q --durations=20 -n "$workers" --dist loadfile "$@"
