"""LESA: the B-spline KAN, the predictor's math, its stage map and schedule, its file, and its cache."""

import math
import os

import pytest
import torch

import hicache
from hicache.kan import KAN, KANLinear, b_spline_bases, uniform_knots
from hicache.lesa import LesaPredictor, LesaPredictorConfig, load_predictor, save_predictor
from hicache.lesa_hooks import lesa_hook
from hicache.schedule import Schedule
from hicache.testbeds.tiny.flux import tiny_flux_transformer


def cox_de_boor(i: int, k: int, x: float, knots: list[float]) -> float:
    """B_{i,k}(x) by the textbook recursion, one basis at a time, in Python floats."""
    if k == 0:
        return 1.0 if knots[i] <= x < knots[i + 1] else 0.0
    left = (x - knots[i]) / (knots[i + k] - knots[i]) * cox_de_boor(i, k - 1, x, knots)
    right = (knots[i + k + 1] - x) / (knots[i + k + 1] - knots[i + 1]) * cox_de_boor(i + 1, k - 1, x, knots)
    return left + right


def silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def kan_layer_direct(layer: KANLinear, x: list[float]) -> list[float]:
    """out_j = sum_i SiLU(x_i) Wb[j, i] + sum_i sum_c B_c(x_i) Ws[j, i, c] S[j, i], basis by basis."""
    knots = [float(v) for v in layer.knots]
    wb, ws, scale = (p.detach().double() for p in (layer.base_weight, layer.spline_weight, layer.spline_scaler))
    out = []
    for j in range(layer.out_features):
        total = 0.0
        for i, xi in enumerate(x):
            total += silu(xi) * float(wb[j, i])
            for c in range(layer.grid_size + layer.spline_order):
                total += cox_de_boor(c, layer.spline_order, xi, knots) * float(ws[j, i, c]) * float(scale[j, i])
        out.append(total)
    return out


def test_knots_are_the_official_uniform_grid_extended_by_the_order():
    knots = uniform_knots(5, 3, (-3, 3))
    assert knots.tolist() == pytest.approx([-3 + 1.2 * i for i in range(-3, 9)])


