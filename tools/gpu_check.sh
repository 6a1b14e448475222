#!/usr/bin/env bash
# One call on the lent GPU machine for a focused change: install the carried wheels (.whl/: transformers and the
# sm_90 mamba_ssm / causal_conv1d wheels that benchmarks/gpu_run.sh built), run the GPU tests selected by a pytest
# -k expression, then benchmarks/experiments.py with the given arguments, all logged to OUT_DIR/log.txt.
#   bash tools/gpu_check.sh OUT_DIR "PYTEST -k EXPRESSION" "EXPERIMENTS ARGS" [TEST_TIMEOUT_S] [BUDGET_S]
# ("none" for either part skips it). E.g.
#   bash tools/gpu_check.sh $OUT "deferred or defers" "--part decode --batches 1,8 --variants fp32,bf16" 240 570
set -uo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ] || [ $# -lt 3 ]; then sed -n 2,7p "$0"; exit 0; fi
OUT=$1; SELECT=$2; EXP_ARGS=$3; TEST_T=${4:-240}; BUDGET=${5:-570}
deadline=$(( $(date +%s) + BUDGET ))
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"; LOG="$OUT/log.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
if [ "$SELECT" != "none" ]; then
  timeout "$TEST_T" python3 -m pytest -p no:cacheprovider tests/test_gpu_fast_path.py tests/test_fused_decode.py \
    -k "$SELECT" -v -rfE --tb=short 2>&1 | tee "$OUT/pytest.txt" | grep -v " PASSED" | tail -60 | tee -a "$LOG"
  echo "$(grep -c " PASSED" "$OUT/pytest.txt") passed (each test's line: $OUT/pytest.txt)" | tee -a "$LOG"
fi
left=$(( deadline - $(date +%s) ))
echo "experiments get ${left} s" | tee -a "$LOG"
if [ "$EXP_ARGS" != "none" ] && [ "$left" -gt 30 ]; then
  # eval: quoted words in EXPERIMENTS ARGS (e.g. --env='A=1 B=2;C=3') stay one argument
  eval "timeout $left python3 benchmarks/experiments.py $EXP_ARGS" 2>&1 | grep -v "Warning\|warn(" | tee -a "$LOG"
fi
