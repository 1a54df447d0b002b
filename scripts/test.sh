#!/usr/bin/env bash
# The whole test suite on a fresh machine: makes/reuses a venv, installs synthq-hf with the extras the tests
# need (the first install compiles llama.cpp for llama-cpp-python: ~12 min on 2 cores; pip caches the wheel),
# checks style, runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SYNTHQ_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "installing into $VENV (the first install compiles llama.cpp: ~12 min on 2 cores)" >&2
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq -e ".[local,topics,preferences,ray,dev]"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest "$@"
