"""Hostile GGUF teachers: a header claiming blocks, widths, heads or a vocabulary its tensors do not have is
refused in one sentence before transformers builds anything (`from_pretrained` is made to fail if reached)."""

from __future__ import annotations

import shutil
import time

import pytest
import transformers
from transformers import LlamaConfig

from conftest import overwrite_gguf_field, tiny_distill_args
from hybridopt.cli import main
from hybridopt.export.gguf import export_gguf
from hybridopt.export.gguf_read import load_gguf
from hybridopt.models.modeling import build_model
from hybridopt.models.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A 2-block Llama GGUF: 64 wide, 4 heads of 16, 2 key/value heads, feed-forward 128."""
    from pydoc_data.topics import topics

    tok = train_bpe_tokenizer([topics[k] for k in sorted(topics)[:20]], vocab_size=300)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("gguf") / "teacher.gguf"
    export_gguf(build_model(config, 0), path, tok, "f16")
    return path


@pytest.fixture
def no_build(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def _forged(good, tmp_path, key, value):
    """A copy of `good` with the integer field `key` overwritten in place."""
    path = shutil.copy(good, tmp_path / "forged.gguf")
    overwrite_gguf_field(path, key, value)
    return path


def test_the_good_file_loads(good):
    model, _ = load_gguf(good)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_blocks_the_file_lacks_are_refused_at_once(good, tmp_path, no_build):
    path = _forged(good, tmp_path, "llama.block_count", 100000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="claims llama.block_count 100000 but holds no tensor of block 2$"):
        load_gguf(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("key, value, message", [
    ("llama.embedding_length", 128, "claims llama.embedding_length 128 but its token_embd.weight is 64 wide$"),
    ("llama.vocab_size", 10**6, r"claims llama.vocab_size 1000000 but its token_embd.weight has \d+ rows$"),
    ("llama.attention.head_count", 8, r"claims llama.attention.head_count 8 \(16 wide each\) but its "
                                      r"blk.0.attn_q.weight has shape \(64, 64\)$"),
    ("llama.attention.head_count_kv", 3, "claims llama.attention.head_count_kv 3, which does not divide "
                                         "llama.attention.head_count 4$"),
    ("llama.attention.head_count_kv", 4, r"claims llama.attention.head_count_kv 4 \(16 wide each\) but its "
                                         r"blk.0.attn_k.weight has shape \(64, 32\)$"),
    ("llama.feed_forward_length", 10**6, r"claims llama.feed_forward_length 1000000 but its blk.0.ffn_up.weight "
                                         r"has shape \(64, 128\)$"),
    ("llama.block_count", 0, "has llama.block_count 0, which is not a positive integer$"),
])
def test_sizes_the_tensors_contradict_are_refused(good, tmp_path, no_build, key, value, message):
    with pytest.raises(ValueError, match=message):
        load_gguf(_forged(good, tmp_path, key, value))


def test_the_cli_refuses_a_forged_gguf_in_one_line(good, corpus_file, tmp_path, capsys):
    path = _forged(good, tmp_path, "llama.block_count", 100000)
    assert main(tiny_distill_args(path, corpus_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hybridopt: error: --teacher: ") and "block_count 100000" in err[-1]
    assert not any("Traceback" in line for line in err)
