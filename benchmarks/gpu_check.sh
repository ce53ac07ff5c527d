#!/usr/bin/env bash
# One-shot GPU session check (no network needed): build the extension with its CUDA kernels in
# place, run the test suite on the GPU, run every benchmarks/bench_*.py at full size with --json,
# then print a summary. Each step's failure is reported and the script goes on to the next one.
#
#   OUT=/some/dir benchmarks/gpu_check.sh     # results in $OUT (default: ./gpu_results)
#
# Environment: python3 with a CUDA build of torch; TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-./gpu_results}
mkdir -p "$out"
py=${PYTHON:-python3}
export ALLO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-8}
declare -a summary=()

step() {  # step NAME LOGFILE COMMAND...: run, log, record ok/FAILED with the time taken
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  echo "=== $name"
  "$@" >"$log" 2>&1
  local rc=$?
  tail -n 25 "$log"
  if [ $rc -eq 0 ]; then
    summary+=("ok      $(printf '%4ds' $((SECONDS - start)))  $name")
  else
    summary+=("FAILED  $(printf '%4ds' $((SECONDS - start)))  $name (exit $rc, log: $log)")
  fi
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  >>"$out/gpu.txt" 2>&1 || true
cat "$out/gpu.txt"

step "build allo._C with CUDA kernels" "$out/build.log" "$py" setup.py build_ext --inplace
step "extension loads" "$out/extension.log" "$py" -c "import allo.ops; print(allo.ops.extension_info())"
step "pytest (GPU tests included)" "$out/pytest.log" "$py" -m pytest -x -q -rs tests

for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name=$(basename "$bench" .py)
  # the alignment study trains tiny models on the CPU for half an hour: nothing for the GPU lease
  [ "$name" = bench_alignment ] && continue
  step "$name (full size)" "$out/$name.log" "$py" "$bench" --json "$out/$name.json"
done

echo
echo "=== summary (results in $out)"
printf '  %s\n' "${summary[@]}"
for bench in "$out"/bench_*.json; do
  [ -e "$bench" ] || continue
  "$py" - "$bench" <<'PY' || true
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"  {sys.argv[1]}")
for r in rows:
    speed = r.get("speedup_vs_baseline")
    mem = r.get("peak_bytes")
    print(f"    {r['case'][:48]:48s} {r['impl'][:18]:18s} {r['median_ms']:10.3f} ms"
          f"  {'-' if mem is None else f'{mem / 1e6:10.1f} MB'}"
          f"  x{'-' if speed is None else f'{speed:.2f}'}")
PY
done
