#!/usr/bin/env bash
# Build (or install) mamba_ssm + causal_conv1d for Hopper (sm_90 only) on a machine with nvcc, torch and no network.
#
#   bash tools/gpu_kernels.sh SRC_DIR SITE_DIR [WHEEL_OUT_DIR]
#
# SRC_DIR holds the sdists (`pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0`,
# with CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE set for pip's metadata step) and optionally
# already built wheels (*.whl), which are installed as they are. Both setup.py files hard-code nine GPU
# architectures and read no variable to narrow them: we patch the list down to sm_90 (and drop -lineinfo) before
# building, which cuts the build time and the wheel size by about 9×.
set -euo pipefail
SRC=$1; SITE=$2; WHEELS=${3:-/tmp/kernel_wheels}
mkdir -p "$SITE" "$WHEELS"
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
build() {  # one package's sdist -> an sm_90-only wheel in $WHEELS
  local name=$1 work dir start
  work=$(mktemp -d); tar xzf "$SRC"/${name}-*.tar.gz -C "$work"; dir=$(echo "$work"/${name}-*)
  sed -i 's|^    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI|    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]  # sm_90 only (patched)\n&|' "$dir/setup.py"
  sed -i 's|"-lineinfo",||' "$dir/setup.py"
  grep -q 'sm_90 only (patched)' "$dir/setup.py" || { echo "== $name: setup.py not patched"; return 1; }
  start=$(date +%s)
  python3 -m pip wheel -q --no-build-isolation --no-deps --no-index "$dir" -w "$WHEELS"
  echo "== $name: built in $(( $(date +%s) - start )) s"
}
# the two builds run side by side (an H100 machine, 16 cores: causal_conv1d ~400 s, mamba_ssm ~140 s one after the
# other): causal_conv1d has three .cu files and keeps few cores busy
pids=()
for name in causal_conv1d mamba_ssm; do
  if ls "$SRC"/${name}-*.whl >/dev/null 2>&1; then
    echo "== $name: installing the prebuilt wheel"; cp "$SRC"/${name}-*.whl "$WHEELS"/; continue
  fi
  build "$name" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
ls -la "$WHEELS"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
