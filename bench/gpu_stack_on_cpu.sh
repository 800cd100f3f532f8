#!/usr/bin/env bash
# The GPU machine's software stack, tested on this CPU before a GPU run spends device time on it.
# The GPU machines lent for bench/gpu_check.sh run Python 3.12, torch 2.11 (CUDA 13), triton 3.6 and numpy 2.5
# (their image's package list, 2026-11), while CI runs torch 2.13 and triton 3.9: an API that 2.11 or 3.6 lacks
# would first show on the GPU, in minutes that cannot be had again. This script makes a throwaway venv with
# those versions (torch's CUDA build runs on a machine without a GPU; its GPU tests skip), installs fastlm
# the way .device/run.sh builds it there (no build isolation), and runs the GPU check's dry run and the whole
# test suite, as .ci/run does. About 3 GB of wheels, 2 minutes to install and 16 to test on the 2-core CPU;
# run it alone (it loads both cores).
#
#   bash bench/gpu_stack_on_cpu.sh [VENV_DIR]     # default /tmp/fastlm-gpu-stack; PYTHON names a 3.12
#
# Exit status: 0 when the dry run and the tests pass, else the first failure's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/fastlm-gpu-stack}"
python="${PYTHON:-python3.12}"
stack=(torch==2.11.0 triton==3.6.0 numpy==2.5.2)  # the GPU machines' versions

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
    || { echo "gpu_stack_on_cpu: PYTHON must name a Python 3.12 (the GPU machines'), not '$python'" >&2; exit 2; }
[[ -d ../shared/data/wikitext-2 ]] \
    || { echo "gpu_stack_on_cpu: ../shared/data/wikitext-2 is missing; run it from a clone beside shared/" >&2; exit 2; }
rm -rf "$venv"
"$python" -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# The stack first, then fastlm with its test tools (pip keeps the stack's versions, which satisfy fastlm's
# bounds), built as on the GPU machine: no build isolation (the venv's setuptools, this machine's cmake).
python -m pip install -q "${stack[@]}" setuptools wheel
python -m pip install -q --no-build-isolation -e ".[dev]"
python -c 'import torch, triton, numpy, fastlm.kernels; print("torch", torch.__version__, "triton", triton.__version__,
"numpy", numpy.__version__, "cuda available:", torch.cuda.is_available())'

export FASTLM_WIKITEXT2="$(cd ../shared/data/wikitext-2 && pwd)" FASTLM_CACHE_DIR="$(mktemp -d)"
export FASTLM_REQUIRED_BACKENDS=reference,cudnn,script,triton,compile
dry="$(mktemp -d)"
trap 'rm -rf "$FASTLM_CACHE_DIR" "$dry"' EXIT
bash bench/gpu_check.sh --dry-run "$dry" > /dev/null || { cat "$dry/summary.txt"; exit 1; }
python -m pytest -q -ra -p no:cacheprovider
