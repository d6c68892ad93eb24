"""LESA through run.py on the tiny FLUX pipeline: training (both phases, resumable), the optimiser's checkpoint,
teacher-forced vs closed-loop histories, and smoke runs of every LESA experiment config."""

import numpy as np
import pytest
import torch

import hicache
from hicache.app.lesa_train import PredictorOptimizer, teacher_forced_forecasts
from hicache.app.paired import win_counts
from hicache.app.tables import render
from hicache.app.testing import TINY_OVERRIDES, run_overrides
from hicache.lesa import LesaPredictor, LesaPredictorConfig, load_predictor
from hicache.lesa_hooks import lesa_hook
from hicache.testbeds.tiny.flux import tiny_flux_pipeline

STEPS = 12  # N=7: full 0-3 and 9, so stages 1 and 2 are both forecast; N=10: full 0-3
SMOKE = ["model=tiny_flux", "data=tiny_words", "data.limit=2", f"sampling.steps={STEPS}", "sampling.height=16",
         "sampling.width=16", "train.predictor.hidden_dim=8", "train.predictor.history_depth=4",
         "train.wandb.mode=disabled"]


def train(tmp_path, interval: int, updates: int = 1) -> dict:
    return run_overrides(["experiment=testbed_lesa_train", *SMOKE, f"cache.interval={interval}",
                          f"train.phase1.max_updates={updates}", f"train.phase2.max_updates={updates}",
                          f"paths.outputs={tmp_path}", f"train.export_dir={tmp_path}/predictors/N{interval}"])[0]


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    """Tiny predictors for N=7 and N=10, trained by the 2-update smoke run of experiment=testbed_lesa_train."""
    root = tmp_path_factory.mktemp("lesa")
    results = {n: train(root, n) for n in (7, 10)}
    return root, results


def test_training_smoke_run_makes_one_update_per_phase_and_resumes(predictors):
    root, results = predictors
    assert results[7]["phase1_updates"] == 1 and results[7]["phase2_updates"] == 1 and results[7]["updates"] == 2
    assert results[7]["cached_steps_per_prompt"] == STEPS - 5
    predictor = load_predictor(root / "predictors" / "N7")
    assert predictor.config.interval == 7 and predictor.config.num_steps == STEPS
    assert predictor.config.timesteps[0] == 1.0 and predictor.config.timesteps[-1] == 0.0
    run = root / "testbed_lesa_train" / "tiny_flux_N7"
    assert sorted(p.name for p in (run / "gt").iterdir()) == ["00000.safetensors", "00001.safetensors"]
    again = train(root, 7)  # the same command again: everything is done, nothing is retrained
    assert again["updates"] == 2 and again["phase1_updates"] == 0 and again["phase2_updates"] == 0


