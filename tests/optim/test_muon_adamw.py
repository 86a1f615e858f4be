"""`MuonAdamW`: the built-in hybrid's Muon + AdamW step as one torch optimizer, so that `hybrid(MuonAdamW(...))`
is `HybridOptimizer(base="muon")` (its controller aside, whose initial weights differ) with one learned scale."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt import HybridOptimizer, MuonAdamW, hybrid
from hybridopt.models.modeling import param_groups


def _lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def _train(model, opt, steps: int, pass_loss: bool) -> float:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 16), generator=g)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step(loss=loss.item()) if pass_loss else opt.step()
        opt.zero_grad()
    return loss.item()


def test_muon_adamw_steps_as_the_built_in_muon_base():
    """With the learned scale, controller and trust region off, `HybridOptimizer(base="muon")` is Muon on the
    hidden matrices and AdamW on the rest: MuonAdamW takes the same steps (float rounding apart)."""
    ours, built_in = _lm(), _lm()
    opt = MuonAdamW(param_groups(ours, 0.1, muon=True), lr=1e-2)
    reference = HybridOptimizer(param_groups(built_in, 0.1, muon=True), lr=1e-2, betas=(0.9, 0.95), base="muon",
                                learn_scale=False, use_controller=False, use_trust_region=False)
    first = _lm().state_dict()
    _train(ours, opt, 5, False)
    _train(built_in, reference, 5, False)
    for (name, p), q in zip(ours.named_parameters(), built_in.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(p, first[name]), f"{name} did not move"
    hidden = ours.model.layers[0].mlp.down_proj.weight
    assert "exp_avg_sq" not in opt.state[hidden] and "exp_avg_sq" in opt.state[ours.model.embed_tokens.weight]


@pytest.mark.parametrize("lr, radius", [(1e-4, 0.1), (1e-2, 0.01)], ids=["rate_too_low", "clipping"])
def test_hybrid_over_muon_adamw_is_the_built_in_hybrid_over_muon(lr, radius):
    """The wrapper over MuonAdamW learns the scale the built-in hybrid over Muon learns (controller off on both):
    at a rate 100x too low the scale climbs to the same value, at a small radius the same steps are clipped."""
    ours, built_in = _lm(), _lm()
    opt = hybrid(MuonAdamW(param_groups(ours, 0.1, muon=True), lr=lr), trust_radius=radius, scale_threshold=0.0)
    reference = HybridOptimizer(param_groups(built_in, 0.1, muon=True), lr=lr, betas=(0.9, 0.95), base="muon",
                                use_controller=False, trust_radius=radius, scale_threshold=0.0)
    _train(ours, opt, 12, True)
    _train(built_in, reference, 12, True)
    summary = reference.summary()
    assert opt.scale == pytest.approx(summary["lr_multiplier"], rel=1e-5)
    clipped = opt.state_dict()["hybrid"]["state"]["clipped_steps"]
    assert clipped == round(summary["constraint_activation_rate"] * summary["total_steps"])
    if lr == 1e-4:
        assert opt.scale > 10 and clipped == 0  # raised, never clipped
    else:
        assert clipped > 6  # the radius binds
    for (name, p), q in zip(ours.named_parameters(), built_in.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_vectors_in_an_orthogonalize_group_take_adams_step_and_bad_arguments_are_refused():
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    opt = MuonAdamW([w, b], lr=1e-2)  # one group, orthogonalize by default: the vector cannot be orthogonalised
    (w.sum() + b.sum()).backward()
    opt.step()
    assert "exp_avg_sq" in opt.state[b] and "exp_avg_sq" not in opt.state[w]
    for kwargs, message in [({"lr": 0.0}, "lr must be positive"), ({"betas": (0.9, 1.0)}, "betas must be"),
                            ({"momentum": 1.0}, "momentum must be in")]:
        with pytest.raises(ValueError, match=message):
            MuonAdamW([w], **kwargs)


def test_a_sharded_matrix_is_refused_and_a_sharded_vector_steps():
    """Muon needs a whole matrix: a DTensor matrix (FSDP2) is refused in one sentence, before anything moves,
    by MuonAdamW itself (so `HybridOptimizer(base="muon")` and `hybrid(MuonAdamW(...))` alike); a DTensor that
    takes Adam's step is fine (one gloo process, the mesh of one)."""
    tdist = pytest.importorskip("torch.distributed")
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        matrix = torch.nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Replicate()]))
        vector = torch.nn.Parameter(distribute_tensor(torch.ones(3), mesh, [Replicate()]))
        matrix.grad, vector.grad = torch.ones_like(matrix), torch.ones_like(vector)
        opt = hybrid(MuonAdamW([matrix, vector], lr=0.1))
        with pytest.raises(ValueError, match="Muon is not supported over sharded parameters"):
            opt.step()
        assert torch.equal(matrix.full_tensor(), torch.ones(4, 3)) and torch.equal(vector.full_tensor(), torch.ones(3))
        MuonAdamW([vector], lr=0.1).step()
        assert not torch.equal(vector.full_tensor(), torch.ones(3))
    finally:
        tdist.destroy_process_group()
