"""`experiments/bench_cache.py` runs end to end (on a toy-sized model; the real run is a benchmark)."""

import os
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
    # the floor (the paper's cached step without the cache's own work) is measured for the caching core's rows only
    floors = [(row.split("|")[14].strip(), row.split("|")[15].strip()) for row in rows[1:]]
    assert all(float(ms) > 0 and float(ratio) > 0 for ms, ratio in floors[:3])
    assert floors[3:] == [("n/a", "n/a")] * 2


def test_floor_step_runs_what_a_cached_step_runs():
    """The benchmark's floor (the cached step's own work, with stored outputs patched in as plain forwards) computes
    exactly what the hooked FORA cached step after the same full step computes, so its time is a fair lower bound."""
    import importlib.util

    import torch

    import hicache

    spec = importlib.util.spec_from_file_location("bench_cache", REPO / "experiments" / "bench_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build_transformer(heads=1, double=2, single=2)
    inputs = bench.make_inputs(16, text_tokens=8)
    full_t, cached_t = torch.tensor([0.9]), torch.tensor([0.7])
    with torch.inference_mode(), bench.floor_forwards(model, inputs, full_t):
        floor = model(**inputs, timestep=cached_t).sample
    uncached = model(**inputs, timestep=cached_t).sample  # patches removed: the model computes as before
    hicache.apply_cache(model, hicache.CacheConfig("fora", interval=2, warmup=1), "flux")
    with torch.inference_mode():
        outs = []
        for t in (full_t, cached_t):
            with model.cache_context("cond"):
                outs.append(model(**inputs, timestep=t).sample)
    hicache.remove_cache(model)
    assert torch.equal(floor, outs[1])
    assert not torch.equal(floor, uncached)
    with torch.inference_mode():
        assert torch.equal(model(**inputs, timestep=cached_t).sample, uncached)


def test_bench_cache_factor_dtype_and_no_floor():
    proc = subprocess.run(
        [sys.executable, "experiments/bench_cache.py", "--steps", "6", "--tokens", "16", "--heads", "1", "--double", "1",
         "--single", "1", "--warmup", "1", "--threads", "1", "--quick", "--no-floor", "--factor-dtype", "bfloat16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bfloat16 factors" in proc.stdout.splitlines()[0]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| hicache")]
    assert len(rows) == 1 and [c.strip() for c in rows[0][14:16]] == ["n/a", "n/a"]


def test_bench_cache_rejects_an_unknown_factor_dtype_in_one_line():
    proc = subprocess.run([sys.executable, "experiments/bench_cache.py", "--factor-dtype", "int8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "argument --factor-dtype: invalid choice: 'int8'" in proc.stderr


def test_full_size_benchmark_path_on_cpu_at_one_layer():
    """`--full-size flux-dev` as on a GPU (published config, random weights, the paper's methods), shrunk to one
    double and one single block, a 64x64 image and 8 text tokens so that it runs on a CPU."""
    proc = subprocess.run(
        [sys.executable, "experiments/bench_cache.py", "--full-size", "flux-dev", "--device", "cpu", "--layers", "1",
         "--height", "64", "--width", "64", "--text-tokens", "8", "--steps", "3", "--intervals", "2", "--warmup", "1",
         "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's hicache, whichever is installed
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("flux-dev: 0.55B parameters (random, float32), 64x64, 8 text tokens, 3 steps, cpu")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["uncached", "FORA N=2", "TaylorSeer O=2 N=2", "HiCache O=2 N=2"]
    for row in rows[2:]:  # full at 0 and 2 of 3 steps: ideal 1.5x; latency measured; cache memory counted
        assert row[1] == "2" and row[4] == "1.50x" and float(row[2]) > 0 and float(row[7]) >= 0
    assert all(row[6] == "n/a" for row in rows[1:])  # peak memory: CUDA only
