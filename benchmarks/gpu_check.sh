#!/usr/bin/env bash
# One-shot GPU session check, sized for a 15-minute lease (no network needed): run the Triton GPU tests
# while the extension builds with its CUDA kernels in place, then the extension's GPU tests, then
# bench_update/select/logprob/step at full size (alone on the GPU), a host-vs-kernel profile, the built-in
# allo-train task on the GPU, then the rest of the test suite if time is left, and print a short table last.
#
#   OUT=/some/dir benchmarks/gpu_check.sh
#
# Everything stays inside a wall-clock budget (GPU_CHECK_BUDGET_S, default 450 s): each step runs
# under `timeout` with what is left, and steps that no longer fit are skipped and listed, so the
# summary always prints. Results: $OUT/summary.txt and $OUT/gpu_check.tar.gz (every log and every
# bench JSON), both refreshed after each step, so a killed run still returns what it finished.
#
# Exit status: 0 when every step that ran passed, 1 when a step FAILED or TIMED OUT (after the summary and
# archive are written; steps skipped for the budget do not count), 2 when torch sees no CUDA GPU (it stops
# at once, unless QUICK=1).
#
# Environment: PYTHON (default python3, a CUDA build of torch), TORCH_CUDA_ARCH_LIST (default 9.0),
# ALLO_BUILD_CUDA (default 1: fail unless the CUDA kernels build; auto with QUICK=1 and no GPU), QUICK=1
# (benches with --quick: a plumbing check of this script on a CPU machine), GPU_CHECK_BUDGET_S.
# A follow-up run on a short lease can narrow it: GPU_CHECK_TRITON_TESTS, GPU_CHECK_EXTENSION_TESTS (test
# files), GPU_CHECK_BENCHES (bench names), GPU_CHECK_PROFILE=0 or GPU_CHECK_PROFILE_ONLY (profile_gpu.py's
# --only), GPU_CHECK_TRAIN=0 (no allo-train run), GPU_CHECK_REST (pytest node ids instead of the rest of the suite);
# GPU_CHECK_SWEEP=1 adds the launch-configuration sweeps to the profile (=update: only MaskedAdamW's).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-./gpu_results}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-450}
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
build_cuda_given=${ALLO_BUILD_CUDA:-}
export ALLO_BUILD_CUDA=${ALLO_BUILD_CUDA:-1} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-8} PYTHONUNBUFFERED=1
# The system compilers: the device image's CXX is a wrapper that links libstdc++ statically, which
# makes the extension's C++ exceptions crash the process (allo/_linkcheck.py; setup.py refuses it)
export CC=${ALLO_CC:-gcc} CXX=${ALLO_CXX:-g++}
# torch.kthvalue over 973M scores takes ~7 s a call (6955 ms on the H100 on 2026-11-26, see
# benchmarks/RESULTS.md): 40 s of a 15-minute lease for a baseline far behind; SELECT_SKIP= keeps it
select_skip=${SELECT_SKIP-kthvalue}
steps="$work/steps.txt"  # one line per finished step; a file, so steps run in the background count too
: >"$steps"

pack() {  # refresh what comes back: the summary so far and one archive of every log and JSON
  cp "$steps" "$out/summary.txt"
  tar -czf "$out/gpu_check.tar.gz.tmp" -C "$work" . 2>/dev/null && mv "$out/gpu_check.tar.gz.tmp" "$out/gpu_check.tar.gz"
}

step() {  # step NAME LIMIT_S COMMAND...: run under the budget, log to $work/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "SKIPPED        $name (budget of ${budget}s spent)" >>"$steps"
    pack
    return 1
  fi
  local log="$work/${name// /_}.log" start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  tail -n 15 "$log"
  if [ $rc -eq 0 ]; then
    echo "ok      $(printf '%4ds' $((SECONDS - start)))  $name" >>"$steps"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "TIMEOUT $(printf '%4ds' $((SECONDS - start)))  $name (limit ${limit}s)" >>"$steps"
  else
    echo "FAILED  $(printf '%4ds' $((SECONDS - start)))  $name (exit $rc)" >>"$steps"
  fi
  pack
  return $rc
}

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  "$py" - "$work/gpu_visible" <<'PY' 2>&1
import importlib, sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU VISIBLE")
if torch.cuda.is_available():  # the file says so to the script (no second torch import)
    open(sys.argv[1], "w").close()
