import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.quant.qat import QATConfig, QATLinear, qat_layers, quantize_
from hybridopt.quant.quantizers import TERNARY, fake_quantize_weight


def _tiny(tie=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=tie))


def test_every_block_linear_is_replaced_and_head_kept():
    model = _tiny()
    params_before = {id(p) for p in model.parameters()}
    names = quantize_(model, QATConfig(bits=TERNARY))
    assert len(names) == 2 * 7
    suffixes = {n.rsplit(".", 1)[-1] for n in names}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model.lm_head) is torch.nn.Linear
    assert {id(p) for p in model.parameters()} == params_before  # shared, not copied
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]


def test_head_on_request_and_group_size_checked():
    model = _tiny()
    assert "lm_head" in quantize_(model, QATConfig(bits=4, include_head=True))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_(_tiny(), QATConfig(group_size=5))


def test_qat_forward_uses_quantized_weights_and_gradient_reaches_latent_weights():
    lin = torch.nn.Linear(16, 8, bias=False)
    qat = QATLinear.from_linear(lin, QATConfig(bits=1))
    x = torch.randn(4, 16)
    torch.testing.assert_close(qat(x), x @ fake_quantize_weight(lin.weight, 1).T)
    qat(x).pow(2).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    torch.testing.assert_close(qat.to_linear()(x), qat(x))


def test_qat_model_trains():
    model = _tiny()
    quantize_(model, QATConfig(bits=TERNARY, act_bits=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 16))
    losses = []
    for _ in range(15):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert len(qat_layers(model)) == 14
