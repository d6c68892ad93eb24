"""Per-output metrics, built from the ``metrics`` config group.

Two kinds: *fidelity* metrics compare an output with the uncached reference (PSNR, SSIM, LPIPS);
*quality* metrics score an output against its prompt alone (CLIP score, ImageReward, the testbed
checker) and are measured on the reference too. A metric whose model cannot be had offline raises
`SetupError` when built; with ``metrics.<name>.required=false`` it is reported "n/a" with a warning.
A new metric is one builder registered in `BUILDERS`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from ..errors import SetupError

logger = logging.getLogger(__name__)


@dataclass
class Metric:
    name: str
    kind: str  # "fidelity": fn(output, reference) ; "quality": fn(output, prompt)
    fn: Callable[[Any, Any], float]


BUILDERS: dict[str, Callable[[DictConfig, torch.device], Metric]] = {}


def register_metric(name: str):
    def add(builder):
        BUILDERS[name] = builder
        return builder

    return add


def build_metrics(config: DictConfig, device: torch.device) -> tuple[list[Metric], list[str]]:
    """The enabled metrics that could be built, and the names of the optional ones that could not."""
    metrics, unavailable = [], []
    for name, options in config.items():
        if not isinstance(options, DictConfig) or not options.get("enabled", False):
            continue
        if name not in BUILDERS:
            raise SetupError(f"metrics.{name} is unknown; known: {', '.join(sorted(BUILDERS))}")
        try:
            metrics.append(BUILDERS[name](options, device))
        except SetupError as err:
            if options.get("required", True):
                raise
            logger.warning("metric %s is n/a: %s", name, err)
            unavailable.append(name)
    return metrics, unavailable


from . import fidelity, quality  # noqa: E402,F401  (register the built-in metrics)
