"""`experiments/bench_cache.py` runs end to end (on a toy-sized model; the real run is a benchmark)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_cache_smoke_run():
    proc = subprocess.run(
        [sys.executable, "experiments/bench_cache.py", "--steps", "6", "--tokens", "16", "--heads", "1",
         "--double", "1", "--single", "1", "--intervals", "3", "--orders", "1", "--warmup", "1", "--threads", "1", "--repeats", "3",
         "--keep-freed-memory"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    labels = [row.split("|")[1].strip() for row in rows[1:]]
    assert labels == ["fora", "taylorseer", "hicache", "diffusers taylorseer", "diffusers taylorseer lite"]
    # 6 steps at N=3, warm-up 1: full at 0, 3 -> ideal 3.00x
    assert all("| 2 |" in row and "3.00x" in row for row in rows[1:4])
    # median step times: uncached / full / cached, all measured
    step_ms = [[float(v) for v in row.split("|")[11].split("/")] for row in rows[1:]]
    assert all(len(v) == 3 and all(ms > 0 for ms in v) for v in step_ms)
    # median page faults of an uncached step and of the cached run's full steps, counted
    faults = [[int(v) for v in row.split("|")[12].split("/")] for row in rows[1:]]
    assert all(len(v) == 2 and min(v) >= 0 for v in faults)
    assert "malloc keeps freed memory" in proc.stdout.splitlines()[0]
