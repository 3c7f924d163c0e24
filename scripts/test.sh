#!/usr/bin/env bash
# Set up .venv when needed, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" --test
cd "$root"
exec .venv/bin/python -m pytest "$@"
