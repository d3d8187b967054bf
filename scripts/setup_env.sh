#!/usr/bin/env bash
# Creates (or refreshes) a virtualenv with torch and builds gradstats into it.
#   scripts/setup_env.sh VENV [EXTRAS]
# Environment:
#   TORCH_SPEC            what to pip-install for torch (default torch==2.14.1)
#   TORCH_INDEX_URL       where from (default PyPI, whose Linux torch is the ~5.5 GB CUDA build)
#   GRADSTATS_CPU=1       a machine without a GPU: torch from the CPU-only index (~0.2 GB) unless
#                         TORCH_INDEX_URL says otherwise, and CPU kernels only
#   GRADSTATS_SKIP_CUDA=1 CPU kernels only (torch as given)
#   GRADSTATS_BUILD_DIR   the build folder (default build/<venv name>: each virtualenv keeps its
#                         own compiled objects, so rebuilding one does not rebuild the other)
#   TORCH_CUDA_ARCH_LIST  default 9.0 here;  FRESH=1 deletes VENV first.
# CUDA kernels are built whenever nvcc is found (and then must be), unless switched off above.
# Under CI=true the CPU-only switches are refused: CI compiles the CUDA kernels.
set -euo pipefail
venv=$(realpath -m "${1:?usage: scripts/setup_env.sh VENV [EXTRAS]}")
extras=${2:-}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}

if [[ "${GRADSTATS_CPU:-0}" == 1 ]]; then
  export GRADSTATS_SKIP_CUDA=1
  TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
fi
if [[ "${CI:-}" == true && "${GRADSTATS_SKIP_CUDA:-0}" == 1 ]]; then
  echo "scripts/setup_env.sh: CI=true compiles the CUDA kernels; GRADSTATS_CPU and" \
       "GRADSTATS_SKIP_CUDA are for local runs (unset them)" >&2
  exit 2
fi

if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$venv"; fi
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel ninja "pybind11>=2.12" numpy
"${pip[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC:-torch==2.14.1}"

if command -v nvcc >/dev/null 2>&1 && [[ "${GRADSTATS_SKIP_CUDA:-0}" != 1 ]]; then
  export GRADSTATS_FORCE_CUDA=1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
# setuptools reads DIST_EXTRA_CONFIG after setup.cfg: [build] build_base moves build_temp
# (ninja's objects), build_lib and the wheel's staging folder to this virtualenv's own folder.
name=$(basename "$venv")
build_dir=$(realpath -m "${GRADSTATS_BUILD_DIR:-build/${name#.}}")
mkdir -p "$build_dir"
printf '[build]\nbuild_base = %s\n' "$build_dir" > "$build_dir/setup-extra.cfg"
export DIST_EXTRA_CONFIG="$build_dir/setup-extra.cfg"
start=$(date +%s)
"${pip[@]}" install --no-build-isolation ".${extras:+[$extras]}"
echo "gradstats: build and install took $(( $(date +%s) - start )) s (build folder $build_dir)"

# Import from outside the source tree so the installed build is what runs.
(cd / && "$venv/bin/python" - <<'PY'
import os, gradstats
info = gradstats.build_info()
print("gradstats build:", info)
if os.environ.get("GRADSTATS_FORCE_CUDA") == "1" and not info["cuda_compiled"]:
    raise SystemExit("nvcc is present but the CUDA kernels were not compiled")
PY
)
