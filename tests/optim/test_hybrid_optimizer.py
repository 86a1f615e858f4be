"""HybridOptimizer: it learns the learning rate, respects the radius, and behaves as a torch optimizer."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridopt.optim.hybrid import HybridOptimizer


def over_adam(params, *args, **kw) -> HybridOptimizer:
    """HybridOptimizer over Adam, the step most tests here check by hand (the default base is Muon)."""
    return HybridOptimizer(params, *args, **{"base": "adam", **kw})


def _regression(lr, steps=400, seed=0, **kw):
    """Noisy linear regression (best Adam lr about 1e-2..1e-1); returns (full-data loss, optimizer)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2000, 20, generator=g)
    y = X @ torch.randn(20, 1, generator=g) + 0.1 * torch.randn(2000, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(20, 1)
    # A controller rate of 1e-2 lets the log-multiplier move about 1e-2 per step: 10x within 400 steps.
    opt = over_adam(model.parameters(), lr=lr, **{"controller_lr": 1e-2, **kw})
    for _ in range(steps):
        idx = torch.randint(0, 2000, (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.item())
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(X), y).item(), opt


@pytest.mark.parametrize("start_lr,direction", [(1e-3, "up"), (1.0, "down")])
def test_hybrid_moves_a_bad_learning_rate_toward_a_good_one(start_lr, direction):
    learned, opt = _regression(start_lr)
    fixed, fixed_opt = _regression(start_lr, use_controller=False, learn_scale=False)
    mult = opt.summary()["lr_multiplier"]
    assert (mult > 3.0) if direction == "up" else (mult < 0.5), mult
    assert learned < 0.5 * fixed, (learned, fixed)
    assert fixed_opt.summary()["avg_lr_multiplier"] == 1.0


def test_disabled_controller_is_exactly_one_and_a_learning_one_moves():
    """The controller alone (no learned scale): off it multiplies by exactly 1; learning, it moves the rate."""
    off, off_opt = _regression(1e-3, steps=200, use_controller=False, learn_scale=False)
    assert off_opt.summary()["avg_lr_multiplier"] == 1.0 and off_opt.summary()["lr_multiplier"] == 1.0
    learning, learning_opt = _regression(1e-3, steps=200, learn_scale=False)
    assert abs(learning_opt.summary()["lr_multiplier"] - 1.0) > 0.1, learning_opt.summary()
    assert learning < off, (learning, off)


def _same_steps(pairs, inputs) -> None:
    """Every (model, optimizer) pair takes one step on the mean squared output for each input in turn."""
    for x in inputs:
        for model, opt in pairs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()


def test_matches_adamw_when_controller_and_trust_region_are_off():
    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = copy.deepcopy(a)
    ours = over_adam(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, use_controller=False,
                           learn_scale=False, use_trust_region=False)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _same_steps([(a, ours), (b, ref)], [torch.randn(16, 8) for _ in range(10)])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _clipped_adam_deltas(adam: list, grads: list, before: list, step: int, lr: float, radius: float
                         ) -> tuple[list, list, list]:
    """By hand, from the rule in `hybrid.py` and `trust_region.py` with the learned scale and the controller
    off: Adam's step u (betas 0.9, 0.999, eps 1e-8; `adam` holds each tensor's [m, v], updated here) and the
    trust region's clip. Returns (the expected steps f u, the limits, the lengths they bound), in float64."""
    u = []
    for state, g in zip(adam, grads):
        state[0] = 0.9 * state[0] + 0.1 * g
        state[1] = 0.999 * state[1] + 0.001 * g * g
        m_hat, v_hat = state[0] / (1 - 0.9 ** step), state[1] / (1 - 0.999 ** step)
        u.append(-lr * m_hat / (v_hat.sqrt() + 1e-8))
    # \mu = \rho max(||theta||, 1e-3) over all parameters at once
    limits = [radius * max(math.sqrt(sum(float(b.pow(2).sum()) for b in before)), 1e-3)]
    lengths = [math.sqrt(sum(float(x.pow(2).sum()) for x in u))]
    factors = [min(1.0, limits[0] / lengths[0])] * len(u)
    return [f * x for f, x in zip(factors, u)], limits, lengths


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), radius=st.floats(1e-3, 0.5), scale=st.floats(1e-3, 1e3),
       lr=st.sampled_from([1e-3, 1e-2, 0.1, 1.0]), learn_scale=st.booleans())
