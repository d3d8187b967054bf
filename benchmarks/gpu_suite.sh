#!/usr/bin/env bash
# The GPU suite in one call of at most ~5 minutes, so that a rerun fits a 15-minute lease:
#   OUT=/some/dir bash benchmarks/gpu_suite.sh        # on a GPU machine, from the repo root
#   bash benchmarks/gpu_suite.sh --dry-run            # anywhere: every stage's Python on the CPU,
#                                                     # tiny shapes; GPU-only stages skipped by name
# Stages, most telling first; each runs under its own time limit, never more than what is left
# of SUITE_BUDGET_S (default 285), and writes its table or log to $OUT as it ends (the kernel
# table after every shape):
#   env           nvidia-smi, python, torch, triton, nvcc, compute-sanitizer        -> suite.log
#   triton_tests  pytest -m cuda tests/test_triton.py: the compiled Triton kernels against
#                 the float64 reference (needs no C++ build)                        -> tests.log
#   build         pip install --no-build-isolation -e . with GRADSTATS_FORCE_CUDA=1,
#                 TORCH_CUDA_ARCH_LIST=9.0                                          -> build.log
#   kernels       bench_triton.py --stage kernels: fused dW + norms vs the cuBLAS dW GEMM, CUDA
#                 events, medians, T in {128, 512, 1024, 2048}; today's CUDA op where built
#                                                                           -> triton_kernels_*
#   gpt2          bench_triton.py --stage gpt2: HF GPT-2 small step, plain vs the monitor vs
#                 Opacus ghost clipping (benchmarks/wheels/opacus-*.whl if present) -> gpt2_step_*
#   cuda_tests    pytest -m cuda tests, test_triton.py excepted (already run)       -> tests.log
#   sanitizer     compute-sanitizer memcheck and racecheck (gradstats kernels only) on every
#                 Triton kernel and every CUDA op, small shapes                     -> sanitizer.log
# At most 8 files come back from $OUT: suite.log, tests.log, build.log, sanitizer.log and the
# two .md/.json pairs. No autotuning: the kernels' tiles are fixed per shape by the cost model.
# Every stage runs even when an earlier one failed; the exit status is non-zero if any failed.
# Environment: OUT (default ./gpu-suite-out), PYTHON (python3), SUITE_BUDGET_S (285),
# STAGES (a subset, e.g. "build cuda_tests sanitizer" for a rerun; the order stays the one below),
# TORCH_CUDA_ARCH_LIST (9.0), CUDA_HOME (else found from nvcc), WHEELS (benchmarks/wheels).
set -uo pipefail
export PYTHONUNBUFFERED=1

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
if ((DRY)) && [[ -z "${PYTHON:-}" && -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
OUT=${OUT:-$PWD/gpu-suite-out}
if ((DRY)) && [[ "$OUT" == "$PWD/gpu-suite-out" ]]; then OUT=$(mktemp -d); fi
mkdir -p "$OUT"
BUDGET=${SUITE_BUDGET_S:-285}
WHEELS=${WHEELS:-benchmarks/wheels}
START=$SECONDS
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$OUT/suite.log"
: > "$LOG"
failed=()

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME MAX_S CMD...: CMD under `timeout min(MAX_S, time left)`; a failure is recorded,
# never fatal; skipped by name when too little time is left.
stage() {
  local name=$1 max=$2
  shift 2
  if [[ -n "${STAGES:-}" && " $STAGES " != *" $name "* ]]; then return; fi
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  say ""
  if ((limit < 10)); then
    say "=== $name: skipped (out of time: ${left} s left of ${BUDGET} s)"
    failed+=("$name(skipped)")
    return
  fi
  say "=== $name (limit ${limit} s, at $((SECONDS - START)) s)"
  local t0=$SECONDS rc=0
  timeout --kill-after=5 "$limit" bash -o pipefail -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG" || rc=$?
  if ((rc == 0)); then
    say "=== $name: ok ($((SECONDS - t0)) s)"
  else
    if ((rc == 124)); then say "=== $name: TIMED OUT after ${limit} s"
    else say "=== $name: FAILED (exit $rc)"; fi
    failed+=("$name")
  fi
}

gpu_only() { say "skipped (GPU only, --dry-run): $*"; }

if [[ -z "${CUDA_HOME:-}" ]] && ! command -v nvcc >/dev/null &&
  [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
fi

env_stage() {
  if ((DRY)); then gpu_only "nvidia-smi"; else nvidia-smi || echo "nvidia-smi failed"; fi
  "$PY" --version
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)'
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "no nvcc on PATH"; fi
  echo "compute-sanitizer: $(command -v compute-sanitizer || echo none on PATH)"
}

triton_tests() {
  if ((DRY)); then  # the plumbing on the CPU: a few interpreter cases
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton.py \
      -k "float32-odd-T-cpu or test_opcheck or cost_model" 2>&1 | tee "$OUT/tests.log"
  else
    "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests/test_triton.py 2>&1 |
      tee "$OUT/tests.log"
  fi
}

bench() {  # bench STAGE
  if ((DRY)); then
    "$PY" benchmarks/bench_triton.py --dry-run --stage "$1" --out "$OUT"
  else
    "$PY" benchmarks/bench_triton.py --stage "$1" --out "$OUT"
  fi
}

build() {
  if ((DRY)); then
    gpu_only "the CUDA build (pip install --no-build-isolation -e . with GRADSTATS_FORCE_CUDA=1)"
    "$PY" -c 'import gradstats; print("existing build:", gradstats.build_info())'
    return
  fi
  export GRADSTATS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  {
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ||
      { echo "pip install -e failed; trying setup.py build_ext --inplace"
        "$PY" setup.py build_ext --inplace; }
    "$PY" -c 'import sys, torch, gradstats
info = gradstats.build_info(); print(info)
sys.exit(0 if info["cuda_compiled"] and torch.cuda.is_available() else 1)'
  } > "$OUT/build.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/build.log"
  return $rc
}

cuda_tests() {
  if ((DRY)); then gpu_only "pytest -m cuda tests"; return; fi
  "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests --ignore tests/test_triton.py 2>&1 |
    tee -a "$OUT/tests.log"
}

# Every Triton kernel (atomic and deterministic norms, sumsq, the split-tile second pass, bias,
# Gram) and every CUDA op, once each on small odd shapes, checked against the reference.
cat > "$SCRATCH/sanitize.py" <<'EOF'
import sys
import torch
from gradstats import kernels, reference

dev = sys.argv[1]
torch.manual_seed(0)
def close(x, ref, tol, what):
    err = ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, (what, err)
for dt, up in ((torch.bfloat16, dev == "cpu"), (torch.float16, False), (torch.float32, False)):
    shapes = ((3, 37, 40, 24), (1, 5, 5, 3)) + (((5, 70, 130, 200),) if dev == "cuda" else ())
    for B, T, d_in, d_out in shapes:
        A = torch.randn(B, T, 2 * d_in, device=dev).to(dt)[..., ::2]  # strided
        G = torch.randn(B, T, d_out, device=dev).to(dt)
        dw, db, nw, nb = reference.linear_fused(A, G)
        for det in (False, True):
            r = kernels.fused_linear(A, G, sumsq=True, deterministic=det, upcast=up or None,
                                     out_dtype=torch.float32, programs=3 if dev == "cpu" else 4)
            close(r.dW, dw, 1e-3, "dW"); close(r.weight_norms, nw, 1e-3, "norms")
            close(r.db, db, 1e-3, "db"); close(r.bias_norms, nb, 1e-3, "bias norms")
            close(kernels.gram_norms(A, G, deterministic=det, upcast=up or None), nw, 1e-3, "gram")
# autocast's mixed inputs: float32 A, half G (A rounded to G's dtype after the load)
for half in (torch.float16,) + ((torch.bfloat16,) if dev == "cuda" else ()):
    A, G = torch.randn(4, 33, 48, device=dev), torch.randn(4, 33, 40, device=dev).to(half)
    r = kernels.fused_linear(A, G)
    close(r.weight_norms, reference.linear_norms(A.to(half), G)[0], 1e-3, "mixed")
if dev == "cuda":
    import gradstats
    for dt in (torch.float32, torch.float16):
        for B, mid, d_in, d_out in ((7, (), 33, 17), (5, (9,), 24, 40), (3, (4, 6), 16, 8)):
            A = torch.randn(B, *mid, d_in, device=dev, dtype=dt)
            G = torch.randn(B, *mid, d_out, device=dev, dtype=dt)
            ref_w, ref_b = reference.linear_norms(A, G)
            for s in ["auto", "gram", "direct"] + (["outer"] if not mid else []):
                w, b = gradstats.linear_norms(A, G, s)
                _, _, fw, fb = gradstats.linear_fused(A, G, s)
                for x, r in ((w, ref_w), (b, ref_b), (fw, ref_w), (fb, ref_b)):
                    close(x, r, 2e-2, s)
torch.cuda.synchronize() if dev == "cuda" else None
print("sanitize.py: every kernel ran and matched the reference on", dev)
EOF

sanitizer() {
  if ((DRY)); then
    gpu_only "compute-sanitizer memcheck / racecheck; the script's checks on the CPU:"
    "$PY" "$SCRATCH/sanitize.py" cpu 2>&1 | tee "$OUT/sanitizer.log"
    return
  fi
  local cs rc=0
  cs=$(command -v compute-sanitizer || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    [[ -z "$cs" && -n "$d" && -x "$d/bin/compute-sanitizer" ]] && cs="$d/bin/compute-sanitizer"
  done
  if [[ -z "$cs" ]]; then
    echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
    return 0
  fi
  # without the caching allocator every tensor is its own allocation, so overruns are seen
  echo "--- memcheck ($cs), gradstats kernels only" | tee "$OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --kernel-name kns=gradstats \
    --error-exitcode 1 "$PY" "$SCRATCH/sanitize.py" cuda 2>&1 | tee -a "$OUT/sanitizer.log" || rc=1
  echo "--- racecheck, gradstats kernels only" | tee -a "$OUT/sanitizer.log"
  "$cs" --tool racecheck --kernel-name kns=gradstats --error-exitcode 1 \
    "$PY" "$SCRATCH/sanitize.py" cuda 2>&1 | tee -a "$OUT/sanitizer.log" || rc=1
  return $rc
}

gpt2() {
  local whl
  whl=$(ls "$WHEELS"/opacus-*.whl 2>/dev/null | head -n 1)
  if "$PY" -c 'import opacus' 2>/dev/null; then
    echo "opacus already importable"
  elif [[ -n "$whl" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SCRATCH/site" "$whl" &&
      export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}" &&
      echo "opacus installed from $whl"
  else
    echo "no $WHEELS/opacus-*.whl: the Opacus rows will say 'opacus not installed'"
  fi
  bench gpt2
}

# the stages run in `bash -c` under `timeout`: they see these functions and variables
export DRY PY OUT SCRATCH WHEELS LOG
export -f say gpu_only env_stage triton_tests bench build cuda_tests sanitizer gpt2

stage env 20 env_stage
stage triton_tests 60 triton_tests
stage build 110 build
stage kernels 60 bench kernels
stage gpt2 60 gpt2
stage cuda_tests 40 cuda_tests
stage sanitizer 60 sanitizer

say ""
say "GPU suite$( ((DRY)) && echo ' (dry run)'): $((SECONDS - START)) s of ${BUDGET} s," \
  "files in $OUT:"
ls "$OUT" | tee -a "$LOG"
if ((${#failed[@]})); then
  say "FAILED or skipped stages: ${failed[*]}"
  exit 1
fi
say "all stages passed"
