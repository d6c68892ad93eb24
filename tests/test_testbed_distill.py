"""Guidance distillation of the FLUX testbed (hicache/testbeds/flux_shapes/distill.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hicache.testbeds.flux_shapes.distill import GuidanceStageConfig, with_guidance_embedding
from hicache.testbeds.tiny.flux import tiny_flux_transformer

REPO = Path(__file__).resolve().parents[1]


def _inputs(transformer, batch=2, tokens=16, text=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return dict(
        hidden_states=torch.randn(batch, tokens, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False,
    )


def test_the_student_starts_as_its_teacher_at_every_guidance_and_learns_from_there():
    teacher = tiny_flux_transformer(seed=3).eval()
    student = with_guidance_embedding(teacher).eval()
    assert student.config.guidance_embeds and not teacher.config.guidance_embeds
    x = _inputs(teacher)
    with torch.no_grad():
        expected = teacher(**x)[0]
        for g in (1.0, 3.5, 7.0):
            assert torch.equal(student(**x, guidance=torch.full((2,), g))[0], expected)
    # the embedder is live: one gradient step on its output layer changes the output with the scale
    last = student.time_text_embed.guidance_embedder.linear_2
    student(**x, guidance=torch.full((2,), 3.0))[0].square().mean().backward()
    assert last.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="already"):
        with_guidance_embedding(student)


def test_bad_guidance_scales_are_refused():
    with pytest.raises(ValueError, match="scale_min"):
        GuidanceStageConfig(steps=1, scale_min=4.0, scale_max=2.0)
    with pytest.raises(ValueError, match="steps"):
        GuidanceStageConfig(steps=-1)


def test_training_with_distillation_ships_a_guidance_embedded_pipeline(tmp_path):
    from hicache.testbeds.flux_shapes import PIPELINE_CALL_KWARGS, load_pipeline

    out = tmp_path / "run"
    smoke = ["max_steps=2", "wandb.mode=disabled", "samples.every=0", "samples.num_captions=2", "samples.eval_captions=2",
             "samples.num_inference_steps=2", "samples.psnr_images=2", "transformer.caption_dropout=0.5",
             "guidance.steps=2", "guidance.batch_size=4", "samples.guidance_scales=[3.5]"]
    proc = subprocess.run([sys.executable, "run.py", "experiment=testbed_train", f"train.out_dir={out}",
                           f"paths.outputs={tmp_path}", *(f"train.{o}" for o in smoke)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "pipeline" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is True
    assert "guidance/loss" in proc.stderr + proc.stdout
    assert (out / "samples" / "final_guidance3.5.png").is_file()
    pipe = load_pipeline(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**PIPELINE_CALL_KWARGS, "guidance_scale": 3.5}
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert image.size == (64, 64)


def test_a_distilled_student_continues_only_with_its_teacher(tmp_path):
    from types import SimpleNamespace

    from hicache.testbeds.flux_shapes.distill import distill_guidance

    student = with_guidance_embedding(tiny_flux_transformer(seed=3))
    with pytest.raises(ValueError, match="guidance.teacher"):
        distill_guidance(SimpleNamespace(transformer=student), None, GuidanceStageConfig(steps=1), print, 0)
    student.save_pretrained(tmp_path / "distilled" / "transformer")
    with pytest.raises(ValueError, match="two branches"):
        distill_guidance(SimpleNamespace(transformer=student), None,
                         GuidanceStageConfig(steps=1, teacher=str(tmp_path / "distilled")), print, 0)


def _one_line_error(tmp_path, *overrides) -> str:
    result = subprocess.run([sys.executable, "run.py", "experiment=testbed_train", *overrides, "train.wandb.mode=disabled",
                             f"train.out_dir={tmp_path / 'out'}", f"paths.outputs={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def test_continuing_a_distilled_folder_without_its_teacher_stops_in_one_line(tmp_path):
    from hicache.testbeds.tiny.flux import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(tmp_path / "tiny")
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": True}))
    line = _one_line_error(tmp_path, f"train.init_from={folder}", "train.transformer.steps=0", "train.guidance.steps=2")
    assert line.startswith("error: train: guidance:") and "guidance.teacher" in line
    # the transformer stage cannot train a distilled transformer (FluxPipeline's forward needs a guidance then)
    line = _one_line_error(tmp_path, f"train.init_from={folder}", "train.guidance.steps=2")
    assert line.startswith("error: train: transformer:") and "transformer.steps=0" in line


def test_guidance_scales_without_a_distilled_transformer_stop_in_one_line(tmp_path):
    line = _one_line_error(tmp_path, "train.max_steps=2", "train.samples.guidance_scales=[3.5]")
    assert line.startswith("error: train: samples.guidance_scales") and "guidance.steps" in line