def test_radius_is_never_exceeded(seed, radius, scale, lr, learn_scale):
    """No step is longer than the radius given (relative to the parameters' norm), the bound computed here, not read from the optimizer (the controller, the one thing that
    may change the radius, is off). Without the learned scale the whole step is checked: Adam's step, scaled
    down to the radius exactly when it is longer, and `clipped` says when that happened."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(3, generator=g))]
    opt = over_adam(params, lr=lr, trust_radius=radius, use_controller=False,
                          learn_scale=learn_scale)
    adam = [[torch.zeros(p.shape, dtype=torch.float64)] * 2 for p in params]
    clipped = 0
    for step in range(1, 7):
        before = [p.detach().clone().double() for p in params]
        grads = [scale * torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step(loss=float(step))
        deltas = [p.detach().double() - b for p, b in zip(params, before)]
        expected, limits, lengths = _clipped_adam_deltas(adam, [x.double() for x in grads], before, step, lr, radius)
        assert math.sqrt(sum(float(d.pow(2).sum()) for d in deltas)) <= limits[0] * (1 + 1e-4)
        if not learn_scale:
            for d, want in zip(deltas, expected):
                torch.testing.assert_close(d, want, rtol=1e-4, atol=1e-6)
            was_clipped = any(length > limit for length, limit in zip(lengths, limits))
            assert opt.summary()["clipped"] == was_clipped
            clipped += was_clipped
    if not learn_scale:
        assert opt.summary()["constraint_activation_rate"] == pytest.approx(clipped / 6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    opt = over_adam(model.parameters(), lr=1e-2)
    data = [torch.randn(8, 6) for _ in range(10)]

    def train(m, o, batches):
        for x in batches:
            o.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            o.step(loss=loss.item())

    train(model, opt, data[:5])
    clone = copy.deepcopy(model)
    opt2 = over_adam(clone.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint on disk would
    train(model, opt, data[5:])
    train(clone, opt2, data[5:])
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    assert opt.summary() == opt2.summary()


def test_non_finite_gradient_skips_the_step_and_with_adapt_radius_shrinks_the_radius():
    p = torch.nn.Parameter(torch.ones(4))
    opt = over_adam([p], lr=0.1, adapt_radius=True)
    p.grad = torch.ones(4)
    opt.step(loss=1.0)
    before, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    radius = opt.hybrid_state.trust_radius
    p.grad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    opt.step(loss=1.0)
    assert torch.equal(p, before) and all(torch.equal(opt.state[p][k], state[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert opt.hybrid_state.trust_radius == radius / 2 and opt.summary()["skipped_steps"] == 1
    p.grad = torch.ones(4)
    opt.step(loss=float("inf"))
    assert opt.summary()["skipped_steps"] == 2 and torch.equal(p, before)


def _linear_run(nan_steps=(), steps=30, **kw):
    """A small regression under a trust region that binds; NaN gradients at `nan_steps` (counted in calls to step).

    Returns (parameters, summary, the radius after every call)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 5, generator=g)
    y = X @ torch.randn(5, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    opt = over_adam(model.parameters(), **{"lr": 0.05, "trust_radius": 0.01, "controller_lr": 1e-2, **kw})
    radii, batches = [], iter(torch.randint(0, 256, (steps, 32), generator=g))
    for call in range(steps + len(nan_steps)):
        idx = next(batches) if call not in nan_steps else torch.arange(32)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        loss.backward()
        if call in nan_steps:
            model.weight.grad[0, 0] = float("nan")
        opt.step(loss=loss.item())
        radii.append(opt.hybrid_state.trust_radius)
    return [p.detach() for p in model.parameters()], opt.summary(), radii


def test_skipped_steps_leave_the_radius_alone_without_adapt_radius():
    # Regression: every non-finite step used to halve the radius for good (three NaNs: 0.1 -> 0.0125).
    p = torch.nn.Parameter(torch.ones(4))
    opt = over_adam([p], lr=1.0, use_controller=False)  # Adam's step of 1 per weight: the radius binds
    for _ in range(3):
        p.grad = torch.full((4,), float("nan"))
        opt.step(loss=1.0)
    assert opt.summary()["skipped_steps"] == 3 and opt.hybrid_state.trust_radius == 0.1
    assert torch.equal(p, torch.ones(4))
    p.grad = torch.ones(4)
    opt.step(loss=1.0)
    # The first finite step is clipped to the configured bound, 0.1 ||theta|| = 0.2, not 0.0125 ||theta||.
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.9))
    assert opt.summary()["clipped"] and opt.summary()["total_steps"] == 1


