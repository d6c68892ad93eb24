"""`psnr_uint8`: the wrapping PSNR of the official LESA evaluation, beside (never instead of) the real one."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hicache.app.metrics import build_metrics
from hicache.app.metrics.fidelity import psnr, psnr_uint8
from hicache.app.testing import CONF_DIR
from hicache.app.tables import render


def test_the_subtraction_and_the_square_wrap_modulo_256():
    """The spec's check: (10, 200, 0) against (0, 0, 200) has a wrapped MSE of (100 + 64 + 64) / 3 = 76."""
    a, b = np.array([[[10, 200, 0]]], np.uint8), np.array([[[0, 0, 200]]], np.uint8)
    assert psnr_uint8(a, b) == pytest.approx(20 * math.log10(255 / math.sqrt(76)))
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / ((100 + 40000 + 40000) / 3)))


def test_unrelated_images_score_about_28_db_and_never_below_24():
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2))
    assert psnr_uint8(a, b) == pytest.approx(27.9, abs=0.1)
    assert psnr(a, b) == pytest.approx(7.7, abs=0.1)
    black = np.zeros_like(a)
    assert psnr_uint8(a, black) > 24.07 > psnr(a, black)
    shifted = (a.astype(int) + 16) % 256  # every difference a multiple of 16: nothing left after wrapping
    assert psnr_uint8(shifted.astype(np.uint8), a) == float("inf")


def test_below_a_difference_of_16_nothing_wraps():
    rng = np.random.default_rng(1)
    a = rng.integers(20, 236, (32, 32, 3), dtype=np.uint8)
    b = (a.astype(int) + rng.integers(-15, 16, a.shape)).astype(np.uint8)
    assert psnr_uint8(b, a) == pytest.approx(psnr(b, a), rel=1e-12)


def test_it_is_off_by_default_and_one_option_adds_it():
    default = OmegaConf.load(CONF_DIR / "metrics" / "default.yaml")
    default = OmegaConf.create({k: default[k] for k in ("psnr", "psnr_uint8")})  # no model-backed metric: fast
    names = [m.name for m in build_metrics(default, torch.device("cpu"))[0]]
    assert "psnr" in names and "psnr_uint8" not in names
    default.psnr_uint8.enabled = True
    metric = next(m for m in build_metrics(default, torch.device("cpu"))[0] if m.name == "psnr_uint8")
    assert metric.kind == "fidelity" and metric.fn is psnr_uint8


def test_tables_show_it_beside_psnr_when_a_run_measured_it(tmp_path):
    base = {"experiment": "e", "model": "testbed", "steps": 50, "reference_steps": 50, "height": 64, "width": 64,
            "device": "cpu", "num_outputs": 4, "method": "hicache", "interval": 7, "order": 2, "sigma": 0.5}
    for run, extra in (("a", {"psnr": 20.0}), ("b", {"psnr": 20.0, "psnr_uint8": 28.5})):
        (tmp_path / run).mkdir()
        (tmp_path / run / "summary.json").write_text(json.dumps({**base, "run": run, **extra}))
    table = render(tmp_path)
    assert "| PSNR | PSNR uint8 (wraps) |" in table and "| 20.00 | 28.50 |" in table and "| 20.00 | - |" in table
    (tmp_path / "b" / "summary.json").write_text(json.dumps({**base, "run": "b", "psnr": 20.0}))
    assert "uint8" not in render(tmp_path)
