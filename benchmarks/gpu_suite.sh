#!/usr/bin/env bash
# The GPU suite: run from the repo root on a machine with a GPU and a CUDA toolkit, no internet.
#   OUT=/some/dir bash benchmarks/gpu_suite.sh
# Builds the extension in place with the CUDA kernels, checks the build, runs the tests, runs every
# CUDA op under compute-sanitizer, and runs every benchmarks/bench_*.py. Writes few files to $OUT:
# build.log, tests.log, sanitizer.log, bench.log and the results the benchmarks produced (packed
# into results.tar.gz when more than four). Every step runs even if an earlier one failed; the exit
# status is non-zero if any failed.
# Environment: OUT (default ./gpu-suite-out), PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0),
# CUDA_HOME (else setup.py finds the toolkit from the nvcc on PATH), BENCH_ARGS (extra arguments
# for every benchmark script, e.g. "--quick").
set -euo pipefail
export PYTHONUNBUFFERED=1

OUT=${OUT:-$PWD/gpu-suite-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START_MARK=$(mktemp)
SCRATCH=$(mktemp -d)
trap 'rm -rf "$START_MARK" "$SCRATCH"' EXIT
failed=()

# step NAME CMD...: runs CMD, records NAME as failed if it fails, never stops the script.
step() {
  local name=$1
  shift
  echo
  echo "=== $name ($(date -u +%H:%M:%S))"
  if "$@"; then
    echo "=== $name: ok"
  else
    echo "=== $name: FAILED (exit $?)"
    failed+=("$name")
  fi
}

environment() {
  nvidia-smi || echo "nvidia-smi failed or not found"
  "$PY" --version
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "no nvcc on PATH"; fi
  echo "CUDA_HOME=${CUDA_HOME:-(unset)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}"
}

if [[ -z "${CUDA_HOME:-}" ]] && ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
fi

build() {
  export GRADSTATS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  {
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . ||
      { echo "pip install -e failed; trying setup.py build_ext --inplace"
        "$PY" setup.py build_ext --inplace; }
  } 2>&1 | tee "$OUT/build.log"
}

check_build() {
  "$PY" -c '
import sys, torch, gradstats
info = gradstats.build_info()
print(info)
sys.exit(0 if info["cuda_compiled"] and torch.cuda.is_available() else 1)' 2>&1 |
    tee -a "$OUT/build.log"
}

tests() {
  "$PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log"
}

# Every CUDA op, every strategy, float32 / float16 / float64, odd sizes, non-contiguous input,
# and enough examples to take more than one scratch chunk.
cat > "$SCRATCH/sanitize_ops.py" <<'EOF'
import torch
import gradstats
from gradstats import reference

torch.manual_seed(0)
cases = [(7, (), 33, 17), (1, (), 5, 3), (5, (9,), 24, 40), (3, (4, 6), 16, 8), (1, (13,), 10, 12),
         (120, (2,), 768, 768)]
for dtype in (torch.float32, torch.float16, torch.float64):
    tol = {torch.float16: 2e-2, torch.float32: 1e-3, torch.float64: 1e-9}[dtype]
    for B, mid, d_in, d_out in cases:
        A = torch.randn(B, *mid, d_in, device="cuda", dtype=dtype)
        G = torch.randn(B, *mid, d_out, device="cuda", dtype=dtype)
        if mid:  # a non-contiguous view too
            A2 = torch.randn(B, *mid, 2 * d_in, device="cuda", dtype=dtype)[..., ::2]
            inputs = [(A, G), (A2, G)]
        else:
            inputs = [(A, G)]
        T = 1
        for m in mid:
            T *= m
        for a, g in inputs:
            ref_w, ref_b = reference.linear_norms(a, g)
            for s in ["auto", "gram", "direct"] + (["outer"] if T == 1 else []):
                w, b = gradstats.linear_norms(a, g, s)
                dW, db, fw, fb = gradstats.linear_fused(a, g, s)
                torch.cuda.synchronize()
                for x, r in ((w, ref_w), (b, ref_b), (fw, ref_w), (fb, ref_b)):
                    err = ((x.double() - r).abs() / r.abs().clamp_min(1e-30)).max().item()
                    assert err < tol, (dtype, B, mid, d_in, d_out, s, err)
print("sanitizer script: all ops ran and matched the reference")
EOF

sanitizer() {
  local cs
  cs=$(command -v compute-sanitizer || true)
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    [[ -z "$cs" && -n "$d" && -x "$d/bin/compute-sanitizer" ]] && cs="$d/bin/compute-sanitizer"
  done
  if [[ -z "$cs" ]]; then
    echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer.log"
    return 0
  fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
  local rc=0
  echo "--- memcheck ($cs)" | tee "$OUT/sanitizer.log"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 1 \
    "$PY" "$SCRATCH/sanitize_ops.py" 2>&1 | tee -a "$OUT/sanitizer.log" || rc=1
  echo "--- racecheck (the gradstats kernels only)" | tee -a "$OUT/sanitizer.log"
  "$cs" --tool racecheck --kernel-name kns=gradstats --error-exitcode 1 \
    "$PY" "$SCRATCH/sanitize_ops.py" 2>&1 | tee -a "$OUT/sanitizer.log" || rc=1
  return "$rc"
}

benchmarks() {
  local f rc=0
  : > "$OUT/bench.log"
  for f in benchmarks/bench_*.py; do
    [[ -e "$f" ]] || continue
    echo "--- $f" | tee -a "$OUT/bench.log"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    "$PY" "$f" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" || rc=1
  done
  echo "--- benchmarks/run_suite.py (full GPT-2 small on the GPU)" | tee -a "$OUT/bench.log"
  "$PY" benchmarks/run_suite.py --device cuda 2>&1 | tee -a "$OUT/bench.log" || rc=1
  # Results written by this run: copied when few, packed otherwise ($OUT returns at most 8 files).
  local produced=()
  while IFS= read -r -d '' f; do produced+=("$f"); done < <(
    find benchmarks/results -type f -newer "$START_MARK" -print0 2>/dev/null)
  if ((${#produced[@]} == 0)); then
    echo "no benchmark results were written" | tee -a "$OUT/bench.log"
  elif ((${#produced[@]} <= 4)); then
    cp "${produced[@]}" "$OUT/"
  else
    tar -czf "$OUT/results.tar.gz" "${produced[@]}"
  fi
  return "$rc"
}

step environment environment
step build build
step check_build check_build
step tests tests
step sanitizer sanitizer
step benchmarks benchmarks

echo
if ((${#failed[@]})); then
  echo "GPU suite: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "GPU suite: all steps passed"