def test_skipped_steps_leave_a_learning_run_as_if_they_had_not_happened():
    # Without adapt_radius a non-finite step is skipped, nothing more: the learned multipliers, the radius and
    # the trajectory after it are those of the run that never saw it.
    clean, clean_summary, clean_radii = _linear_run()
    skipped, skipped_summary, skipped_radii = _linear_run(nan_steps=(5, 6, 7))
    assert all(torch.equal(p, q) for p, q in zip(clean, skipped))
    assert skipped_summary == {**clean_summary, "skipped_steps": 3}
    assert set(skipped_radii) == set(clean_radii) == {0.01}
    assert clean_summary["constraint_activation_rate"] > 0.2  # the radius really bounds these runs


def _quadratic_radii(nan_steps=(), steps=20):
    """Full-batch 0.5 ||theta - target||^2 with adapt_radius (Adam at lr 0.5: the radius binds until it has grown);
    NaN gradients at `nan_steps` (counted in calls to step). Returns the radius after every call."""
    torch.manual_seed(0)
    target, p = torch.randn(10), torch.nn.Parameter(torch.ones(10))
    opt = over_adam([p], lr=0.5, adapt_radius=True, use_controller=False)
    radii = []
    for call in range(steps + len(nan_steps)):
        opt.zero_grad()
        loss = 0.5 * (p - target).pow(2).sum()
        loss.backward()
        if call in nan_steps:
            p.grad[0] = float("nan")
        opt.step(loss=loss.item())
        radii.append(opt.hybrid_state.trust_radius)
    return radii


def test_with_adapt_radius_skipped_steps_shrink_the_radius_and_good_steps_grow_it_back():
    # A non-finite value at theta_t counts as the worst outcome of the update that led there: each halves the
    # radius. The rule's own growth (1.5x after a clipped step whose decrease beat 0.75 of the prediction) then
    # brings it back: shrinking is not for good.
    clean, shrunk = _quadratic_radii(), _quadratic_radii(nan_steps=(3, 4, 5))
    assert shrunk[:3] == clean[:3] == pytest.approx([0.1, 0.15, 0.225])  # it grows from the configured 0.1
    assert shrunk[3:6] == pytest.approx([0.225 / 2, 0.225 / 4, 0.225 / 8])
    back = next(i for i in range(6, len(shrunk)) if shrunk[i] >= clean[2])
    assert back - 5 <= 6, shrunk  # 1.5^6 > 8: six good clipped steps undo three halvings
    # and it settles where the clean run settled, where the update no longer reaches the bound
    assert shrunk[-1] == pytest.approx(clean[-1], rel=0.1) and clean[-1] > 0.5, (shrunk[-1], clean[-1])


def test_with_adapt_radius_a_non_finite_step_before_any_update_leaves_the_radius():
    # Before the first update no step led to the non-finite value, so there is nothing to blame the radius for:
    # the run continues exactly as one that never saw the skipped steps.
    assert _quadratic_radii(nan_steps=(0, 1))[2:] == _quadratic_radii()


def _assert_first_adam_state(state: dict, grad: torch.Tensor, beta2: float = 0.999) -> None:
    """The state of a tensor after its first update with gradient `grad` (default betas)."""
    assert state["step"] == 1
    torch.testing.assert_close(state["exp_avg"], 0.1 * grad, rtol=0, atol=0)
    torch.testing.assert_close(state["exp_avg_sq"], (1 - beta2) * grad * grad, rtol=0, atol=0)


