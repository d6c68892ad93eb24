"""Inf-DiT SR testbed training and the SR table, end to end at toy sizes (seconds)."""

import json

import pytest
import torch

from hicache.app.testing import CONF_DIR
from hicache.app.sr_experiment import (SRSetupError, load_hr_images, load_sr_pipeline, resolve_variants,
                                                  run_table)
from hicache.models.inf_dit.pipeline import edm_preconditioning, edm_sigmas
from hicache.testbeds.inf_dit_sr.data import downscale, random_crops
from hicache.testbeds.inf_dit_sr.train import (SRTestbedConfig, TrainConfig, blend_init_, blend_targets, build_testbed,
                                               load_testbed, lr_factor, psnr, train, training_sigmas, update_ema)

TOY = SRTestbedConfig(num_layers=1, hidden_size=32, num_attention_heads=2, encoder_width=16, vector_dim=8)




@pytest.fixture(scope="module")
def toy_testbed(tmp_path_factory):
    out = tmp_path_factory.mktemp("sr_testbed")
    cfg = TrainConfig(steps=2, batch_size=2, pool_size=4, eval_pairs=1, eval_steps=1, save_every=1, model=TOY,
                      ema_decay=0.9, p_mean=-0.5, p_std=2.0)
    meta = train(cfg, out)
    return out, meta


