"""A Kolmogorov-Arnold network of B-spline layers, the temporal part of LESA's predictor.

LESA's official code uses the "efficient-kan" layer: ``out = SiLU(x) W_base + B(x) . (W_spline * scaler)``,
with ``B(x)`` the uniform cubic B-spline bases of every input on a fixed grid. No maintained package ships
exactly that layer (``pykan``'s `KANLayer` has another parametrisation, masks and symbolic branches and pulls
in sympy and pandas; ``torchkan`` another basis), so it is written here: the bases by the Cox-de Boor
recursion over an extended uniform knot vector (``tests/test_lesa.py`` checks them against a direct
recursive evaluation), the initialisation as in the official code (kaiming-uniform base weights, spline
coefficients fitted by least squares to small noise, a standalone spline scaler). The grid is never
updated (the official code never calls ``update_grid``), so it is a buffer computed from the config.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def uniform_knots(grid_size: int, spline_order: int, grid_range: Sequence[float]) -> torch.Tensor:
    """The ``grid_size + 2 spline_order + 1`` knots: ``grid_size`` equal intervals over ``grid_range``,
    extended by ``spline_order`` knots of the same spacing on each side."""
    low, high = float(grid_range[0]), float(grid_range[1])
    if not high > low:
        raise ValueError(f"KAN grid_range must be increasing, got {list(grid_range)}")
    h = (high - low) / grid_size
    return torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float64) * h + low


def b_spline_bases(x: torch.Tensor, knots: torch.Tensor, spline_order: int) -> torch.Tensor:
    """B-spline bases of order ``spline_order`` at every element of ``x``: shape ``(*x.shape, len(knots) - 1 -
    spline_order)``. Order 0 is the indicator of ``[k_i, k_{i+1})``; each order blends two neighbours of the last
    (Cox-de Boor). Outside the knots every basis is 0."""
    knots = knots.to(x.dtype)
    x = x.unsqueeze(-1)
    bases = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)
    for k in range(1, spline_order + 1):
        left = (x - knots[: -(k + 1)]) / (knots[k:-1] - knots[: -(k + 1)])
        right = (knots[k + 1:] - x) / (knots[k + 1:] - knots[1:-k])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


class KANLinear(torch.nn.Module):
    """One KAN layer, ``in_features -> out_features``: a SiLU-activated linear part plus a learned B-spline
    of every input for every output (``(grid_size + spline_order)`` coefficients each)."""

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: Sequence[float] = (-3.0, 3.0), scale_noise: float = 0.02, scale_base: float = 1.0,
                 scale_spline: float = 0.2):
        super().__init__()
        if grid_size < 1 or spline_order < 0:
            raise ValueError(f"KAN needs grid_size >= 1 and spline_order >= 0, got {grid_size}, {spline_order}")
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.register_buffer("knots", uniform_knots(grid_size, spline_order, grid_range).float(), persistent=False)
        self.base_weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = torch.nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        torch.nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        # coefficients of splines through small noise at the interior grid points (least squares)
        points = self.knots[self.spline_order: -self.spline_order]  # grid_size + 1 points
        noise = (torch.rand(len(points), self.in_features, self.out_features) - 0.5) * self.scale_noise / self.grid_size
        design = b_spline_bases(points.double(), self.knots.double(), self.spline_order)  # (points, coeffs)
        coeffs = torch.linalg.lstsq(design.expand(self.in_features, -1, -1),
                                    noise.double().transpose(0, 1)).solution  # (in, coeffs, out)
        self.spline_weight.copy_(coeffs.permute(2, 0, 1).to(self.spline_weight.dtype))
        torch.nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KANLinear expects {self.in_features} input features, got shape {list(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        base = F.linear(F.silu(flat), self.base_weight)
        bases = b_spline_bases(flat, self.knots, self.spline_order).reshape(flat.shape[0], -1)
        spline = F.linear(bases, (self.spline_weight * self.spline_scaler.unsqueeze(-1)).reshape(self.out_features, -1))
        return (base + spline).reshape(*x.shape[:-1], self.out_features)


class KAN(torch.nn.Module):
    """KAN layers of the given widths, e.g. ``[51, 256, 256, 1]``."""

    def __init__(self, widths: Sequence[int], **layer_kwargs):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"a KAN needs at least an input and an output width, got {list(widths)}")
        self.layers = torch.nn.ModuleList(KANLinear(a, b, **layer_kwargs) for a, b in zip(widths, widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
