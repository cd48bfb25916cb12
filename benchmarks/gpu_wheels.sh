#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels the GPU machine lacks, for CPython 3.12 on
# manylinux x86_64, into a git-ignored folder that travels with the checkout (see gpu_check.sh).
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # default: wheels/
#
# The GPU machines have torch (CUDA), numpy, pillow, pyyaml, typer, rich, sentencepiece, pytest and
# pyarrow, but no webdataset, pycocotools or fvcore. fvcore publishes only a source archive, so it
# is built here into a pure-Python wheel. Everything is installed there with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-wheels}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# binary wheels for the target interpreter, whatever this machine runs
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DIR" \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    pycocotools
# pure-Python dependencies (py3-none-any wheels)
"$PY" -m pip download -q --no-deps --only-binary=:all: --dest "$DIR" \
    webdataset braceexpand iopath yacs tabulate termcolor portalocker tqdm typing_extensions
# fvcore: source only on PyPI; a pure-Python package, so its wheel works on any CPython 3
"$PY" -m pip wheel -q --no-deps --wheel-dir "$DIR" fvcore
ls -l "$DIR"
du -sh "$DIR"