def test_training_writes_a_loadable_testbed_with_its_gate(toy_testbed):
    out, meta = toy_testbed
    assert meta["steps_done"] == 2 and set(meta["gate"]) >= {"psnr_sr", "psnr_bicubic", "passes"}
    assert json.loads((out / "testbed.json").read_text())["gate"] == meta["gate"]
    pipe = load_testbed(out)
    image = pipe(torch.rand(1, 3, 16, 16), num_inference_steps=1, output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_crops_and_degradation():
    photos = [torch.rand(3, 80, 100)]
    crops = random_crops(photos, 3, 64, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 64, 64) and 0 <= crops.min() and crops.max() <= 1
    assert downscale(crops).shape == (3, 3, 16, 16)
    assert psnr(crops, crops.clone()).min() > 100


def test_equal_cost_variant_matches_the_cache_forward_count():
    spec = {"full": {}, "steps_cost": {"match_cost_of": "hicache_N5"},
            "hicache_N5": {"cache": {"method": "hicache", "interval": 5, "warmup": 3, "order": 2}}}
    variants = {v.name: v for v in resolve_variants(spec, 20)}
    assert variants["full"].steps == 20 and variants["full"].cache is None
    # 39 forwards, full at 0, 1, 2, 7, 12, ..., 37 -> 10 full forwards -> 6 Heun steps (11 forwards)
    assert variants["steps_cost"].steps == 6


def test_sr_table_on_the_toy_testbed(toy_testbed, tmp_path):
    out, _ = toy_testbed
    pipe = load_sr_pipeline("testbed", str(out))
    images = load_hr_images("heldout", 2, None, 64, pipe.transformer.config.image_block_size)
    spec = {"full": {}, "fora_N2": {"cache": {"method": "fora", "interval": 2, "warmup": 1, "order": 0}},
            "steps_cost": {"match_cost_of": "fora_N2"}}
    rows = run_table(pipe, images, resolve_variants(spec, 3), seed=0, lpips=False, out_dir=tmp_path, save_images=1)
    by = {r["variant"]: r for r in rows}
    assert by["full"]["psnr_full"] == float("inf") and by["full"]["flops_speedup"] == 1.0
    assert by["fora_N2"]["full_forwards"] == 3 and by["fora_N2"]["cached_forwards"] == 2
    assert by["fora_N2"]["flops_speedup"] > 1.2 and by["fora_N2"]["psnr_full"] < float("inf")
    assert "psnr_hr" in by["bicubic"]
    assert (tmp_path / "results.md").read_text().startswith("| variant |")


def test_missing_weights_and_data_are_one_line_errors(tmp_path):
    with pytest.raises(SRSetupError, match=r"cloud\.tsinghua\.edu\.cn"):
        load_sr_pipeline("released", str(tmp_path / "none.pt"))
    with pytest.raises(SRSetupError, match="train one with"):
        load_sr_pipeline("testbed", str(tmp_path))
    with pytest.raises(SRSetupError, match="no HR images"):
        load_hr_images("folder", None, str(tmp_path), 64, 32)


def test_lr_decays_over_wall_clock_when_the_time_limit_binds():
    cfg = TrainConfig(steps=1000, time_limit_minutes=10, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1)            # warm-up
    assert lr_factor(100, 0.0, cfg) < 1.0                          # step progress
    assert lr_factor(20, 300.0, cfg) == pytest.approx(0.55)        # half the time: cosine midpoint
    assert lr_factor(20, 600.0, cfg) == pytest.approx(0.1)         # time is up: the floor


def test_ema_follows_the_weights():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.zero_()
    update_ema(ema, model, decay=0.5, step=100)
    assert torch.allclose(ema.weight, 0.5 * model.weight)


def test_blend_init_starts_as_the_wiener_blend_of_noisy_and_bicubic_input():
    """The blend start: D(x; sigma) ~ w x + (1 - w) up, whatever sigma (a random start is nowhere near it)."""
    cfg = SRTestbedConfig(num_layers=1, hidden_size=64, num_attention_heads=2, patch_size=2, image_block_size=16,
                          image_size=32, vector_dim=8, encoder_width=16)
    transformer = build_testbed(cfg).transformer
    mse = 0.01
    info = blend_init_(transformer, mse)
    assert set(info) >= {"fit_rel_error_noisy", "fit_rel_error_lr"}
    generator = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    lr = torch.nn.functional.avg_pool2d(hr, 4)
    up = torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    for s in (0.05, 0.5, 5.0):
        sigma = torch.full((2,), s)
        x = hr + s * torch.randn(hr.shape, generator=generator)
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
        with torch.no_grad():
            out = transformer(torch.cat([x, up], 1) * c_in[0], c_noise, lr, torch.zeros(2, 8)).sample
        denoised = c_skip[0] * x + c_out[0] * out
        w = mse / (mse + s**2)
        blend = w * x + (1 - w) * up
        error = (denoised - blend).pow(2).mean().sqrt()
        assert error < 0.2 * (blend - hr).pow(2).mean().sqrt(), s  # far closer to the blend than the blend to HR
    coef_noisy, coef_lr = blend_targets(torch.tensor([1e-3, 40.0]), mse)
    assert coef_lr[1] == pytest.approx(80.0, rel=0.01) and abs(coef_noisy[1]) < 0.02


def test_blend_init_rejects_a_too_narrow_model():
    with pytest.raises(ValueError, match="blend init needs hidden_size"):
        blend_init_(build_testbed(TOY).transformer, 0.01)


@pytest.mark.parametrize("bad, message", [
    (dict(init="xavier"), "train.init must be 'random' or 'blend', got 'xavier'"),
    (dict(loss_weighting="l1"), "train.loss_weighting must be 'edm' or 'relative', got 'l1'"),
    (dict(p_schedule=1.5), r"train.p_schedule is a fraction of the batch, in \[0, 1\]; got 1.5"),
])
def test_unknown_training_options_are_one_line_errors(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        train(TrainConfig(**bad), tmp_path)
    assert "\n" not in str(err.value)


def test_training_sigmas_cover_the_samplers_levels_when_asked():
    """p_schedule 0 is EDM's log-normal, draw for draw; p_schedule 1 follows the sampler's rho-spaced schedule, so
    the top levels the 20-step Heun sampler starts from are trained as often as it visits them."""
    lognormal = training_sigmas(4096, torch.Generator().manual_seed(0), p_mean=0.0, p_std=1.0)
    reference = (torch.randn(4096, generator=torch.Generator().manual_seed(0))).exp()
    torch.testing.assert_close(lognormal, reference, rtol=0, atol=0)
    schedule = training_sigmas(4096, torch.Generator().manual_seed(0), p_mean=0.0, p_std=1.0, p_schedule=1.0)
    assert float(schedule.min()) >= 0.002 * (1 - 1e-5) and float(schedule.max()) <= 40.0 * (1 + 1e-5)
    visited = edm_sigmas(20)[:-1]
    share_above_8 = float((visited > 8).float().mean())  # 6 of the 20 levels
    assert abs(float((schedule > 8).float().mean()) - share_above_8) < 0.05
    assert float((lognormal > 8).float().mean()) < 0.05
    half = training_sigmas(4096, torch.Generator().manual_seed(0), p_mean=0.0, p_std=1.0, p_schedule=0.5)
    assert 0.1 < float((half > 8).float().mean()) < 0.2


def test_testbed_evaluation_script_on_the_shipped_testbed():
    """experiments/eval_inf_dit_sr_testbed.py runs (2 sampling steps, 17 scenes) and prints its four rows."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "experiments/eval_inf_dit_sr_testbed.py", "--n", "17", "--steps", "2",
                           "--sigmas", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "dB" not in line]
    assert [row.split("|")[2].strip() for row in rows] == ["16", "1", "17", "16"]
    assert "sigma 1: " in proc.stdout


SR_EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("infdit_*.yaml"))


def test_the_sr_experiments_exist():
    assert SR_EXPERIMENTS == ["infdit_sigma", "infdit_table"]


@pytest.mark.parametrize("experiment", SR_EXPERIMENTS)
def test_sr_experiment_smoke_run_through_run_py(experiment, toy_testbed, tmp_path):
    """`python run.py experiment=infdit_*` on the toy testbed: every row of the config, one job, one table."""
    import yaml

    from hicache.app.testing import run_overrides

    out, _ = toy_testbed
    (rows,) = run_overrides([f"experiment={experiment}", f"model.path={out}", "sr.steps=2", "data.n=2",
                             "sr.save_images=1", f"paths.outputs={tmp_path}"])
    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    assert [r["variant"] for r in rows] == [*spec["sr"]["variants"], "bicubic"]
    assert rows[0]["variant"] == "full" and rows[0]["psnr_full"] == float("inf")
    assert all(0 < r["psnr_hr"] < 100 for r in rows)
    results = tmp_path / experiment / "inf_dit_testbed"
    assert (results / "results.md").read_text().startswith("| variant |") and (results / "full_0.png").is_file()


def test_sr_and_text_to_image_models_refuse_each_others_experiments(tmp_path, capsys):
    from hicache.app.testing import run_overrides

    cases = [
        (["experiment=infdit_table", "model=testbed"], "needs an Inf-DiT model"),
        (["experiment=testbed_hicache", "model=inf_dit_testbed", "data.limit=1"], "is a super-resolution model"),
        (["experiment=infdit_table", "model=inf_dit", f"model.path={tmp_path / 'none.pt'}", "model.device=cpu"],
         "cloud.tsinghua.edu.cn"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_overrides([*overrides, f"paths.outputs={tmp_path}"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and err.startswith("error: ") and "\n" not in err


def test_training_experiment_runs_through_run_py(tmp_path):
    """`python run.py experiment=inf_dit_sr_testbed_train` (in-process, toy sizes) trains and writes a testbed."""
    from hicache.app.testing import run_overrides

    out = tmp_path / "sr"
    toy = [f"train.model.{k}={v}" for k, v in dict(num_layers=1, hidden_size=32, num_attention_heads=2,
                                                       encoder_width=16, vector_dim=8).items()]
    loop = [f"train.trainer.{k}={v}" for k, v in dict(steps=2, batch_size=2, pool_size=4, eval_pairs=1, eval_steps=1,
                                                        save_every=1, eval_every=0, init="random").items()]
    [meta] = run_overrides(["experiment=inf_dit_sr_testbed_train", f"train.out_dir={out}", f"paths.outputs={tmp_path}",
                            *toy, *loop])
    assert meta["steps_done"] == 2
    assert (out / "testbed.json").is_file() and load_testbed(out) is not None


def test_sr_experiment_stops_in_one_line_when_it_cannot_fit(toy_testbed, tmp_path, capsys):
    from hicache.app.testing import run_overrides

    out, _ = toy_testbed
    with pytest.raises(SystemExit) as exit_info:
        run_overrides(["experiment=infdit_table", f"model.path={out}", "sr.steps=2", "data.n=1",
                       "model.memory_limit_gib=0.00001", f"paths.outputs={tmp_path}"])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: Inf-DiT at 64x64 px does not fit cpu: weights ")
    assert "grows with the image's area" in err[0]
    assert not (tmp_path / "infdit_table").exists()
