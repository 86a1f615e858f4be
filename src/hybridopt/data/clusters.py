"""Data clusters: k-means groups of the training sequences, by teacher features.

Each training sequence is described by the teacher's last hidden states, mean-pooled
over its tokens and L2-normalised (the teacher is loaded anyway, and its representation groups text by
topic and style better than token counts do). Spherical k-means (cosine similarity), k-means++
initialisation and a fixed seed (`hybridopt.kmeans`), then every sequence is assigned to its nearest
centroid. Validation sequences are assigned to the same centroids, so validation loss can be reported
per cluster.

Labels and centroids are cached under the cache directory, keyed by a hash of the teacher's weights,
the token streams and the clustering settings; one process computes an entry, and others wanting it
meanwhile wait and read it (`fileio.read_or_build`).
"""

from __future__ import annotations

import hashlib
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hybridopt.fileio import atomic_write, read_or_build
from hybridopt.data.blocks import TokenBlocks
from hybridopt.kmeans import KMEANS_ITERATIONS, MAX_POINTS_PER_CENTROID, assign, faiss_gpus, faiss_module, kmeans
from hybridopt.models.modeling import hash_model

_CACHE_VERSION = "data-clusters-v2"


@torch.no_grad()
def sequence_features(model: torch.nn.Module, data: TokenBlocks, batch_size: int, device: torch.device,
                      desc: str = "features") -> np.ndarray:
    """Mean-pooled last hidden states of `model` over each block of `data`, L2-normalised: `(N, d)`."""
    was_training = model.training
    model.eval()
    feats = []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        input_ids, _ = data.batch(list(range(start, min(start + batch_size, len(data)))))
        hidden = _last_hidden(model, input_ids.to(device))  # (B, T, d)
        feats.append(torch.nn.functional.normalize(hidden.float().mean(1), dim=-1).cpu())
    model.train(was_training)
    return torch.cat(feats).numpy()


def _last_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state (after the final norm): from the backbone alone when the model has one, which
    skips the (B, T, V) logits; otherwise from the full model's hidden states."""
    backbone = model.base_model
    if backbone is not model:
        out = backbone(input_ids=input_ids, return_dict=True)
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    return model(input_ids=input_ids, output_hidden_states=True, return_dict=True).hidden_states[-1]


@dataclass
class DataClusters:
    """K-means clusters of the training sequences.

    Attributes:
        labels: cluster of every training sequence, `(N,)`.
        val_labels: nearest cluster of every validation sequence, `(N_val,)`.
        centroids: `(K, d)` unit vectors.
        representatives: per cluster, the training sequences closest to its centroid (best first).
        seconds: time spent computing features and clustering (0 when read from the cache).
        cached: whether the result came from the cache.
    """

    labels: np.ndarray
    val_labels: np.ndarray
    centroids: np.ndarray
    representatives: list[list[int]]
    seconds: float = 0.0
    cached: bool = False

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_clusters)


def _cache_key(model: torch.nn.Module, train: TokenBlocks, val: TokenBlocks, k: int, seed: int,
               gpu: bool = False) -> str:
    """A hash of everything the clusters depend on: settings, faiss (and whether on the GPU), the teacher
    (config and weights), the data."""
    settings = (f"{_CACHE_VERSION} k={k} seed={seed} niter={KMEANS_ITERATIONS} max_points={MAX_POINTS_PER_CENTROID} "
                f"init=kmeans++ spherical faiss={faiss_module().__version__} features=mean-last-hidden "
                f"train={train.digest} val={val.digest}" + (" faiss-gpu" if gpu else ""))
    h = hashlib.sha256(settings.encode())
    hash_model(h, model)
    return h.hexdigest()[:24]


