"""Inf-DiT port: key mapping, block/neighbour logic, pipeline shapes and cropping, cache recipe, errors.

The port itself was checked against the official code offline (official DiffusionEngine on CPU with
SDPA for flash-attn, same random weights through the converter); see hicache/models/inf_dit/README.md.
"""

import re

import pytest
import torch

import hicache
from hicache.models.inf_dit import InfDiTTransformer2DModel, from_sat_state_dict, to_sat_state_dict
from hicache.models.inf_dit.attention import (
    from_blocks,
    gather_neighbour_blocks,
    rope_position_ids,
    to_blocks,
)
from hicache.models.inf_dit.checkpoint import CheckpointMismatch, load_sat_checkpoint
from hicache.models.inf_dit.pipeline import center_crop_to_multiple, edm_sigmas
from hicache.testbeds.tiny.inf_dit import TINY_CONFIG, tiny_inf_dit_pipeline

# The official DiffusionEngine's state_dict keys at num_layers=2 (dumped from the official code).
OFFICIAL_KEYS_2_LAYERS = {
    "cond_embed.map_vector.0.bias", "cond_embed.map_vector.0.weight", "cond_embed.map_vector.2.bias",
    "cond_embed.map_vector.2.weight", "mixins.adaln_layer.adaLN_modulations.0.1.bias",
    "mixins.adaln_layer.adaLN_modulations.0.1.weight", "mixins.adaln_layer.adaLN_modulations.1.1.bias",
    "mixins.adaln_layer.adaLN_modulations.1.1.weight", "mixins.adaln_layer.cross_attention.dense.bias",
    "mixins.adaln_layer.cross_attention.dense.weight", "mixins.adaln_layer.cross_attention.key_value.bias",
    "mixins.adaln_layer.cross_attention.key_value.weight", "mixins.adaln_layer.cross_attention.query.bias",
    "mixins.adaln_layer.cross_attention.query.weight", "mixins.adaln_layer.cross_k_ln.bias",
    "mixins.adaln_layer.cross_k_ln.weight", "mixins.adaln_layer.cross_q_ln.bias", "mixins.adaln_layer.cross_q_ln.weight",
    "mixins.adaln_layer.k_layer_norm.0.bias", "mixins.adaln_layer.k_layer_norm.0.weight",
    "mixins.adaln_layer.k_layer_norm.1.bias", "mixins.adaln_layer.k_layer_norm.1.weight",
    "mixins.adaln_layer.lr_key_position_embedding", "mixins.adaln_layer.lr_query_position_embedding",
    "mixins.adaln_layer.post_cross_attention_layernorm.bias", "mixins.adaln_layer.post_cross_attention_layernorm.weight",
    "mixins.adaln_layer.proj_lr.bias", "mixins.adaln_layer.proj_lr.weight", "mixins.adaln_layer.q_layer_norm.0.bias",
    "mixins.adaln_layer.q_layer_norm.0.weight", "mixins.adaln_layer.q_layer_norm.1.bias",
    "mixins.adaln_layer.q_layer_norm.1.weight", "mixins.adaln_layer.re_pos_embed", "mixins.adaln_layer.rope.freqs_cos",
    "mixins.adaln_layer.rope.freqs_sin", "mixins.final_layer.adaLN_modulation.1.bias",
    "mixins.final_layer.adaLN_modulation.1.weight", "mixins.final_layer.linear.bias", "mixins.final_layer.linear.weight",
    "mixins.patch_embed.proj.bias", "mixins.patch_embed.proj.weight", "time_embed.mlp.0.bias", "time_embed.mlp.0.weight",
    "time_embed.mlp.2.bias", "time_embed.mlp.2.weight", "transformer.layers.0.attention.dense.bias",
    "transformer.layers.0.attention.dense.weight", "transformer.layers.0.attention.query_key_value.bias",
    "transformer.layers.0.attention.query_key_value.weight", "transformer.layers.0.mlp.dense_4h_to_h.bias",
    "transformer.layers.0.mlp.dense_4h_to_h.weight", "transformer.layers.0.mlp.dense_h_to_4h.bias",
    "transformer.layers.0.mlp.dense_h_to_4h.weight", "transformer.layers.1.attention.dense.bias",
    "transformer.layers.1.attention.dense.weight", "transformer.layers.1.attention.query_key_value.bias",
    "transformer.layers.1.attention.query_key_value.weight", "transformer.layers.1.mlp.dense_4h_to_h.bias",
    "transformer.layers.1.mlp.dense_4h_to_h.weight", "transformer.layers.1.mlp.dense_h_to_4h.bias",
    "transformer.layers.1.mlp.dense_h_to_4h.weight", "transformer.position_embeddings.weight",
}
UNUSED_IN_PORT = {k for k in OFFICIAL_KEYS_2_LAYERS if re.search(r"position_embeddings|k_layer_norm|rope\.freqs", k)}




