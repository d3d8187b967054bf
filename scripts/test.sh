#!/usr/bin/env bash
# The whole test run on a fresh machine: a fresh virtualenv, torch, the build (CUDA kernels too
# where nvcc is present), then pytest. Benchmarks are not part of it.
# FRESH=0 reuses .venv-test and its build folder (an incremental build); GRADSTATS_CPU=1 takes
# the CPU-only torch and CPU kernels (see scripts/setup_env.sh for every switch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv-test}
start=$(date +%s)
FRESH=${FRESH:-1} bash scripts/setup_env.sh "$venv" test,demo
built=$(date +%s)
if command -v nvcc >/dev/null 2>&1 && [[ "${GRADSTATS_SKIP_CUDA:-0}" != 1 ]] \
    && [[ "${GRADSTATS_CPU:-0}" != 1 ]]; then
  export GRADSTATS_FORCE_CUDA=1  # the build above had to compile the CUDA kernels
fi
"$venv/bin/pytest" -q -p no:cacheprovider tests "$@"
echo "gradstats: setup+build $(( built - start )) s, tests $(( $(date +%s) - built )) s"
