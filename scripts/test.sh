#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
# The oldest transformers pyproject.toml admits, beside (not in) the environment: the export test
# loads an export with it too. Only transformers and the two packages it pins are installed there;
# everything else (torch, numpy, safetensors) comes from .venv.
oldest="$(dirname "$FLASHLM_PY")/../transformers-oldest"
if [ ! -d "$oldest/transformers" ]; then
    "$FLASHLM_PY" -m pip install -q --no-deps --target "$oldest" \
        "transformers==4.46.3" "tokenizers==0.20.3" "huggingface-hub==0.26.5"
fi
export FLASHLM_TRANSFORMERS_OLDEST="$(cd "$oldest" && pwd)"
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
