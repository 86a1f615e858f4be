"""The teacher-logit cache: exact top-k targets, reuse, refusal of damaged or forged files, and a cached
run with k = V reproducing a live run."""

import json
import struct

import pytest
import torch
import torch.nn.functional as F

from conftest import rewrite_safetensors_header, tiny_distill_args, tiny_distill_config
from hybridopt.cli import main
from hybridopt.config import DistillConfig
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter
from hybridopt.data.teacher_cache import build_cache, cache_key, ensure_cache, open_cache

CPU = torch.device("cpu")


def test_cached_targets_are_the_teachers_top_k(teacher_and_blocks, tmp_path):
    teacher, blocks = teacher_and_blocks
    cache = build_cache(teacher, blocks, 8, 2.0, tmp_path / "c.safetensors", 3, CPU, Reporter(quiet=True))
    ids, logprobs = cache.targets([7, 2])
    assert ids.shape == logprobs.shape == (2, 16, 8) and ids.dtype == torch.int16
    with torch.no_grad():
        logits = teacher(input_ids=blocks.batch([7, 2])[0]).logits
    want_values, want_ids = F.log_softmax(logits / 2.0, -1).topk(8, -1)
    assert torch.equal(ids.long(), want_ids)
    assert torch.allclose(logprobs, want_values, atol=1e-6)


def test_ensure_cache_reuses_and_rebuilds_a_damaged_file(teacher_and_blocks, tmp_path, capsys):
    teacher, blocks = teacher_and_blocks
    first = ensure_cache(teacher, blocks, 4, 1.0, tmp_path, 4, CPU)
    assert "built in" in capsys.readouterr().out
    again = ensure_cache(teacher, blocks, 4, 1.0, tmp_path, 4, CPU)
    assert again.path == first.path and "read from" in capsys.readouterr().out
    first.path.write_bytes(first.path.read_bytes()[:-100])  # truncated
    rebuilt = ensure_cache(teacher, blocks, 4, 1.0, tmp_path, 4, CPU)
    captured = capsys.readouterr()
    assert "rebuilding the damaged teacher cache" in captured.err and "built in" in captured.out
    assert torch.equal(rebuilt.targets([0])[0], build_cache(teacher, blocks, 4, 1.0, tmp_path / "x.safetensors",
                                                            4, CPU, Reporter(quiet=True)).targets([0])[0])


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["__metadata__"].update(key="0" * 24), "made for another teacher"),
    (lambda h: h["__metadata__"].update(format="other"), "not a hybridopt teacher cache"),
    (lambda h: h["__metadata__"].update(format_version="9"), "format version"),
    (lambda h: h["__metadata__"].update(vocab="7"), "does not fit"),
    (lambda h: h["ids"].update(shape=[10, 16, 5]), "tensor 'ids'"),
    (lambda h: h["logprobs"].update(dtype="F64"), "tensor 'logprobs'"),
])
def test_forged_headers_are_refused_before_reading_data(teacher_and_blocks, tmp_path, edit, message):
    teacher, blocks = teacher_and_blocks
    cache = build_cache(teacher, blocks, 4, 1.0, tmp_path / "c.safetensors", 4, CPU, Reporter(quiet=True))
    rewrite_safetensors_header(cache.path, edit)
    with pytest.raises(ValueError, match=message):
        open_cache(cache.path, cache_key(teacher, blocks, 4, 1.0), blocks, cache.vocab)


def test_a_huge_header_length_is_refused_without_allocating(teacher_and_blocks, tmp_path):
    teacher, blocks = teacher_and_blocks
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        open_cache(path, cache_key(teacher, blocks, 4, 1.0), blocks, 512)


def test_out_of_range_values_are_refused_when_read(teacher_and_blocks, tmp_path):
    teacher, blocks = teacher_and_blocks
    cache = build_cache(teacher, blocks, 4, 1.0, tmp_path / "c.safetensors", 4, CPU, Reporter(quiet=True))
    data = bytearray(cache.path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8 : 8 + n])["ids"]["data_offsets"][0]
    data[start : start + 2] = struct.pack("<h", 30000)  # block 0, first id, beyond the vocabulary of 512
    cache.path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cache.targets([0])
    assert cache.targets([1])[0].shape == (1, 16, 4)  # other blocks still read


def _cfg(teacher, data, out, **kw):
    return tiny_distill_config(teacher, data, out, **{**dict(epochs=2, max_steps_per_epoch=4, eval_every=1,
                                                             baseline=False), **kw})


def test_a_cached_run_with_k_equal_to_v_reproduces_the_live_run(tiny_teacher, corpus_file, tmp_path):
    quiet = Reporter(quiet=True)
    live = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "live"), quiet)
    cached = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "cached", teacher_topk=512), quiet)
    small = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "small", teacher_topk=4), quiet)
    assert cached["student"]["loss"] == pytest.approx(live["student"]["loss"], abs=1e-4)
    for a, b in zip(cached["student"]["history"], live["student"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    # k = 4 of 512 is a different objective: its training loss must differ measurably.
    assert abs(small["student"]["history"][0]["loss"] - live["student"]["history"][0]["loss"]) > 1e-3


def test_teacher_cache_command_then_distill_reads_it(tiny_teacher, corpus_file, tmp_path, capsys):
    args = tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "run", "--teacher_topk", "16", "--no-baseline")
    assert main(["teacher-cache", *args[1:]]) == 0
    assert "built in" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Teacher cache: top-16 at temperature 2, " in out and "read from" in out
    assert main(["distill", *args[1:-3], "--teacher_topk", "0"]) == 2
    assert "--teacher_topk must be at least 1" in capsys.readouterr().err


def test_an_interrupted_cached_run_resumes_to_the_same_result(tiny_teacher, corpus_file, tmp_path):
    quiet = Reporter(quiet=True)
    straight = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "a", teacher_topk=16, epochs=3), quiet)
    assert run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "b", teacher_topk=16, epochs=3), quiet,
                       stop_after_epoch=1) == {"interrupted_at_epoch": 1}
    resumed = run_distill(DistillConfig(resume=str(tmp_path / "b")), quiet)
    assert resumed["student"]["loss"] == straight["student"]["loss"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in h]  # noqa: E731
    assert strip(resumed["student"]["history"]) == strip(straight["student"]["history"])
