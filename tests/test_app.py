"""The experiment app end to end on the random tiny FLUX pipeline (seconds per run)."""

import json

import pytest

from hicache.app.testing import TINY_OVERRIDES, run_overrides
from hicache.app.tables import render


def test_single_run_writes_images_metrics_and_summary(tmp_path):
    [summary] = run_overrides([*TINY_OVERRIDES, "name=one", f"paths.outputs={tmp_path}", "cache=hicache",
                               "cache.interval=2", "cache.warmup=1", "speed.flops=true"])
    run_dir = tmp_path / "one" / summary["run"]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["00000.png", "00001.png"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert all(r["psnr"] > 10 and 0 < r["ssim"] <= 1 for r in records)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["method"] == "hicache" and on_disk["num_outputs"] == 2
    # 4 steps, full at 0, 2: the transformer runs half the time, so FLOPs drop by close to 2x
    assert on_disk["full_steps"] == [0, 2]
    assert 1.5 < on_disk["flops_speedup"] <= 2.0
    assert "| HiCache |" in render(tmp_path)


def test_jobs_of_one_process_share_the_pipeline_and_leave_it_uncached(tmp_path, monkeypatch):
    import hicache.app.pipelines as pipelines

    loads = []
    real_load = pipelines._load
    monkeypatch.setattr(pipelines, "_load", lambda *a: loads.append(1) or real_load(*a))
    pipelines.forget_pipelines()
    base = [*TINY_OVERRIDES, "name=share", f"paths.outputs={tmp_path}"]
    run_overrides([*base, "cache=hicache", "cache.interval=2", "cache.warmup=1"])
    [uncached] = run_overrides([*base, "cache=none"])
    assert len(loads) == 1
    assert uncached["psnr"] == float("inf")  # the kept pipeline has no hooks left: bit-identical to the reference
