#!/usr/bin/env bash
# Creates (once) the virtual environment .venv with flashlm and its test extras installed.
# Sourced by scripts/quickstart.sh and scripts/test.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLASHLM_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.flashlm-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$py" -m pip install -q --upgrade pip
    # torch first, pinned, so that the dependency resolver does not pull a multi-GB build:
    # on a CPU machine this is the CPU wheel. Override with FLASHLM_TORCH_SPEC.
    if ! "$py" -c "import torch" 2>/dev/null; then
        "$py" -m pip install -q "${FLASHLM_TORCH_SPEC:-torch==2.13.0}"
    fi
    "$py" -m pip install -q -e "$root[test]"
    touch "$stamp"
fi
export FLASHLM_PY="$py"
