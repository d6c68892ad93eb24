"""Which denoising steps run the model in full, and which are forecast.

The interval rule matches the paper's counts: with interval N and warm-up W, steps s < W are full,
then s = W - 1 + j N. N=7, W=3 on 50 steps gives 0,1,2,9,16,23,30,37,44: nine full steps, the
paper's 50/9 = 5.55x. An explicit list of full steps replaces the rule; the last K steps can be
forced full either way, and so can any listed steps (``extra_full_steps``: LESA's official schedule forces
step 3, so N=7 runs 10 full steps of 50 and N=10 runs 8). Pure integer logic, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Schedule:
    interval: int = 7
    warmup: int = 3
    full_steps: tuple[int, ...] | None = None
    final_full_steps: int = 0
    num_steps: int | None = None
    extra_full_steps: tuple[int, ...] = ()

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        if self.final_full_steps < 0:
            raise ValueError(f"final_full_steps must be >= 0, got {self.final_full_steps}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.full_steps is not None:
            steps = tuple(sorted(set(int(s) for s in self.full_steps)))
            if not steps or steps[0] != 0 or any(s < 0 for s in steps):
                raise ValueError(f"full_steps must contain step 0 and no negative steps, got {list(self.full_steps)}")
            object.__setattr__(self, "full_steps", steps)
        extra = tuple(sorted(set(int(s) for s in self.extra_full_steps)))
        if any(s < 0 for s in extra):
            raise ValueError(f"extra_full_steps must not be negative, got {list(self.extra_full_steps)}")
        object.__setattr__(self, "extra_full_steps", extra)

    def is_full(self, step: int, num_steps: int | None = None) -> bool:
        total = num_steps if num_steps is not None else self.num_steps
        if self.final_full_steps and total is not None and step >= total - self.final_full_steps:
            return True
        if step in self.extra_full_steps:
            return True
        if self.full_steps is not None:
            return step in self.full_steps
        return step < self.warmup or (step - (self.warmup - 1)) % self.interval == 0

    def full_steps_for(self, num_steps: int) -> list[int]:
        return [s for s in range(num_steps) if self.is_full(s, num_steps)]

    def sparse_warning(self, num_steps: int) -> str | None:
        """Why running this schedule on ``num_steps`` steps is likely a mistake, or None.

        Fewer than two full steps after warm-up means a long run of steps forecast from the warm-up alone,
        with no full step to correct them (interval=100 on 50 steps forecasts steps 3-49 in a row)."""
        full = self.full_steps_for(num_steps)
        cached = num_steps - len(full)
        if cached == 0 or sum(s >= self.warmup for s in full) >= 2:
            return None
        longest = max(b - a - 1 for a, b in zip(full, full[1:] + [num_steps]))
        most = (num_steps - self.warmup) // 2
        fix = (f"use interval <= {most} for two full steps after warm-up" if self.full_steps is None and most >= 1
               else "list more full steps or use fewer warm-up steps")
        return (f"hicache: at {num_steps} steps the schedule is full only at {full}, fewer than 2 full steps after "
                f"warm-up: up to {longest} steps in a row are forecast without a correcting full step; {fix}")

    def ideal_speedup(self, num_steps: int) -> float:
        """Step count over full-step count: the speedup if cached steps cost nothing."""
        return num_steps / len(self.full_steps_for(num_steps))


def same_cost_steps(num_steps: int, schedule: Schedule) -> int:
    """Steps of a plain sampler that cost as much as ``schedule`` does: the step-reduction baseline."""
    return len(schedule.full_steps_for(num_steps))


def as_schedule(interval: int, warmup: int, full_steps: Sequence[int] | None, final_full_steps: int,
                num_steps: int | None) -> Schedule:
    return Schedule(interval, warmup, tuple(full_steps) if full_steps is not None else None,
                    final_full_steps, num_steps)
