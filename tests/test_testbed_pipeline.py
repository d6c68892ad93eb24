"""The shipped testbed pipeline, and the training script's smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hicache.testbeds.flux_shapes import PIPELINE_CALL_KWARGS, TESTBED_DIR, check, heldout_captions, load_pipeline

REPO = Path(__file__).resolve().parents[1]
SMOKE = [
    "max_steps=2", "wandb.mode=disabled", "samples.every=0", "samples.num_captions=2",
    "samples.eval_captions=2", "samples.num_inference_steps=2", "samples.psnr_images=2",
]  # keys of the `train` group (conf/train/testbed.yaml)


def test_shipped_pipeline_loads_and_generates():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(TESTBED_DIR)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert pipe.vae.config.latent_channels == 16
    size = sum(f.stat().st_size for f in TESTBED_DIR.rglob("*") if f.is_file())
    assert size < 40 * 2**20
    pipe.set_progress_bar_config(disable=True)
    caption = heldout_captions(1)[0]
    image = pipe(caption, num_inference_steps=4, generator=torch.Generator().manual_seed(0), **PIPELINE_CALL_KWARGS).images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 1  # not a blank image
    assert set(check(image, caption)) >= {"shape", "colour", "position", "size"}
    # it samples on FLUX.1-dev's 1024 px time grid (mu 1.15) at its own 64 tokens, not at FluxPipeline's 0.47
    assert pipe.scheduler.config.base_shift == pipe.scheduler.config.max_shift == 1.15


def test_missing_folder_gives_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json") as err:
        load_pipeline(tmp_path / "nowhere")
    assert "\n" not in str(err.value)


def test_training_experiment_smoke_run(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "run.py", "experiment=testbed_train", f"train.out_dir={out}", f"paths.outputs={tmp_path}",
         *(f"train.{o}" for o in SMOKE), "train.schedule_mu=0.8"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pipeline" / "model_index.json").is_file()
    scheduler = json.loads((out / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["base_shift"] == scheduler["max_shift"] == 0.8  # the schedule it was evaluated at ships with it
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "vae_reconstructions.png").is_file()
    assert "transformer/loss" in proc.stderr + proc.stdout


def test_training_is_reproducible(tmp_path):
    from hydra import compose, initialize_config_dir

    from hicache.testbeds.flux_shapes.train import run

    # no wall-clock limit: with one, the learning rate also follows elapsed time and the run is not step-exact
    overrides = SMOKE + ["model.text_width=32", "model.num_single_layers=1", "vae.batch_size=2", "transformer.batch_size=4",
                         "transformer.time_limit_minutes=null", "transformer.caption_dropout=0.5"]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "train"), version_base=None):
        cfg = compose(config_name="testbed", overrides=overrides)
    from safetensors.torch import load_file

    weights, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does; also keeps the test fast on a busy machine
    try:
        for name in ("a", "b"):
            run(cfg, tmp_path / name, lambda metrics, step: None)
            weights.append(load_file(tmp_path / name / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
