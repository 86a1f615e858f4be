"""Teachers of other architectures load through AutoModelForCausalLM; the student follows their vocabulary."""

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import tiny_distill_args
from hybridopt.cli import main
from hybridopt.config import StudentConfig
from hybridopt.models.modeling import build_model, context_length, load_teacher, student_config, vocab_size


@pytest.fixture(scope="module")
def gpt2_teacher(tmp_path_factory, tiny_teacher):
    path = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    # 8 rows more than the tokenizer: padded heads are common; the student must follow the head.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer) + 8, n_embd=32, n_layer=1, n_head=2, n_positions=48))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpt2_teacher_distils_into_a_llama_student(gpt2_teacher, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_distill_args(gpt2_teacher, corpus_file, out, "--epochs", "1", "--no-baseline")) == 0
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["vocab_size"] == json.loads((gpt2_teacher / "config.json").read_text())["vocab_size"]
    assert config["max_position_embeddings"] == 48


def test_gpt2_context_is_enforced(gpt2_teacher):
    teacher, _ = load_teacher(gpt2_teacher, torch.device("cpu"))
    assert context_length(teacher.config) == 48
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_student_shares_teacher_vocab_and_seed_fixes_init(tiny_teacher):
    teacher, tokenizer = load_teacher(tiny_teacher, torch.device("cpu"))
    cfg = student_config(teacher.config, vocab_size(teacher), StudentConfig(student_hidden=32, student_heads=2),
                         tokenizer, max_positions=128)
    a, b, c = build_model(cfg, 1), build_model(cfg, 1), build_model(cfg, 2)
    assert a.config.vocab_size == vocab_size(teacher)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_bad_teacher_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load the (tokenizer|model) in"):
        load_teacher(tmp_path, torch.device("cpu"))
