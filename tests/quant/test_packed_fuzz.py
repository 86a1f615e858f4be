"""Fuzzing the packed loader and its decoders: whatever bytes or header fields a file holds, `load_packed`
either returns a model or raises the documented `UserError`, never another exception, and never allocates a
model the file's data does not back; a decoder returns the values its width allows or raises ValueError.
Bounded: a tiny file and a few dozen to a few hundred examples per property (a few seconds each)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from hybridopt.errors import UserError
from hybridopt.export.packed import _PACKINGS, PACKED_NAME, _unpack, export_packed, load_packed
from hybridopt.quant.packing import packed_nbytes
from hybridopt.quant.quantizers import TERNARY
from test_bad_input import Q, rewrite, tiny_qat_model

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.sampled_from([0, 1, 2, 16, 64, 2**24, 2**31])
    | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A folder for the file each example writes, beside the valid packed file it starts from."""
    root = tmp_path_factory.mktemp("fuzz")
    export_packed(tiny_qat_model(), root / "valid")
    return root / "valid" / PACKED_NAME, root / "fuzzed"


def _load_or_refuse(folder, monkeypatch) -> None:
    """The property: a model (of at most what the data backs) or a one-sentence UserError."""
    budget = sum(t.numel() for t in tiny_qat_model().state_dict().values())
    init = LlamaForCausalLM.__init__

    def bounded(self, config, *args, **kwargs):
        if torch.get_default_device().type != "meta":  # a real allocation: no bigger than the file's model
            with torch.device("meta"):
                init(self, config, *args, **kwargs)
            assert sum(math.prod(t.shape) for t in self.state_dict().values()) <= budget, "allocation beyond the data"
        init(self, config, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", bounded)
    try:
        load_packed(folder)
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith(f"'{folder}")
    finally:
        monkeypatch.undo()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10**9))
def test_flipped_bytes_and_truncation(packed, monkeypatch, edits, cut):
    valid, folder = packed
    data = bytearray(valid.read_bytes())
    for at, value in edits:
        data[at % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    folder.mkdir(exist_ok=True)
    (folder / PACKED_NAME).write_bytes(bytes(data))
    _load_or_refuse(folder, monkeypatch)


@FUZZ
@given(where=st.sampled_from(["config", "quant", "metadata"]),
       key=st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                            "rope_parameters", "rope_theta", "hidden_act", "tie_word_embeddings", "pad_token_id",
                            "eos_token_id", "model_type", "auto_map", "attn_implementation", "dtype", "pretraining_tp",
                            "bits", "shape", "group_size", "packing", "act_bits", "format", "format_version", "quant"]),
       value=JSON, delete=st.booleans())
def test_forged_header_fields(packed, monkeypatch, where, key, value, delete):
    """A field set to any JSON value (or removed), the checksum recomputed to match, as a forger would."""
    valid, folder = packed
    folder.mkdir(exist_ok=True)
    (folder / PACKED_NAME).write_bytes(valid.read_bytes())

    def edit(meta, config, quant, tensors):
        target = {"config": config, "quant": quant[Q], "metadata": meta}[where]
        if delete:
            target.pop(key, None)
        else:
            target[key] = json.dumps(value) if where == "metadata" else value

    rewrite(folder / PACKED_NAME, edit)
    _load_or_refuse(folder, monkeypatch)


@settings(max_examples=300, deadline=None, database=None)
@given(packing=st.sampled_from(sorted(_PACKINGS)), numel=st.integers(0, 300), off_by=st.sampled_from([0, 0, 0, -1, 1]),
       data=st.data())
def test_decoders_take_any_bytes(packing, numel, off_by, data):
    """Each decoder, given any bytes (mostly of the right length) for `numel` values: exactly `numel` values its
    width allows, or ValueError (which `load_packed` reports as a UserError)."""
    bits = _PACKINGS[packing]
    n = max(packed_nbytes(numel, bits) + off_by, 0)
    wrong_length = n != packed_nbytes(numel, bits)
    buffer = torch.tensor(list(data.draw(st.binary(min_size=n, max_size=n))), dtype=torch.uint8)
    try:
        q = _unpack(buffer, packing, numel)
    except ValueError:
        assert wrong_length or packing == "ternary5"  # the right length of bits is always decodable; trits can exceed 242
        return
    assert not wrong_length, "a buffer of the wrong length was decoded"
    allowed = {TERNARY: (-1, 1), 1.0: (-1, 1)}.get(bits) or (-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1)
    assert q.numel() == numel and (numel == 0 or allowed[0] <= int(q.min()) <= int(q.max()) <= allowed[1])
    if packing == "sign1":
        assert not (q == 0).any()
