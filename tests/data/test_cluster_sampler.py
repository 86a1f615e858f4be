"""ClusterStratifiedBatchSampler: target frequencies, determinism, exact resume, unbiased weighted loss."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.data.sampler import SAMPLING_MODES, ClusterStratifiedBatchSampler, randomized_rounding

LABELS = torch.tensor([0] * 120 + [1] * 50 + [2] * 25 + [3] * 5)  # unequal clusters, one tiny


def _all_batches(s, epochs):
    out = []
    for e in range(epochs):
        s.set_epoch(e)
        out.extend(s)
    return out


@settings(max_examples=80, deadline=None)
@given(x=st.lists(st.floats(0.01, 20), min_size=1, max_size=12), total=st.integers(0, 64),
       seed=st.integers(0, 10**6))
def test_randomized_rounding_keeps_the_total_and_rounds_each_entry_down_or_up(x, total, seed):
    t = torch.tensor(x, dtype=torch.float64)
    t = t / t.sum() * total  # batch_size * shares: an integer total
    c = randomized_rounding(t, torch.Generator().manual_seed(seed))
    assert int(c.sum()) == total
    assert bool(((c >= (t - 1e-9).floor()) & (c <= (t + 1e-9).ceil())).all())


def test_randomized_rounding_is_unbiased():
    x = torch.tensor([2.3, 0.45, 4.25, 1.0, 0.0])  # sums to 8
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([randomized_rounding(x, g) for _ in range(20000)]).double().mean(0)
    assert torch.allclose(mean, x.double(), atol=0.02), mean


@pytest.mark.parametrize("mode,target", [
    ("proportional", [0.6, 0.25, 0.125, 0.025]),
    ("balanced", [0.25, 0.25, 0.25, 0.25]),
    ("single", [0.6, 0.25, 0.125, 0.025]),
    ("iid", [0.6, 0.25, 0.125, 0.025]),
])
def test_cluster_frequencies_match_the_mode_over_many_batches(mode, target):
    s = ClusterStratifiedBatchSampler(LABELS, 16, seed=3, mode=mode)
    batches = _all_batches(s, 200)  # 2400 batches
    counts = torch.bincount(LABELS[torch.tensor(batches).flatten()], minlength=4).double()
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor(target, dtype=torch.float64), atol=0.01), (mode, freq)
    assert all(len(b) == 16 for b in batches)
    if mode == "single":
        assert all(s.batch_cluster(b) is not None for b in batches)
    if mode == "proportional":
        # Per batch, each cluster's count is B p_k rounded down or up: never far from its share.
        per = torch.stack([torch.bincount(LABELS[torch.tensor(b)], minlength=4) for b in batches]).double()
        share = 16 * torch.tensor(target, dtype=torch.float64)
        assert bool(((per >= share.floor()) & (per <= share.ceil())).all())


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_no_duplicates_within_a_batch_unless_a_cluster_is_too_small(mode):
    s = ClusterStratifiedBatchSampler(LABELS, 16, seed=0, mode=mode)
    for b in _all_batches(s, 5):
        ks = LABELS[torch.tensor(b)]
        for k in range(4):
            picked = [i for i, c in zip(b, ks.tolist()) if c == k]
            if len(picked) <= int((LABELS == k).sum()):
                assert len(set(picked)) == len(picked)


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_batches_depend_only_on_seed_epoch_and_step(mode):
    a = _all_batches(ClusterStratifiedBatchSampler(LABELS, 16, seed=7, mode=mode), 3)
    b = _all_batches(ClusterStratifiedBatchSampler(LABELS, 16, seed=7, mode=mode), 3)
    c = _all_batches(ClusterStratifiedBatchSampler(LABELS, 16, seed=8, mode=mode), 3)
    assert a == b and a != c
    s = ClusterStratifiedBatchSampler(LABELS, 16, seed=7, mode=mode)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_resume_replays_the_remaining_batches_exactly(mode):
    full = ClusterStratifiedBatchSampler(LABELS, 16, seed=1, mode=mode, max_batches=9)
    full.set_epoch(4)
    expected = list(full)
    first = ClusterStratifiedBatchSampler(LABELS, 16, seed=1, mode=mode, max_batches=9)
    first.set_epoch(4, start_step=2)
    it = iter(first)
    assert [next(it) for _ in range(3)] == expected[2:5]
    state = first.state_dict()  # after handing out batches 2, 3 and 4
    resumed = ClusterStratifiedBatchSampler(LABELS, 16, seed=999, mode=mode, max_batches=9)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[5:]
    assert len(full) == 9
    relabelled = ClusterStratifiedBatchSampler(LABELS.flip(0), 16, seed=1, mode=mode, max_batches=9)
    with pytest.raises(ValueError, match="different labels"):
        relabelled.load_state_dict(state)


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_importance_weighted_batch_mean_is_unbiased(mode):
    """E[mean_i w_i l_i] over the sampler equals the full-data mean loss, for every mode."""
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(len(LABELS), generator=g) + LABELS.double() * 2  # clusters differ a lot
    target = float(losses.mean())
    s = ClusterStratifiedBatchSampler(LABELS, 16, seed=5, mode=mode)
    estimates = []
    for b in _all_batches(s, 400):
        w = s.example_weights(b).double()
        estimates.append(float((w * losses[torch.tensor(b)]).mean()))
    est = torch.tensor(estimates)
    stderr = float(est.std() / len(est) ** 0.5)
    assert abs(float(est.mean()) - target) < 4 * stderr + 1e-3, (mode, float(est.mean()), target, stderr)
    if mode == "balanced":
        # Without the weights, balanced batches over-weight the small, high-loss clusters.
        plain = [float(losses[torch.tensor(b)].mean()) for b in _all_batches(s, 50)]
        assert sum(plain) / len(plain) > target + 0.5
        assert s.weighted
    else:
        assert not s.weighted and torch.all(s.example_weights(list(range(10))) == 1)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown sampling mode"):
        ClusterStratifiedBatchSampler(LABELS, 4, 0, mode="uniform")
