"""Results survive a kill: finished runs are skipped, a half-done run renders only what is missing."""

import json

import pytest

import hicache.app.runner as runner
from hicache.app.testing import TINY_OVERRIDES, run_overrides

JOB = [*TINY_OVERRIDES, "name=resume", "cache=fora", "cache.interval=2", "cache.warmup=1"]


def _count_renders(monkeypatch) -> list:
    calls = []
    timed = runner.Renderer.timed

    def counting(self, prompt, steps):
        calls.append(prompt.index)
        return timed(self, prompt, steps)

    monkeypatch.setattr(runner.Renderer, "timed", counting)
    return calls


def test_finished_run_is_skipped_without_loading_the_model(tmp_path, monkeypatch):
    [first] = run_overrides([*JOB, f"paths.outputs={tmp_path}"])

    def must_not_load(*args, **kwargs):
        raise AssertionError("a finished run loaded the pipeline")

    monkeypatch.setattr(runner, "load_pipeline", must_not_load)
    [again] = run_overrides([*JOB, f"paths.outputs={tmp_path}"])
    assert again == first


def test_killed_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    [first] = run_overrides([*JOB, f"paths.outputs={tmp_path}"])
    run_dir = tmp_path / "resume" / first["run"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # As if killed while writing output 1: output 0's line is in, output 1's line is torn.
    (run_dir / "summary.json").unlink()
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "progress").mkdir(exist_ok=True)
    (run_dir / "progress" / "rank0.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:20])
    renders = _count_renders(monkeypatch)
    [resumed] = run_overrides([*JOB, f"paths.outputs={tmp_path}"])
    assert renders == [1]  # only the output whose record was torn (references come from disk)
    assert resumed["num_outputs"] == 2
    assert resumed["psnr"] == pytest.approx(first["psnr"])
    assert not list((run_dir / "progress").glob("*.jsonl"))


def test_a_folder_holding_another_config_is_an_error(tmp_path, capsys):
    run_overrides([*JOB, f"paths.outputs={tmp_path}", "run_name=same"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_overrides([*JOB, f"paths.outputs={tmp_path}", "run_name=same", "cache.interval=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "different config" in err and "\n" not in err
