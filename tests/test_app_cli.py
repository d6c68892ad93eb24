"""`run.py` as users call it: the composed config, the one-line missing-weights error, a multirun
sweep logged to W&B offline and rendered as a table, and 2-process data-parallel sharding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hicache.app.testing import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]


def run_py(*args, env=None, timeout=300, launcher=(sys.executable,)):
    return subprocess.run([*launcher, str(REPO / "run.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_SILENT": "true", **(env or {})})


def test_cfg_job_prints_the_composed_config():
    result = run_py("experiment=flux_hicache", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    for line in ("name: flux_hicache", "  height: 1024", "  interval: 7", "  sigma: 0.5", "  hub_id: sayakpaul/drawbench"):
        assert line in result.stdout.splitlines()


def test_missing_weights_is_one_line(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HICACHE_OUTPUTS": str(tmp_path / "out")}  # the hub is unreachable here
    result = run_py("experiment=flux_hicache", env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: model flux_dev") and "model.path=" in lines[0] and "FLUX_DEV_PATH" in lines[0]


def test_missing_launcher_plugin_is_one_line():
    pytest.importorskip("omegaconf")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        pytest.skip("hydra-submitit-launcher is installed")
    except ImportError:
        pass
    result = run_py("-m", "experiment=testbed_table", "hydra/launcher=submitit_slurm")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: hydra/launcher=submitit_slurm needs the hydra-submitit-launcher package: pip install hydra-submitit-launcher"]


def test_multirun_sweep_logs_wandb_offline_and_renders_a_table(tmp_path):
    result = run_py("-m", "experiment=testbed_ablation_order", *TINY_OVERRIDES, "logger=wandb",
                    "variant=taylorseer_N7_O1,hicache_N7_O1_s0.5", f"paths.outputs={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent.name for p in (tmp_path / "testbed_ablation_order").glob("*/summary.json"))
    assert runs == ["hicache_N7_O1_s0.5_limit2", "taylorseer_N7_O1_limit2"]  # data.limit=2 is part of the name
    for run in runs:
        [offline] = (tmp_path / "testbed_ablation_order" / run / "wandb").glob("offline-run-*")
        assert list(offline.glob("run-*.wandb"))
    table = subprocess.run([sys.executable, "-m", "hicache.app.tables", str(tmp_path)], capture_output=True, text=True,
                           check=True, cwd=REPO).stdout
    assert "## testbed_ablation_order" in table
    assert any(line.startswith("| HiCache | 4 | 7 | 1 | 0.5 | 2 |") for line in table.splitlines())
    assert any(line.startswith("| TaylorSeer | 4 | 7 | 1 | - | 2 |") for line in table.splitlines())


def test_two_process_sharding_merges_on_rank_zero(tmp_path):
    result = run_py(*TINY_OVERRIDES, "data.limit=4", "name=shard", f"paths.outputs={tmp_path}",
                    launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = [p.parent for p in (tmp_path / "shard").glob("*/summary.json")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["index"], r["rank"]) for r in records] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_outputs"] == 4
    assert len(list((run_dir / "images").glob("*.png"))) == 4


def test_the_command_a_setup_error_suggests_then_runs(tmp_path):
    """After the missing-weights error, the same command with the hinted model.path must run: the
    failed attempt may not leave a claimed run folder behind."""
    from hicache.testbeds.tiny.flux import save_tiny_flux_pipeline

    out = tmp_path / "out"
    env = {"HF_HOME": str(tmp_path / "hf")}
    small = ("data=tiny_words", "data.limit=1", "sampling.steps=2", "sampling.height=16", "sampling.width=16",
             "metrics=fidelity", "logger=none", "speed.warmup=false", "speed.flops=false", f"paths.outputs={out}")
    failed = run_py("experiment=flux_hicache", *small, env=env)
    assert failed.returncode == 2 and "model.path=" in failed.stderr
    folder = save_tiny_flux_pipeline(tmp_path / "flux")
    fixed = run_py("experiment=flux_hicache", *small, f"model.path={folder}", "model.dtype=float32",
                   "model.device=cpu", "model.call_kwargs.max_sequence_length=16", env=env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert list(out.glob("flux_hicache/*/summary.json"))
