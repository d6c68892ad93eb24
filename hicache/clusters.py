"""ClusCa's token arithmetic: K-means over tokens, one fresh token per cluster, propagation into D0.

ClusCa (cluster-driven feature caching) recomputes, at a cached step, a module for one token of
each of K token clusters, writes those fresh rows into the order-0 term D0 of the module's
difference history, and (for the modules that propagate) pulls every token of a cluster towards
its cluster's fresh row: ``D0[n] <- gamma * S[cluster(n)] + (1 - gamma) * D0[n]``. The forecast is
then formed from the updated D0 and the unchanged higher orders, as usual.

Every rule below is the official code's (HiCache's copy of ClusCa, ``cluster_utils/Kmeans.py``,
``select_fresh_tokens.py``, ``update_cache.py``), quirks included: the L1 assignment with a mean
update, the ``+1e-8`` counts (an empty cluster's centroid becomes the zero vector), the early stop
that keeps the *old* centroids, initial rows drawn with replacement, the empty cluster whose
"fresh" token falls back to token 0, and the per-cluster *sum* of fresh rows used as their mean
(exact for one fresh token per cluster, which is all ClusCa ever selects).

The one deliberate divergence: the official code draws from the global device RNG, which it never
seeds, so its images depend on process history. Here every draw takes an explicit CPU
``torch.Generator`` and indices move to the data's device after drawing, so a seed fixes the result
on any device. The draw shapes are the official ones, ``randint(0, N, (B, K))`` for the K-means
initial rows and ``rand(B, N)`` for a selection.

Pure tensor math: no model, hook or diffusers imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KMEANS_ITERATIONS = 10
KMEANS_RTOL = 1e-4


def initial_centroids(x: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """``num_clusters`` token rows of ``x`` [B, N, D] per batch element, drawn uniformly with replacement."""
    batch, tokens, _ = x.shape
    rows = torch.randint(0, tokens, (batch, num_clusters), generator=generator).to(x.device)
    return x[torch.arange(batch, device=x.device)[:, None], rows]


def kmeans(x: torch.Tensor, num_clusters: int, centroids: torch.Tensor | None = None,
           generator: torch.Generator | None = None, iterations: int = KMEANS_ITERATIONS,
           rtol: float = KMEANS_RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the tokens of ``x`` [B, N, D]: (labels [B, N] int64, centroids [B, K, D] in x's dtype).

    Warm-started from ``centroids`` if given, else from random rows (`initial_centroids`, which
    needs ``generator``). Each iteration assigns every token to the centroid nearest in L1 distance
    (computed in float32) and moves each centroid to the mean of its tokens (in x's dtype, counts
    plus 1e-8); it stops when ``allclose(old, new, rtol)`` and then returns the old centroids with the
    labels computed from them. After ``iterations`` without convergence the labels are one
    iteration behind the returned centroids, as in the official code.
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans expects tokens as [batch, tokens, channels], got shape {tuple(x.shape)}")
    if num_clusters < 1:
        raise ValueError(f"kmeans needs at least one cluster, got {num_clusters}")
    if centroids is None:
        if generator is None:
            raise ValueError("kmeans without initial centroids needs a generator for the random initial rows")
        centroids = initial_centroids(x, num_clusters, generator)
    x32 = x.float()
    labels = None
    for _ in range(iterations):
        labels = torch.cdist(x32, centroids.float(), p=1).argmin(dim=-1)
        one_hot = F.one_hot(labels, num_classes=num_clusters).type_as(x)
        counts = one_hot.sum(dim=1) + 1e-8
        new = torch.bmm(one_hot.transpose(1, 2), x) / counts.unsqueeze(-1)
        if torch.allclose(centroids, new, rtol=rtol):
            break
        centroids = new
    return labels, centroids


def select_fresh(labels: torch.Tensor, num_clusters: int, weights: torch.Tensor) -> torch.Tensor:
    """One token per cluster [B, K]: the token of the cluster with the largest weight (``weights`` [B, N],
    uniform draws make it a uniformly random member); an empty cluster gives token 0."""
    clusters = torch.arange(num_clusters, device=labels.device).view(1, -1, 1)
    members = labels.unsqueeze(1) == clusters  # [B, K, N]
    masked = torch.where(members, weights.unsqueeze(1), torch.tensor(-float("inf"), device=labels.device))
    return masked.argmax(dim=2)


def draw_fresh(labels: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """`select_fresh` with the official draw: ``rand(B, N)`` from ``generator`` (CPU), then moved to the labels' device."""
    weights = torch.rand(labels.shape, generator=generator).to(labels.device)
    return select_fresh(labels, num_clusters, weights)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` [B, K] of ``x`` [B, N, D]: [B, K, D]."""
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_fresh(d0: torch.Tensor, indices: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """A copy of ``d0`` [B, N, D] with rows ``indices`` [B, K] replaced by ``fresh`` [B, K, D] (in d0's dtype)."""
    return d0.scatter(1, indices.unsqueeze(-1).expand(-1, -1, d0.shape[-1]), fresh.to(d0.dtype))


def propagate_fresh(d0: torch.Tensor, indices: torch.Tensor, fresh: torch.Tensor, labels: torch.Tensor,
                    num_clusters: int, gamma: float) -> torch.Tensor:
    """`scatter_fresh`, then every token n becomes ``gamma * S[labels[n]] + (1 - gamma) * D0[n]``, where
    ``S[c]`` sums the fresh rows whose *token* lies in cluster c (so token 0, standing in for an empty
    cluster, adds to its own cluster's sum). A new tensor in d0's dtype; gamma = 0 is the scatter alone."""
    scattered = scatter_fresh(d0, indices, fresh)
    if gamma == 0:
        return scattered
    batch, _, channels = d0.shape
    fresh = fresh.to(d0.dtype)
    sums = torch.zeros(batch, num_clusters, channels, dtype=d0.dtype, device=d0.device)
    sums.scatter_add_(1, labels.gather(1, indices).unsqueeze(-1).expand(-1, -1, channels), fresh)
    spread = sums.gather(1, labels.unsqueeze(-1).expand(-1, -1, channels))
    return spread * gamma + scattered * (1 - gamma)
