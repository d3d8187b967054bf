#!/usr/bin/env bash
# The main job from nothing: a virtualenv, torch, the build, then `gradstats demo`.
# Rerunning it rebuilds incrementally in its own build folder (build/venv); on a machine
# without a GPU, GRADSTATS_CPU=1 takes the ~0.2 GB CPU-only torch instead of the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
bash scripts/setup_env.sh "$venv" demo
"$venv/bin/gradstats" demo "$@"
