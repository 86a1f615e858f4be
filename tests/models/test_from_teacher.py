"""Students that start from their teacher: weights copied exactly, layers kept as asked, unsupported teachers
refused."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hybridopt.models.from_teacher import (block_influence, check_supported, even_layers, measured_layers,
                                           student_from_teacher)


def _teacher(layers=4, tied=False, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.mark.parametrize("tied", [False, True])
def test_a_full_student_is_the_teacher(tied):
    teacher = _teacher(tied=tied)
    student = student_from_teacher(teacher)
    assert student.config.tie_word_embeddings == tied
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert t_state.keys() == s_state.keys()
    for name, tensor in t_state.items():
        assert torch.equal(s_state[name], tensor), name
        assert s_state[name].data_ptr() != tensor.data_ptr(), "the student must own its weights"
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_pruning_keeps_the_named_layers_in_order():
    teacher = _teacher(layers=5)
    student = student_from_teacher(teacher, [0, 2, 4])
    assert student.config.num_hidden_layers == 3
    t_layers, s_layers = teacher.model.layers, student.model.layers
    for new, old in enumerate([0, 2, 4]):
        for (name, p), (_, q) in zip(s_layers[new].state_dict().items(), t_layers[old].state_dict().items()):
            assert torch.equal(p, q), (new, old, name)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


@pytest.mark.parametrize("layers", [[], [1, 1], [2, 1], [0, 5], [-1, 2]])
def test_bad_layer_lists_are_refused(layers):
    with pytest.raises(ValueError, match="distinct, increasing indices in"):
        student_from_teacher(_teacher(layers=5), layers)


def test_even_layers():
    assert even_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert even_layers(4, 2) == [0, 3]
    assert even_layers(5, 5) == [0, 1, 2, 3, 4]
    assert even_layers(5, 1) == [4]
    with pytest.raises(ValueError):
        even_layers(3, 4)


def test_measured_layers_drop_the_layer_that_changes_nothing():
    teacher = _teacher(layers=4)
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its influence is 0
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    influence = block_influence(teacher, batches)
    assert len(influence) == 4
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert all(v > 1e-3 for i, v in enumerate(influence) if i != 2)
    kept, again = measured_layers(teacher, 3, batches)
    assert kept == [0, 1, 3] and again == influence
    # by hand, for layer 0: 1 - mean cosine between the embeddings and the first layer's output
    ids = batches[0]
    states = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    by_hand = 1 - torch.nn.functional.cosine_similarity(states[0], states[1], dim=-1).mean()
    assert block_influence(teacher, [ids])[0] == pytest.approx(float(by_hand), abs=1e-6)


def test_unsupported_teachers_are_refused_in_one_sentence():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"Llama-family teachers only \(llama, mistral.*this teacher is a 'gpt2'"):
        check_supported(gpt2)
    biased = _teacher()
    biased.config.attention_bias = True
    with pytest.raises(ValueError, match="biases"):
        check_supported(biased)
