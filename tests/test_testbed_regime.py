"""experiments/testbed_regime.py end to end on a tiny random FLUX pipeline (seconds)."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hicache.testbeds.tiny.flux import save_tiny_flux_pipeline

REPO = Path(__file__).resolve().parents[1]


def _regime_module():
    spec = importlib.util.spec_from_file_location("testbed_regime", REPO / "experiments" / "testbed_regime.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_regime_report_on_a_tiny_pipeline(tmp_path):
    regime = _regime_module()
    folder = save_tiny_flux_pipeline(tmp_path / "tiny")
    out = regime.main([
        "--testbed", str(folder), "--prompts", "3", "--steps", "12", "--intervals", "3", "7",
        "--sigmas", "0.5", "--straightness-steps", "4", "--resolution", "16", "--batch", "2",
        "--out", str(tmp_path / "out"), "--name", "smoke",
    ])
    result = json.loads((out / "regime.json").read_text())
    assert (out / "regime.png").stat().st_size > 0
    assert "## Trajectory straightness" in (out / "regime.md").read_text()
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"steps", "FORA", "TaylorSeer O=1", "TaylorSeer O=2", "HiCache O=2 s=0.5"}
    for r in result["rows"]:
        assert len(r["psnr"]) == 3 and all(np.isfinite(r["psnr"]))
    # the equal-cost sampler gets the schedule's full steps: 12 steps, warm-up 3, N=7 -> steps 0, 1, 2, 9
    assert {r["interval"]: r["full_steps"] for r in result["rows"] if r["method"] == "steps"} == {3: 6, 7: 4}
    s = result["straightness"]
    assert len(s["velocity_cosine_per_step"]) == 11 and -1 <= s["velocity_cosine_mean"] <= 1
    assert 0 < s["chord_over_path"] <= 1 + 1e-6
    c = next(c for c in result["comparisons"] if c["interval"] == 7 and c["b"] == "steps" and c["a"] == "TaylorSeer O=2")
    assert c["n"] == 3 and 0 <= c["a_wins"] <= 3 and c["ci_low"] <= c["mean_diff"] <= c["ci_high"]
    assert set(result["conditions"]) >= {"a_gap_N7_dB", "b_taylorseer_N7_dB", "c_checker_accuracy_reference"}


def test_paired_counts_wins_and_brackets_the_mean():
    regime = _regime_module()
    res = regime.paired([3.0, 2.0, 5.0, 1.0], [1.0, 2.5, 1.0, 0.0])
    assert res["a_wins"] == 3 and res["b_wins"] == 1 and res["n"] == 4
    assert res["mean_diff"] == pytest.approx(1.625)
    assert res["ci_low"] <= res["mean_diff"] <= res["ci_high"]


def test_full_step_count_matches_the_issue():
    regime = _regime_module()
    assert [regime.full_step_count(n, 50) for n in (7, 16, 24)] == [9, 5, 4]


@pytest.mark.parametrize("tokens", [16, 64, 4096])
def test_with_shift_samples_at_one_shift_exponent_for_every_size(tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    regime = _regime_module()
    base = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched = regime.with_shift(base, 1.15)
    c = sched.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    assert mu == pytest.approx(1.15)
    s = np.linspace(1.0, 1 / 50, 50)
    sched.set_timesteps(sigmas=s, mu=mu)
    shift = np.exp(1.15)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), shift * s / (1 + (shift - 1) * s), rtol=1e-5)
    assert base.config.base_shift == 0.5  # the testbed's own scheduler is untouched


def test_stretch_report_on_a_tiny_pipeline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("testbed_stretches", REPO / "experiments" / "testbed_stretches.py")
    stretches = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stretches)
    full, gaps = stretches.stretches(16, 50)
    assert full == [0, 1, 2, 18, 34] and [(g.start, g.stop) for g in gaps] == [(3, 18), (19, 34), (35, 50)]
    folder = save_tiny_flux_pipeline(tmp_path / "tiny")
    text = stretches.main(["--testbed", str(folder), "--interval", "4", "--steps", "10", "--prompts", "2",
                           "--resolution", "16"])
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| TaylorSeer O=2", "| HiCache O=2 s=0.5", "| FORA"]
    assert "only 3-5 cached" in text and "only 7-9 cached" in text and "4-step sampler" in text
    cells = [float(c) for r in rows for c in r.strip("| ").split(" | ")[1:]]
    assert len(cells) == 9 and all(np.isfinite(cells))


def test_mu_is_named_in_the_report_and_refused_without_dynamic_shifting(tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    regime = _regime_module()
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        regime.with_shift(FlowMatchEulerDiscreteScheduler(shift=3.0), 1.15)
    folder = save_tiny_flux_pipeline(tmp_path / "tiny")
    args = ["--testbed", str(folder), "--prompts", "1", "--steps", "6", "--intervals", "3", "--sigmas", "0.5",
            "--straightness-steps", "2", "--resolution", "16", "--batch", "1", "--mu", "0", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):  # the tiny pipeline's scheduler has a fixed shift: --mu would be ignored
        regime.main(args)
    assert "use_dynamic_shifting" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no guidance embedding: FluxPipeline would ignore guidance_scale
        regime.main([*[a for i, a in enumerate(args) if "--mu" not in args[max(i - 1, 0):i + 1]], "--guidance", "3.5"])
    assert "guidance_embeds" in capsys.readouterr().err
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dynamic_shifting": True}))
    out = regime.main([*args, "--name", "mu0"])
    assert "schedule shift exponent 0.0 (--mu)," in (out / "regime.md").read_text()  # 0 is a shift, not "the default"
    # without --mu the report names the mu FluxPipeline samples at: here one fixed in the folder, as the shipped one's
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_shift": 0.8, "max_shift": 0.8}))
    own = [a for i, a in enumerate(args) if "--mu" not in args[max(i - 1, 0):i + 1]]
    out = regime.main([*own, "--name", "own"])
    assert "schedule shift exponent 0.8 (the scheduler's own)," in (out / "regime.md").read_text()
