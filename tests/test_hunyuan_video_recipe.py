"""The `hunyuan_video` recipe on an unmodified `HunyuanVideoTransformer3DModel`.

What is forecast must be a block's pre-gate, pre-residual term: replacing the module's output by
zeros must leave the block's output equal to its input (the residual is added outside), and adding
a perturbation must move the output by exactly gate * perturbation (the gate is applied outside).
"""

import pytest
import torch

import hicache
from hicache.testbeds.tiny.hunyuan_video import tiny_hunyuan_video_transformer




@pytest.fixture(scope="module")
def transformer():
    return tiny_hunyuan_video_transformer(num_layers=2, num_single_layers=2)


def _inputs(batch=1, frames=2, size=4, text=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text)
    mask[:, -2:] = 0  # padded text tokens, as the pipeline produces
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        timestep=torch.tensor([700.0] * batch),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 8, generator=g),
        guidance=torch.tensor([6000.0] * batch),
        return_dict=False,
    )


def test_recipe_hooks_the_block_compute_and_nothing_else(transformer):
    handle = hicache.apply_cache(transformer, hicache.CacheConfig("hicache", interval=3, warmup=2), "hunyuan_video")
    try:
        assert sorted(handle.forecast_hooks) == sorted(
            [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn", "ff", "ff_context")]
            + [f"single_transformer_blocks.{i}.proj_out" for i in range(2)]
        )
        assert sorted(handle.skip_hooks) == sorted(
            [f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("norm.norm", "attn", "proj_mlp", "act_mlp")]
            + [f"transformer_blocks.{i}.{m}" for i in range(2)
               for m in ("norm1.norm", "norm1_context.norm", "norm2", "norm2_context")]
            + ["rope"]
        )
        assert not any(n.startswith(("context_embedder", "time_text_embed", "norm_out", "proj_out", "x_embedder"))
                       for n in (*handle.forecast_hooks, *handle.skip_hooks))
    finally:
        hicache.remove_cache(transformer)


def _block_io(block, module, args, transform):
    """Run ``block`` on ``args`` with ``module``'s output replaced by ``transform(output)``."""
    def hook(_m, _inp, out):
        return transform(out)

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return block(*args)
    finally:
        h.remove()


def _block_args(transformer, seed=0):
    """Positional block inputs captured from a real forward of the transformer."""
    captured = {}

    def grab(_m, args):
        captured.setdefault("args", args)

    h = transformer.transformer_blocks[0].register_forward_pre_hook(grab)
    with torch.no_grad():
        transformer(**_inputs(seed=seed))
    h.remove()
    return captured["args"]


def _zeros(out):
    return tuple(torch.zeros_like(o) for o in out) if isinstance(out, tuple) else torch.zeros_like(out)


def test_double_block_forecast_outputs_are_pre_gate_and_pre_residual(transformer):
    block = transformer.transformer_blocks[0]
    args = _block_args(transformer)
    hidden, context, temb = args[0], args[1], args[2]
    # attention and both MLPs zero: the block must return its inputs unchanged
    hooks = [m.register_forward_hook(lambda _m, _i, o: _zeros(o)) for m in (block.attn, block.ff, block.ff_context)]
    with torch.no_grad():
        out_hidden, out_context = block(*args)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(out_context, context, rtol=0, atol=0)

    # a perturbation of the MLP outputs moves the outputs by exactly gate_mlp * delta
    with torch.no_grad():
        _, _, _, _, gate_mlp = block.norm1(hidden, emb=temb)
        _, _, _, _, c_gate_mlp = block.norm1_context(context, emb=temb)
        base_hidden, base_context = block(*args)
    delta = torch.randn_like(hidden)
    moved_hidden, _ = _block_io(block, block.ff, args, lambda o: o + delta)
    torch.testing.assert_close(moved_hidden - base_hidden, gate_mlp.unsqueeze(1) * delta, rtol=1e-4, atol=1e-5)
    delta_c = torch.randn_like(context)
    _, moved_context = _block_io(block, block.ff_context, args, lambda o: o + delta_c)
    torch.testing.assert_close(moved_context - base_context, c_gate_mlp.unsqueeze(1) * delta_c, rtol=1e-4, atol=1e-5)


def test_double_block_attention_tuple_is_pre_gate(transformer):
    block = transformer.transformer_blocks[1]
    args = _block_args(transformer)
    hidden, context, temb = args[0], args[1], args[2]
    # make the MLPs vanish so the output is input + gate_msa * attn (+ nothing)
    hooks = [m.register_forward_hook(lambda _m, _i, o: _zeros(o)) for m in (block.ff, block.ff_context)]
    try:
        with torch.no_grad():
            _, gate_msa, _, _, _ = block.norm1(hidden, emb=temb)
            _, c_gate_msa, _, _, _ = block.norm1_context(context, emb=temb)
            base = block(*args)
        d, dc = torch.randn_like(hidden), torch.randn_like(context)
        moved = _block_io(block, block.attn, args, lambda o: (o[0] + d, o[1] + dc))
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(moved[0] - base[0], gate_msa.unsqueeze(1) * d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved[1] - base[1], c_gate_msa.unsqueeze(1) * dc, rtol=1e-4, atol=1e-5)


def test_single_block_proj_out_is_pre_gate_and_pre_residual(transformer):
    block = transformer.single_transformer_blocks[0]
    captured = {}
    h = block.register_forward_pre_hook(lambda _m, a: captured.setdefault("args", a))
    with torch.no_grad():
        transformer(**_inputs(seed=1))
    h.remove()
    args = captured["args"]
    hidden, context, temb = args[0], args[1], args[2]
    out_hidden, out_context = _block_io(block, block.proj_out, args, _zeros)
    torch.testing.assert_close(out_hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(out_context, context, rtol=0, atol=0)

    with torch.no_grad():
        _, gate = block.norm(torch.cat([hidden, context], dim=1), emb=temb)
        base = torch.cat(block(*args), dim=1)
    delta = torch.randn(hidden.shape[0], hidden.shape[1] + context.shape[1], hidden.shape[2])
    moved = torch.cat(_block_io(block, block.proj_out, args, lambda o: o + delta), dim=1)
    torch.testing.assert_close(moved - base, gate.unsqueeze(1) * delta, rtol=1e-4, atol=1e-5)


def test_single_block_skipped_modules_only_feed_proj_out(transformer):
    """With proj_out's output fixed, zeroing the skipped attention, proj_mlp and act_mlp changes nothing."""
    block = transformer.single_transformer_blocks[1]
    captured = {}
    h = block.register_forward_pre_hook(lambda _m, a: captured.setdefault("args", a))
    with torch.no_grad():
        transformer(**_inputs(seed=2))
    h.remove()
    args = captured["args"]
    fixed = {}
    out_ref = _block_io(block, block.proj_out, args, lambda o: fixed.setdefault("o", o))
    hooks = [m.register_forward_hook(lambda _m, _i, o: _zeros(o)) for m in (block.attn, block.proj_mlp, block.act_mlp)]
    try:
        out = _block_io(block, block.proj_out, args, lambda o: fixed["o"])
    finally:
        for h in hooks:
            h.remove()
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recipe_runs_on_the_image_to_video_token_replace_variant():
    """HunyuanVideo-I2V's token-replace blocks keep the module names; interval 1 is exact, caching is not."""
    model = tiny_hunyuan_video_transformer(num_layers=1, num_single_layers=1, image_condition_type="token_replace")
    inputs = _inputs(frames=3, seed=3)

    def denoise(config):
        if config is not None:
            hicache.apply_cache(model, config, "hunyuan_video")
        outs = []
        try:
            with torch.no_grad():
                for t in (900.0, 700.0, 500.0, 300.0, 100.0):
                    inputs["timestep"] = torch.tensor([t])
                    if config is None:
                        outs.append(model(**inputs)[0])
                    else:
                        with hicache.cache_context(model, "cond"):
                            outs.append(model(**inputs)[0])
        finally:
            if config is not None:
                hicache.remove_cache(model)
        return torch.stack(outs)

    plain = denoise(None)
    assert torch.equal(denoise(hicache.CacheConfig("hicache", interval=1, warmup=1)), plain)
    cached = denoise(hicache.CacheConfig("hicache", interval=3, warmup=2, order=1))
    assert torch.equal(cached[:2], plain[:2]) and not torch.equal(cached[2:4], plain[2:4])