def _assert_running_adam_state(state: dict, steps: int) -> None:
    """The state of a tensor after `steps` updates with gradient 1 every time (default betas): carried on, not reset."""
    assert state["step"] == steps
    torch.testing.assert_close(state["exp_avg"], torch.full((3,), 1 - 0.9 ** steps))
    torch.testing.assert_close(state["exp_avg_sq"], torch.full((3,), 1 - 0.999 ** steps))


def _assert_update_buffers_hold_the_step(opt, params, deltas) -> None:
    """Each tensor's buffer holds its step before the trust region, negated: the applied step is one common
    factor f in (0, 1] times it (here f < 1: the steps were clipped)."""
    ratios = torch.cat([-delta / opt._buffers[p]["update"] for p, delta in zip(params, deltas)])
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))
    assert 0 < float(ratios[0]) < 1, ratios


def test_a_parameter_whose_first_gradient_comes_after_step_1_starts_its_state_then():
    # Regression: KeyError 'trace' when a tensor first got a gradient after step 1 (the learning controller read
    # the trace of every tensor with a gradient).
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = over_adam([a, b], lr=0.1)  # the controller learns: the hypergradient reads the traces
    a.grad = torch.ones(3)
    opt.step(loss=1.0)  # b has no gradient yet
    assert b not in opt.state and torch.equal(b, torch.ones(3))
    a.grad, b.grad = torch.ones(3), -torch.ones(3)  # b's first gradient, at step 2: it should move up
    a_before = a.detach().clone()
    opt.step(loss=1.0)
    delta_a, delta_b = a.detach() - a_before, b.detach() - 1
    # Both Adam directions are +-1 (a's gradient is constant; b's first step is the sign of its gradient), so
    # under one learned multiplier and one trust region b moves by exactly the mirror of a's step.
    assert bool((delta_b > 0.05).all()) and bool((delta_a < -0.05).all()), (delta_a, delta_b)
    torch.testing.assert_close(delta_b, -delta_a)
    _assert_first_adam_state(opt.state[b], -torch.ones(3))
    _assert_update_buffers_hold_the_step(opt, [a, b], [delta_a, delta_b])
    _assert_running_adam_state(opt.state[a], steps=2)
    b.grad = -torch.ones(3)
    opt.step(loss=1.0)  # the next hypergradient reads b's trace
    assert opt.summary()["total_steps"] == 3 and opt.state[b]["step"] == 2 and bool((b > 1 + delta_b).all())


def test_a_param_group_added_to_a_running_optimizer_starts_its_state_then():
    # Regression: the same KeyError 'trace' for the tensors of a group added by add_param_group after step 1.
    a = torch.nn.Parameter(torch.ones(3))
    opt = over_adam([a], lr=0.1)
    for _ in range(2):
        a.grad = torch.ones(3)
        opt.step(loss=1.0)
    c = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [c]})
    new_group = opt.param_groups[1]
    assert new_group["lr"] == opt.param_groups[0]["lr"]  # the defaults
    a.grad, c.grad = torch.ones(3), -torch.ones(3)
    a_before = a.detach().clone()
    opt.step(loss=1.0)
    delta_a, delta_c = a.detach() - a_before, c.detach() - 1
    assert bool((delta_c > 0.05).all()), delta_c
    torch.testing.assert_close(delta_c, -delta_a)  # as in the test above: mirrored unit Adam directions
    _assert_first_adam_state(opt.state[c], -torch.ones(3))
    _assert_update_buffers_hold_the_step(opt, [a, c], [delta_a, delta_c])
    _assert_running_adam_state(opt.state[a], steps=3)
    assert opt.summary()["total_steps"] == 3


