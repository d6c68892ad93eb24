"""`python run.py experiment=collect_features` through the experiment app, on the random tiny FLUX."""

import subprocess
import sys
from pathlib import Path

import pytest

from hicache.app.testing import TINY_OVERRIDES, run_overrides
from hicache.trajectories import load_trajectories

ROOT = Path(__file__).resolve().parents[1]


def test_collect_features_writes_one_file_per_prompt(tmp_path):
    [summary] = run_overrides(["experiment=collect_features", *TINY_OVERRIDES, f"paths.outputs={tmp_path}",
                               "collect.num_tokens=4", r"collect.blocks=transformer_blocks\.0"])
    files = sorted(Path(summary["out_dir"]).glob("*.safetensors"))
    assert [f.name for f in files] == ["p00000_s0.safetensors", "p00001_s1.safetensors"]
    assert Path(summary["out_dir"]) == tmp_path / "collect_features" / "tiny_flux" / "trajectories"
    traj = load_trajectories(files[1])
    assert traj.meta["prompt"] == "a large blue square in the center" and traj.meta["seed"] == 1
    assert traj.meta["model"] == "tiny_flux" and traj.meta["call_kwargs"]["num_inference_steps"] == 4
    assert {s.name for s in traj} == {"transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context"}
    assert all(s.values.shape[0] == 4 and s.values.shape[2] <= 4 for s in traj)


def test_collect_features_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "run.py", "experiment=collect_features", *TINY_OVERRIDES, f"paths.outputs={tmp_path}",
           "collect.blocks=nope"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: nothing to record")
    with pytest.raises(SystemExit):
        run_overrides(["experiment=collect_features", *TINY_OVERRIDES, f"paths.outputs={tmp_path}", "cache=hicache"])