def test_b_spline_bases_match_cox_de_boor():
    knots = uniform_knots(5, 3, (-3, 3))
    xs = torch.tensor([-6.0, -3.6, -3.0, -1.7, -0.2, 0.0, 0.9, 2.4, 2.99, 3.0, 4.1, 7.0], dtype=torch.float64)
    bases = b_spline_bases(xs, knots, 3)
    assert bases.shape == (len(xs), 8)
    expected = [[cox_de_boor(c, 3, float(x), knots.tolist()) for c in range(8)] for x in xs]
    torch.testing.assert_close(bases, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    inside = (xs >= -3) & (xs < 3)
    torch.testing.assert_close(bases[inside].sum(-1), torch.ones(int(inside.sum()), dtype=torch.float64))  # partition of unity


def test_kan_layer_and_network_match_a_direct_evaluation():
    torch.manual_seed(0)
    kan = KAN([4, 3, 2]).double()
    x = [-2.5, 0.3, 1.7, 4.0]
    hidden = kan_layer_direct(kan.layers[0], x)
    expected = kan_layer_direct(kan.layers[1], hidden)
    got = kan(torch.tensor([x], dtype=torch.float64))[0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def flux_dev_sigmas(steps: int = 50, mu: float = 1.15) -> list[float]:
    """FLUX.1-dev's 1024x1024 schedule (BFL get_schedule, image_seq_len 4096 -> mu 1.15): shifted linspace."""
    def shift(t: float) -> float:
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0
    return [shift(1 - i / steps) for i in range(steps + 1)]


def test_parameter_count_is_the_official_one():
    predictor = LesaPredictor(LesaPredictorConfig(timesteps=flux_dev_sigmas(), interval=7))
    assert sum(p.numel() for p in predictor.parameters()) == 2_365_463


def test_stage_map_and_windows_on_flux_dev_1024():
    predictor = LesaPredictor(LesaPredictorConfig(timesteps=flux_dev_sigmas(), interval=7, hidden_dim=4))
    stages = [predictor.stage(t) for t in flux_dev_sigmas()[:50]]
    assert stages == [0] * 13 + [1] * 25 + [2] * 12  # stage 0 = steps 0-12, 1 = 13-37, 2 = 38-49
    assert [predictor.window(s) for s in (0, 1, 2)] == [4, 8, 8]
    qwen = LesaPredictor(LesaPredictorConfig(timesteps=[1, 0], interval=7, hidden_dim=4, stage_thresholds=[0.9, 0.4]))
    assert [qwen.stage(t) for t in (0.95, 0.9, 0.45, 0.4, 0.1)] == [0, 1, 1, 2, 2]


def official_full_steps(num_steps: int, interval: int, first_enhance: int = 3) -> list[int]:
    """The official `cal_type`: a counter, and step 3 forced full after the counter moved."""
    full, counter = [], 0
    for step in range(num_steps):
        if step < first_enhance or counter == interval - 1:
            is_full, counter = True, 0
        else:
            is_full, counter = False, counter + 1
        if step == 3:
            is_full = True
        if is_full:
            full.append(step)
    return full


@pytest.mark.parametrize("interval", range(2, 13))
def test_schedule_is_the_official_cal_type(interval):
    config = hicache.CacheConfig("lesa", interval=interval, warmup=3, predictor=LesaPredictor(
        LesaPredictorConfig(timesteps=flux_dev_sigmas(), interval=interval, hidden_dim=4)))
    assert config.schedule.full_steps_for(50) == official_full_steps(50, interval)


def test_lesa_schedule_counts_ten_and_eight_full_steps():
    assert Schedule(7, 3, extra_full_steps=(3,)).full_steps_for(50) == [0, 1, 2, 3, 9, 16, 23, 30, 37, 44]
    assert Schedule(10, 3, extra_full_steps=(3,)).full_steps_for(50) == [0, 1, 2, 3, 12, 22, 32, 42]
    counts = {n: len(Schedule(n, 3, extra_full_steps=(3,)).full_steps_for(50)) for n in range(5, 11)}
    assert counts == {5: 13, 6: 11, 7: 10, 8: 9, 9: 9, 10: 8}
    # the training-free peers at the same cost: TaylorSeer/HiCache N=6 -> 10 full steps, N=9 -> 8
    assert len(Schedule(6, 3).full_steps_for(50)) == 10 and len(Schedule(9, 3).full_steps_for(50)) == 8


def small_predictor(steps: int = 8, interval: int = 3, **kwargs) -> LesaPredictor:
    torch.manual_seed(0)
    config = LesaPredictorConfig(timesteps=[1 - i / steps for i in range(steps + 1)], interval=interval,
                                 history_depth=4, hidden_dim=8, **kwargs)
    return LesaPredictor(config)


def test_predictor_is_h_prev_plus_kan_times_history_filter():
    predictor = small_predictor(branches=["cond", "uncond"]).double()
    history = [torch.randn(1, 5, 3, dtype=torch.float64) for _ in range(6)]
    for t, branch in ((0.95, "cond"), (0.7, "uncond"), (0.2, "cond")):
        stage = predictor.stage(t)
        k = predictor.window(stage)
        experts = predictor.experts[branch]
        w, b = experts.latent[stage].weight.detach()[0], experts.latent[stage].bias.detach()[0]
        z = sum(float(w[i]) * history[-k + i] for i in range(k)) + float(b)
        offsets = [t - tau for tau in predictor.config.timesteps]
        layers = experts.timestep[stage].layers
        alpha = kan_layer_direct(layers[2], kan_layer_direct(layers[1], kan_layer_direct(layers[0], offsets)))[0]
        torch.testing.assert_close(predictor(history, t, branch), history[-1] + alpha * z, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="only 3 exist"):
        predictor(history[:3], 0.7)
    with pytest.raises(ValueError, match="not for the cache context 'other'"):
        predictor(history, 0.7, "other")


def test_predictor_file_round_trip(tmp_path):
    predictor = small_predictor()
    old_mask = os.umask(0o022)
    try:
        save_predictor(predictor, tmp_path / "p")
    finally:
        os.umask(old_mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "p").iterdir()} == \
        {"predictor.json": 0o644, "predictor.safetensors": 0o644}  # not safetensors' 0600: shared predictors are read
    loaded = load_predictor(tmp_path / "p")
    assert loaded.config == predictor.config
    history = [torch.randn(2, 3) for _ in range(4)]
    torch.testing.assert_close(loaded(history, 0.5), predictor(history, 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LESA predictor at"):
        load_predictor(tmp_path / "missing")


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "needs predictor="),
    (dict(predictor="/nonexistent/predictor"), "no LESA predictor at"),
    (dict(predictor=small_predictor(interval=5)), "trained for interval 5, not 3"),
    (dict(predictor=small_predictor(), num_inference_steps=10), "8-step schedule, not 10"),
])
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        hicache.CacheConfig("lesa", interval=3, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="is for method='lesa'"):
        hicache.CacheConfig("fora", predictor=small_predictor())


