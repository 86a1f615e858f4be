import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.data.sampler import ShuffledBatchSampler


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), b=st.integers(1, 40), seed=st.integers(0, 10**6), epoch=st.integers(0, 50),
       cap=st.integers(0, 10))
def test_batches_are_full_distinct_and_deterministic(n, b, seed, epoch, cap):
    s = ShuffledBatchSampler(n, b, seed, cap)
    s.set_epoch(epoch)
    batches = list(s)
    assert len(batches) == len(s) >= 1
    assert all(len(batch) == min(b, n) for batch in batches)
    flat = [i for batch in batches for i in batch]
    assert len(set(flat)) == len(flat) and all(0 <= i < n for i in flat)
    again = ShuffledBatchSampler(n, b, seed, cap)
    again.set_epoch(epoch)
    assert list(again) == batches


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 100), b=st.integers(1, 10), start=st.integers(0, 20))
def test_resume_mid_epoch_replays_the_tail(n, b, start):
    s = ShuffledBatchSampler(n, b, seed=3)
    s.set_epoch(7)
    full = list(s)
    restored = ShuffledBatchSampler(n, b, seed=0)
    s.set_epoch(7, start)
    restored.load_state_dict(s.state_dict())
    assert list(restored) == full[start:]


def test_state_counts_the_batches_handed_out():
    s = ShuffledBatchSampler(100, 10, seed=3)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    restored = ShuffledBatchSampler(100, 10, seed=0)
    restored.load_state_dict(s.state_dict())
    s.set_epoch(2)
    assert head + list(restored) == list(s)
    with pytest.raises(ValueError, match="different batch_size"):
        ShuffledBatchSampler(100, 5, seed=3).load_state_dict(s.state_dict())


def test_epochs_differ():
    s = ShuffledBatchSampler(100, 10, seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0
