"""faiss k-means: recovery of separated groups, determinism, guards."""

import numpy as np
import pytest

from hybridopt.kmeans import assign, kmeans


def _blobs(n_per=40, k=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(d, dtype=np.float32)[:k] * 5
    x = np.concatenate([c + 0.3 * rng.standard_normal((n_per, d)).astype(np.float32) for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(np.arange(k), n_per)


def test_kmeans_recovers_well_separated_groups_and_is_deterministic():
    x, truth = _blobs()
    centroids, labels = kmeans(x, 3, seed=0)
    assert centroids.shape == (3, 8)
    # Same partition up to renaming: each true group maps to exactly one cluster.
    assert all(len(set(labels[truth == t])) == 1 for t in range(3))
    assert len(set(labels)) == 3
    again = kmeans(x, 3, seed=0)[1]
    assert (again == labels).all()
    assert (assign(x, centroids) == labels).all()


def test_kmeans_refuses_more_clusters_than_points():
    x, _ = _blobs(n_per=2)
    with pytest.raises(ValueError, match="cannot make 10 clusters of 6 sequences"):
        kmeans(x, 10, 0, what="sequences")


def test_kmeans_refuses_more_clusters_than_distinct_points():
    x = np.repeat(_blobs(n_per=1)[0], 20, axis=0)  # 3 distinct points, 60 rows
    with pytest.raises(ValueError, match="only 3 of the 60 .* are distinct"):
        kmeans(x, 4, 0)
    assert len(set(kmeans(x, 3, 0)[1])) == 3


def test_kmeans_takes_any_run_seed():
    x, _ = _blobs()
    assert (kmeans(x, 3, seed=2**31 + 5)[1] == kmeans(x, 3, seed=5)[1]).all()  # faiss seeds are C ints
