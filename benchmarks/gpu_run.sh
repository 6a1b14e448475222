#!/usr/bin/env bash
# One call on the lent GPU machine (torch 2.11, no network): install the carried transformers wheel, build or
# install mamba_ssm + causal_conv1d (tools/gpu_kernels.sh), run the GPU test, then the benchmark.
#   bash benchmarks/gpu_run.sh OUT_DIR "BENCHMARK ARGS" [TEST_TIMEOUT_S] [BENCH_TIMEOUT_S]
set -uo pipefail
OUT=$1; BENCH_ARGS=${2:-}; TEST_T=${3:-150}; BENCH_T=${4:-400}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/transformers-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -1
start=$(date +%s)
bash tools/gpu_kernels.sh .whl /tmp/site "$OUT/wheels" 2>&1 | grep -v "^ptxas\|^Warning\|warning #" | tail -20 | tee "$OUT/build.log"
echo "kernels ready in $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
python3 -c "
import traceback
try:
    import mamba_ssm, causal_conv1d; print('mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)
except Exception: traceback.print_exc()
import transformers; print('transformers', transformers.__version__, transformers.__file__)
from transformers.models.mamba2 import modeling_mamba2 as m
" 2>&1 | tee -a "$OUT/build.log"
if [ "$TEST_T" != "0" ]; then
  timeout "$TEST_T" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_fast_path.py 2>&1 | tail -25 | tee "$OUT/test.log"
fi
timeout "$BENCH_T" python3 benchmarks/generation.py --out "$OUT/benchmarks.json" $BENCH_ARGS 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/bench.log"
