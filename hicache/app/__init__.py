"""The experiment app behind `run.py`: load a pipeline, cache it, render prompts, measure, write results.

Module map (one job each):

- `pipelines`:   build a pipeline from a model config (`LOADERS` maps `model.kind` to a loader)
- `caching`:     attach the configured cache (hicache methods, diffusers' own caches, step reduction)
- `prompts`:     prompt sets (hub datasets, local files, testbed captions)
- `references`:  the uncached outputs on disk, keyed by (model, prompt, seed, steps, size)
- `speed`:       wall-clock latency and FLOPs of the transformer calls
- `metrics`:     fidelity (PSNR, SSIM, LPIPS), quality (CLIP, ImageReward), testbed checker
- `results`:     atomic per-run files: images, metrics.jsonl, summary.json
- `loggers`:     W&B (offline by default) or nothing
- `distributed`: data-parallel prompt sharding under torchrun / accelerate
- `runner`:      the loop tying them together; `main` wraps it for `run.py`
"""
