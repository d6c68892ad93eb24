"""Trajectory recording on the tiny FluxPipeline: right modules, right steps, exact values, clean removal."""

import json

import pytest
import torch

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_pipeline
from hicache.trajectories import (
    TrajectoryRecorder,
    collect_pipeline_runs,
    load_trajectories,
    split_block,
    token_index,
    trajectory_files,
)




STEPS = 5
CALL = dict(num_inference_steps=STEPS, height=32, width=32, guidance_scale=3.5)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(num_layers=2, num_single_layers=2)


def test_split_block():
    assert split_block("transformer_blocks.3.attn") == ("transformer_blocks.3", "attn")
    assert split_block("single_transformer_blocks.12.proj_out") == ("single_transformer_blocks.12", "proj_out")
    assert split_block("proj_out") == ("", "proj_out")


def test_token_index_is_fixed_sorted_and_bounded():
    a, b = token_index(100, 10, seed=3), token_index(100, 10, seed=3)
    assert torch.equal(a, b) and len(a) == 10 and torch.all(a[1:] > a[:-1])
    assert not torch.equal(a, token_index(100, 10, seed=4))
    assert torch.equal(token_index(8, 10, seed=0), torch.arange(8))


def test_collect_saves_one_file_per_run_with_metadata(pipe, tmp_path):
    paths = collect_pipeline_runs(
        pipe, ["a red circle", "a blue square"], [0, 1], tmp_path, blocks=r"transformer_blocks\.1|single_transformer_blocks\.0",
        num_tokens=8, progress=False, **CALL,
    )
    assert len(paths) == 4 and trajectory_files(tmp_path) == sorted(paths)
    traj = load_trajectories(paths[0])
    names = {s.name for s in traj}
    assert names == {"transformer_blocks.1.attn", "transformer_blocks.1.ff", "transformer_blocks.1.ff_context",
                     "single_transformer_blocks.0.proj_out"}
    # attn returns (image, text): both outputs are kept
    assert {s.output for s in traj if s.module == "attn"} == {0, 1}
    for s in traj:
        assert s.steps == list(range(STEPS))
        assert s.values.shape[0] == STEPS and s.values.shape[2] <= 8
    meta = traj.meta
    assert meta["prompt"] == "a red circle" and meta["seed"] == 0 and meta["recipe"] == "flux"
    assert len(meta["timesteps"]["cond"]) == STEPS and meta["timesteps"]["cond"][0] == pytest.approx(1.0)
    assert len(meta["sigmas"]) == STEPS + 1
    assert json.loads(paths[0].with_suffix(".json").read_text())["seed"] == 0
    # hooks are gone after collection
    assert not pipe.transformer._diffusers_hook.hooks


def test_recorded_values_are_the_module_outputs(pipe):
    """Values recorded by the hook equal what a plain torch forward hook sees, on the kept tokens."""
    model = pipe.transformer
    name = "single_transformer_blocks.1.proj_out"
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    recorder = TrajectoryRecorder(model, "flux", blocks=r"single_transformer_blocks\.1", num_tokens=5)
    try:
        pipe("a green star", generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)
    finally:
        recorder.remove()
        handle.remove()
    series = recorder._features[("cond", name, 0)]
    assert [s for s, _ in series] == list(range(STEPS))
    index = token_index(seen[0].shape[1], 5, 0)
    for (_, value), full in zip(series, seen):
        torch.testing.assert_close(value, full[:, index].float())


def test_recording_does_not_change_the_output(pipe):
    def run():
        return pipe("a cat", generator=torch.Generator().manual_seed(2), output_type="latent", **CALL).images

    reference = run()
    recorder = TrajectoryRecorder(pipe.transformer, "flux", num_tokens=4)
    try:
        recorded = run()
    finally:
        recorder.remove()
    torch.testing.assert_close(recorded, reference, rtol=0, atol=0)


def test_memory_budget_and_bad_inputs(pipe):
    recorder = TrajectoryRecorder(pipe.transformer, "flux", num_tokens=None, max_bytes=1000)
    try:
        with pytest.raises(MemoryError, match="max_bytes"):
            pipe("a dog", generator=torch.Generator().manual_seed(0), output_type="latent", **CALL)
    finally:
        recorder.remove()
    with pytest.raises(ValueError, match="matches no module"):
        TrajectoryRecorder(pipe.transformer, "flux", blocks="nope")
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig("fora"), "flux")
    try:
        with pytest.raises(ValueError, match="full compute"):
            TrajectoryRecorder(pipe.transformer, "flux")
    finally:
        hicache.remove_cache(pipe.transformer)
    with pytest.raises(FileNotFoundError, match="collect_features"):
        load_trajectories("/nonexistent/run.safetensors")