STEPS = 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.cat([torch.zeros(16, 1), ids.float()], 1),
                txt_ids=torch.zeros(5, 3))


@torch.no_grad()
def _sample(model, config=None, observer=None, timestep_shift=0.0):
    inputs = _inputs()
    if config is not None:
        hicache.apply_cache(model, config, "flux")
        if observer is not None:
            lesa_hook(model).observer = observer
    try:
        x = inputs["hidden_states"].clone()
        for i in range(STEPS):
            t = torch.tensor([1.0 - i / STEPS + timestep_shift])
            if config is None:
                v = model(**{**inputs, "hidden_states": x}, timestep=t, return_dict=False)[0]
            else:
                with hicache.cache_context(model, "cond"):
                    v = model(**{**inputs, "hidden_states": x}, timestep=t, return_dict=False)[0]
            x = x - v / STEPS
        return x
    finally:
        if config is not None:
            hicache.remove_cache(model)


def test_interval_one_equals_the_uncached_model():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    config = hicache.CacheConfig("lesa", interval=1, warmup=3, predictor=small_predictor(interval=1))
    torch.testing.assert_close(_sample(model, config), _sample(model), rtol=0, atol=0)


def test_history_holds_computed_and_forecast_tensors_and_cached_steps_skip_the_stack():
    model = tiny_flux_transformer(num_layers=2, num_single_layers=2)
    predictor = small_predictor()
    seen = []
    calls = []
    model.transformer_blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    out = _sample(model, hicache.CacheConfig("lesa", interval=3, warmup=3, predictor=predictor),
                  observer=lambda step, branch, value, full: seen.append((step, full, value.clone())))
    assert [(s, f) for s, f, _ in seen] == [(0, True), (1, True), (2, True), (3, True), (4, False), (5, True),
                                            (6, False), (7, False)]
    assert len(calls) == 5  # the double-stream block ran at the 5 full steps only
    with torch.no_grad():  # step 6 is forecast from steps 2..5, step 7 from 3..6 (the forecast of 6 included)
        torch.testing.assert_close(seen[6][2], predictor([v for _, _, v in seen[2:6]], 1 - 6 / STEPS))
        torch.testing.assert_close(seen[7][2], predictor([v for _, _, v in seen[3:7]], 1 - 7 / STEPS))
    assert torch.isfinite(out).all()


def test_a_run_off_the_predictors_schedule_stops_with_one_line():
    model = tiny_flux_transformer(num_layers=1, num_single_layers=1)
    config = hicache.CacheConfig("lesa", interval=3, warmup=3, predictor=small_predictor())
    with pytest.raises(ValueError, match="trained on a schedule with t=0.5000"):
        _sample(model, config, timestep_shift=0.05)
