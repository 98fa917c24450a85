"""Exact neighbours against brute force; duplicate groups; k-NN accuracy; bad inputs."""

import numpy as np
import pytest

from transforms import neighbors


def _clustered(n=300, dim=24, clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + 0.6 * rng.normal(size=(n, dim))
    return neighbors.normalize(x), np.array([f"c{c}" for c in labels], dtype=object)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_exact_neighbors_match_brute_force(block):
    x, _ = _clustered()
    k = 10
    index, sims = neighbors.exact_neighbors(x, x, k, exclude_self=True, block=block)
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    expected = np.sort(full, axis=1)[:, ::-1][:, :k]
    np.testing.assert_allclose(sims, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(full, index, 1), sims, rtol=1e-5, atol=1e-6)
    assert not (index == np.arange(len(x))[:, None]).any()  # never itself
    assert (np.diff(sims, axis=1) <= 1e-7).all()  # best first


def test_queries_against_another_table():
    x, _ = _clustered()
    q = x[:5] + 0.01
    index, _ = neighbors.exact_neighbors(neighbors.normalize(q), x, 3, block=32)
    assert index[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_k_and_threshold_are_checked():
    x, _ = _clustered(n=10)
    with pytest.raises(ValueError, match="larger than the 9 rows"):
        neighbors.exact_neighbors(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        neighbors.exact_neighbors(x, x, 0)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            neighbors.check_threshold(bad)


def test_duplicate_groups_are_connected_components():
    x, _ = _clustered(n=50)
    x = np.concatenate([x, x[[3, 3, 7]] * 1.0, neighbors.normalize(x[[20]] + 1e-3)])  # 50..53
    index, sims = neighbors.exact_neighbors(x, x, 5, exclude_self=True)
    groups = neighbors.duplicate_groups(index, sims, 0.999)
    assert [3, 50, 51] in groups and [7, 52] in groups and [20, 53] in groups
    assert all(len(g) > 1 for g in groups)


def test_knn_accuracy_on_clusters_and_unlabelled_rows():
    x, labels = _clustered(n=400)
    index, _ = neighbors.exact_neighbors(x, x, 20, exclude_self=True)
    acc = neighbors.knn_accuracy(labels[index], labels)
    assert set(acc) == {1, 5, 20} and all(v > 0.8 for v in acc.values())
    shuffled = np.random.default_rng(1).permutation(labels)
    assert neighbors.knn_accuracy(shuffled[index], shuffled)[5] < 0.4
    unlabelled = labels.copy()
    unlabelled[0] = None
    with pytest.raises(ValueError, match="unlabelled"):
        neighbors.knn_accuracy(labels[index], unlabelled)
