#!/usr/bin/env bash
# The main job from nothing: a virtualenv, torch, the build, then `gradstats demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
bash scripts/setup_env.sh "$venv" demo
"$venv/bin/gradstats" demo "$@"
