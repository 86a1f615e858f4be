"""Fuzzing the packed loader: whatever bytes or header fields a file holds, `load_packed` either returns a
model or raises the documented `UserError`, never another exception, and never allocates a model the file's
data does not back. Bounded: a tiny file and a few dozen examples per property (a few seconds each)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from hybridopt.errors import UserError
from hybridopt.export import PACKED_NAME, export_packed, load_packed
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
