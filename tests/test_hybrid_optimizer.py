"""HybridOptimizer: it learns the learning rate, respects the radius, and behaves as a torch optimizer."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.hybrid_optimizer import HybridOptimizer


def _regression(lr, steps=400, seed=0, **kw):
    """Noisy linear regression (best Adam lr about 1e-2..1e-1); returns (full-data loss, optimizer)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2000, 20, generator=g)
    y = X @ torch.randn(20, 1, generator=g) + 0.1 * torch.randn(2000, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(20, 1)
    # A controller rate of 1e-2 lets the log-multiplier move about 1e-2 per step: 10x within 400 steps.
    opt = HybridOptimizer(model.parameters(), lr=lr, **{"controller_lr": 1e-2, **kw})
    for _ in range(steps):
        idx = torch.randint(0, 2000, (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.item())
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(X), y).item(), opt


@pytest.mark.parametrize("start_lr,direction", [(1e-3, "up"), (1.0, "down")])
def test_controller_moves_a_bad_learning_rate_toward_a_good_one(start_lr, direction):
    learned, opt = _regression(start_lr)
    fixed, fixed_opt = _regression(start_lr, use_controller=False)
    mult = opt.summary()["lr_multiplier"]
    assert (mult > 3.0) if direction == "up" else (mult < 0.3), mult
    assert learned < 0.5 * fixed, (learned, fixed)
    assert fixed_opt.summary()["avg_lr_multiplier"] == 1.0


def test_disabled_controller_is_exactly_one_and_frozen_controller_differs():
    _, off = _regression(1e-2, steps=50, use_controller=False)
    assert off.summary()["avg_lr_multiplier"] == 1.0 and off.hybrid["lr_mult"] == 1.0
    frozen, _ = _regression(1e-3, steps=200, learn_controller=False)
    learning, _ = _regression(1e-3, steps=200)
    assert frozen != learning


def test_matches_adamw_when_controller_and_trust_region_are_off():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = copy.deepcopy(a)
    ours = HybridOptimizer(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, use_controller=False,
                           use_trust_region=False)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(10):
        x = torch.randn(16, 8)
        for m, o in ((a, ours), (b, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), radius=st.floats(1e-3, 0.5), scale=st.floats(1e-3, 1e3),
       mode=st.sampled_from(["global", "per_tensor"]))
def test_radius_is_never_exceeded(seed, radius, scale, mode):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    opt = HybridOptimizer(params, lr=1.0, trust_radius=radius, trust_mode=mode)
    clipped = 0
    for step in range(6):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = scale * torch.randn(p.shape, generator=g)
        opt.step(loss=float(step))
        mu = opt.hybrid["radius"] * opt.hybrid["radius_mult"]
        deltas = [p.detach() - b for p, b in zip(params, before)]
        if mode == "global":
            norm = math.sqrt(sum(float(b.pow(2).sum()) for b in before))
            assert math.sqrt(sum(float(d.pow(2).sum()) for d in deltas)) <= mu * max(norm, 1e-3) * (1 + 1e-4)
        else:
            for d, b in zip(deltas, before):
                limit = mu * max(float(b.pow(2).mean().sqrt()), 1e-3) * math.sqrt(b.numel())
                assert float(d.norm()) <= limit * (1 + 1e-4)
        clipped += opt.hybrid["clipped"]
    assert opt.summary()["constraint_activation_rate"] == pytest.approx(clipped / 6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    opt = HybridOptimizer(model.parameters(), lr=1e-2)
    data = [torch.randn(8, 6) for _ in range(10)]

    def train(m, o, batches):
        for x in batches:
            o.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            o.step(loss=loss.item())

    train(model, opt, data[:5])
    clone = copy.deepcopy(model)
    opt2 = HybridOptimizer(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint on disk would
    train(model, opt, data[5:])
    train(clone, opt2, data[5:])
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    assert opt.summary() == opt2.summary()


def test_non_finite_gradient_skips_the_step_and_shrinks_the_radius():
    p = torch.nn.Parameter(torch.ones(4))
    opt = HybridOptimizer([p], lr=0.1)
    p.grad = torch.ones(4)
    opt.step(loss=1.0)
    before, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    radius = opt.hybrid["radius"]
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step(loss=1.0)
    assert torch.equal(p, before) and torch.equal(opt.state[p]["exp_avg"], state["exp_avg"])
    assert opt.hybrid["radius"] < radius and opt.summary()["skipped_steps"] == 1
    p.grad = torch.ones(4)
    opt.step(loss=float("inf"))
    assert opt.summary()["skipped_steps"] == 2 and torch.equal(p, before)


def test_lr_scheduler_scales_the_base_rate_and_closure_works():
    p = torch.nn.Parameter(torch.ones(3))
    opt = HybridOptimizer([p], lr=0.1, use_controller=False, use_trust_region=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    sched.step()
    assert float(loss.detach()) == pytest.approx(3.0)
    # First Adam step moves each weight by lr (times the sign of its gradient).
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95), rtol=0, atol=1e-6)