@pytest.fixture(scope="module")
def pipe():
    return tiny_inf_dit_pipeline(seed=0)


def official_state(model):
    """The port's weights under official names, plus the tensors the official model has and the port drops."""
    state = to_sat_state_dict(model.state_dict(), model.config.num_layers)
    for key in UNUSED_IN_PORT:
        state[key] = torch.zeros(3)
    return state


# --- key mapping ---------------------------------------------------------------------------------


def test_port_keys_map_onto_exactly_the_official_keys(pipe):
    model = pipe.transformer
    assert set(to_sat_state_dict(model.state_dict(), 2)) == OFFICIAL_KEYS_2_LAYERS - UNUSED_IN_PORT


def test_key_mapping_round_trips_both_ways(pipe):
    model = pipe.transformer
    official = official_state(model)
    port = from_sat_state_dict(official, 2)
    assert set(port) == set(model.state_dict())
    assert all(torch.equal(port[k], v) for k, v in model.state_dict().items())
    again = to_sat_state_dict(port, 2)
    assert all(torch.equal(again[k], official[k]) for k in again)
    fresh = InfDiTTransformer2DModel(**TINY_CONFIG)
    fresh.load_state_dict(port, strict=True)
    x, lr, emb = torch.randn(1, 6, 16, 16), torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 8)
    assert torch.equal(fresh(x, 0.1, lr, emb).sample, model(x, 0.1, lr, emb).sample)


def test_unexpected_and_missing_keys_are_named(pipe):
    official = official_state(pipe.transformer)
    with pytest.raises(CheckpointMismatch, match=r"unexpected key.*mixins\.adaln_layer\.surprise"):
        from_sat_state_dict({**official, "mixins.adaln_layer.surprise": torch.zeros(1)}, 2)
    del official["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    with pytest.raises(CheckpointMismatch, match=r"missing key.*transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        from_sat_state_dict(official, 2)


def test_wrong_layer_count_is_an_error(pipe):
    with pytest.raises(CheckpointMismatch, match="num_layers=1"):
        from_sat_state_dict(official_state(pipe.transformer), 1)


def test_sat_checkpoint_file_loads_and_missing_file_says_where_to_get_it(pipe, tmp_path):
    torch.save({"module": official_state(pipe.transformer)}, tmp_path / "mp_rank_00_model_states.pt")
    model = InfDiTTransformer2DModel.from_sat_checkpoint(tmp_path, **TINY_CONFIG)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pipe.transformer.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"cloud\.tsinghua\.edu\.cn.*mp_rank_00_model_states\.pt"):
        load_sat_checkpoint(tmp_path / "nowhere")


def test_converter_writes_a_from_pretrained_folder(pipe, tmp_path):
    from hicache.models.inf_dit.convert import main

    torch.save({"module": official_state(pipe.transformer)}, tmp_path / "ckpt.pt")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_CONFIG.items()]
    assert main([str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--no-image-encoder", *flags]) == 0
    loaded = InfDiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in pipe.transformer.state_dict().items())
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "out2")]) == 2


def test_released_parameter_count_matches_the_official_model(capsys):
    from hicache.models.inf_dit.convert import main

    assert main(["--count"]) == 0
    out = capsys.readouterr().out
    assert "port transformer (released config): 753,430,768" in out
    assert "official DiT: 753,762,928 (issue: 753,762,928) MATCH" in out