def _read_cache(path: Path) -> DataClusters | None:
    """The cached clusters at `path`, or None if there are none or the file is damaged (then they are recomputed)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            reps = [list(r[r >= 0]) for r in z["representatives"]]
            return DataClusters(z["labels"], z["val_labels"], z["centroids"], reps, cached=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        print(f"warning: ignoring the damaged cluster cache {path} ({e}); clustering again", file=sys.stderr)
        return None


def _write_cache(path: Path, clusters: DataClusters) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    padded = np.full((clusters.num_clusters, 3), -1, dtype=np.int64)
    for i, r in enumerate(clusters.representatives):
        padded[i, : len(r)] = r

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temporary name
            np.savez(f, labels=clusters.labels, val_labels=clusters.val_labels, centroids=clusters.centroids,
                     representatives=padded)

    atomic_write(path, write)


def cluster_data(teacher: torch.nn.Module, train: TokenBlocks, val: TokenBlocks, k: int, seed: int,
                 batch_size: int, device: torch.device, cache: Path | None = None) -> DataClusters:
    """Cluster the training sequences by teacher features; assign the validation sequences; cache both.

    Raises:
        ValueError: `k` exceeds the number of (distinct) training sequences.
    """
    if k > len(train):
        raise ValueError(f"{k} data clusters exceed the {len(train)} training sequences; "
                         f"ask for at most {len(train)} or use shorter sequences")
    gpu = device.type == "cuda" and faiss_gpus() > 0  # k-means on the GPU when faiss has GPU support
    if cache is None:
        return _cluster(teacher, train, val, k, seed, batch_size, device, gpu)
    path = cache / f"{_cache_key(teacher, train, val, k, seed, gpu)}.npz"

    def build() -> DataClusters:
        result = _cluster(teacher, train, val, k, seed, batch_size, device, gpu)
        _write_cache(path, result)
        return result

    # one clustering per entry: a process that wants it while another clusters waits, then reads its file
    return read_or_build(path, lambda: _read_cache(path), build, "the data clusters")


def _cluster(teacher: torch.nn.Module, train: TokenBlocks, val: TokenBlocks, k: int, seed: int, batch_size: int,
             device: torch.device, gpu: bool) -> DataClusters:
    """`cluster_data`'s work, uncached."""
    start = time.perf_counter()
    feats = sequence_features(teacher, train, batch_size, device, "clustering: teacher features")
    val_feats = sequence_features(teacher, val, batch_size, device, "clustering: validation features")
    centroids, labels = kmeans(feats, k, seed, what="training sequences", gpu=gpu)
    sizes = np.bincount(labels, minlength=k)
    if (sizes == 0).any():
        keep = np.flatnonzero(sizes)
        print(f"warning: k-means left {k - len(keep)} of {k} data clusters empty; using {len(keep)}",
              file=sys.stderr)
        centroids = centroids[keep]
        labels = assign(feats, centroids)
    val_labels = assign(val_feats, centroids)
    sims = feats @ centroids.T  # (N, K)
    reps = []
    for c in range(len(centroids)):
        members = np.flatnonzero(labels == c)
        reps.append(list(members[np.argsort(-sims[members, c])][:3]))
    return DataClusters(labels, val_labels, centroids, reps, seconds=time.perf_counter() - start)


def format_cluster_report(clusters: DataClusters, train: TokenBlocks, tokenizer: PreTrainedTokenizerBase,
                          snippets: int = 2, width: int = 70, sampling: str = "proportional",
                          batch_size: int = 0) -> str:
    """Cluster sizes (min / median / max) and the sequences nearest each centroid, as printed at start;
    a warning for each cluster too small for what `sampling` draws from it per batch of `batch_size`."""
    sizes = clusters.sizes
    how = "read from the cache" if clusters.cached else f"{clusters.seconds:.1f} s (teacher features + faiss k-means)"
    lines = [f"Data clusters: {clusters.num_clusters} k-means clusters of {len(clusters.labels):,} training "
             f"sequences, {how}; sizes min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}"]
    for c in range(clusters.num_clusters):
        texts = []
        for i in clusters.representatives[c][:snippets]:
            text = " ".join(tokenizer.decode(train[int(i)][:-1].tolist()).split())
            texts.append(repr(text[:width] + ("..." if len(text) > width else "")))
        lines.append(f"  cluster {c} ({sizes[c]} sequences, {sizes[c] / len(clusters.labels):.1%}): " + " | ".join(texts))
    # Examples one batch takes from a cluster: more than the cluster holds means repeats within the batch.
    need = {"balanced": -(-batch_size // clusters.num_clusters), "single": batch_size}.get(sampling, 0)
    small = [int(c) for c in np.flatnonzero(sizes < need)]
    if small:
        lines.append(f"  warning: {sampling} sampling draws {need} sequences per batch from a cluster, more than "
                     f"cluster{'s' if len(small) > 1 else ''} {', '.join(map(str, small))} "
                     f"hold{'' if len(small) > 1 else 's'}; those batches repeat sequences")
    return "\n".join(lines)
