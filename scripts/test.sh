#!/usr/bin/env bash
# Set up .venv when needed, then run the test suite. Extra arguments go to pytest.
#   bash scripts/test.sh           the whole suite, in two test processes (pytest-xdist; CI runs this)
#   bash scripts/test.sh --quick   the quick tier for development, in one process: the engine's shape,
#                                  requests, parsing, docs, selection and geometry (nothing compressed or trained)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" --test
cd "$root"
if [[ "${1:-}" == "--quick" ]]; then
    shift
    exec .venv/bin/python -m pytest Testing/Python/engine/test_architecture.py Testing/Python/engine/test_docs.py \
        Testing/Python/slicer_module/test_requests.py Testing/Python/engine/test_models.py \
        Testing/Python/engine/test_selection.py Testing/Python/engine/test_crop.py \
        Testing/Python/engine/test_geometry.py Testing/Python/engine/test_methods.py \
        Testing/Python/packaging "$@"
fi
# a test file runs whole in one process (its module fixtures are made once), the two processes side by side
exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@"
