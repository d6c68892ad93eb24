"""The experiment app behind `run.py`: load a pipeline, cache it, render prompts, measure, write results.

Module map (one job each):

- `checks`:      the composed config checked before any work (cache group vs method, unknown keys, sizes)
- `pipelines`:   build a pipeline from a model config (`LOADERS` maps `model.kind` to a loader)
- `caching`:     attach the configured cache (hicache methods, diffusers' own caches, step reduction)
- `prompts`:     prompt sets (hub datasets, local files, testbed captions)
- `references`:  the uncached outputs on disk, keyed by (model, prompt, seed, steps, size)
- `speed`:       wall-clock latency and FLOPs of the transformer calls
- `metrics`:     fidelity (PSNR, SSIM, LPIPS), quality (CLIP, ImageReward), testbed checker
- `results`:     atomic per-run files: images, metrics.jsonl, summary.json; the run folder's atomic claim
- `files`:       temporary-then-rename files with the user's umask
- `loggers`:     W&B (offline by default) or nothing
- `distributed`: data-parallel prompt sharding under torchrun / accelerate
- `runner`:      the loop tying them together (and the same-process latency pairs); `main` wraps it for `run.py`
- `tables`, `plots`: Markdown tables and sweep plots of a results folder
"""
