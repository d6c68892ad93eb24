"""A run does what its name and table row say, or stops with one line (exit 2) saying what to change;
nothing is lost or left half claimed (issue 22, the app half)."""

import json
import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir

import hicache.app.runner as runner
from hicache.app.errors import SetupError
from hicache.app.results import RunDir
from hicache.app.tables import render
from hicache.app.testing import CONF_DIR, TINY_OVERRIDES, compose_config, run_overrides

REPO = Path(__file__).resolve().parents[1]


def one_line_exit(overrides, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_overrides(overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# -- 1. the row is what the cache group and the overrides say ----------------------------------------

def test_no_experiment_has_a_cache_block_that_would_beat_the_chosen_group():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        assert "cache" not in (yaml.safe_load(path.read_text()) or {}), path.name


def test_experiment_with_another_cache_group_runs_that_group(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose_config(["experiment=testbed_hicache", "cache=fora"])
    assert (cfg.cache.method, cfg.cache.label, cfg.cache.sigma) == ("fora", "FORA", None)
    [summary] = run_overrides([*TINY_OVERRIDES, "experiment=testbed_hicache", "cache=fora", "cache.interval=2",
                               "cache.warmup=1", f"paths.outputs={tmp_path}"])
    assert (summary["method"], summary["label"], summary["sigma"]) == ("fora", "FORA", None)
    assert summary["run"].startswith("fora_N2")


def test_an_override_may_not_change_the_groups_method(tmp_path, capsys):
    err = one_line_exit([*TINY_OVERRIDES, "cache=fora", "cache.method=hicache", f"paths.outputs={tmp_path}"], capsys)
    assert "cache=fora" in err and "cache=hicache" in err
    assert not list(tmp_path.rglob("fingerprint.json"))


def test_a_command_line_override_the_variant_would_replace_is_an_error(tmp_path, capsys):
    err = one_line_exit([*TINY_OVERRIDES, "experiment=testbed_table", "cache=fora", f"paths.outputs={tmp_path}"], capsys)
    assert "cache=fora" in err and "variant=hicache_N7_O2_s0.5" in err


def test_uncached_row_is_one_x_in_flops_and_latency(tmp_path):
    [summary] = run_overrides([*TINY_OVERRIDES, "experiment=testbed_hicache", "cache=none", "speed.flops=true",
                               f"paths.outputs={tmp_path}"])
    assert summary["method"] == "none" and summary["label"] == "original"
    assert summary["flops_speedup"] == 1.0 and summary["latency_speedup"] == 1.0
    assert summary["psnr"] == float("inf")


# -- 2. latency: both pipelines timed in this run ------------------------------------------------

def test_latency_pairs_are_timed_in_the_run_and_references_carry_no_time(tmp_path):
    job = [*TINY_OVERRIDES, "name=lat", "cache=fora", "cache.interval=2", "cache.warmup=1", "speed.latency_pairs=2",
           f"paths.outputs={tmp_path}"]
    [summary] = run_overrides(job)
    latency = json.loads((tmp_path / "lat" / summary["run"] / "latency.json").read_text())
    assert [p["index"] for p in latency["pairs"]] == [0, 1]
    assert summary["latency_pairs"] == 2
    mean = lambda key: sum(p[key] for p in latency["pairs"]) / 2  # noqa: E731
    assert summary["reference_latency_s"] == pytest.approx(mean("uncached_s"))
    assert summary["latency_speedup"] == pytest.approx(mean("uncached_s") / mean("cached_s"))
    metas = [json.loads(p.read_text()) for p in (tmp_path / "_references").rglob("*.json") if p.parent.name != "flops"]
    assert metas and all("latency_s" not in m for m in metas)
    table = render(tmp_path / "lat")
    assert "timed in the same process" in table


# -- 3. identity and bad values ------------------------------------------------------------------

def test_a_short_sweep_does_not_collide_with_the_full_run_and_tables_keep_them_apart(tmp_path):
    base = [*TINY_OVERRIDES, "name=ident", "cache=fora", "cache.interval=2", "cache.warmup=1", f"paths.outputs={tmp_path}"]
    [two] = run_overrides(base)                      # data.limit=2 (TINY_OVERRIDES)
    [three] = run_overrides([*base, "data.limit=3"])
    assert two["run"] != three["run"] and (two["num_outputs"], three["num_outputs"]) == (2, 3)
    table = render(tmp_path / "ident")
    assert table.count("\n## ") + table.startswith("## ") == 2 and "2 prompts" in table and "3 prompts" in table


@pytest.mark.parametrize("override, words", [
    ("data.limit=-1", "data.limit=-1"),
    ("sampling.steps=0", "sampling.steps=0"),
    ("sampling.height=18", "multiple of 4"),   # the tiny FLUX: 2 x vae_scale_factor 2
    ("+cache.sigmma=0.3", "known keys"),
    ("cache.sigma=0", "sigma"),
])
def test_bad_values_stop_in_one_line_before_claiming_a_folder(override, words, tmp_path, capsys):
    err = one_line_exit([*TINY_OVERRIDES, "cache=hicache", override, f"paths.outputs={tmp_path}"], capsys)
    assert words in err
    assert not list(tmp_path.rglob("fingerprint.json"))


def test_run_py_prints_a_config_error_as_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *TINY_OVERRIDES, "cache.sigma=0",
                             f"paths.outputs={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


# -- 4. claims and file modes --------------------------------------------------------------------

def test_a_run_failing_after_its_claim_releases_it(tmp_path, capsys, monkeypatch):
    base = [*TINY_OVERRIDES, "name=claim", "run_name=same", "cache=fora", "cache.warmup=1", f"paths.outputs={tmp_path}"]

    def fails(*args, **kwargs):
        raise SetupError("a metric's model is missing")

    real = runner.ensure_references
    monkeypatch.setattr(runner, "ensure_references", fails)
    one_line_exit([*base, "cache.interval=2"], capsys)
    assert not list(tmp_path.rglob("fingerprint.json"))
    monkeypatch.setattr(runner, "ensure_references", real)
    [summary] = run_overrides([*base, "cache.interval=3"])  # the corrected command, another config
    assert summary["interval"] == 3


def _claim(path: str, fingerprint: str, start, results) -> None:
    start.wait()
    try:
        RunDir(path, fingerprint).claim()
        results.put(fingerprint)
    except SetupError:
        results.put(None)


def test_claiming_is_atomic_across_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_claim, args=(str(tmp_path / "run"), f"fp{i}", start, results)) for i in range(6)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(30)
    winners = [f for f in (results.get(timeout=5) for _ in workers) if f is not None]
    assert len(winners) == 1
    assert json.loads((tmp_path / "run" / "fingerprint.json").read_text())["fingerprint"] == winners[0]
    RunDir(tmp_path / "run", winners[0]).claim()  # the same config may share it


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        [summary] = run_overrides([*TINY_OVERRIDES, "name=mode", "cache=fora", "cache.interval=2", "cache.warmup=1",
                                   f"paths.outputs={tmp_path}"])
    finally:
        os.umask(old)
    run_dir = tmp_path / "mode" / summary["run"]
    files = [run_dir / "summary.json", run_dir / "metrics.jsonl", run_dir / "fingerprint.json",
             run_dir / "images" / "00000.png", *(tmp_path / "_references").rglob("*.png")]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files), [oct(f.stat().st_mode) for f in files]


# -- 6. W&B as the run goes ----------------------------------------------------------------------

def test_wandb_logs_each_output_as_it_is_rendered(tmp_path, monkeypatch):
    from hicache.app.loggers import WandbLogger

    seen = []
    real = WandbLogger.log_output

    def spy(self, record):
        run_dir = next((tmp_path / "live").iterdir())
        seen.append((record["index"], (run_dir / "summary.json").exists(), self.run is not None))
        real(self, record)

    monkeypatch.setattr(WandbLogger, "log_output", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")
    [summary] = run_overrides([*TINY_OVERRIDES, "name=live", "cache=fora", "cache.interval=2", "cache.warmup=1",
                               "logger=wandb", f"paths.outputs={tmp_path}"])
    assert seen[:2] == [(0, False, True), (1, False, True)]  # logged live, before the run was summarised
    [offline] = (tmp_path / "live" / summary["run"] / "wandb").glob("offline-run-*")
    assert list(offline.glob("run-*.wandb"))


# -- 5. a plain `pip install .` has no torchvision / lpips: LPIPS is "n/a", not a traceback ---------

def test_lpips_without_its_packages_is_optional(monkeypatch):
    import importlib.util

    import torch

    from hicache.app.metrics import build_metrics
    from omegaconf import OmegaConf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    metrics, unavailable = build_metrics(OmegaConf.create({"lpips": {"enabled": True, "required": False}}),
                                         torch.device("cpu"))
    assert metrics == [] and unavailable == ["lpips"]
    with pytest.raises(SetupError, match="pip install torchvision"):
        build_metrics(OmegaConf.create({"lpips": {"enabled": True, "required": True}}), torch.device("cpu"))