# --- block and neighbour logic -------------------------------------------------------------------


def test_neighbours_on_a_2x3_block_grid():
    ids = torch.arange(6).reshape(1, 2, 3, 1)  # block (i, j) holds the id 3 i + j
    slots = gather_neighbour_blocks(ids)[0, :, :, :, ].tolist()
    # slots: self, top-left, left, top; missing neighbours clamp to the border (replicate padding)
    expected = {
        (0, 0): [0, 0, 0, 0], (0, 1): [1, 0, 0, 1], (0, 2): [2, 1, 1, 2],
        (1, 0): [3, 0, 3, 0], (1, 1): [4, 0, 3, 1], (1, 2): [5, 1, 4, 2],
    }
    for (i, j), want in expected.items():
        assert slots[i][j] == want, (i, j)


def test_blocks_round_trip_and_follow_raster_order():
    grid, block = (4, 6), 2
    x = torch.arange(24).reshape(1, 24, 1)
    blocks = to_blocks(x, grid, block)
    assert blocks.shape == (1, 2, 3, 4, 1)
    assert blocks[0, 1, 2, :, 0].tolist() == [16, 17, 22, 23]  # rows 2-3, columns 4-5
    assert torch.equal(from_blocks(blocks, grid, block), x)


def test_rope_positions_wrap_at_the_period():
    pos = rope_position_ids((3, 5), period=4)
    assert pos[7].tolist() == [1, 2] and pos[4].tolist() == [0, 0]  # token 4 is column 4 -> 4 % 4


def test_a_block_only_sees_its_neighbours(pipe):
    """Changing the input in the bottom-right block of a 3x3 grid leaves the top-left 2x2 blocks unchanged."""
    model = pipe.transformer
    x, lr, emb = torch.randn(1, 6, 48, 48), torch.rand(1, 3, 12, 12) * 2 - 1, torch.randn(1, 8)
    base = model(x, 0.2, lr, emb).sample
    x2 = x.clone()
    x2[..., 32:, 32:] += 1
    moved = model(x2, 0.2, lr, emb).sample
    assert torch.equal(base[..., :32, :32], moved[..., :32, :32])
    assert not torch.equal(base[..., 32:, 32:], moved[..., 32:, 32:])


# --- pipeline ------------------------------------------------------------------------------------


def run(pipe, image, steps=2, seed=0, **kwargs):
    return pipe(image, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **kwargs).images


def test_sigmas_are_the_edm_schedule():
    s = edm_sigmas(20)
    assert len(s) == 21 and s[-1] == 0
    assert s[0] == pytest.approx(40.0, rel=1e-5) and s[-2] == pytest.approx(0.002, rel=1e-4)


def test_non_square_image_needing_a_crop(pipe):
    image = torch.rand(1, 3, 11, 14)  # crops to 8 x 12 (multiples of 16 px / 4), centred
    out = run(pipe, image)
    assert out.shape == (1, 3, 32, 48) and 0 <= out.min() and out.max() <= 1
    top, left = round((11 - 8) / 2), round((14 - 12) / 2)
    assert torch.equal(center_crop_to_multiple(image, 4), image[..., top : top + 8, left : left + 12])
    assert torch.equal(out, run(pipe, image[..., top : top + 8, left : left + 12]))


