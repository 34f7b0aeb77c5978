#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
set +e
# PYTHONSAFEPATH keeps python -m from putting the repository root first on sys.path: the tests
# import flashlm as installed (kernels/ mapped to flashlm.kernels by pyproject.toml), as users do.
PYTHONSAFEPATH=1 "$FLASHLM_PY" -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    exit 1
fi
exit "$status"
