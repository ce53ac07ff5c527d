#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine: torch, allo (editable, with its compiled extension) and,
# with --dev, what the tests need. Safe to rerun; it only installs what is missing.
#
#   ALLO_TORCH_VERSION  torch release to install (default 2.14.1: a CUDA build that also runs on CPU
#                       and brings triton)
#   ALLO_BUILD_CUDA     auto | 1 | 0, passed to setup.py (1: fail unless the CUDA kernels build)
#   CUDA_HOME           CUDA toolkit root; found automatically when unset
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    *) echo "setup_env.sh: unknown argument '$arg' (the only option is --dev)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" "torch==${ALLO_TORCH_VERSION:-2.14.1}" setuptools wheel pybind11 ninja

# The CUDA toolkit root. The nvcc on PATH may be a wrapper script whose folder is not the toolkit
# root (linking then fails with "cannot find -lcudart"), so look for a folder that has both.
if [ -z "${CUDA_HOME:-}" ]; then
  for root in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$root/bin/nvcc" ] && ls "$root"/lib64/libcudart.so* >/dev/null 2>&1; then
      export CUDA_HOME="$root"; break
    fi
  done
fi
# Without a GPU to ask, compile for Hopper only (otherwise torch compiles for every architecture).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi >/dev/null 2>&1; then
  export TORCH_CUDA_ARCH_LIST="9.0"
fi
export MAX_JOBS=${MAX_JOBS:-2}

"${pip[@]}" --no-build-isolation -e ".${extras}"
.venv/bin/python -c "import allo, allo.ops; print('allo', allo.__version__, '| extension:', allo.ops.extension_info())"
