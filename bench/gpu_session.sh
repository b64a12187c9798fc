#!/usr/bin/env bash
# The GPU runs, one stage per call, for a lent GPU machine (each stage fits a 10-minute command).
#
#   bash bench/gpu_session.sh tests     # the whole suite on CUDA (Triton compiled, not interpreted; CUDA multi-tensor ops)
#   bash bench/gpu_session.sh ops       # bench_linear_ce.py (with Liger-Kernel and cut-cross-entropy) and bench_sam.py
#   bash bench/gpu_session.sh e2e-1b    # bench/e2e.py --model-size 1b
#   bash bench/gpu_session.sh e2e-8b    # bench/e2e.py --model-size 8b (does NPO+SAM+ILU fit one GPU?)
#
# Peers that the machine lacks travel as wheels in .whl/ (ignored by git; see the device tool's
# README), e.g. liger-kernel and cut-cross-entropy, both pure-Python wheels; they go on PYTHONPATH
# before the package is installed, so a carried setuptools serves the build too. Results files land in
# bench/results/ (commit them) and, when $OUT is set, are copied there with the logs.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:?stage: tests | ops | e2e-1b | e2e-8b}"
out="${OUT:-}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# pyproject's license expression needs setuptools >= 77 (no index there: carry its wheel in .whl/ if older)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null ||
  { echo "editable install failed: is setuptools >= 77 there? carry its wheel in .whl/" >&2; exit 1; }
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
marker=$(mktemp)  # results written after this are this stage's

log="${out:-/tmp}/gpu-$stage.log"
case "$stage" in
  tests) python3 -m pytest -q -x tests 2>&1 | tee "$log" ;;
  ops) { python3 bench/bench_linear_ce.py && python3 bench/bench_sam.py; } 2>&1 | tee "$log" ;;
  e2e-1b) python3 bench/e2e.py --model-size 1b 2>&1 | tee "$log" ;;
  e2e-8b) python3 bench/e2e.py --model-size 8b --steps 5 --warmup 2 2>&1 | tee "$log" ;;
  *) echo "unknown stage $stage (tests | ops | e2e-1b | e2e-8b)" >&2; exit 2 ;;
esac
if [ -n "$out" ]; then
  # the new results files and the regenerated table (at most 8 files come back)
  find bench/results -type f -newer "$marker" -exec cp {} "$out/" \;
  cp bench/RESULTS.md "$out/"
fi
