"""ClusCa's token rules (hicache.clusters) against direct, token-by-token evaluations of the official rules."""

import pytest
import torch

from hicache import clusters as C


def direct_kmeans(x, centroids, iterations=10, rtol=1e-4):
    """The official loop written out per token and per cluster (one batch element, float32)."""
    k = centroids.shape[0]
    labels = None
    for _ in range(iterations):
        labels = torch.tensor([min(range(k), key=lambda c: float((x[n] - centroids[c]).abs().sum()))
                               for n in range(x.shape[0])])
        new = torch.stack([x[labels == c].sum(0) / (float((labels == c).sum()) + 1e-8) for c in range(k)])
        if torch.allclose(centroids, new, rtol=rtol):
            break
        centroids = new
    return labels, centroids


def blobs(n=64, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(k, d, generator=g)
    return (centres[torch.arange(n) % k] + torch.randn(n, d, generator=g)).unsqueeze(0)


@pytest.mark.parametrize("iterations", [1, 2, 10])
def test_kmeans_matches_the_direct_loop_from_given_centroids(iterations):
    x = blobs()
    start = x[:, [0, 1, 2, 5]].clone()  # two rows of the same blob: a hard start
    labels, centroids = C.kmeans(x, 4, centroids=start, iterations=iterations)
    want_labels, want_centroids = direct_kmeans(x[0], start[0], iterations)
    assert torch.equal(labels[0], want_labels)
    torch.testing.assert_close(centroids[0], want_centroids, rtol=1e-6, atol=1e-6)


def test_kmeans_empty_cluster_gets_the_zero_centroid():
    x = blobs(k=2)
    far = torch.full((1, 1, 8), 1e4)  # a start no token is nearest to
    labels, centroids = C.kmeans(x, 3, centroids=torch.cat([x[:, :2], far], 1), iterations=1)
    assert not (labels == 2).any()
    assert torch.equal(centroids[0, 2], torch.zeros(8))


def test_kmeans_stops_at_convergence_and_returns_the_old_centroids():
    x = blobs()
    labels, converged = C.kmeans(x, 4, centroids=x[:, :4].clone())
    again_labels, again = C.kmeans(x, 4, centroids=converged)  # warm start at the fixed point: one iteration
    assert torch.equal(again_labels, labels) and again is converged


def test_kmeans_random_start_draws_rows_from_the_generator():
    x = blobs()
    g = torch.Generator().manual_seed(3)
    labels, centroids = C.kmeans(x, 4, generator=g, iterations=1)
    rows = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    want_labels, want_centroids = direct_kmeans(x[0], x[0, rows[0]], 1)
    assert torch.equal(labels[0], want_labels)
    torch.testing.assert_close(centroids[0], want_centroids)
    with pytest.raises(ValueError, match="needs a generator"):
        C.kmeans(x, 4)


def test_kmeans_in_bfloat16_keeps_centroids_in_bfloat16():
    x = blobs().bfloat16()
    labels, centroids = C.kmeans(x, 4, centroids=x[:, :4].clone())
    assert centroids.dtype == torch.bfloat16 and labels.dtype == torch.int64


def test_selection_is_the_heaviest_member_of_each_cluster_and_token_0_for_an_empty_one():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 30), generator=g)
    labels[labels == 3] = 1  # cluster 3 is empty
    weights = torch.rand(2, 30, generator=g)
    chosen = C.select_fresh(labels, 5, weights)
    for b in range(2):
        for c in range(5):
            members = [n for n in range(30) if labels[b, n] == c]
            want = max(members, key=lambda n: float(weights[b, n])) if members else 0
            assert int(chosen[b, c]) == want


def test_draw_fresh_uses_one_rand_of_the_official_shape():
    labels = torch.randint(0, 4, (2, 30), generator=torch.Generator().manual_seed(0))
    chosen = C.draw_fresh(labels, 4, torch.Generator().manual_seed(7))
    weights = torch.rand(2, 30, generator=torch.Generator().manual_seed(7))
    assert torch.equal(chosen, C.select_fresh(labels, 4, weights))


def propagation_case(empty_cluster=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    n, d, k = 20, 6, 4
    labels = torch.randint(0, k, (1, n), generator=g)
    if empty_cluster:
        labels[labels == 2] = 1
    indices = C.select_fresh(labels, k, torch.rand(1, n, generator=g))
    d0 = torch.randn(1, n, d, generator=g).to(dtype)
    fresh = torch.randn(1, k, d, generator=g).to(dtype)
    return d0, indices, fresh, labels, k


@pytest.mark.parametrize("empty_cluster", [False, True])
def test_propagation_against_direct_evaluation(empty_cluster):
    d0, indices, fresh, labels, k = propagation_case(empty_cluster)
    gamma = 0.005
    out = C.propagate_fresh(d0, indices, fresh, labels, k, gamma)
    scattered = d0[0].clone()
    for j in range(k):
        scattered[indices[0, j]] = fresh[0, j]
    sums = torch.zeros(k, d0.shape[-1])
    for j in range(k):  # each fresh row adds to the cluster its token lies in
        sums[labels[0, indices[0, j]]] += fresh[0, j]
    for n in range(d0.shape[1]):
        torch.testing.assert_close(out[0, n], gamma * sums[labels[0, n]] + (1 - gamma) * scattered[n])
    if not empty_cluster:  # one fresh token per cluster: fresh positions keep their fresh rows
        torch.testing.assert_close(out[0, indices[0]], fresh[0])
    assert not torch.equal(out, C.scatter_fresh(d0, indices, fresh))


def test_gamma_zero_is_a_pure_scatter_and_leaves_d0_untouched():
    d0, indices, fresh, labels, k = propagation_case()
    before = d0.clone()
    out = C.propagate_fresh(d0, indices, fresh, labels, k, 0.0)
    want = d0.clone()
    want[0, indices[0]] = fresh[0]
    assert torch.equal(out, want) and torch.equal(d0, before)


def test_propagation_in_bfloat16_stays_in_bfloat16():
    d0, indices, fresh, labels, k = propagation_case(dtype=torch.bfloat16)
    out = C.propagate_fresh(d0, indices, fresh.float(), labels, k, 0.005)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), C.propagate_fresh(d0.float(), indices, fresh.bfloat16().float(), labels,
                                                              k, 0.005), rtol=1e-2, atol=1e-2)
