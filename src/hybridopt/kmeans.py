"""K-means with faiss: the one clustering routine behind data clusters and parameter clusters.

Pure functions of arrays: no models, no files, no command-line names. k-means++ initialisation,
a fixed seed, at most `MAX_POINTS_PER_CENTROID` training points per centroid (faiss subsamples
beyond that), spherical (cosine) or Euclidean; on the GPUs with `gpu=True` (a faiss built with GPU support).
"""

from __future__ import annotations

import numpy as np
import torch

MAX_POINTS_PER_CENTROID = 256
KMEANS_ITERATIONS = 20
_ASSIGN_CHUNK = 65536


def faiss_module():
    """faiss, limited to torch's thread count.

    Imported on first use: faiss loads its own OpenMP runtime, which runs that never cluster do not need.
    faiss and torch each bring an OpenMP runtime; keep faiss to torch's thread count, not every core
    (torch's count can change between calls, so this is set on each use, not once).
    """
    import faiss

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


def faiss_gpus() -> int:
    """How many GPUs faiss can use (0 for faiss-cpu, which has no GPU support)."""
    return getattr(faiss_module(), "get_num_gpus", lambda: 0)()


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = KMEANS_ITERATIONS, spherical: bool = True,
           what: str = "points", nredo: int = 1, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the rows of `x` into `k` groups; return `(centroids (k, d), labels (n,))`.

    Args:
        x: `(n, d)` points.
        k: number of clusters.
        seed: faiss seed (reduced modulo 2**31).
        niter: Lloyd iterations.
        spherical: cluster by cosine similarity (unit-norm centroids), else by Euclidean distance.
        what: what the points are, for error messages ("training sequences").
        nredo: restarts; the clustering with the lowest objective is kept (worth it for small `x`).
        gpu: train on faiss's GPUs (see `faiss_gpus`); the clusters may differ from the CPU's in ties.

    Raises:
        ValueError: `k` is below 1, or larger than the number of (distinct) points.
    """
    faiss = faiss_module()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"cannot make {k} clusters of {n} {what}; ask for at most {n}")
    distinct = len(np.unique(x, axis=0))
    if k > distinct:
        raise ValueError(f"only {distinct} of the {n} {what} are distinct, too few for {k} clusters; "
                         f"ask for at most {distinct}")
    km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=seed % 2**31, spherical=spherical, verbose=False,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1,
                      init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS, gpu=gpu)
    km.train(x)
    return km.centroids.copy(), assign(x, km.centroids, spherical)


def assign(x: np.ndarray, centroids: np.ndarray, spherical: bool = True) -> np.ndarray:
    """Nearest centroid of every row of `x` (inner product when spherical, else L2), in chunks: `(n,)` int64."""
    faiss = faiss_module()
    index = faiss.IndexFlatIP(centroids.shape[1]) if spherical else faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), _ASSIGN_CHUNK):
        chunk = np.ascontiguousarray(x[start : start + _ASSIGN_CHUNK], dtype=np.float32)
        labels[start : start + len(chunk)] = index.search(chunk, 1)[1][:, 0]
    return labels
