import random

import numpy as np
import pytest
import torch

from hybridopt.fileio import atomic_write
from hybridopt.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hybridopt.errors import UserError


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = rng_state()
    a = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_checkpoint_loads_without_pickle(tmp_path):
    save_checkpoint(tmp_path, {"model": {"w": torch.ones(2)}, "position": {"epoch": 3}})
    state = load_checkpoint(tmp_path)  # weights_only=True inside
    assert state["position"]["epoch"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))


def test_missing_or_corrupt_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_a_failed_checkpoint_write_is_a_user_error_and_keeps_the_previous_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"x": torch.ones(2)})

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="is the disk full"):
        save_checkpoint(tmp_path, {"x": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


class _Payload:
    """Stands for code a pickle would run: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path, capsys):
    torch.save({"format_version": 1, "model": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(tmp_path)
    assert "pickle code ran" not in capsys.readouterr().out
