#!/usr/bin/env bash
# Creates (or refreshes) a virtualenv with torch and builds gradstats into it.
#   scripts/setup_env.sh VENV [EXTRAS]
# Environment: TORCH_SPEC (default torch==2.14.1), TORCH_CUDA_ARCH_LIST (default 9.0 here),
# FRESH=1 to delete VENV first. CUDA kernels are built whenever nvcc is found, and then must be.
set -euo pipefail
venv=$(realpath -m "${1:?usage: scripts/setup_env.sh VENV [EXTRAS]}")
extras=${2:-}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$venv"; fi
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel ninja "pybind11>=2.12" numpy
"${pip[@]}" install "${TORCH_SPEC:-torch==2.14.1}"

if command -v nvcc >/dev/null 2>&1 && [[ "${GRADSTATS_SKIP_CUDA:-0}" != 1 ]]; then
  export GRADSTATS_FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
start=$(date +%s)
"${pip[@]}" install --no-build-isolation ".${extras:+[$extras]}"
echo "gradstats: build and install took $(( $(date +%s) - start )) s"

# Import from outside the source tree so the installed build is what runs.
(cd / && "$venv/bin/python" - <<'PY'
import os, gradstats
info = gradstats.build_info()
print("gradstats build:", info)
if os.environ.get("GRADSTATS_FORCE_CUDA") == "1" and not info["cuda_compiled"]:
    raise SystemExit("nvcc is present but the CUDA kernels were not compiled")
PY
)
