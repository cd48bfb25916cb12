#!/usr/bin/env bash
# The one-command GPU check: the CUDA tests, then benchmarks/gpu_check.py, results under OUT.
#
# Prepare on a machine with a package index (the GPU machine has none), once per checkout:
#     bash benchmarks/gpu_wheels.sh            # wheels/ (git-ignored, < 1 MiB): webdataset, pycocotools, fvcore, ...
# Then on the GPU machine (Python 3.12, CUDA torch), from the repository root, with wheels/ copied along
# (the device tool: carry ["wheels"]):
#     pip install --no-index --no-deps wheels/*.whl && pip install --no-deps --no-build-isolation -e . \
#         && bash benchmarks/gpu_check.sh "$OUT"
# Writes OUT/pytest_cuda.log, OUT/pytest_cuda.xml, OUT/gpu_check.json and OUT/gpu_check.log in about
# 8 minutes (a stage that would pass the deadline is skipped and named in the JSON). Without a GPU
# the CUDA tests are skipped and gpu_check.py runs the same stages at tiny sizes on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$(date +%s)
timeout 240 "$PY" -m pytest -m cuda -q tests/test_cuda.py --junitxml "$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log"
LEFT=$(( 470 - ($(date +%s) - START) ))
"$PY" benchmarks/gpu_check.py --out "$OUT" --deadline "$LEFT" 2>&1 | tee "$OUT/gpu_check.log"
echo "total $(( $(date +%s) - START )) s; results in $OUT/gpu_check.json"