def test_lr_scheduler_scales_the_base_rate_and_closure_works():
    p = torch.nn.Parameter(torch.ones(3))
    opt = over_adam([p], lr=0.1, use_controller=False, use_trust_region=False)
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


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=0.0), "lr must be positive"), (dict(trust_radius=-1.0), "trust_radius must be positive"),
    (dict(base="lion"), "base must be"), (dict(betas=(0.9, 1.0)), "betas must be"),
    (dict(weight_decay=-0.1), "weight_decay must be"), (dict(num_clusters=-1), "num_clusters must be"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridOptimizer([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_summary_keys_and_clipped_flag():
    p = torch.nn.Parameter(torch.ones(4))
    opt = over_adam([p], lr=1.0, trust_radius=0.01, use_controller=False)
    p.grad = torch.ones(4)
    opt.step()
    s = opt.summary()
    assert set(s) == {"total_steps", "avg_lr_multiplier", "learned_scale", "constraint_activation_rate", "trust_radius",
                      "lr_multiplier", "skipped_steps", "clipped"}
    assert s["clipped"] is True and s["constraint_activation_rate"] == 1.0
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.99))  # ||delta|| = 0.01 * ||theta|| = 0.02


def test_radius_and_multipliers_live_in_the_optimizer_state():
    p = torch.nn.Parameter(torch.ones(4))
    opt = over_adam([p], lr=1.0, use_controller=False)
    opt.hybrid_state.trust_radius = 0.05  # an outer loop changes the radius between steps
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 0.95))
    assert opt.summary()["trust_radius"] == 0.05
    learned = over_adam([p], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        p.grad = torch.randn(4, generator=g)
        learned.step(loss=1.0)
    s = learned.hybrid_state
    assert learned.summary()["lr_multiplier"] == math.exp(s.scale.log_scale + s.correction) != 1.0
    assert learned.summary()["trust_radius"] == s.trust_radius * s.radius_multiplier


def test_a_param_groups_own_trust_radius_is_refused():
    """The trust region bounds one norm over all parameters, so a group's own radius would be ignored: refused."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="one trust_radius for all parameters"):
        over_adam([{"params": [a]}, {"params": [b], "trust_radius": 0.5}])
    opt = over_adam([{"params": [a]}])
    with pytest.raises(ValueError, match="one trust_radius for all parameters"):
        opt.add_param_group({"params": [b], "trust_radius": 0.5})
    assert len(opt.param_groups) == 1


def test_set_cluster_checks_the_range():
    opt = over_adam([torch.nn.Parameter(torch.ones(2))], num_clusters=3)
    opt.set_cluster(2)
    opt.set_cluster(None)
    with pytest.raises(ValueError, match="cluster_id must be in"):
        opt.set_cluster(3)


@pytest.mark.parametrize("heads", [[0], [0, 1], [1]])
def test_controller_hand_written_gradient_is_the_surrogates(heads):
    """`surrogate_gradients_` (the chain rule by hand) equals autograd on `surrogate`, also with outputs beyond the
    clamp bounds, where the bound penalty and the straight-through clamp both act."""
    from hybridopt.optim.controller import AuxiliaryNN

    torch.manual_seed(0)
    net = AuxiliaryNN(8)
    x = torch.randn(6)
    with torch.no_grad():
        net.net[2].weight.normal_()
        net.net[2].bias.copy_(torch.tensor([5.0, 0.0]) - net.net[2].weight @ torch.tanh(net.net[0](x)))
    z = net.raw(x).detach()  # output 0 beyond the bound log 10, output 1 inside it
    torch.testing.assert_close(z, torch.tensor([5.0, 0.0]))
    net.zero_grad()
    net.surrogate(x, 0.37, heads).backward()
    expected = [p.grad.clone() for p in net.net.parameters()]
    net.zero_grad()
    net.surrogate_gradients_(x, 0.37, heads)
    for got, want in zip([p.grad for p in net.net.parameters()], expected):
        torch.testing.assert_close(got, want)


def test_scale_threshold_leaves_the_scale_alone_on_noise_and_follows_consistent_evidence():
    """Zero-mean hypergradients (noise) give |sigma| ~ 0.23: with tau 0.5 the scale moves on ~3% of steps, with
    tau 0 on every step; a consistent signal (h < 0 with noise of half its size) moves it on nearly every step."""
    from hybridopt.optim.scale import ScaleState, learned_log_scale, normalized_hypergradient

    def moves(mean: float, threshold: float, steps: int = 4000) -> float:
        gen = torch.Generator().manual_seed(0)
        state, log_scale, moved = ScaleState(), 0.0, 0
        for h in (mean + torch.randn(steps, generator=gen, dtype=torch.float64)).tolist():
            state, sigma = normalized_hypergradient(state, h, (0.9, 0.99))
            new = learned_log_scale(log_scale, sigma, 1e-3, threshold)  # small steps: never reaches the bound
            moved += new != log_scale
            log_scale = new
        return moved / steps

    assert moves(0.0, 0.5) < 0.05
    assert moves(0.0, 0.0) == 1.0
    assert moves(-2.0, 0.5) > 0.95


def test_a_lowering_after_a_clipped_step_starts_from_the_rate_the_radius_allowed():
    """Clipped to 1% of its length, a step said too long lowers the scale from ell + log 0.01, so the next step
    is shorter at once; a raising signal, an unclipped step and a signal below the threshold ignore the ratio."""
    from hybridopt.optim.scale import learned_log_scale

    assert learned_log_scale(0.0, 0.8, 0.1, 0.5, -10.0, clip_ratio=0.01) == pytest.approx(math.log(0.01) - 0.08)
    assert learned_log_scale(0.0, 0.8, 0.1, 0.5, -3.0, clip_ratio=0.01) == -3.0  # the floor holds
    assert learned_log_scale(0.0, -0.8, 0.1, 0.5, -10.0, clip_ratio=0.01) == pytest.approx(0.08)
    assert learned_log_scale(0.0, 0.8, 0.1, 0.5, -10.0) == pytest.approx(-0.08)
    assert learned_log_scale(0.0, 0.4, 0.1, 0.5, -10.0, clip_ratio=0.01) == 0.0


def test_min_scale_bounds_the_learned_scale_from_below_and_defaults_by_base_as_the_controller():
    """The scale may only raise Schedule-Free's rate unless told otherwise; over Adam it may fall to 1e-4x."""
    from hybridopt.optim.scale import learned_log_scale

    assert learned_log_scale(0.05, 1.0, 0.1, 0.5, floor=0.0) == 0.0  # a step down to -0.05 stops at the floor
    assert learned_log_scale(0.05, -1.0, 0.1, 0.5, floor=0.0) == pytest.approx(0.15)  # up: unaffected
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert HybridOptimizer(params, base="schedulefree").scale_floor == 0.0
    assert HybridOptimizer(params, base="schedulefree", min_scale=0.01).scale_floor == pytest.approx(math.log(0.01))
    assert HybridOptimizer(params, base="adam").scale_floor == pytest.approx(-math.log(1e4))
    with pytest.raises(ValueError, match="min_scale must be in"):
        HybridOptimizer(params, min_scale=2.0)
    # and the controller: off over Schedule-Free unless asked for, on over Adam
    assert [HybridOptimizer(params, base=b).use_controller for b in ("schedulefree", "adam", "sgd")] == [False, True, True]
    assert HybridOptimizer(params, base="schedulefree", use_controller=True).use_controller


def test_radius_start_lifts_a_far_too_low_rate_once_after_the_warmup():
    """Over Schedule-Free the first step after the warmup lifts the scale so that a step would be a quarter of the
    trust radius long (the ratio read from the global trust region); later steps do not do it again, and a rate already
    near the radius is left alone."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)

    def scales(lr, warmup, steps=6, **kw):
        opt = HybridOptimizer([w], lr=lr, base="schedulefree", **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        out = []
        for _ in range(steps):
            w.grad = torch.randn_like(w)
            opt.step()
            sched.step()
            out.append(opt.summary()["learned_scale"])
        return out, opt.hybrid_state.radius_ratio

    # At lr 1e-6 a step is lr sqrt(n) long against a radius of 0.1 |w| = 0.1 * 0.1 sqrt(n): ratio ~1e4.
    low, ratio = scales(1e-6, warmup=3)
    assert low[:3] == [1.0, 1.0, 1.0]  # held through the warmup (steps 1-3)
    assert low[3] == pytest.approx(0.25 * 1e4, rel=0.1)  # lifted at the first step after it
    assert low[4] == pytest.approx(low[3], rel=0.25) and ratio == pytest.approx(4.0, rel=0.2)  # once; now a quarter
    assert scales(1e-6, warmup=3, radius_start=0.0)[0][3] == 1.0  # off
    assert scales(1e-6, warmup=3, use_trust_region=False)[0][3] == 1.0  # no global radius to start from
    assert scales(1e-2, warmup=1)[0][1] == 1.0  # 0.25 x a ratio of ~1 is no lift
    with pytest.raises(ValueError, match="radius_start must be in"):
        HybridOptimizer([w], radius_start=1.5)
    assert [HybridOptimizer([w], base=b).radius_start for b in ("schedulefree", "adam")] == [0.25, 0.0]


def test_distill_flags_that_switch_everything_off_leave_schedule_free_adamw():
    """`--hybrid --no-learn_scale --no-controller --no-trust_region` trains with Schedule-Free AdamW's step (the
    ablation RESULTS.md runs), on distill's parameter groups; each flag alone turns off only its part."""
    import schedulefree

    from hybridopt.config import TrainConfig
    from hybridopt.training.step import build_optimizer

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))

    ours, theirs = net(), net()
    cfg = TrainConfig(hybrid=True, hybrid_base="schedulefree", learn_scale=False, controller=False, trust_region=False,
                      lr=0.05)
    opt = build_optimizer(cfg, ours)
    groups = [{"params": [p for p in theirs.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    ref = schedulefree.AdamWScheduleFree(groups, lr=0.05, betas=(0.9, 0.95), warmup_steps=0, foreach=False)
    ref.train()
    g = torch.Generator().manual_seed(1)
    _same_steps([(ours, opt), (theirs, ref)], [torch.randn(16, 5, generator=g) for _ in range(20)])
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    only = build_optimizer(TrainConfig(hybrid=True, controller=False), net())
    assert (only.use_controller, only.learn_scale, only.use_trust_region) == (False, True, True)


def test_muon_base_is_torchs_muon_and_adamw_when_nothing_learns():
    """`--hybrid --hybrid_base muon` with the scale, controller and trust region off takes the steps of
    torch.optim.Muon (its iteration in float32: the bench's Float32Muon) on the hidden matrices and AdamW on the
    embeddings, head and norms, with distill's parameter groups."""
    from hybridopt.bench.arms import Float32Muon
    from hybridopt.config import TrainConfig
    from hybridopt.models.modeling import hidden_matrices
    from hybridopt.training.step import build_optimizer

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 8)
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Tanh(), torch.nn.Linear(24, 8))
            self.norm = torch.nn.LayerNorm(8)
            self.head = torch.nn.Linear(8, 5, bias=False)

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            return self.head(self.norm(self.body(self.embed(x))))

    def net():
        torch.manual_seed(0)
        return Net()

    ours, theirs = net(), net()
    cfg = TrainConfig(hybrid=True, hybrid_base="muon", learn_scale=False, controller=False, trust_region=False,
                      lr=0.02, weight_decay=0.1)
    opt = build_optimizer(cfg, ours)
    hidden, rest = hidden_matrices(theirs)
    assert [p.shape for p in hidden] == [(24, 8), (8, 24)]  # not the embedding or the head
    muon = Float32Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() == 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=0.02, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        x = torch.randint(0, 11, (16,), generator=g)
        for model, opts in ((ours, [opt]), (theirs, [muon, adamw])):
            for o in opts:
                o.zero_grad()
            model(x).pow(2).mean().backward()
            for o in opts:
                o.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    moved = sum((p - q).abs().sum() for p, q in zip(ours.parameters(), net().parameters()))
    assert moved > 0.1


def test_schedulefree_base_is_schedulefree_adamw_when_nothing_learns():
    """base='schedulefree' with the scale, controller and trust region off takes the steps of the
    `schedulefree` package's AdamWScheduleFree (no warmup), at the training point y and, after eval(), at x."""
    import schedulefree

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))

    ours, theirs = net(), net()
    opt = HybridOptimizer(ours.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.01, base="schedulefree",
                          learn_scale=False, use_controller=False, use_trust_region=False)
    ref = schedulefree.AdamWScheduleFree(theirs.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.01,
                                         warmup_steps=0, foreach=False)
    ref.train()
    g = torch.Generator().manual_seed(1)
    _same_steps([(ours, opt), (theirs, ref)], [torch.randn(16, 5, generator=g) for _ in range(20)])
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    y = [p.detach().clone() for p in ours.parameters()]
    opt.eval()
    ref.eval()
    for p, q, before in zip(ours.parameters(), theirs.parameters(), y):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, before)  # x is not y
    with pytest.raises(ValueError, match="eval mode"):
        opt.step()
    opt.train()
    for p, before in zip(ours.parameters(), y):
        torch.testing.assert_close(p, before, rtol=0, atol=1e-6)


