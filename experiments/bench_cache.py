"""Wall-clock benchmark of the caching core on a ~20M-parameter FLUX transformer on the CPU.

How close does each method get to its ideal speedup (steps / full steps)? The gap is the cost of
what still runs at cached steps (embeddings, modulation, gates, residual adds, the forecast itself).
Diffusers' own TaylorSeer hook (default and lite mode) runs on the same model for comparison.
Prints a Markdown table; asserts nothing.

The floor columns say how much of that gap is the cache's own: the same cached step with the recipe's modules
replaced by plain forwards returning stored outputs (`floor_forwards`: no hooks, no forecast arithmetic), timed in
the same pair, gives the best speedup any cache attached to the unmodified model could reach there.

    python experiments/bench_cache.py                 # 50 steps, 1024 image tokens
    python experiments/bench_cache.py --threads 1 --repeats 3   # median of 3 pairs: steadier on a shared machine
    python experiments/bench_cache.py --steps 20 --tokens 256 --quick
    python experiments/bench_cache.py --threads 2 --repeats 5 --intervals 7 --keep-freed-memory

At full size, on a GPU (`--full-size`): the real transformer built from its published config with random weights
(latency does not depend on the values), at the paper's resolution, uncached vs cached latency per method and N,
peak memory and the ideal ratio, as one table:

    python experiments/bench_cache.py --full-size flux-dev --device cuda          # FLUX.1-dev 1024x1024, 50 steps
    python experiments/bench_cache.py --full-size hunyuan-video --device cuda     # 65 frames at 480x640 (long)
    python experiments/bench_cache.py --full-size qwen-image --device cuda        # Qwen-Image 1328x1328
    python experiments/bench_cache.py --full-size flux-dev --layers 1 --height 64 --width 64 --text-tokens 8 --steps 4

`--keep-freed-memory` sets glibc's malloc to keep freed memory in the process (the usual CPU-inference tuning,
what jemalloc or tcmalloc do by default). With glibc's defaults the memory of a full step's activations can go back
to the OS during the cached steps that follow, and the next full step page-faults it in again: measured here,
17-35 thousand page faults and 30-40 ms more per full step on two threads. glibc adapts its thresholds to the
process's history (every run in it, the floor's too), so which steps fault changes from run to run; the page-fault
columns show it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import resource
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel, TaylorSeerCacheConfig
from tqdm import tqdm

import hicache
from hicache.hooks import STAND_IN_SHAPE_OF_ROLE, chunk_runs, live_rows_linear, stand_in_shape
from hicache.recipes import get_recipe


def build_transformer(seed: int = 0, heads: int = 4, double: int = 4, single: int = 10) -> FluxTransformer2DModel:
    """FLUX's architecture at 64-dim heads; the defaults give 19.8M parameters at width 256."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=(16, 24, 24),
    ).eval()


def make_inputs(tokens: int, text_tokens: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, 64, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, 128, generator=g),
        pooled_projections=torch.randn(1, 128, generator=g),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )


