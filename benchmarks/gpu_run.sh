#!/usr/bin/env bash
# One call on the lent GPU machine (torch 2.11, no network): install the carried wheels (transformers and its needs), build or
# install mamba_ssm + causal_conv1d (tools/gpu_kernels.sh), run the GPU test, then the benchmark, all inside
# BUDGET_S seconds (the device tool allows 600 per command).
#   bash benchmarks/gpu_run.sh OUT_DIR "BENCHMARK ARGS" [TEST_TIMEOUT_S] [BUDGET_S] [PYTEST -k EXPRESSION]
# (BENCHMARK ARGS "none": no benchmark; TEST_TIMEOUT_S 0: no tests; the -k expression selects GPU tests, all by default)
# Everything is logged to OUT_DIR/log.txt. Freshly built kernel wheels are split into 15 MiB parts under
# OUT_DIR/wheels/ (the tool returns files of at most 16 MiB); rejoin them with `cat NAME.part-* > NAME` into .whl/
# so that the next call installs them instead of compiling again.
set -uo pipefail
OUT=$1; BENCH_ARGS=${2:-}; TEST_T=${3:-150}; BUDGET=${4:-570}; SELECT=${5:-}
deadline=$(( $(date +%s) + BUDGET ))
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
mkdir -p "$OUT/wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -1; } | tee "$LOG"
start=$(date +%s)
prebuilt=$(ls .whl/mamba_ssm-*.whl 2>/dev/null)
bash tools/gpu_kernels.sh .whl /tmp/site "$OUT/wheels" 2>&1 | grep -v "^ptxas\|^Warning\|warning #" | tail -20 | tee -a "$LOG"
echo "kernels ready in $(( $(date +%s) - start )) s" | tee -a "$LOG"
if [ -z "$prebuilt" ]; then
  for w in "$OUT"/wheels/*.whl; do split -b 15m -d "$w" "$w.part-" && rm "$w"; done
else
  rm -rf "$OUT/wheels"
fi
python3 -c "
import traceback
try:
    import mamba_ssm, causal_conv1d; print('mamba_ssm', mamba_ssm.__version__, 'causal_conv1d', causal_conv1d.__version__)
    import selective_scan_cuda, causal_conv1d_cuda
except Exception: traceback.print_exc()
import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
" 2>&1 | tee -a "$LOG"
if [ "$TEST_T" != "0" ]; then
  timeout "$TEST_T" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_fast_path.py tests/test_fused_decode.py \
    ${SELECT:+-k "$SELECT"} 2>&1 | tail -25 | tee -a "$LOG"
fi
left=$(( deadline - $(date +%s) ))
echo "benchmark gets ${left} s" | tee -a "$LOG"
[ "$BENCH_ARGS" != "none" ] && [ "$left" -gt 30 ] && timeout "$left" python3 benchmarks/generation.py --out "$OUT/benchmarks.json" $BENCH_ARGS 2>&1 \
  | grep -v "Warning\|warn(" | tee -a "$LOG"
