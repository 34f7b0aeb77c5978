#!/usr/bin/env bash
# The main job on a fresh machine: sets up .venv if needed, then trains the debug model on the
# bundled corpus (CPU when there is no GPU), evaluates it, exports it to a Hugging Face
# directory and prints a sample generated through transformers. Arguments go to quickstart.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup_env.sh"
cd "$root"
exec "$FLASHLM_PY" scripts/quickstart.py "$@"
