"""scripts/bench/scale.py's CPU dry run: parts 1 (FSDP2 at 1 and 2 processes) and 2 (ring
context parallelism over 2 processes against one process at the same tokens per process), end
to end through `accelerate launch`, at the smallest size; checks the JSON rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_writes_rows_with_efficiency(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "bench" / "scale.py"), "--cpu-dry-run", "--parts", "1", "2",
           "--methods", "fsdp2", "ring", "accel_cp", "--contexts", "256", "--docs", "dense", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    rows = {r["id"]: r for r in data["rows"]}
    assert set(rows) == {"p1_debug_fsdp2_n1", "p1_debug_fsdp2_n2", "p2_single_dense_128", "p2_ring_dense_n2_256",
                         "p2_accel_cp_dense_n2_256"}
    for key in ("p1_debug_fsdp2_n1", "p1_debug_fsdp2_n2", "p2_single_dense_128", "p2_ring_dense_n2_256"):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_gpu"] == r["tokens_per_s"] / r["gpus"]
        assert r["steps_logged"] == 3 and all(x > 0 for x in r["losses"])
    one, two = rows["p1_debug_fsdp2_n1"], rows["p1_debug_fsdp2_n2"]
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
    ring, single = rows["p2_ring_dense_n2_256"], rows["p2_single_dense_128"]
    assert ring["vs_one_gpu"] == ring["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
    assert rows["p2_accel_cp_dense_n2_256"]["status"] == "unavailable"  # Accelerate's CP needs CUDA
    assert (tmp_path / "scale.md").read_text().startswith("Scaling over GPUs")