def test_pil_input_and_output(pipe):
    from PIL import Image

    image = Image.fromarray((torch.rand(9, 12, 3) * 255).to(torch.uint8).numpy())
    out = pipe(image, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert len(out) == 1 and out[0].size == (48, 32)


def test_image_embeds_bypass_the_encoder(pipe):
    image = torch.rand(1, 3, 8, 8)
    lr = image * 2 - 1
    from hicache.models.inf_dit.image_encoder import encode_lr_image

    embeds = encode_lr_image(pipe.image_encoder, lr)
    assert torch.allclose(embeds.norm(dim=-1), torch.ones(1))
    assert torch.equal(run(pipe, image), run(pipe, image, image_embeds=embeds))


def test_upscale_two(pipe):
    out = run(pipe, torch.rand(1, 3, 8, 16), upscale=2)
    assert out.shape == (1, 3, 16, 32)


def test_bad_inputs_give_clear_errors(pipe):
    with pytest.raises(ValueError, match="at least 4x4 px"):
        run(pipe, torch.rand(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        run(pipe, torch.rand(1, 3, 8, 8) * 2)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        run(pipe, torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="image_embeds must be"):
        run(pipe, torch.rand(1, 3, 8, 8), image_embeds=torch.randn(1, 5))
    with pytest.raises(ValueError, match="latents must be"):
        run(pipe, torch.rand(1, 3, 8, 8), latents=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="upscale must be"):
        run(pipe, torch.rand(1, 3, 8, 8), upscale=3)
    with pytest.raises(ValueError, match="output_type"):
        pipe(torch.rand(1, 3, 8, 8), output_type="latent")
    with pytest.raises(ValueError, match="multiples of image_block_size=16"):
        pipe.transformer(torch.randn(1, 6, 24, 32), 0.0, torch.randn(1, 3, 6, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"lr_image must have shape \(1, 3, 4, 8\)"):
        pipe.transformer(torch.randn(1, 6, 16, 32), 0.0, torch.randn(1, 3, 8, 8), torch.randn(1, 8))
    no_encoder = tiny_inf_dit_pipeline(with_image_encoder=False)
    with pytest.raises(ValueError, match="pass image_embeds"):
        run(no_encoder, torch.rand(1, 3, 8, 8))


# --- cache recipe --------------------------------------------------------------------------------


def test_recipe_matches_attn_cross_attn_and_ff(pipe):
    from hicache.recipes import get_recipe

    recipe = get_recipe("inf_dit")
    names = [n for n, _ in pipe.transformer.named_modules() if recipe.role(n) == "forecast"]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.cross_attn", "transformer_blocks.0.ff",
                     "transformer_blocks.1.attn", "transformer_blocks.1.ff"]


@pytest.mark.parametrize("method", ["none", "fora", "hicache"])
def test_interval_one_equals_uncached(pipe, method):
    image = torch.rand(1, 3, 8, 12)
    reference = run(pipe, image, steps=3)
    hicache.apply_cache(pipe.transformer, hicache.CacheConfig(method=method, interval=1, warmup=1, order=1), "inf_dit")
    try:
        assert torch.equal(run(pipe, image, steps=3), reference)
    finally:
        hicache.remove_cache(pipe.transformer)


def test_a_step_is_one_transformer_forward(pipe):
    image = torch.rand(1, 3, 8, 12)
    reference = run(pipe, image, steps=4)
    config = hicache.CacheConfig(method="hicache", interval=3, warmup=2, order=1, sigma=0.5)
    hicache.apply_cache(pipe.transformer, config, "inf_dit")
    try:
        cached = run(pipe, image, steps=4)
        summary = hicache.cache_summary(pipe.transformer, num_inference_steps=7)
        assert summary.full_forwards + summary.cached_forwards == 7  # 4 Heun steps, the last one Euler
        assert summary.cached_forwards == len(summary.cached_steps) > 0
        assert not torch.equal(cached, reference)
        assert torch.equal(run(pipe, image, steps=4), cached)  # state resets between calls
    finally:
        hicache.remove_cache(pipe.transformer)


def test_clip_tower_loads_strictly_from_official_names(monkeypatch):
    from hicache.models.inf_dit import image_encoder
    from hicache.testbeds.tiny.inf_dit import tiny_clip_visual

    monkeypatch.setattr(image_encoder, "build_clip_visual", lambda arch="": tiny_clip_visual(seed=1))
    source = tiny_clip_visual(seed=0)
    state = {f"image_encoder.model.visual.{k}": v for k, v in source.state_dict().items()}
    state["image_encoder.model.token_embedding.weight"] = torch.zeros(2, 2)  # text side: not part of the tower
    loaded = image_encoder.clip_visual_from_sat_state_dict(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    del state["image_encoder.model.visual.proj"]
    with pytest.raises(RuntimeError, match="proj"):
        image_encoder.clip_visual_from_sat_state_dict(state)
