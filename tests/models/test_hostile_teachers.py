"""Hostile teacher folders: a config.json claiming shapes its safetensors do not hold, weights missing, a tokenizer
larger than the embedding, a hub attention kernel. Each is refused in one sentence before any model is built
(`AutoModelForCausalLM.from_pretrained` is made to fail if reached), or loads without looking anything up."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_distill_args
from hybridopt.cli import main
from hybridopt.models.modeling import load_teacher
from hybridopt.models.tokenizer import train_bpe_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    return train_bpe_tokenizer([topics[k] for k in sorted(topics)[:20]], vocab_size=300)


def _save(path, tok, vocab=None, tie=False, layers=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory, tok):
    return _save(tmp_path_factory.mktemp("good") / "teacher", tok)


@pytest.fixture
def teacher(good, tmp_path):
    """A fresh copy of the good teacher, to damage."""
    return shutil.copytree(good, tmp_path / "teacher")


@pytest.fixture
def no_build(monkeypatch):
    """Building the real model fails the test: a refusal must come from the headers alone."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)


def _edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path, drop=(), add=None):
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_the_good_teacher_loads(good, tok):
    model, tokenizer = load_teacher(good, CPU)
    assert len(tokenizer) == len(tok) and model.config.num_hidden_layers == 2


def test_layers_the_files_lack_are_refused_at_once(teacher, no_build):
    _edit_config(teacher, num_hidden_layers=100000)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"config.json claims num_hidden_layers 100000 but its safetensors hold "
                                         r"no tensor of layer 2; the config does not describe these weights$"):
        load_teacher(teacher, CPU)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("field, value", [("hidden_size", 10**6), ("vocab_size", 10**7),
                                          ("intermediate_size", 10**8), ("vocab_size", 10**15)])
def test_sizes_beyond_the_files_are_refused(teacher, no_build, field, value):
    _edit_config(teacher, **{field: value})
    with pytest.raises(ValueError, match=f"config.json claims {field} {value}, more than the 39840 values its "
                                         "safetensors hold$"):
        load_teacher(teacher, CPU)


@pytest.mark.parametrize("field, value, tensor", [
    ("hidden_size", 64, r"hidden_size 64\) make model.embed_tokens.weight \(\d+, 64\), but its safetensors hold \(\d+, 32\)"),
    ("intermediate_size", 128, r"intermediate_size 128\) make model.layers.0.mlp.gate_proj.weight \(128, 32\)"),
    ("num_attention_heads", 4, r"num_attention_heads 4, num_key_value_heads 2, head_dim 16\) make "
                               r"model.layers.0.self_attn.q_proj.weight \(64, 32\), but its safetensors hold \(32, 32\)"),
])
def test_shapes_the_files_do_not_hold_are_refused(teacher, no_build, field, value, tensor):
    _edit_config(teacher, **{field: value})
    with pytest.raises(ValueError, match=r"config.json's sizes \(" + tensor):
        load_teacher(teacher, CPU)


def test_the_cli_refuses_a_forged_config_in_one_line(teacher, corpus_file, tmp_path, capsys):
    _edit_config(teacher, num_hidden_layers=100000)
    assert main(tiny_distill_args(teacher, corpus_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hybridopt: error: --teacher: ") and "num_hidden_layers 100000" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize("drop", ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"])
def test_a_missing_weight_is_named(teacher, no_build, drop):
    _edit_weights(teacher, drop=[drop])
    with pytest.raises(ValueError, match=f"lacks the weight {drop}, which would be left randomly initialised"):
        load_teacher(teacher, CPU)


def test_a_whole_missing_layer_is_named(teacher, no_build):
    _edit_weights(teacher, drop=[k for k in load_file(teacher / "model.safetensors") if ".layers.1." in k])
    with pytest.raises(ValueError, match="claims num_hidden_layers 2 but its safetensors hold no tensor of layer 1"):
        load_teacher(teacher, CPU)


