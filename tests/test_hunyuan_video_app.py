"""HunyuanVideo through the experiment app (`run.py`) on the tiny pipeline: videos, metrics, W&B, errors."""

import json

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from hicache.app import video
from hicache.app.errors import SetupError
from hicache.app.testing import CONF_DIR, run_overrides
from hicache.app.tables import render

VIDEO_TINY_OVERRIDES = (
    "model=tiny_hunyuan_video", "data=tiny_words", "data.limit=2", "sampling.steps=8", "sampling.height=32",
    "sampling.width=32", "metrics=video", "logger=none", "speed.warmup=false",
)


def test_lossless_mp4_reads_back_bit_identical(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    video.write_lossless_mp4(frames, tmp_path / "v.mp4")
    assert np.array_equal(video.read_mp4(tmp_path / "v.mp4"), frames)
    video.write_preview_mp4(frames, tmp_path / "p.mp4")  # lossy, but a playable video of the same size
    assert video.read_mp4(tmp_path / "p.mp4").shape == frames.shape


def test_video_fidelity_is_the_mean_over_frames():
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    out = ref.copy()
    out[1] = np.clip(out[1].astype(int) + rng.integers(-20, 21, out[1].shape), 0, 255).astype(np.uint8)
    out[2] = np.clip(out[2].astype(int) + rng.integers(-5, 6, out[2].shape), 0, 255).astype(np.uint8)
    psnr = video.BUILDERS["video_psnr"](OmegaConf.create({}), "cpu")
    assert psnr.name == "psnr" and psnr.kind == "fidelity"
    frame_psnr = [10 * np.log10(255**2 / np.mean((out[i].astype(float) - ref[i]) ** 2)) for i in (1, 2)]
    assert psnr.fn(out[1:], ref[1:]) == pytest.approx(np.mean(frame_psnr), rel=1e-9)
    assert psnr.fn(ref, ref) == float("inf")
    ssim = video.BUILDERS["video_ssim"](OmegaConf.create({}), "cpu")
    assert ssim.fn(ref, ref) == pytest.approx(1.0)
    assert ssim.fn(out, ref) < 1.0


def test_tiny_model_config_uses_the_pipeline_template_with_the_tiny_crop():
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    from hicache.testbeds.tiny.hunyuan_video import tiny_llama_tokenizer, tiny_prompt_template

    spec = yaml.safe_load((CONF_DIR / "model" / "tiny_hunyuan_video.yaml").read_text())
    template = spec["call_kwargs"]["prompt_template"]
    assert template == tiny_prompt_template(tiny_llama_tokenizer())
    assert template["template"] == DEFAULT_PROMPT_TEMPLATE["template"]


def test_table_experiment_on_the_tiny_pipeline(tmp_path):
    base = [*VIDEO_TINY_OVERRIDES, "experiment=hunyuan_video_table", f"paths.outputs={tmp_path}"]
    summaries = {}
    for variant in ("original", "hicache_N7_O2_s0.5", "taylorseer_N5_O1"):
        [summary] = run_overrides(base + [f"variant={variant}"])
        summaries[variant] = summary
    original, hicache = summaries["original"], summaries["hicache_N7_O2_s0.5"]
    run_dir = tmp_path / "hunyuan_video_table"
    [hicache_dir] = run_dir.glob("hicache_N7_O2_s0.5_limit2")  # data.limit is part of the run's name
    outputs = sorted((hicache_dir / "images").iterdir())
    assert [p.name for p in outputs] == ["00000.mp4", "00001.mp4"]
    assert video.read_mp4(outputs[0]).shape == (9, 32, 32, 3)
    # the uncached run equals its reference exactly: the stored videos are lossless
    assert original["psnr"] == float("inf") and original["ssim"] == 1.0 and original["flops_speedup"] == 1.0
    # 8 steps, N=7, warm-up 3: full at 0, 1, 2 only; the forecast error is small but not zero
    assert hicache["full_steps"] == [0, 1, 2]
    assert 25 < hicache["psnr"] < float("inf") and hicache["ssim"] < 1.0
    assert 1.8 < hicache["flops_speedup"] < 8 / 3  # refiner, embeddings and norms still run every step
    records = [json.loads(line) for line in (hicache_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [42, 43]  # TaylorSeer's protocol: seed 42 + prompt index
    table = render(run_dir)
    assert "| HiCache | 8 | 7 | 2 | 0.5 |" in table and "| TaylorSeer | 8 | 5 | 1 |" in table


def test_wandb_logs_cached_and_reference_videos(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    [summary] = run_overrides([*VIDEO_TINY_OVERRIDES, "name=wandb_video", f"paths.outputs={tmp_path}", "logger=wandb",
                               "cache=fora", "cache.interval=3", "cache.warmup=1", "speed.flops=false"])
    run_dir = tmp_path / "wandb_video" / summary["run"]
    side_by_side = video.read_mp4(run_dir / "media" / "00000_cached_vs_reference.mp4")
    assert side_by_side.shape == (9, 32, 64, 3)
    logged = list((run_dir / "wandb").glob("offline-run-*/files/media/videos/*.mp4"))
    assert len(logged) == 2


def test_missing_weights_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_overrides(["experiment=hunyuan_video_hicache", f"paths.outputs={tmp_path}",
                       f"model.path={tmp_path / 'no_such_model'}", "logger=none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model_index.json missing" in err and "hunyuanvideo-community/HunyuanVideo" in err


def test_vbench_missing_is_one_line_setup_error():
    try:
        import vbench  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vbench is installed here")
    with pytest.raises(SetupError) as err:
        video.BUILDERS["vbench"](OmegaConf.create({"dimensions": ["subject_consistency"]}), "cpu")
    assert "pip install vbench" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SetupError, match="standard suite"):
        video.BUILDERS["vbench"](OmegaConf.create({"dimensions": ["color"]}), "cpu")


def test_vbench_prompt_suite_from_a_local_file(tmp_path):
    suite = tmp_path / "VBench_full_info.json"
    suite.write_text(json.dumps([{"prompt_en": "a cat", "dimension": ["color"]}, {"prompt_en": "a dog"}]))
    data = OmegaConf.create({"name": "vbench", "source": "vbench", "file": str(suite), "limit": None})
    assert video.SOURCES["vbench"](data) == ["a cat", "a dog"]


def test_image_metrics_on_a_video_model_fail_before_rendering(tmp_path, capsys):
    overrides = [o for o in VIDEO_TINY_OVERRIDES if not o.startswith("metrics=")]
    with pytest.raises(SystemExit):
        run_overrides([*overrides, "name=wrong_metrics", f"paths.outputs={tmp_path}", "metrics=fidelity"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use metrics=video" in err
    assert not (tmp_path / "_references").exists()  # nothing was rendered
    assert not (tmp_path / "wrong_metrics").exists()  # nor the run folder claimed