@torch.inference_mode()
def sample(model: FluxTransformer2DModel, inputs: dict, steps: int) -> tuple[float, float, list[float], list[int]]:
    """A flow-matching Euler loop, as FluxPipeline drives the transformer.

    Returns (wall-clock seconds, process CPU seconds, per-step seconds, per-step minor page faults): on a
    shared machine the CPU time is the steadier total, the per-step times show what a full and a cached step
    cost, and the page faults show memory the allocator had to get back from the OS."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = inputs["hidden_states"].clone()
    step_times, step_faults = [], []
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(steps):
        faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with model.cache_context("cond"):
            v = model(**{**inputs, "hidden_states": x}, timestep=sigmas[i : i + 1]).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        step_times.append(time.perf_counter() - t)
        step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    model._reset_stateful_cache()
    return elapsed, cpu, step_times, step_faults


@contextlib.contextmanager
def floor_forwards(model: FluxTransformer2DModel, inputs: dict, timestep: torch.Tensor, recipe: str = "flux"):
    """The model patched to run the least a cached step of the unmodified model can run, after a full step at
    ``timestep``: what the recipe forecasts or skips is replaced by plain forwards (no hooks) that return its outputs
    of that full step as they are (no forecast arithmetic, not even a copy) or the stand-ins the hooks use, and the
    modulation linears multiply only their gate rows. What is left (embeddings, gates, gating multiplies, residual
    adds, concatenations, the final norm and projection) is the model's own code, which any cache that attaches to it
    without forking it has to run."""
    roles = get_recipe(recipe)
    recorded, handles = {}, []
    for name, module in model.named_modules():
        if roles.role(name) in ("forecast", *STAND_IN_SHAPE_OF_ROLE):
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: recorded.__setitem__(name, out)))
    try:
        with torch.inference_mode():
            model(**inputs, timestep=timestep)
    finally:
        for handle in handles:
            handle.remove()
    zeros: dict[tuple, torch.Tensor] = {}

    def stand_in(like, kind):
        if isinstance(like, tuple):
            return tuple(stand_in(o, kind) for o in like)
        return dead(stand_in_shape(like.shape, kind), like.dtype, like.device)

    def dead(shape, dtype, device):  # made once per shape, as the hooks' shared zero pool does
        key = (tuple(shape), dtype, device)
        if key not in zeros:
            zeros[key] = torch.zeros(shape, dtype=dtype, device=device)
        return zeros[key]

    patched = []
    try:
        for name, module in model.named_modules():
            role = roles.role(name)
            if role == "forecast":
                module.forward = lambda *a, out=recorded[name], **k: out
            elif role in STAND_IN_SHAPE_OF_ROLE:
                module.forward = lambda *a, out=stand_in(recorded[name], STAND_IN_SHAPE_OF_ROLE[role]), **k: out
            elif role == "live_chunks":
                runs = chunk_runs(module.out_features, *roles.chunks(name))
                module.forward = lambda x, module=module, runs=runs: live_rows_linear(x, module.weight, module.bias, runs, dead)
            else:
                continue
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward


@torch.inference_mode()
def floor_step_seconds(model: FluxTransformer2DModel, inputs: dict, steps: int) -> list[float]:
    """Per-step times of `floor_forwards` over a sampling run's timesteps."""
    sigmas, times = torch.linspace(1.0, 0.0, steps + 1), []
    with floor_forwards(model, inputs, sigmas[:1]):
        for i in range(steps):
            t = time.perf_counter()
            with model.cache_context("cond"):
                model(**inputs, timestep=sigmas[i : i + 1])
            times.append(time.perf_counter() - t)
    return times