def test_eval_and_train_leave_other_bases_alone():
    p = torch.nn.Parameter(torch.ones(3))
    opt = over_adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone()
    opt.eval()
    assert torch.equal(p, before)
    opt.step()  # not refused: there is no average to be at
    opt.train()
    assert not torch.equal(p, before)


def test_a_rule_10_state_is_refused_in_one_sentence():
    """Rule 10's optimizer saved its own per-tensor state and a "hybrid" entry, no wrapper_version: rule 11 cannot
    continue it and says so, before touching anything."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = over_adam([p], lr=0.1)
    old = {"state": {0: {"step": 3, "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3), "update": torch.ones(3)}},
           "param_groups": [{"params": [0], "lr": 0.1}], "hybrid": {"state": {"step": 3}}}
    with pytest.raises(ValueError, match="rule 10 or earlier"):
        opt.load_state_dict(old)
    assert not opt.state and opt.hybrid_state.step == 0


def test_adapt_radius_is_refused_with_schedulefree():
    with pytest.raises(ValueError, match="adapt_radius is not supported with base='schedulefree'"):
        HybridOptimizer([torch.nn.Parameter(torch.ones(2))], base="schedulefree", adapt_radius=True)


def _rule_fingerprint() -> dict:
    """What 40 steps of each base compute on a fixed noisy quadratic (float64): final loss and learned scale,
    to 6 significant digits."""
    out = {}
    for base in ("adam", "schedulefree", "sgd", "muon"):
        shape = (5, 10) if base == "muon" else (50,)  # Muon orthogonalises matrices
        torch.manual_seed(0)  # the controller's initial weights
        gen = torch.Generator().manual_seed(0)
        target = torch.randn(2, 50, generator=gen, dtype=torch.float64).view(2, *shape)
        w = [torch.randn(50, generator=gen, dtype=torch.float64).view(shape).requires_grad_() for _ in range(2)]
        opt = HybridOptimizer(w, lr=1e-3 if base != "sgd" else 2.0, base=base, weight_decay=0.01)  # SGD: too high
        for t in range(40):
            for group in opt.param_groups:  # a 5-step warmup, then constant
                group["lr"] = opt.defaults["lr"] * min(1.0, (t + 1) / 5)
            noise = torch.randn(2, 50, generator=gen, dtype=torch.float64).view(2, *shape)
            loss = sum(((x - y - 0.3 * n) ** 2).sum() for x, y, n in zip(w, target, noise))
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss)
        opt.eval()
        final = sum(((x - y) ** 2).sum() for x, y in zip(w, target)).item()
        out[base] = (float(f"{final:.6g}"), float(f"{opt.summary()['learned_scale']:.6g}"))
    return out


def test_rule_version_is_bumped_with_every_change_of_what_a_step_computes():
    """RULE_VERSION names the cache entries of teachers trained with --hybrid, so a teacher trained by an
    older rule is never taken for a newer one: when this test fails, the rule changed; bump RULE_VERSION in
    hybrid_optimizer.py and put the new fingerprint here under it."""
    from hybridopt.optim.hybrid import RULE_VERSION

    # 11: the wrapper over torch's AdamW and SGD, schedulefree's AdamWScheduleFree and MuonAdamW: rule 10's figures
    # over adam, schedulefree and muon to the 6 digits; over sgd the weight decay is now coupled, as torch's SGD's.
    fingerprints = {10: {"adam": (173.745, 33.846), "schedulefree": (45.6048, 160.653), "sgd": (8.00952, 0.0698589),
                         "muon": (54.2458, 531.266)},
                    11: {"adam": (173.745, 33.846), "schedulefree": (45.6048, 160.653), "sgd": (7.97972, 1.0),
                         "muon": (54.2458, 531.266)}}
    assert RULE_VERSION in fingerprints, "RULE_VERSION has no fingerprint here: add the one this test prints"
    assert _rule_fingerprint() == fingerprints[RULE_VERSION], (
        f"the rule computes {_rule_fingerprint()}: bump RULE_VERSION and record that under it")
