"""Cost of a generation: wall-clock latency and FLOPs of the transformer calls.

Latency is synchronised with the accelerator, so queued GPU kernels are counted. FLOPs are counted
by `torch.utils.flop_counter.FlopCounterMode` around each transformer forward only (text encoders
and VAE cost the same with and without a cache), in a separate pass, since the counting itself is
slow.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch counts the CUDA attention kernels but not the CPU one, so CPU runs would leave attention out.
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_ATTENTION not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_CPU_ATTENTION)(_cpu_attention_flops)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def stopwatch(device: torch.device):
    """Yields a dict whose ``seconds`` is set on exit."""
    result = {}
    synchronize(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        synchronize(device)
        result["seconds"] = time.perf_counter() - start


@contextmanager
def count_transformer_flops(transformer: torch.nn.Module):
    """Yields a dict whose ``flops`` is the sum over every transformer forward inside the block."""
    result = {"flops": 0, "calls": 0}
    modes: list[FlopCounterMode] = []

    def enter(module, args, kwargs):
        mode = FlopCounterMode(display=False)
        mode.__enter__()
        modes.append(mode)

    def leave(module, args, kwargs, output):
        mode = modes.pop()
        mode.__exit__(None, None, None)
        result["flops"] += int(mode.get_total_flops())
        result["calls"] += 1

    pre = transformer.register_forward_pre_hook(enter, with_kwargs=True)
    post = transformer.register_forward_hook(leave, with_kwargs=True)
    try:
        yield result
    finally:
        pre.remove()
        post.remove()
        while modes:
            modes.pop().__exit__(None, None, None)


# Columns of the FLOPs scripts' Markdown tables (experiments/*_flops.py): header and cell format of each row key.
FLOPS_COLUMNS = {
    "method": ("Method", "{}"),
    "steps": ("Steps", "{}"),
    "full_steps": ("Full steps", "{}"),
    "tflops": ("Transformer PFLOPs", lambda v: f"{v / 1e3:.1f}"),
    "flops_speedup": ("FLOPs speedup", "{:.2f}x"),
    "ideal_speedup": ("Ideal (steps / full)", "{:.2f}x"),
    "cache_gib": ("Cache (GiB)", "{:.1f}"),
}


def flops_table(rows: list[dict], keys: list[str]) -> str:
    """The Markdown table of FLOPs rows (dicts with the `FLOPS_COLUMNS` keys), with the columns ``keys``."""
    def cell(key, value):
        fmt = FLOPS_COLUMNS[key][1]
        return fmt(value) if callable(fmt) else fmt.format(value)

    lines = ["| " + " | ".join(FLOPS_COLUMNS[k][0] for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
