"""Quantization warmup: the QAT layers' blend of latent and quantized weights, step by step."""

import pytest
import torch

from hybridopt.quant.qat import QATConfig, QATLinear, qat_layers, quantize_, set_quantization_mix
from hybridopt.quant.quantizers import quantize_dequantize
from hybridopt.training.quant_warmup import QuantWarmup, warmup_mix
from hybridopt.training.trainer import Trainer, TrainerCallback


def test_warmup_mix():
    assert [warmup_mix(s, 4) for s in (1, 2, 3, 4, 5, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_mix(1, 0) == 1.0


def test_the_mix_blends_the_weights_and_keeps_the_gradient():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4, bias=False)
    layer = QATLinear.from_linear(linear, QATConfig(bits=1.58))
    x = torch.randn(3, 16)
    q = quantize_dequantize(linear.weight, 1.58)
    grads = []
    for mix in (0.0, 0.25, 1.0):
        layer.mix = mix
        out = layer(x)
        expected = x @ (linear.weight + mix * (q - linear.weight)).T
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        linear.weight.grad = None
        out.sum().backward()
        grads.append(linear.weight.grad.clone())
    for g in grads[1:]:  # straight-through: the gradient is x summed, whatever the mix
        torch.testing.assert_close(g, grads[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_quantization_mix(torch.nn.Sequential(layer), 1.5)


class _Record(TrainerCallback):
    def __init__(self, model):
        self.model, self.mixes = model, []

    def on_loss(self, step, loss):
        self.mixes.append({round(m.mix, 6) for m in qat_layers(self.model).values()})
        return loss


def test_the_trainer_warms_up_over_the_first_steps(tiny_teacher, corpus_file, tmp_path):
    from hybridopt.config import TrainConfig
    from hybridopt.data.splits import corpus_documents, token_splits
    from hybridopt.models.modeling import load_teacher
    from hybridopt.models.from_teacher import student_from_teacher

    teacher, tok = load_teacher(tiny_teacher, torch.device("cpu"))
    train, val = token_splits(corpus_documents([str(corpus_file)])[0], tok, 16, 0.1)
    student = student_from_teacher(teacher)
    quantize_(student, QATConfig(bits=1.58))
    record = _Record(student)
    cfg = TrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=2, seq_len=16, device="cpu", eval_every=2)
    trainer = Trainer(cfg, student, train, val, tmp_path, torch.device("cpu"),
                      callbacks=[QuantWarmup(student, 4), record])
    trainer.setup()
    trainer.train()
    assert record.mixes == [{0.25}, {0.5}, {0.75}, {1.0}, {1.0}, {1.0}]
