"""The app's parts on their own: prompt sets, metrics and their one-line errors, loading, FLOPs, diffusers caches."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from hicache.app.caching import attach
from hicache.app.errors import SetupError
from hicache.app.metrics import build_metrics
from hicache.app.metrics.fidelity import psnr, ssim
from hicache.app.pipelines import load_pipeline
from hicache.app.prompts import load_prompts
from hicache.app.references import ReferenceStore
from hicache.app.outputs import output_kind
from hicache.app.speed import count_transformer_flops
from hicache.testbeds.tiny.flux import save_tiny_flux_pipeline, tiny_flux_pipeline

CPU = torch.device("cpu")


def cfg(**kwargs):
    return OmegaConf.create(kwargs)


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


# -- prompts -------------------------------------------------------------------------------------

def test_text_file_prompts_get_index_seeds(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n  a blue square  \na star\n")
    prompts = load_prompts(cfg(name="f", source="file", file=str(path), column=None, limit=2), seed_offset=10)
    assert [(p.index, p.text, p.seed) for p in prompts] == [(0, "a red circle", 10), (1, "a blue square", 11)]


def test_hub_prompt_set_reads_its_local_file_override(tmp_path):
    path = tmp_path / "drawbench.csv"
    path.write_text("Prompts,Category\nA red colored car.,Colors\nA black colored banana.,Colors\n")
    data = cfg(name="drawbench", source="hub", hub_id="sayakpaul/drawbench", split="train", column="Prompts",
               local_file=str(path), limit=None)
    assert [p.text for p in load_prompts(data)] == ["A red colored car.", "A black colored banana."]


def test_unreachable_hub_prompt_set_is_a_one_line_error(monkeypatch):
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    data = cfg(name="drawbench", source="hub", hub_id="sayakpaul/drawbench", split="train", column="Prompts",
               local_file=None, limit=None)
    with pytest.raises(SetupError) as err:
        load_prompts(data)
    assert "data.local_file=" in one_line(err.value)


def test_testbed_prompt_set_uses_the_heldout_captions():
    testbed = pytest.importorskip("hicache.testbeds.flux_shapes")
    prompts = load_prompts(cfg(name="t", source="testbed", n=3, seed=0, limit=None))
    assert [p.text for p in prompts] == list(testbed.heldout_captions(3, 0))


# -- metrics -------------------------------------------------------------------------------------

def _image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_psnr_and_ssim_match_their_definitions():
    a = _image(0)
    b = Image.fromarray(np.clip(np.asarray(a).astype(int) + 4, 0, 255).astype(np.uint8))
    mse = np.mean((np.asarray(a).astype(float) - np.asarray(b).astype(float)) ** 2)
    assert psnr(b, a) == pytest.approx(10 * math.log10(255**2 / mse))
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert ssim(_image(1), a) < 0.1


def test_lpips_without_alexnet_weights_is_one_line_or_na(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    options = {"lpips": {"enabled": True, "required": True, "net": "alex"}}
    with pytest.raises(SetupError) as err:
        build_metrics(cfg(**options), CPU)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in one_line(err.value)
    options["lpips"]["required"] = False
    metrics, unavailable = build_metrics(cfg(**options), CPU)
    assert metrics == [] and unavailable == ["lpips"]


def test_clip_without_its_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SetupError) as err:
        build_metrics(cfg(clip={"enabled": True, "required": True, "model": "openai/clip-vit-large-patch14"}), CPU)
    assert "metrics.clip.model=" in one_line(err.value)


def test_image_reward_without_package_or_checkpoint_is_one_line(tmp_path):
    options = cfg(image_reward={"enabled": True, "required": True, "checkpoint": str(tmp_path / "ImageReward.pt"),
                                "med_config": str(tmp_path / "med_config.json")})
    with pytest.raises(SetupError) as err:
        build_metrics(options, CPU)
    assert "image-reward" in one_line(err.value) or "ImageReward.pt" in one_line(err.value)


def test_checker_metric_scores_the_testbed_caption():
    testbed = pytest.importorskip("hicache.testbeds.flux_shapes")
    [checker], _ = build_metrics(cfg(checker={"enabled": True, "required": True}), CPU)
    caption = testbed.heldout_captions(1, 0)[0]
    image = testbed.render(testbed.parse_caption(caption)) if hasattr(testbed, "render") else None
    if not isinstance(image, Image.Image):
        pytest.skip("testbed.render does not return a PIL image from a scene")
    assert checker.fn(image, caption) == pytest.approx(1.0)


# -- loading, references, FLOPs, caches ---------------------------------------------------------------

def test_flux_pipeline_loads_from_a_folder_and_missing_folder_is_one_line(tmp_path):
    folder = save_tiny_flux_pipeline(tmp_path / "pipe")
    model = cfg(name="tiny_folder", kind="flux", path=str(folder), dtype="float32", download_hint="get it")
    pipe = load_pipeline(model, CPU)
    assert type(pipe).__name__ == "FluxPipeline"
    model.path = str(tmp_path / "missing")
    with pytest.raises(SetupError) as err:
        load_pipeline(model, CPU)
    assert one_line(err.value).endswith("get it") and "model_index.json" in str(err.value)


def test_reference_store_round_trip_and_keys(tmp_path):
    store = ReferenceStore(tmp_path, output_kind("image"), {"model": "m", "steps": 50})
    assert store.get("a cat", 0) is None
    store.put("a cat", 0, _image(0), {"latency_s": 1.5, "metrics": {}})
    image, meta = store.get("a cat", 0)
    assert np.array_equal(np.asarray(image), np.asarray(_image(0))) and meta["latency_s"] == 1.5
    assert store.key("a cat", 0) != store.key("a cat", 1) != ReferenceStore(tmp_path, output_kind("image"), {"model": "m", "steps": 49}).key("a cat", 0)


def _generate(pipe, steps=6):
    return pipe("a red circle", num_inference_steps=steps, height=16, width=16, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_flops_count_only_the_transformer_and_drop_with_the_cache():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with count_transformer_flops(pipe.transformer) as full:
        _generate(pipe)
    assert full["calls"] == 6 and full["flops"] > 0
    cache = cfg(family="hicache", method="hicache", interval=3, warmup=1, order=1, sigma=0.5)
    attached = attach(pipe, cache, cfg(recipe="flux"), 6)
    try:
        with count_transformer_flops(pipe.transformer) as cached:
            _generate(pipe)
    finally:
        attached.detach()
    assert cached["calls"] == 6 and cached["flops"] < 0.6 * full["flops"]  # full at steps 0 and 3 only


@pytest.mark.parametrize("name", ["diffusers_taylorseer", "diffusers_magcache", "diffusers_first_block_cache",
                                  "diffusers_pab"])
def test_diffusers_caches_attach_run_and_detach(name):
    from hicache.app.testing import CONF_DIR

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = _generate(pipe)
    attached = attach(pipe, OmegaConf.load(CONF_DIR / "cache" / f"{name}.yaml"), cfg(recipe="flux"), 6)
    assert pipe.transformer.is_cache_enabled
    cached = _generate(pipe)
    attached.detach()
    assert not pipe.transformer.is_cache_enabled
    assert np.isfinite(cached).all() and cached.shape == reference.shape
    assert np.array_equal(_generate(pipe), reference)


@pytest.mark.parametrize("name", ["none", "fora", "taylorseer", "hicache", "hi_taylor", "hicache_analytic"])
def test_hicache_cache_configs_attach_run_and_detach(name):
    from hicache.app.testing import CONF_DIR

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = _generate(pipe)
    attached = attach(pipe, OmegaConf.load(CONF_DIR / "cache" / f"{name}.yaml"), cfg(recipe="flux"), 6)
    cached = _generate(pipe)
    attached.detach()
    assert np.isfinite(cached).all()
    assert np.array_equal(cached, reference) == (name == "none")  # 6 steps at N=7, W=3: steps 3-5 forecast
    assert np.array_equal(_generate(pipe), reference)