def test_a_missing_weight_hidden_by_padding_is_named_after_loading(teacher):
    # An unrelated tensor of the same size keeps the totals equal: transformers' own list of missing keys tells.
    _edit_weights(teacher, drop=["model.layers.1.mlp.up_proj.weight"], add={"padding": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match=r"lacks the weight model.layers.1.mlp.up_proj.weight \(1 missing in all\)"):
        load_teacher(teacher, CPU)


def test_a_tied_head_may_be_absent(tmp_path, tok):
    path = _save(tmp_path / "tied", tok, tie=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, _ = load_teacher(path, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tok, no_build):
    path = _save(tmp_path / "small", tok, vocab=len(tok) - 100, layers=1)
    with pytest.raises(ValueError, match=f"its tokenizer has {len(tok)} tokens but the model's embedding has only "
                                         f"{len(tok) - 100} rows; use the tokenizer the model was trained with$"):
        load_teacher(path, CPU)


@pytest.mark.parametrize("attn", ["kernels-community/flash-attn3", "flash_attention_2"])
def test_a_configured_attention_kernel_is_never_looked_up(teacher, monkeypatch, attn):
    def hub(*args, **kwargs):
        raise AssertionError("a kernel was looked up")
    monkeypatch.setattr(transformers.modeling_utils, "lazy_import_flash_attention", hub)
    _edit_config(teacher, attn_implementation=attn)
    model, _ = load_teacher(teacher, CPU)
    assert model.config._attn_implementation == "sdpa"


def test_bench_refuses_a_forged_teacher_in_the_words_distill_uses(teacher, no_build, corpus_file, tmp_path, capsys):
    """`hybridopt bench --teacher` said `--teacher/--data:` (and let anything but a ValueError through); now the
    sentence `hybridopt distill` prints, before the bench folder is made."""
    _edit_config(teacher, num_hidden_layers=100000)
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--task", "distill", "--teacher", str(teacher), "--data", str(corpus_file),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"hybridopt: error: --teacher: '{teacher}': config.json claims num_hidden_layers 100000 but its safetensors "
        "hold no tensor of layer 2; the config does not describe these weights\n")
    assert not out.exists()


@pytest.mark.parametrize("command", [["generate", "--max_new_tokens", "2"], ["export"]])
def test_a_student_folder_is_checked_like_a_teacher_folder(teacher, no_build, tmp_path, capsys, command):
    """`generate --model` and `export --model` built whatever a Hugging Face folder's config.json claimed (100000
    layers: all the memory there is); now its headers are checked first, as a teacher's are."""
    _edit_config(teacher, num_hidden_layers=100000)
    argv = [command[0], "--model", str(teacher), *command[1:]]
    if command == ["export"]:
        argv += ["--out", str(tmp_path / "x")]
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    assert capsys.readouterr().err == (
        f"hybridopt: error: --model: '{teacher}': config.json claims num_hidden_layers 100000 but its safetensors "
        "hold no tensor of layer 2; the config does not describe these weights\n")
    assert not (tmp_path / "x").exists()


def test_a_teacher_with_weights_only_in_a_pickle_is_refused_and_the_pickle_never_loaded(teacher, tmp_path, monkeypatch,
                                                                                       corpus_file, capsys):
    witness = tmp_path / "pwned"

    class Payload:  # what a pickle's code could do: here, leave a file
        def __reduce__(self):
            return (open, (str(witness), "w"))

    (teacher / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, teacher / "pytorch_model.bin")

    def no_pickle(*args, **kwargs):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(torch, "load", no_pickle)
    message = (f"'{teacher}' holds no model.safetensors; hybridopt reads model weights from safetensors only (save "
               "the model with save_pretrained)")
    with pytest.raises(ValueError) as e:
        load_teacher(teacher, CPU)
    assert str(e.value) == message
    capsys.readouterr()
    assert main(tiny_distill_args(teacher, corpus_file, tmp_path / "run")) == 2
    assert capsys.readouterr().err == f"hybridopt: error: --teacher: {message}\n"
    assert not witness.exists()
