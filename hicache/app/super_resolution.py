"""`python run.py experiment=infdit_table`: the super-resolution table as one job of the app.

The rows of an SR table are scored against the full sampler's output, so unlike the text-to-image
experiments (one Hydra job per variant) all variants run in one job, over the same images. The work
itself is `hicache.app.sr_experiment`; this module maps the composed config onto it, turns
its setup errors into the app's one-line errors, and reports the rows to the configured logger.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import SetupError
from .loggers import build_logger
from .memory_check import check_sr_fits
from .outputs import output_kind
from .pipelines import model_cpu_threads, resolve_device

logger = logging.getLogger(__name__)

# model.kind of the conf/model entries that are Inf-DiT SR models -> the SR loader's kind
SR_MODEL_KINDS = {"inf_dit": "released", "inf_dit_testbed": "testbed"}


def run_sr(cfg: DictConfig) -> list[dict]:
    """Run every variant of ``cfg.sr`` on the configured HR images; write results.json/.md; the rows."""
    from hicache.app.sr_experiment import (SRSetupError, load_hr_images, load_sr_pipeline,
                                                      resolve_variants, run_table, testbed_data_source)

    model = cfg.model
    if model.kind not in SR_MODEL_KINDS:
        raise SetupError(f"experiment {cfg.name} needs an Inf-DiT model (model=inf_dit_testbed or model=inf_dit), "
                         f"got model={model.name} (kind {model.kind})")
    kind = SR_MODEL_KINDS[model.kind]
    out_dir = Path(cfg.paths.outputs) / cfg.name / model.name
    try:
        with model_cpu_threads(model):
            device = resolve_device(model.device)
            pipe = load_sr_pipeline(kind, str(model.path), str(model.dtype), "cpu")  # moved once it is known to fit
            heldout = testbed_data_source(str(model.path)) if kind == "testbed" else "photos"
            data = cfg.data
            images = load_hr_images(data.source, data.n, data.folder, int(data.size),
                                    pipe.transformer.config.image_block_size, heldout)
            logger.info("HR images: %d from %s", len(images), heldout if data.source == "heldout" else data.source)
            variants = resolve_variants(OmegaConf.to_container(cfg.sr.variants), int(cfg.sr.steps))
            check_sr_fits(pipe, model, device, [tuple(i.shape[-2:]) for i in images], [v.cache for v in variants])
            pipe = pipe.to(device)
            rows = run_table(pipe, images, variants, int(cfg.sr.seed), bool(cfg.metrics.lpips), out_dir,
                             int(cfg.sr.save_images))
    except SRSetupError as err:
        raise SetupError(str(err)) from None
    records = [{"index": i, **{k: v for k, v in row.items() if k != "cache"}} for i, row in enumerate(rows)]
    load = output_kind("image").load
    pairs = [(load(out_dir / f"{r['variant']}_0.png"), load(out_dir / "full_0.png"))
             for r in rows if (out_dir / f"{r['variant']}_0.png").is_file()]
    build_logger(cfg.logger).log_run(config=cfg, run_dir=out_dir, name=f"{cfg.name}/{model.name}", group=cfg.name,
                                     records=records, summary={"images": len(images), "variants": len(variants)},
                                     pairs=pairs)
    print((out_dir / "results.md").read_text(), flush=True)
    logger.info("results in %s", out_dir)
    return rows
