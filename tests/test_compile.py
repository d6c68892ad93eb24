"""Cached sampling under torch.compile on a tiny FLUX: the same output as eager, and no graph break inside a
block (the `eager` backend: dynamo's tracing and graph breaks are what is tested, not a code generator)."""

import pytest
import torch
from torch._dynamo.utils import counters

import hicache
from hicache.testbeds.tiny.flux import tiny_flux_transformer

STEPS = 12  # N=4, warm-up 2, O=2: every kind of full step (no history, no difference, 1, 2) and of cached step


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))


def sample(model, call):
    inputs, outs = _inputs(), []
    with torch.inference_mode():  # as the app renders
        for i in range(STEPS):
            with model.cache_context("cond"):
                outs.append(call(**inputs, timestep=torch.tensor([1.0 - i / STEPS])).sample)
    return outs


# torch.compile(model) passes the same test (its only break: the step counter, on purpose); it is left out of the
# suite for time (each compiled run costs a minute or two of dynamo tracing on CPU): add "torch_compile_model" to run it
@pytest.mark.parametrize("how", ["compile_repeated_blocks_fullgraph"])
def test_cached_sampling_compiles_without_breaks_inside_blocks_or_per_step_recompiles(how):
    """Two sampling loops with no reset between them (the step hook sees the new loop): compiled = eager, no graph
    break, and the second loop compiles nothing new. The hooks read step positions and loop ids as floats (dynamo
    makes them graph inputs) and keep every int that changes per step or loop out of the blocks, so the graphs are
    one per kind of step, not one per step: within the default recompile limit of 8 per block class, which
    fullgraph=True turns into a hard error."""
    torch._dynamo.reset()
    config = hicache.CacheConfig("hicache", interval=4, warmup=2, order=2)
    eager = tiny_flux_transformer(1, 1)
    hicache.apply_cache(eager, config, "flux")
    expected = sample(eager, eager) + sample(eager, eager)

    model = tiny_flux_transformer(1, 1)
    hicache.apply_cache(model, config, "flux")
    counters.clear()
    if how == "compile_repeated_blocks_fullgraph":
        model.compile_repeated_blocks(fullgraph=True, backend="eager")  # fails on any break inside a block
        call = model
    else:
        call = torch.compile(model, backend="eager")
    got = sample(model, call)
    graphs_after_one_loop = counters["stats"]["unique_graphs"]
    got += sample(model, call)
    assert counters["stats"]["unique_graphs"] == graphs_after_one_loop
    assert hicache.cache_summary(model).cached_forwards == 2 * (STEPS - len(config.schedule.full_steps_for(STEPS)))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    breaks = dict(counters["graph_break"])
    if how == "torch_compile_model":
        # the one break is the step counter on the root, kept out of the graph on purpose (torch.compiler.disable)
        assert all("disable" in reason or "skip" in reason.lower() for reason in breaks), breaks
    else:
        assert not breaks, breaks
