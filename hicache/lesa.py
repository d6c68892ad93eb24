"""LESA's stage-aware learned forecaster (CVPR 2026), as a small `torch.nn.Module`, and its file format.

Where HiCache forecasts a module's output in a fixed basis from divided differences, LESA learns the
forecast of one tensor per model call (the recipe names it) from the last outputs of that tensor, computed
or predicted. For the step at time ``t`` (``t`` in [0, 1], 1 = noise):

    stage, K = 0, depth // 2 if t > a  else  1, depth if t > b  else  2, depth        (a, b = 0.9, 0.5; Qwen 0.9, 0.4)
    z     = Linear_stage(K -> 1) over the last K outputs, elementwise (K weights and a bias)
    alpha = KAN_stage([t - tau_j for every schedule point tau_j])   (num_steps + 1 offsets -> one scalar)
    forecast = h_prev + alpha * z

with one expert set (3 linears, 3 KANs) per CFG branch. As in the official code (`KANPredictor`), the
offsets go to every point of the sampling schedule, final 0 included, so a predictor belongs to one schedule
(step count, and for shifted schedules the resolution): it stores that schedule, and the hook checks the
run against it. It also stores the cache schedule it was trained for (interval N, warm-up, forced full
steps): LESA trains one predictor per N.

A predictor is a folder of two files: ``predictor.json`` (`LesaPredictorConfig`) and
``predictor.safetensors`` (the parameters). Nothing here knows models, hooks or diffusers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from .kan import KAN

CONFIG_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"
FORMAT = "hicache-lesa-predictor/1"


@dataclass
class LesaPredictorConfig:
    """Everything that defines a predictor besides its weights.

    Args:
        timesteps: the ``num_steps + 1`` schedule points ``tau_j`` in [0, 1] (for flow-matching
            pipelines the scheduler's sigmas, final 0 included).
        interval, warmup, extra_full_steps: the cache schedule it was trained for (official: N, 3, [3]).
        history_depth: outputs kept and read (8: stage 0 reads 4, stages 1 and 2 read 8).
        hidden_dim: width of the two hidden KAN layers (256).
        stage_thresholds: t above the first is stage 0, above the second stage 1, else stage 2.
        branches: the cache-context names with their own experts ("cond"; Qwen-Image: "cond", "uncond").
        grid_size, spline_order, grid_range: the KAN's B-splines (5, 3, [-3, 3]).
        model: free text, the model and recipe it was trained on.
    """

    timesteps: list[float]
    interval: int
    warmup: int = 3
    extra_full_steps: list[int] = field(default_factory=lambda: [3])
    history_depth: int = 8
    hidden_dim: int = 256
    stage_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.5])
    branches: list[str] = field(default_factory=lambda: ["cond"])
    grid_size: int = 5
    spline_order: int = 3
    grid_range: list[float] = field(default_factory=lambda: [-3.0, 3.0])
    model: str = ""

    def __post_init__(self):
        self.timesteps = [float(t) for t in self.timesteps]
        self.extra_full_steps = [int(s) for s in self.extra_full_steps]
        self.stage_thresholds = [float(t) for t in self.stage_thresholds]
        self.branches = [str(b) for b in self.branches]
        self.grid_range = [float(v) for v in self.grid_range]
        if len(self.timesteps) < 2:
            raise ValueError(f"a LESA predictor needs the num_steps + 1 schedule points, got {len(self.timesteps)}")
        if self.history_depth < 2:
            raise ValueError(f"history_depth must be >= 2, got {self.history_depth}")
        if len(self.stage_thresholds) != 2 or not self.stage_thresholds[0] >= self.stage_thresholds[1]:
            raise ValueError(f"stage_thresholds must be two decreasing values, got {self.stage_thresholds}")
        if not self.branches:
            raise ValueError("a LESA predictor needs at least one branch")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1


class StageExperts(torch.nn.Module):
    """One branch's three experts: a history filter and a KAN of the timestep offsets per stage."""

    def __init__(self, config: LesaPredictorConfig):
        super().__init__()
        depth = config.history_depth
        self.latent = torch.nn.ModuleList(torch.nn.Linear(k, 1) for k in (depth // 2, depth, depth))
        widths = [config.num_steps + 1, config.hidden_dim, config.hidden_dim, 1]
        self.timestep = torch.nn.ModuleList(
            KAN(widths, grid_size=config.grid_size, spline_order=config.spline_order, grid_range=config.grid_range)
            for _ in range(3))


class LesaPredictor(torch.nn.Module):
    """``forecast = h_prev + KAN_stage(t - tau) * Linear_stage(last K outputs)``, per branch."""

    def __init__(self, config: LesaPredictorConfig):
        super().__init__()
        self.config = config
        self.experts = torch.nn.ModuleDict({branch: StageExperts(config) for branch in config.branches})

    def stage(self, t: float) -> int:
        high, low = self.config.stage_thresholds
        return 0 if t > high else 1 if t > low else 2

    def window(self, stage: int) -> int:
        """K, the number of past outputs the stage reads."""
        return self.config.history_depth // 2 if stage == 0 else self.config.history_depth

    def offsets(self, t: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.tensor([[t - tau for tau in self.config.timesteps]], dtype=dtype, device=device)

    def forward(self, history: Sequence[torch.Tensor], t: float, branch: str = "cond") -> torch.Tensor:
        """The forecast at time ``t`` from ``history`` (oldest first, newest last), in the predictor's dtype."""
        if branch not in self.experts:
            raise ValueError(f"this LESA predictor has experts for the branches {self.config.branches}, "
                             f"not for the cache context {branch!r}")
        stage = self.stage(t)
        k = self.window(stage)
        if len(history) < k:
            raise ValueError(f"LESA stage {stage} (t={t:.4f}) reads the last {k} outputs but only {len(history)} "
                             "exist: a cached step this early needs more full steps before it (raise warmup)")
        experts = self.experts[branch]
        linear = experts.latent[stage]
        weight = linear.weight.reshape(-1)
        dtype = weight.dtype
        recent = [h.to(dtype) for h in history[-k:]]
        z = linear.bias + sum(w * h for w, h in zip(weight, recent))  # Linear(K -> 1) along the history axis
        alpha = experts.timestep[stage](self.offsets(t, dtype, weight.device)).reshape(())
        return recent[-1] + alpha * z


def save_predictor(predictor: LesaPredictor, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``predictor.json`` and ``predictor.safetensors`` into ``folder``; ``dtype``: store the floating-point
    tensors in it (e.g. float16 for a shipped predictor: half the bytes; `load_predictor` casts them back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in predictor.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    _readable_as_umask_allows(folder / WEIGHTS_FILE)  # safetensors writes 0600: a shared predictor must be readable
    text = json.dumps({"format": FORMAT, **asdict(predictor.config)}, indent=1)
    (folder / CONFIG_FILE).write_text(text)
    return folder


def _readable_as_umask_allows(path: Path) -> None:
    """Give ``path`` the mode a plain ``open`` would have (0666 minus the umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_predictor(path: str | Path, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> LesaPredictor:
    """A predictor saved by `save_predictor` (``path``: its folder or one of its two files), in eval mode."""
    folder = Path(path).expanduser()
    if folder.is_file():
        folder = folder.parent
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not (config_file.is_file() and weights_file.is_file()):
        raise ValueError(f"no LESA predictor at {folder}: expected {CONFIG_FILE} and {WEIGHTS_FILE} there")
    spec = json.loads(config_file.read_text())
    if spec.pop("format", None) != FORMAT:
        raise ValueError(f"{config_file} is not a {FORMAT} file")
    predictor = LesaPredictor(LesaPredictorConfig(**spec))
    state = load_file(str(weights_file))
    missing, unexpected = predictor.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not fit its {CONFIG_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return predictor.to(device=device, dtype=dtype if dtype is not None else state[next(iter(state))].dtype).eval()
