#!/usr/bin/env bash
# The main job on the embedded default: installs synthq-hf with the local llama.cpp server (first install compiles
# llama.cpp: ~12 min on 2 cores), then runs the `demo` recipe — bundled seeds → keywords → BM25 search → grounded
# demonstrations; bundled corpus (streamed) → new instructions → scores → threshold filter — with SmolLM2-135M and
# writes a Hub-layout dataset folder with its card. Extra arguments go to `synthq run demo` (e.g. --limit 3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SYNTHQ_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "installing into $VENV (the first install compiles llama.cpp: ~12 min on 2 cores)" >&2
"$VENV/bin/python" -m pip install -qq --upgrade pip
"$VENV/bin/python" -m pip install -qq -e ".[local,preferences]"
"$VENV/bin/synthq" run demo --overwrite "$@"
