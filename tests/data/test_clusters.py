"""Data clusters: cached teacher-feature clusters, per-cluster validation loss, the cluster report."""

import numpy as np
import pytest
import torch

from hybridopt.data.clusters import DataClusters, cluster_data, format_cluster_report
from hybridopt.training.evaluation import evaluate_lm


def test_cluster_data_caches_and_assigns_validation(tiny_teacher, tmp_path):
    from hybridopt.data.blocks import TokenBlocks
    from hybridopt.models.modeling import load_teacher

    teacher, tokenizer = load_teacher(tiny_teacher, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    train = TokenBlocks(torch.randint(0, 500, (32 * 60 + 1,), generator=g), 32)
    val = TokenBlocks(torch.randint(0, 500, (32 * 10 + 1,), generator=g), 32)
    first = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert not first.cached  # computed (its wall time is reported, not asserted: no timing in tests)
    assert first.labels.shape == (60,) and first.val_labels.shape == (10,)
    assert first.sizes.sum() == 60 and (first.sizes > 0).all()
    assert all(first.labels[r[0]] == c for c, r in enumerate(first.representatives))
    second = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert second.cached and second.seconds == 0.0  # read, not recomputed
    assert (second.labels == first.labels).all() and (second.val_labels == first.val_labels).all()
    report = format_cluster_report(second, train, tokenizer)
    assert "4 k-means clusters of 60 training sequences, read from the cache" in report
    assert report.count("  cluster ") == 4
    with pytest.raises(ValueError, match="61 data clusters exceed the 60 training sequences"):
        cluster_data(teacher, train, val, 61, 0, 8, torch.device("cpu"))

    # A damaged cache file is recomputed (and rewritten), not a crash.
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    third = cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path)
    assert not third.cached and (third.labels == first.labels).all()
    assert cluster_data(teacher, train, val, 4, 0, 8, torch.device("cpu"), cache=tmp_path).cached


def test_per_cluster_validation_losses_add_up_to_the_overall_loss(tiny_teacher):
    from hybridopt.data.blocks import TokenBlocks
    from hybridopt.models.modeling import load_teacher

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


@pytest.mark.parametrize("device,gpus,on_gpu", [("cpu", 0, False), ("cpu", 1, False), ("cuda", 0, False),
                                                ("cuda", 1, True)])
def test_clusters_made_on_gpus_are_cached_apart(tiny_teacher, tmp_path, monkeypatch, device, gpus, on_gpu):
    """k-means runs on the GPUs only for a CUDA run with a faiss that has GPUs (faiss-cpu, the declared
    dependency, has none); faiss on GPUs may break ties otherwise than on the CPU, so those clusters get their own
    cache entry, and the CPU's key is what it was before GPU k-means existed (caches already on disk stay valid)."""
    from hybridopt.data import clusters as data_clusters
    from hybridopt.data.blocks import TokenBlocks
    from hybridopt.kmeans import kmeans
    from hybridopt.models.modeling import load_teacher

    teacher, _ = load_teacher(tiny_teacher, torch.device("cpu"))
    blocks = TokenBlocks(torch.arange(32 * 4 + 1) % 500, 32)
    cpu = data_clusters._cache_key(teacher, blocks, blocks, 4, 0)
    assert data_clusters._cache_key(teacher, blocks, blocks, 4, 0, gpu=False) == cpu
    assert data_clusters._cache_key(teacher, blocks, blocks, 4, 0, gpu=True) != cpu

    # faiss reports `gpus`; features and k-means run on the CPU whatever the device (there is no GPU here), and
    # where cluster_data asked k-means to run is recorded.
    asked = []

    def recorded_kmeans(*args, gpu, **kwargs):
        asked.append(gpu)
        return kmeans(*args, **kwargs)

    monkeypatch.setattr(data_clusters, "faiss_gpus", lambda: gpus)
    monkeypatch.setattr(data_clusters, "sequence_features", lambda *args, **kwargs: np.eye(4, 8, dtype=np.float32))
    monkeypatch.setattr(data_clusters, "kmeans", recorded_kmeans)
    data_clusters.cluster_data(teacher, blocks, blocks, 4, 0, 8, torch.device(device), cache=tmp_path)
    assert asked == [on_gpu]
    key = data_clusters._cache_key(teacher, blocks, blocks, 4, 0, gpu=on_gpu)
    assert [p.name for p in tmp_path.glob("*.npz")] == [f"{key}.npz"]


def test_faiss_gpus_counts_none_without_gpu_support():
    """faiss-cpu (no GPU index types in the module) reports no GPUs, so k-means stays on the CPU; a faiss built
    with GPU support reports what it sees, as many as CUDA at most."""
    from hybridopt.kmeans import faiss_gpus, faiss_module

    if not hasattr(faiss_module(), "StandardGpuResources"):
        assert faiss_gpus() == 0
    else:
        assert 0 <= faiss_gpus() <= torch.cuda.device_count()