def keep_freed_memory() -> None:
    """glibc mallopt: never trim the heap, and serve allocations up to 32 MiB (the largest threshold glibc accepts)
    from it instead of from mmap, so freed memory is reused rather than returned to the OS."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt"):
        raise SystemExit("--keep-freed-memory needs glibc's mallopt; use LD_PRELOAD with jemalloc or tcmalloc instead")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) and libc.mallopt(m_mmap_threshold, ctypes.c_int(32 * 2**20))):
        raise SystemExit("glibc rejected the mallopt settings of --keep-freed-memory")


def diffusers_full_steps(cfg: TaylorSeerCacheConfig, steps: int) -> list[int]:
    return [
        s for s in range(steps)
        if s < cfg.disable_cache_before_step or (s - cfg.disable_cache_before_step - 1) % cfg.cache_interval == 0
    ]


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times) if times else float("nan")


FULL_SIZE = {
    # name: (diffusers class, published transformer config, recipe, (height, width, frames), text tokens)
    "flux-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 "flux", (1024, 1024, None), 512),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", {}, "hunyuan_video", (480, 640, 65), 256),
    "qwen-image": ("QwenImageTransformer2DModel", {}, "qwen_image", (1328, 1328, None), 128),
}
TIMESTEP_SCALE = {"flux-dev": 1.0, "hunyuan-video": 1000.0, "qwen-image": 1.0}  # what each pipeline feeds: sigma or 1000 sigma
# (label, CacheConfig kwargs) of the full-size table: the paper's methods at N = 5 and 7 (warm-up 3, O = 2)
FULL_SIZE_ROWS = tuple((f"{label} N={n}", dict(method=method, interval=n, warmup=3, order=order))
                       for n in (5, 7) for label, method, order in (("FORA", "fora", 0), ("TaylorSeer O=2", "taylorseer", 2),
                                                                    ("HiCache O=2", "hicache", 2)))


def full_size_transformer(name: str, layers: int | None, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The published architecture with its default random initialisation, made on ``device`` in ``dtype``."""
    import diffusers

    cls_name, config, *_ = FULL_SIZE[name]
    config = dict(config)
    if layers is not None:  # the same blocks, fewer of them: the CPU test of the full-size path
        config.update(num_layers=layers, **({"num_single_layers": layers} if name != "qwen-image" else {}))
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)  # made in its dtype, on the device: no float32 or CPU copy of a 12-20B model
    try:
        with torch.device(device):
            model = getattr(diffusers, cls_name)(**config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def full_size_inputs(name: str, model, height: int, width: int, frames: int | None, text_tokens: int,
                     device: torch.device, dtype: torch.dtype) -> dict:
    from hicache.memory import INPUT_BUILDERS

    *_, recipe, _, _ = FULL_SIZE[name]
    kwargs = dict(frames=frames) if frames else {}
    inputs = INPUT_BUILDERS[recipe](model.config, height=height, width=width, text_tokens=text_tokens, dtype=dtype,
                                    device=device, **kwargs)
    g = torch.Generator(device=device).manual_seed(0)
    for key, value in inputs.items():  # the builders give shapes; the benchmark needs finite values
        if isinstance(value, torch.Tensor) and value.is_floating_point() and key not in ("timestep", "guidance") \
                and "mask" not in key:
            inputs[key] = torch.randn(value.shape, generator=g, device=device, dtype=dtype) if "ids" not in key \
                else torch.zeros_like(value)
    inputs.pop("timestep", None)
    return inputs


@torch.inference_mode()
def full_size_sample(model, inputs: dict, steps: int, device: torch.device, timestep_scale: float = 1.0) -> float:
    """Seconds of a flow-matching Euler loop of ``steps`` transformer calls, synchronised with the device."""
    from hicache.app.speed import stopwatch

    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = inputs["hidden_states"]
    batch = x.shape[0]
    with stopwatch(device) as clock:
        for i in range(steps):
            t = torch.full((batch,), sigmas[i] * timestep_scale, device=device, dtype=x.dtype)
            with model.cache_context("cond"):
                v = model(**{**inputs, "hidden_states": x}, timestep=t)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    model._reset_stateful_cache()
    return clock["seconds"]


def _peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def full_size_main(args) -> None:
    """``--full-size``: one table of uncached vs cached latency at the paper's size (see the module docstring)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    _, _, recipe, (height, width, frames), text_tokens = FULL_SIZE[args.full_size]
    height, width = args.height or height, args.width or width
    frames = args.frames or frames
    text_tokens = args.text_tokens or text_tokens
    model = full_size_transformer(args.full_size, args.layers, device, dtype)
    inputs = full_size_inputs(args.full_size, model, height, width, frames, text_tokens, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    shape = f"{frames} x {height}x{width}" if frames else f"{height}x{width}"
    print(f"{args.full_size}: {params / 1e9:.2f}B parameters (random, {str(dtype).removeprefix('torch.')}), {shape}, "
          f"{text_tokens} text tokens, {args.steps} steps, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    intervals = (5, 7) if args.intervals == parser_defaults()["intervals"] else args.intervals
    rows = tuple((f"{label.split(' N=')[0]} N={n}", {**kw, "interval": n, "warmup": args.warmup}) for n in intervals
                 for label, kw in FULL_SIZE_ROWS[:3])
    full_size_sample(model, inputs, 2, device, TIMESTEP_SCALE[args.full_size])  # warm-up: kernels, allocator
    _reset_peak(device)
    base = [full_size_sample(model, inputs, args.steps, device, TIMESTEP_SCALE[args.full_size])]
    base_peak = _peak_bytes(device)
    results = []
    for label, kwargs in tqdm(rows, desc="caches"):
        config = hicache.CacheConfig(**kwargs, factor_dtype=None if args.factor_dtype == "output" else args.factor_dtype)
        hicache.apply_cache(model, config, recipe)
        try:
            _reset_peak(device)
            seconds = full_size_sample(model, inputs, args.steps, device, TIMESTEP_SCALE[args.full_size])
            summary = hicache.cache_summary(model, args.steps)
        finally:
            hicache.remove_cache(model)
        results.append((label, len(summary.full_steps), seconds, _peak_bytes(device), summary.cache_bytes,
                        summary.ideal_speedup))
    base.append(full_size_sample(model, inputs, args.steps, device, TIMESTEP_SCALE[args.full_size]))  # again after: the machine did not drift
    uncached = statistics.mean(base)

    def gib(n):
        return "n/a" if n is None else f"{n / 2**30:.2f}"

    print(f"\n| method | full steps | latency (s) | speedup | ideal | speedup / ideal | peak memory (GiB) | cache (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| uncached | {args.steps} | {uncached:.2f} ({base[0]:.2f}, {base[1]:.2f}) | 1.00x | 1.00x | 1.00 "
          f"| {gib(base_peak)} | 0 |")
    for label, full, seconds, peak, cache, ideal in results:
        speedup = uncached / seconds
        print(f"| {label} | {full} | {seconds:.2f} | {speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.2f} "
              f"| {gib(peak)} | {gib(cache)} |")


def parser_defaults() -> dict:
    return {"intervals": [5, 6, 7, 9]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--intervals", type=int, nargs="+", default=[5, 6, 7, 9])
    parser.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4, help="width = 64 x heads")
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=10, help="single-stream blocks")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' TaylorSeer rows")
    parser.add_argument("--quick", action="store_true", help="hicache only, N=7, O=2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1, help="(uncached, cached) pairs per configuration; the median pair is reported")
    parser.add_argument("--no-floor", action="store_true",
                        help="do not time the floor (it runs in the same process, and glibc's malloc adapts its thresholds to every run)")
    parser.add_argument("--factor-dtype", default="output", choices=["output", "float32", "bfloat16", "float16"],
                        help="dtype of the stored differences (hicache's rows); output: each output's own (the default)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory in the process (no page faults back at full steps; see above)")
    parser.add_argument("--full-size", choices=sorted(FULL_SIZE),
                        help="the published transformer at the paper's size, random weights (see the docstring)")
    parser.add_argument("--device", default="cpu", help="--full-size: cuda, cuda:1, cpu")
    parser.add_argument("--layers", type=int, default=None, help="--full-size: double and single blocks (default: all)")
    parser.add_argument("--height", type=int, default=None, help="--full-size: pixels (default: the paper's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None, help="--full-size hunyuan-video: frames (default 65)")
    parser.add_argument("--text-tokens", type=int, default=None, help="--full-size: text tokens (default: the pipeline's)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="--full-size: weights (default: bfloat16 on cuda, float32 on cpu)")
    args = parser.parse_args()
    if args.full_size:
        if args.threads:
            torch.set_num_threads(args.threads)
        return full_size_main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()

    model = build_transformer(heads=args.heads, double=args.double, single=args.single)
    inputs = make_inputs(args.tokens)
    params = sum(p.numel() for p in model.parameters())
    print(f"FLUX transformer: {params / 1e6:.1f}M parameters, width {64 * args.heads}, {args.tokens} image tokens, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (uncached, cached) pairs, "
          f"{'malloc keeps freed memory' if args.keep_freed_memory else 'default malloc settings'}, {args.factor_dtype} factors")

    runs: list[tuple[str, object]] = []
    methods = ["hicache"] if args.quick else ["fora", "taylorseer", "hicache"]
    for method in methods:
        for n in ([7] if args.quick else args.intervals):
            for order in ([0] if method == "fora" else [2] if args.quick else args.orders):
                runs.append((method, hicache.CacheConfig(method, interval=n, warmup=args.warmup, order=order,
                                                         factor_dtype=None if args.factor_dtype == "output" else args.factor_dtype)))
    if not (args.quick or args.no_diffusers):
        runs.append(("diffusers taylorseer", TaylorSeerCacheConfig()))
        runs.append(("diffusers taylorseer lite", TaylorSeerCacheConfig(use_lite_mode=True)))

    sample(model, inputs, 2)  # warm-up: allocator, threads
    rows = []
    for label, cfg in tqdm(runs, desc="configs"):
        # each cached run is paired with an uncached run just before it, so a change in the machine's
        # load between configurations does not bias the speedup; the median pair is reported
        pairs = []
        for _ in range(args.repeats):
            base, base_cpu, base_steps, base_faults = sample(model, inputs, args.steps)
            if isinstance(cfg, hicache.CacheConfig):
                hicache.apply_cache(model, cfg, "flux")
                seconds, cpu, steps, faults = sample(model, inputs, args.steps)
                summary = hicache.cache_summary(model, args.steps)
                hicache.remove_cache(model)
                full_steps, mem = set(summary.full_steps), summary.cache_bytes
            else:
                model.enable_cache(cfg)
                seconds, cpu, steps, faults = sample(model, inputs, args.steps)
                model.disable_cache()
                full_steps, mem = set(diffusers_full_steps(cfg, args.steps)), float("nan")
            step_ms = (  # median uncached step, and the cached run's median full and cached steps
                median_ms(base_steps),
                median_ms([t for i, t in enumerate(steps) if i in full_steps]),
                median_ms([t for i, t in enumerate(steps) if i not in full_steps]),
            )
            full_faults = (  # median page faults of an uncached step and of the cached run's full steps
                statistics.median(base_faults),
                statistics.median([f for i, f in enumerate(faults) if i in full_steps]),
            )
            # the best a cache could do in this pair: the full steps as uncached, the cached steps at the floor
            # (the paper's cached step: for hicache's rows only)
            timed_floor = isinstance(cfg, hicache.CacheConfig) and not args.no_floor
            floor_ms = median_ms(floor_step_seconds(model, inputs, args.steps)) if timed_floor else float("nan")
            best = base * len(full_steps) / args.steps + (args.steps - len(full_steps)) * floor_ms / 1000
            pairs.append((base / seconds, base, seconds, base_cpu / cpu, step_ms, full_faults, base / best, floor_ms))
        speedup, base, seconds, cpu_speedup, step_ms, full_faults, floor_speedup, floor_ms = sorted(pairs, key=lambda p: p[0])[len(pairs) // 2]
        full = len(full_steps)
        if isinstance(cfg, hicache.CacheConfig):
            n, order = cfg.interval, ("-" if cfg.method == "fora" else cfg.order)
        else:
            n, order = cfg.cache_interval, cfg.max_order
        ideal = args.steps / full
        rows.append((label, n, order, full, base, seconds, speedup, ideal, cpu_speedup, step_ms, full_faults, mem,
                     floor_speedup, floor_ms))

    print("\n| method | N | O | full steps | uncached (s) | cached (s) | speedup | ideal | speedup / ideal "
          "| CPU-time speedup / ideal | step ms: uncached / full / cached (medians) "
          "| page faults per step: uncached / full (medians) | cache memory (MiB) | floor step ms | floor speedup / ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, n, order, full, base, seconds, speedup, ideal, cpu_speedup, step_ms, full_faults, mem, floor_speedup, floor_ms in rows:
        mem_txt = "n/a" if mem != mem else f"{mem / 2**20:.1f}"
        steps_txt = " / ".join(f"{ms:.1f}" for ms in step_ms)
        print(f"| {label} | {n} | {order} | {full} | {base:.2f} | {seconds:.2f} | {speedup:.2f}x | {ideal:.2f}x "
              f"| {speedup / ideal:.2f} | {cpu_speedup / ideal:.2f} | {steps_txt} "
              f"| {full_faults[0]:.0f} / {full_faults[1]:.0f} | {mem_txt} "
              + ("| n/a | n/a |" if floor_ms != floor_ms else f"| {floor_ms:.1f} | {floor_speedup / ideal:.2f} |"))


if __name__ == "__main__":
    main()
