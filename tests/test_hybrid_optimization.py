"""The design document's API: each switch really switches its component off."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.controller import AuxiliaryNN, TrainingState
from hybridopt.hybrid_optimization import ConstrainedOptimizer, HybridOptimizationManager, HybridTrainingConfig
from hybridopt.qat import qat_layers


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def _train(config, steps=30):
    model, manager = _model(), HybridOptimizationManager(config)
    x = torch.randint(0, 64, (4, 12))
    metrics = []
    for step in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        metrics.append(manager.optimization_step(model, loss, None, cluster_id=step % 3, step=step))
        model.zero_grad()
    return model, manager, metrics


def test_full_configuration_quantizes_learns_and_reports():
    model, manager, metrics = _train(HybridTrainingConfig(base_learning_rate=1e-3))
    assert len(qat_layers(model)) == 7
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert any(m["lr_multiplier"] != 1.0 for m in metrics)
    assert manager.optimizer.hybrid["cluster_id"] == 29 % 3
    text = manager.summary_text()
    assert "Total Steps: 30" in text and "HYBRID OPTIMIZATION SUMMARY" in text


def test_switches_turn_components_off():
    model, manager, metrics = _train(HybridTrainingConfig(use_quantization=False, use_auxiliary_nn=False,
                                                          use_trust_region=False, use_clustering=False,
                                                          base_learning_rate=10.0))
    assert not qat_layers(model)
    assert all(m["lr_multiplier"] == 1.0 for m in metrics)
    assert not any(m["constraint_active"] for m in metrics)
    assert manager.optimizer.hybrid["cluster_id"] is None


def test_predict_learning_rate_starts_at_one():
    state = TrainingState(loss=2.5, gradient_magnitude=0.1, step=3)
    assert AuxiliaryNN().predict_learning_rate(state) == 1.0


def test_constrained_optimizer_respects_the_absolute_radius():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = ConstrainedOptimizer([p], momentum=0.9)
    info = opt.step(parameters=[p], gradients=[torch.ones(10)], learning_rate=1.0, constraint_radius=0.01)
    assert info["constraint_active"] and abs(info["update_norm"] - 0.01) < 1e-6
    info = opt.step(parameters=[p], gradients=[torch.full((10,), 1e-6)], learning_rate=1e-3, constraint_radius=1.0)
    assert not info["constraint_active"]
    # Momentum: buffer = 0.9 * 1 + 1e-6, update = -lr * buffer per coordinate.
    assert abs(info["update_norm"] - 1e-3 * (0.9 + 1e-6) * 10 ** 0.5) < 1e-9
