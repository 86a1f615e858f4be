"""The design document's API (hybridopt.manager, root hybrid_optimization.py): each switch really switches its
component off, and the entry points go through HybridOptimizer's public interface."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.optim.controller import AuxiliaryNN, TrainingState
from hybridopt.manager import ConstrainedOptimizer, HybridOptimizationManager, HybridTrainingConfig, format_summary
from hybridopt.quant.qat import qat_layers


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
    # One fixed batch at lr 1e-3: successive updates agree, so the learned rate grows every step (~30x in 30 steps
    # measured); a multiplier stuck near 1 means the hybrid is not learning.
    assert metrics[-1]["lr_multiplier"] > 5 and all(b["lr_multiplier"] > a["lr_multiplier"]
                                                    for a, b in zip(metrics[1:], metrics[2:]))
    assert manager.optimizer.hybrid_state.cluster_id == 29 % 3
    text = manager.summary_text()
    assert "Total Steps: 30" in text and "HYBRID OPTIMIZATION SUMMARY" in text


def test_switches_turn_components_off():
    model, manager, metrics = _train(HybridTrainingConfig(use_quantization=False, use_auxiliary_nn=False,
                                                          use_trust_region=False, use_clustering=False,
                                                          base_learning_rate=10.0))
    assert not qat_layers(model)
    assert all(m["lr_multiplier"] == 1.0 for m in metrics)
    assert not any(m["constraint_active"] for m in metrics)
    assert manager.optimizer.hybrid_state.cluster_id is None


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


def test_constrained_optimizer_radius_is_absolute_for_nonzero_parameters():
    p = torch.nn.Parameter(torch.full((4,), 2.0))  # ||theta|| = 4: relative radius 0.05 in the param group
    opt = ConstrainedOptimizer([p])
    info = opt.step(gradients=[torch.ones(4)], learning_rate=1.0, constraint_radius=0.2)
    assert info["constraint_active"] and info["update_norm"] == pytest.approx(0.2, rel=1e-6)
    with pytest.raises(ValueError, match="parameters given at construction"):
        opt.step(parameters=[torch.nn.Parameter(torch.ones(4))], gradients=[torch.ones(4)])


@pytest.mark.parametrize("field,value", [("base_learning_rate", 0.0), ("initial_trust_radius", -0.1),
                                         ("momentum", 1.0), ("weight_decay", -1.0), ("data_clusters", 0),
                                         ("target_bits", 3)])
def test_config_validation_raises_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        HybridTrainingConfig(**{field: value})


def test_format_summary_is_the_design_documents_block():
    text = format_summary({"total_steps": 240, "avg_lr_multiplier": 1.18, "constraint_activation_rate": 0.0,
                           "trust_radius": 0.1}, final_loss=2.725691)
    assert text.splitlines()[1:] == ["HYBRID OPTIMIZATION SUMMARY", "=" * 60, "Total Steps: 240",
                                     "Final Loss: 2.725691", "Avg Learning Rate Multiplier: 1.18x",
                                     "Constraint Activation Rate: 0.0%", "Final Trust Radius: 0.100000", "=" * 60]


def test_root_shim_imports_from_a_checkout():
    root = Path(__file__).resolve().parents[1]
    code = ("from hybrid_optimization import HybridOptimizationManager, AuxiliaryNN, TrainingState; "
            "import hybridopt.manager as m; assert HybridOptimizationManager is m.HybridOptimizationManager")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