for name in ("triton", "transformers", "accelerate"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
PY
  nvcc --version 2>&1 | tail -n 2
} >"$work/environment.txt"
cat "$work/environment.txt"
pack

summarize() {  # the summary (environment, steps, failed tests, bench tables) and the archive, as the last output
  {
    echo "=== environment"
    cat "$work/environment.txt"
    echo "=== steps (budget ${budget}s, used ${SECONDS}s; logs and JSON in $out/gpu_check.tar.gz)"
    sed 's/^/  /' "$steps"
    if [ -s "${ALLO_TEST_FAILURES:-}" ]; then
      echo "=== failed tests (tracebacks: test_failures.txt in the archive)"
      grep '^=== ' "$ALLO_TEST_FAILURES" | sed 's/^=== /  /'
    fi
    for bench in "$work"/bench_*.json; do
      [ -e "$bench" ] || continue
      "$py" - "$bench" <<'PY' || true
import json, os, sys
rows = json.load(open(sys.argv[1]))
print(f"=== {os.path.basename(sys.argv[1])}")
for r in rows:
    speed, mem = r.get("speedup_vs_baseline"), r.get("peak_bytes")
    print(f"  {r['case'][:40]:40s} {r['impl'][:22]:22s} {r['median_ms']:9.3f} ms"
          f" {'-' if mem is None else f'{mem / 1e6:9.1f} MB'} x{'-' if speed is None else f'{speed:.2f}'}")
PY
    done
  } >"$work/summary.txt" 2>&1
  cp "$work/summary.txt" "$out/summary.txt"
  tar -czf "$out/gpu_check.tar.gz" -C "$work" .
  cat "$out/summary.txt"
}

if [ ! -e "$work/gpu_visible" ]; then
  if [ "${QUICK:-0}" != 1 ]; then
    # on a CPU every step would run on (the GPU tests in Triton's interpreter, the benches at full size on
    # the CPU) and read as a GPU check
    echo "NO GPU         torch sees no CUDA GPU (environment above): stopped; QUICK=1 runs the CPU plumbing check" >>"$steps"
    summarize
    echo "gpu_check.sh: torch sees no CUDA GPU (PYTHON=$py); run it on a GPU machine, or with QUICK=1 for the CPU plumbing check" >&2
    exit 2
  fi
  # QUICK=1 on a CPU: the plumbing check builds the C++ kernels (ALLO_BUILD_CUDA=1 would fail the build)
  export ALLO_BUILD_CUDA=${build_cuda_given:-auto}
fi

pytest_args=(-q -rs -p no:cacheprovider)
# every failure's traceback as it happens (tests/conftest.py): a step cut by the budget never prints
# pytest's summary
export ALLO_TEST_FAILURES="$work/test_failures.txt"
"$py" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=240)
gpu_pytest_args=("${pytest_args[@]}")
# compiling the Triton kernels (~100 variants) is the slow part of the GPU tests and is single-threaded
# per kernel: spread the test files over processes when pytest-xdist is there (the device image has it)
"$py" -c "import xdist" 2>/dev/null && gpu_pytest_args+=(-n 12 --dist loadfile)
# the tests that exercise GPU code: every Triton kernel natively and the optimizer (these need no
# allo._C, so they run while it builds: compiling ~100 Triton variants is the slow part of them and
# uses other cores than the C++/CUDA build), then the CUDA extension's own tests once it is built
# (word-split on purpose: lists of paths)
triton_tests=(${GPU_CHECK_TRITON_TESTS:-tests/test_optim_kernels.py tests/test_optim_masked_adamw.py tests/test_optim_user_contract.py
              tests/test_select_triton.py tests/test_select_device_plan.py tests/test_select_boundary.py})
# (tests/test_select.py allocates masks through allo._C: after the build, not while it runs)
extension_tests=(${GPU_CHECK_EXTENSION_TESTS:-tests/test_logprob.py tests/test_logprob_fused.py tests/test_ops_losses_edges.py
                 tests/test_optim_compact_rows.py tests/test_select.py tests/test_optim_exactness.py
                 tests/test_select_exactness.py})

