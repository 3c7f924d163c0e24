#!/usr/bin/env bash
# Create .venv (if missing) and install TuckerSegment with pinned dependencies.
# Re-runs are cheap: nothing is reinstalled unless the requirement files changed.
# Usage: scripts/setup.sh [--test]   (--test adds slicer-core and pytest)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
req=(-r requirements/requirements.txt)
if [[ "${1:-}" == "--test" ]]; then req+=(-r requirements/test.txt); fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv with $($python --version)" >&2
    "$python" -m venv .venv
fi
stamp=".venv/.tuckersegment-installed${1:-}"
digest="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
    exit 0
fi
echo "setup: installing pinned dependencies into .venv (torch 2.13.0, nnU-Net v2, tensorly; a few minutes the first time)" >&2
# One pip command with the constraints file: torch stays the 2.13.0 CPU wheel (never a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c requirements/constraints.txt "${req[@]}" -e .
echo "$digest" > "$stamp"
