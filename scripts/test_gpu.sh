#!/usr/bin/env bash
# The test suite on a GPU machine, in the environment that has flashlm installed (pip install -e .):
#   1. every module with the GPU visible: the kernels compiled, bf16 and long sequences on CUDA;
#   2. the CPU multi-process modules (gloo processes, kernels under the Triton interpreter) with
#      the GPU hidden, as CI runs them.
# Runs the modules in parallel when pytest-xdist is installed (FLASHLM_TEST_WORKERS, default 8).
# Extra arguments go to both pytest runs. Exit status: the first run's failure, else the second's.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${FLASHLM_PY:-python3}"
cpu_modules=(tests/test_context_parallel.py tests/test_fsdp.py)
parallel=()
if "$py" -c "import xdist" 2>/dev/null; then
    parallel=(-n "${FLASHLM_TEST_WORKERS:-8}")
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "scripts/test_gpu.sh: no CUDA device visible; on a CPU machine use scripts/test.sh" >&2
    exit 2
fi
echo "== 1/2: the suite on $("$py" -c "import torch; print(torch.cuda.get_device_name())")"
PYTHONSAFEPATH=1 "$py" -m pytest -q "${parallel[@]}" tests "$@"
first=$?
echo "== 2/2: CPU multi-process modules, GPU hidden: ${cpu_modules[*]}"
CUDA_VISIBLE_DEVICES="" PYTHONSAFEPATH=1 "$py" -m pytest -q "${parallel[@]}" "${cpu_modules[@]}" "$@"
second=$?
[ "$first" -ne 0 ] && exit "$first"
exit "$second"