step "pytest Triton GPU tests" 200 "$py" -m pytest "${gpu_pytest_args[@]}" "${triton_tests[@]}" &
triton_pid=$!
built=0
if step "build allo._C with CUDA kernels" 200 "$py" setup.py build_ext --inplace &&
   step "extension loads" 60 "$py" -c "import allo.ops; print(allo.ops.extension_info())"; then
  built=1
  step "pytest extension GPU tests" 100 "$py" -m pytest "${gpu_pytest_args[@]}" "${extension_tests[@]}"
fi
wait "$triton_pid"  # the benchmarks need the GPU (and the cores) to themselves
# the alignment study trains tiny models on the CPU for half an hour: nothing for the GPU lease.
# bench_update and bench_select need no extension: they run even if the build failed
for name in ${GPU_CHECK_BENCHES:-bench_update bench_select bench_logprob bench_step}; do
  if [ $built = 0 ] && { [ $name = bench_logprob ] || [ $name = bench_step ]; }; then
    echo "SKIPPED        $name (allo._C did not build)" >>"$steps"
    continue
  fi
  args=("${quick[@]}" --json "$work/$name.json")
  [ "$name" = bench_select ] && [ -n "$select_skip" ] && args+=(--skip "$select_skip")
  # the improve step without the embedding/output-layer routing and with autocast's weight cache on
  # (allo_improve_before), in the same run
  [ "$name" = bench_step ] && args+=(--before)
  step "$name" 100 "$py" "benchmarks/$name.py" "${args[@]}"
done
# where the time of select and of an optimizer step goes (host vs kernels), for the record
# GPU_CHECK_SWEEP=1: also time the Triton kernels over launch configurations (select: TILE, BLOCK, warps,
# pipelining stages; MaskedAdamW: BLOCK, warps, and at 100% torch's fused kernel), about a minute more;
# GPU_CHECK_SWEEP=update (or select): that part's sweeps only
sweep=(--no-sweep)
[ "${GPU_CHECK_SWEEP:-0}" = 1 ] && sweep=()
[ "${GPU_CHECK_SWEEP:-0}" != 0 ] && [ "${GPU_CHECK_SWEEP:-0}" != 1 ] && sweep=(--sweep-parts "$GPU_CHECK_SWEEP")
[ "${GPU_CHECK_PROFILE:-1}" = 1 ] &&
  step "profile_gpu" $([ ${#sweep[@]} = 0 ] && echo 180 || echo 90) "$py" benchmarks/profile_gpu.py \
    --only "${GPU_CHECK_PROFILE_ONLY:-select,update,step-memory}" --trace-dir "$work" "${sweep[@]}"
# the whole pipeline on the GPU (the tests below run it on tiny models only if time is left): the built-
# in task end to end, bf16 autocast, Triton optimizer, CUDA log-prob kernels, routed output layer; a
# smaller task than the default (a smoke test of the GPU paths: 42 s on a 2-core CPU, the default 110 s)
[ $built = 1 ] && [ "${GPU_CHECK_TRAIN:-1}" = 1 ] && step "allo-train built-in task (GPU, bf16)" 120 "$py" -m allo.train.cli \
  --output_dir "$work/allo_output" --disable_tqdm --bf16 true --sft_steps 200 --num_train_problems 80 \
  --num_eval_problems 40 --num_samples 4
if [ $built = 1 ] && [ -n "${GPU_CHECK_REST:-}" ]; then
  rest=($GPU_CHECK_REST)
  step "pytest chosen tests" 300 "$py" -m pytest "${pytest_args[@]}" "${rest[@]}"
elif [ $built = 1 ]; then
  deselect=()
  for t in "${triton_tests[@]}" "${extension_tests[@]}"; do deselect+=(--ignore "$t"); done
  # in parallel processes too (run 3, one process: 113 of these 156 tests in 162 s, the allo-train ones
  # slowest); the small models leave the GPU's memory to spare
  # -vv (against -q): a line per test as it ends, so a run cut by the budget still names its failures
  step "pytest rest of the suite" 300 "$py" -m pytest "${gpu_pytest_args[@]}" -vv "${deselect[@]}" tests
fi
wait

summarize
# the summary alone said a step failed: the exit status says it too
failed=$(grep -cE '^(FAILED|TIMEOUT) ' "$steps")
if [ "$failed" -gt 0 ]; then
  echo "gpu_check.sh: $failed step(s) FAILED or TIMED OUT (see the steps above)" >&2
  exit 1
fi
