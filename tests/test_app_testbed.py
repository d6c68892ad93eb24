"""The app on the shipped testbed (`hicache/testbeds/weights/flux_shapes/`): loads with from_pretrained, renders,
checks. The testbed ships with the package, so these tests never skip."""

from hicache.app.testing import run_overrides


def test_testbed_experiment_smoke_run_with_checker(tmp_path):
    [summary] = run_overrides(["experiment=testbed_hicache", "data.limit=2", "sampling.steps=8", "logger=none",
                               "speed.warmup=false", "cache.interval=3", "cache.warmup=2", f"paths.outputs={tmp_path}"])
    assert summary["model"] == "testbed" and summary["num_outputs"] == 2
    assert 0.0 <= summary["checker"] <= 1.0 and 0.0 <= summary["reference_checker"] <= 1.0
    assert summary["psnr"] > 0 and summary["flops_speedup"] > 1.2
    assert (tmp_path / "testbed_hicache" / summary["run"] / "images" / "00001.png").is_file()