def test_optimizer_checkpoint_round_trip_and_the_lr_halves_every_lr_step(tmp_path):
    def make():
        torch.manual_seed(0)
        predictor = LesaPredictor(LesaPredictorConfig(timesteps=[1, 0.5, 0], interval=2, history_depth=2, hidden_dim=4))
        return predictor, PredictorOptimizer(predictor, lr=1e-3, weight_decay=1e-4, grad_clip=1.0, lr_step=2, lr_gamma=0.5)

    history, target = [torch.randn(3, 4) for _ in range(2)], torch.randn(3, 4)
    predictor, opt = make()
    for _ in range(3):
        opt.update(predictor(history, 0.5), target)
    assert opt.lr == pytest.approx(5e-4)  # halved after 2 updates
    torch.save(opt.state_dict(), tmp_path / "checkpoint.pt")
    copy, copy_opt = make()
    copy_opt.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    assert copy_opt.updates == 3 and copy_opt.lr == opt.lr
    assert opt.update(predictor(history, 0.5), target) == copy_opt.update(copy(history, 0.5), target)
    for a, b in zip(predictor.parameters(), copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_teacher_forced_history_is_ground_truth_and_closed_loop_history_holds_forecasts(predictors):
    root, _ = predictors
    predictor = load_predictor(root / "predictors" / "N7")
    pipe = tiny_flux_pipeline()
    config = hicache.CacheConfig("lesa", interval=7, predictor=predictor, num_inference_steps=STEPS)
    hicache.apply_cache(pipe.transformer, config, "flux")
    seen, forecasts = {}, {}
    hook = lesa_hook(pipe.transformer)
    hook.observer = lambda step, branch, value, full: seen.setdefault(step, (full, value.clone()))
    hook.on_prediction = lambda forecast, step, branch: forecasts.setdefault(step, forecast.detach().clone())
    try:
        pipe("a red circle", num_inference_steps=STEPS, height=16, width=16, max_sequence_length=16,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hicache.remove_cache(pipe.transformer)
    assert sorted(forecasts) == [4, 5, 6, 7, 8, 10, 11]
    history = [seen[s][1] for s in range(STEPS)]
    for step in forecasts:  # closed loop: the forecast enters the history, and the next step reads it
        assert seen[step][0] is False
        torch.testing.assert_close(seen[step][1], forecasts[step])
    with torch.no_grad():
        torch.testing.assert_close(forecasts[6], predictor(history[2:6], predictor.config.timesteps[6]))
        # teacher forcing on the same values reads exactly the ground truth of the 4 previous steps
        truth = {"cond": torch.stack(history)}
        forced = {step: f for step, _, f in teacher_forced_forecasts(predictor, truth, [6, 11])}
    torch.testing.assert_close(forced[6], forecasts[6])
    torch.testing.assert_close(forced[11], predictor(history[7:11], predictor.config.timesteps[11]))


def test_lesa_experiments_smoke_run_and_table(predictors, tmp_path):
    root, _ = predictors
    base = [*TINY_OVERRIDES, f"sampling.steps={STEPS}", f"paths.outputs={tmp_path}"]
    variants = ["lesa_N7", "taylorseer_N6_O2", "step_reduction_N6", "lesa_N10", "hicache_N9_O2_s0.5"]
    predictors = [f"cache.predictor_dir={root}/predictors"]  # only the lesa group has it (a typo check refuses it elsewhere)
    summaries = [run_overrides([*base, "experiment=testbed_lesa", f"variant={v}",
                                *(predictors if v.startswith("lesa") else [])])[0] for v in variants]
    assert [s["num_outputs"] for s in summaries] == [2] * len(variants)
    full = {s["run"].removesuffix("_limit2"): len(s["full_steps"]) for s in summaries}  # <run>_limit<n>
    # (on 50 steps LESA N=7 and N=6 both run 10 full steps; on these 12, step 3 forced full makes LESA's 5 vs 4)
    assert full == {"lesa_N7": 5, "taylorseer_N6_O2": 4, "step_reduction_N6": 4, "lesa_N10": 4, "hicache_N9_O2_s0.5": 4}
    assert all(s["psnr"] > 0 for s in summaries)
    assert render(tmp_path / "testbed_lesa").count("| LESA |") == 2
    pairs = [{**r, "a": r["a"].removesuffix("_limit2"), "b": r["b"].removesuffix("_limit2")}
             for r in win_counts(tmp_path / "testbed_lesa")]
    assert {(r["full_steps"], r["a"], r["b"]) for r in pairs} >= {(4, "hicache_N9_O2_s0.5", "lesa_N10"),
                                                                  (4, "lesa_N10", "taylorseer_N6_O2")}
    assert not any("lesa_N7" in (r["a"], r["b"]) for r in pairs)  # alone at 5 full steps
    assert all(r["a_wins"] + r["b_wins"] + r["ties"] == r["prompts"] == 2 for r in pairs)
    flux = run_overrides([*base, "experiment=flux_lesa", "sampling.height=16", "sampling.width=16",
                          f"cache.predictor={root}/predictors/N7"])[0]
    assert flux["method"] == "lesa" and flux["num_outputs"] == 2


def test_a_missing_predictor_is_a_one_line_error_before_rendering(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_overrides([*TINY_OVERRIDES, "cache=lesa", f"paths.outputs={tmp_path}", f"cache.predictor_dir={tmp_path}/none"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LESA predictor at" in err[0] and "experiment=testbed_lesa_train" in err[0]
    assert not (tmp_path / "_references").exists()  # failed before rendering anything


def test_a_predictor_for_another_interval_is_a_one_line_error(predictors, tmp_path, capsys):
    root, _ = predictors
    with pytest.raises(SystemExit):
        run_overrides([*TINY_OVERRIDES, f"sampling.steps={STEPS}", "cache=lesa", "cache.interval=10",
                       f"cache.predictor={root}/predictors/N7", f"paths.outputs={tmp_path}"])
    assert "trained for interval 7, not 10" in capsys.readouterr().err


def test_official_bfloat16_recipe_freezes_weights_that_float32_moves():
    """Why float32 is the default: an AdamW step of ~lr = 1e-4 is below half a bfloat16 ulp of a weight near 0.5."""
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        predictor = LesaPredictor(LesaPredictorConfig(timesteps=[1, 0.5, 0], interval=2, history_depth=2,
                                                      hidden_dim=4)).to(dtype)
        weight = predictor.experts["cond"].latent[1].weight
        with torch.no_grad():
            weight.fill_(0.5)
        before = weight.detach().clone()
        opt = PredictorOptimizer(predictor, lr=1e-4, weight_decay=1e-4, grad_clip=1.0, lr_step=500, lr_gamma=0.5)
        history = [torch.randn(8, 4, dtype=dtype) for _ in range(2)]
        opt.update(predictor(history, 0.7), torch.randn(8, 4))  # t = 0.7: stage 1
        moved[dtype] = bool((weight.detach() != before).any())
    assert moved == {torch.float32: True, torch.bfloat16: False}


@pytest.mark.parametrize("interval, full_steps", [(7, 10), (10, 8)])
def test_the_shipped_testbed_predictors_fit_the_testbeds_sampling(interval, full_steps):
    """`python run.py model=testbed cache=lesa cache.interval=N` finds these by itself (conf/cache/lesa.yaml): they
    must be for that N and for the testbed's 50-step schedule at 64x64, as the evaluation samples."""
    from hicache.lesa import load_predictor
    from hicache.testbeds import WEIGHTS_DIR
    from hicache.testbeds.flux_shapes import load_pipeline

    predictor = load_predictor(WEIGHTS_DIR / "lesa" / "testbed" / f"N{interval}")
    config = predictor.config
    assert config.interval == interval and config.warmup == 3 and list(config.extra_full_steps) == [3]
    assert len(hicache.CacheConfig("lesa", interval=interval, warmup=3, extra_full_steps=[3], predictor=predictor)
               .schedule.full_steps_for(50)) == full_steps
    pipe = load_pipeline()
    # what FluxPipeline does at 50 steps and 64x64: sigmas linspace(1, 1/50), shifted for the image's token count
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=_testbed_mu(pipe))
    assert config.timesteps == pytest.approx(pipe.scheduler.sigmas.tolist(), abs=1e-6)


def _testbed_mu(pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (64 // pipe.vae_scale_factor // 2) ** 2
    c = pipe.scheduler.config
    return calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))
