"""faiss k-means: recovery of separated groups, guards, cached data clusters, per-cluster validation loss."""

import numpy as np
import pytest
import torch

from hybridopt.clustering import DataClusters, assign, cluster_data, format_cluster_report, kmeans
from hybridopt.errors import UserError


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
    with pytest.raises(UserError, match="cannot make 10 clusters of 6 sequences"):
        kmeans(x, 10, 0, what="sequences")


def test_kmeans_refuses_more_clusters_than_distinct_points():
    x = np.repeat(_blobs(n_per=1)[0], 20, axis=0)  # 3 distinct points, 60 rows
    with pytest.raises(UserError, match="only 3 of the 60 .* are distinct"):
        kmeans(x, 4, 0)
    assert len(set(kmeans(x, 3, 0)[1])) == 3


def test_kmeans_takes_any_run_seed():
    x, _ = _blobs()
    assert (kmeans(x, 3, seed=2**31 + 5)[1] == kmeans(x, 3, seed=5)[1]).all()  # faiss seeds are C ints


def test_cluster_data_caches_and_assigns_validation(tiny_teacher, tmp_path):
    from hybridopt.dataset import TokenBlocks
    from hybridopt.modeling import load_teacher

    teacher, tokenizer = load_teacher(tiny_teacher, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    train = TokenBlocks(torch.randint(0, 500, (32 * 60 + 1,), generator=g), 32)
    val = TokenBlocks(torch.randint(0, 500, (32 * 10 + 1,), generator=g), 32)
    first = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert not first.cached and first.seconds > 0
    assert first.labels.shape == (60,) and first.val_labels.shape == (10,)
    assert first.sizes.sum() == 60 and (first.sizes > 0).all()
    assert all(first.labels[r[0]] == c for c, r in enumerate(first.representatives))
    second = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert second.cached
    assert (second.labels == first.labels).all() and (second.val_labels == first.val_labels).all()
    report = format_cluster_report(second, train, tokenizer)
    assert "4 k-means clusters of 60 training sequences, read from the cache" in report
    assert report.count("  cluster ") == 4
    with pytest.raises(UserError, match="--data_clusters 61 exceeds the 60 training sequences"):
        cluster_data(teacher, train, val, 61, 0, 8, torch.device("cpu"))

    # A damaged cache file is recomputed (and rewritten), not a crash.
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    third = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert not third.cached and (third.labels == first.labels).all()
    assert cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path).cached


def test_per_cluster_validation_losses_add_up_to_the_overall_loss(tiny_teacher):
    from hybridopt.dataset import TokenBlocks
    from hybridopt.modeling import load_teacher
    from hybridopt.recipes.distill import evaluate_lm

    teacher, _ = load_teacher(tiny_teacher, torch.device("cpu"))
    val = TokenBlocks(torch.randint(0, 500, (32 * 12 + 1,), generator=torch.Generator().manual_seed(1)), 32)
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 3, 3])  # cluster 1 has no validation block
    ev = evaluate_lm(teacher, val, 5, torch.device("cpu"), labels, num_clusters=5)
    plain = evaluate_lm(teacher, val, 5, torch.device("cpu"))
    assert ev["loss"] == pytest.approx(plain["loss"], rel=1e-9)
    losses = ev["cluster_loss"]
    assert len(losses) == 5 and losses[1] is None and losses[4] is None  # no validation blocks: null, not NaN
    weighted = (7 * losses[0] + 3 * losses[2] + 2 * losses[3]) / 12
    assert weighted == pytest.approx(ev["loss"], rel=1e-9)
    assert len({round(v, 6) for v in (losses[0], losses[2], losses[3])}) == 3


@pytest.mark.parametrize("sampling,flagged", [("proportional", None), ("balanced", "clusters 1, 2 hold"),
                                              ("single", "clusters 0, 1, 2 hold")])
def test_report_warns_about_clusters_too_small_for_the_sampling(sampling, flagged):
    labels = np.array([0] * 7 + [1] * 2 + [2])
    clusters = DataClusters(labels, labels, np.eye(3, dtype=np.float32), [[], [], []])
    report = format_cluster_report(clusters, None, None, sampling=sampling, batch_size=8)
    assert "sizes min 1, median 2, max 7" in report
    assert ("warning" in report) == (flagged is not None)
    if flagged:
        assert flagged in report
