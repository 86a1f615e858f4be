"""The fast HybridOptimizer against the slow line-by-line reference (tests/optim/reference_hybrid.py), schedule_free style:
identical gradients and losses into both, parameters compared with a tight `allclose` after every step."""

import copy
import math

import pytest
import torch
from reference_hybrid import ReferenceHybrid

from hybridopt.optim.hybrid import HybridOptimizer

STEPS = 200
# Clips often: exercises the radius head. While steps clip, only sigma > 0 moves the scale; with the default
# threshold (0.5) it never moves in these 200 steps, so these configurations move it on every step (tau 0).
CLIP = dict(lr=0.05, trust_radius=0.01, controller_lr=1e-2, scale_threshold=0.0)
SF = dict(base="schedulefree", min_scale=1e-4, use_controller=True)  # both ways, and the controller on
CONFIGS = {
    "adam_global": dict(controller_lr=1e-2),
    "adam_global_clip": CLIP,
    "sgd_global_clip": dict(CLIP, base="sgd", lr=0.2),
    "no_trust_region": dict(use_trust_region=False, lr=0.01, controller_lr=1e-2, scale_threshold=0.3),
    "adapt_radius": dict(CLIP, adapt_radius=True),
    "adapt_radius_nan": dict(CLIP, adapt_radius=True, _nan=True),
    "nan_without_adapt": dict(CLIP, _nan=True),
    # No controller: the non-finite check reads h_t instead of \|g_t\| once every tensor has moved.
    "nan_schedulefree_defaults": dict(base="schedulefree", lr=1e-3, _nan=True),
    "clusters": dict(num_clusters=4, controller_lr=1e-2, _clusters=True),
    "weight_decay": dict(CLIP, weight_decay=0.1),
    "two_groups_scheduled": dict(controller_lr=1e-2, weight_decay=0.01, scale_threshold=0.1, _groups=True),
    "loss_not_passed": dict(controller_lr=1e-2, _no_loss=True),
    "controller_off": dict(CLIP, use_controller=False),
    "late_parameter": dict(CLIP, _late=True),
    "added_group": dict(controller_lr=1e-2, _added_group=True),
    "gaps": dict(CLIP, _gaps=True),  # a tensor without a gradient now and then: its Delta theta is 0 then
    "reloaded": dict(CLIP, _reload=True),  # state_dict -> a new optimizer mid-run, the pending trust factor too
    "reloaded_gaps": dict(CLIP, _reload=True, _gaps=True),
    "other_hyperparameters": dict(betas=(0.8, 0.99), eps=1e-6, scale_betas=(0.5, 0.9), scale_lr=0.05,
                                  controller_hidden=8, controller_lr=3e-3),
    "scale_only": dict(CLIP, use_controller=False),
    "warmup_holds_the_scale": dict(controller_lr=1e-2, _warmup=True),
    "controller_only": dict(CLIP, learn_scale=False),
    "nothing_learns": dict(CLIP, use_controller=False, learn_scale=False),
    "no_threshold": dict(controller_lr=1e-2, scale_threshold=0.0),  # the scale moves on every step
    # Schedule-Free under the learned scale, here allowed to move both ways (min_scale 1e-4); `_eval`: after the
    # last step both switch to the average x.
    "schedulefree": dict(SF, controller_lr=1e-2, _eval=True),
    "schedulefree_global_clip": dict(CLIP, **SF, _eval=True),
    "schedulefree_groups_gaps_reloaded": dict(CLIP, **SF, _groups=True, _gaps=True, _reload=True, _eval=True),
    "schedulefree_late_parameter": dict(CLIP, **SF, _late=True),
    # The learned scale's lower bound (`_floor`: the bound, reached after the scale rose above it): Schedule-Free's
    # defaults (one-sided, no controller); and a bound set over Adam.
    "schedulefree_floor": dict(CLIP, base="schedulefree", lr=3e-3, _eval=True, _floor=1.0),
    "adam_floor_0.5": dict(CLIP, min_scale=0.5, _floor=0.5),
    # A rate far below the trust radius's: Schedule-Free's first step after the warmup (here the second) starts
    # the scale at a quarter of the radius's rate; radius_start 0 turns that off.
    "schedulefree_radius_start": dict(base="schedulefree", lr=1e-5, _eval=True, _started=True),
    "schedulefree_no_radius_start": dict(base="schedulefree", lr=1e-5, radius_start=0.0),
    # Muon's orthogonalised momentum on the matrices (16 x 6: the tall orientation, 1 x 16: the wide one), Adam's on
    # the biases; `_muon_groups`: the output layer's matrix opts out (Adam), as an LM's head does.
    "muon": dict(base="muon", controller_lr=1e-2),
    "muon_global_clip": dict(CLIP, base="muon"),
    "muon_head_opts_out": dict(base="muon", controller_lr=1e-2, weight_decay=0.01, _muon_groups=True),
    "muon_reloaded_gaps": dict(CLIP, base="muon", _reload=True, _gaps=True),
    # radius_start 0.25 by default over Muon. In float32 the first step (at 1e-5) read back as a difference of
    # parameters of size ~0.3 carries their rounding: the start scale it sets is 2.4e-4 off the reference's, and
    # the steps at that scale (~1e-2) differ by ~1e-5.
    "muon_low_rate": dict(base="muon", lr=1e-5, _started=True, _f32_tolerance=dict(rtol=1e-3, atol=1e-4)),
}


def _problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 6, generator=g)
    y = torch.sin(X @ torch.randn(6, 1, generator=g)) + 0.1 * torch.randn(512, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return X, y, model, g


RELOAD_AT = range(40, 60)  # "reloaded": the fast optimizer is rebuilt from its state_dict after these steps
WARMUP = 20  # steps of the linear warmup of "warmup_holds_the_scale"
LATE_UNTIL, ADDED_AT = 30, 50  # the last layer's bias has no gradient before step 30; the last layer joins at 50
JOINS = {"late_parameter": LATE_UNTIL, "added_group": ADDED_AT}  # the step at which the last bias first moves


def _groups(model, config):
    grouped, added_group = config.get("_groups"), config.get("_added_group")
    if added_group:
        return list(model[0].parameters())
    if config.get("_muon_groups"):
        return [{"params": [model[0].weight]}, {"params": [model[2].weight], "orthogonalize": False},
                {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    if not grouped:
        return list(model.parameters())
    return [{"params": [p for p in model.parameters() if p.dim() == 2], "lr": 0.01, "weight_decay": 0.05},
            {"params": [p for p in model.parameters() if p.dim() < 2], "lr": 0.05}]


def run_fast_and_reference(config: dict, steps: int = STEPS, break_fast=None):
    """Yield (step, fast params, reference params, fast summary, reference summary) after every step."""
    kw = {"base": "adam", **{k: v for k, v in config.items() if not k.startswith("_")}}  # adam where unnamed
    X, y, model, g = _problem()
    ref_model = copy.deepcopy(model)
    torch.manual_seed(1)  # same controller initialisation in both
    fast = HybridOptimizer(_groups(model, config), **kw)
    torch.manual_seed(1)
    ref = ReferenceHybrid(_groups(ref_model, config), **kw)
    if break_fast:
        break_fast(fast)
    sched = torch.optim.lr_scheduler.LambdaLR(fast, [lambda s: 1 - s / 400, lambda s: 0.5 + 0.5 * math.cos(s / 50)]) \
        if config.get("_groups") else \
        torch.optim.lr_scheduler.LambdaLR(fast, lambda s: min(1.0, (s + 1) / WARMUP)) if config.get("_warmup") else None
    for step in range(steps):
        idx = torch.randint(0, 512, (32,), generator=g)
        if config.get("_added_group") and step == ADDED_AT:
            fast.add_param_group({"params": list(model[2].parameters())})
            ref.add_param_group({"params": list(ref_model[2].parameters())})
        model.zero_grad()  # not fast.zero_grad(): with _added_group the last layer is not in the optimizer yet
        loss = torch.nn.functional.mse_loss(model(X[idx]), y[idx])
        loss.backward()
        if config.get("_late") and step < LATE_UNTIL:
            model[2].bias.grad = None
        if config.get("_gaps") and step % 7 in (3, 4):
            model[2].bias.grad = None
        if config.get("_nan") and step in (0, 40, 41, 90):  # 0: before any update
            model[0].weight.grad[0, 0] = float("inf") if step == 41 else float("nan")
        loss_value = float("inf") if config.get("_nan") and step == 120 else loss.item()
        for p, q in zip(model.parameters(), ref_model.parameters()):  # identical gradients
            q.grad = None if p.grad is None else p.grad.clone()
        for rg, fg in zip(ref.param_groups, fast.param_groups):  # identical scheduled learning rates
            rg["lr"] = fg["lr"]
        if config.get("_clusters"):
            fast.set_cluster(step % 5 if step % 5 < 4 else None)
            ref.set_cluster(step % 5 if step % 5 < 4 else None)
        fast.step() if config.get("_no_loss") else fast.step(loss=loss_value)
        ref.step() if config.get("_no_loss") else ref.step(loss=loss_value)
        if sched:
            sched.step()
        if config.get("_reload") and step in RELOAD_AT:
            state = copy.deepcopy(fast.state_dict())
            fast = HybridOptimizer(_groups(model, config), **kw)
            fast.load_state_dict(state)
        if config.get("_eval") and step == steps - 1:
            fast.eval()
            ref.eval()
        yield step, list(model.parameters()), list(ref_model.parameters()), fast.summary(), ref.summary()


@pytest.fixture
def default_dtype(request):
    """Run in the requested default dtype (model, data and controller), then restore it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(before)


# float64: the two differ only by rounding (~1e-15), so the tolerance is tight. float32: rounding differences of the
# two formulas (lerp vs weighted sum, sqrt(mean) vs sqrt(sum / n)) feed back through the controller and grow to
# ~1e-5 relative over 200 steps, hence the looser float32 tolerance.
TOLERANCE = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float32], indirect=True, ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_reference(name, default_dtype):
    tol = TOLERANCE[default_dtype]
    if default_dtype == torch.float32:
        tol = CONFIGS[name].get("_f32_tolerance", tol)
    rtol = tol["rtol"]
    clipped, scales = 0, []
    for step, fast_params, ref_params, s_fast, s_ref in run_fast_and_reference(CONFIGS[name]):
        for p, q in zip(fast_params, ref_params):
            assert torch.allclose(p, q, **tol), (name, step, (p - q).abs().max().item())
        assert s_fast["clipped"] == s_ref["clipped"] and s_fast["skipped_steps"] == s_ref["skipped_steps"], (name, step)
        for key in ("trust_radius", "lr_multiplier", "avg_lr_multiplier", "learned_scale"):
            same = s_fast[key] is None if s_ref[key] is None else s_fast[key] == pytest.approx(s_ref[key], rel=rtol)
            assert same, (name, step, key, s_fast[key], s_ref[key])
        clipped += s_fast["clipped"]
        scales.append(s_fast["learned_scale"])
        if step == 0:
            last_bias = fast_params[3].detach().clone()
        # Held while the lr rose, and for the first steps after it: the warmup's hypergradients were dropped, and a
        # mean of fewer than 4 fresh ones is too noisy to move it.
        if CONFIGS[name].get("_warmup") and step <= WARMUP + 2:
            assert s_fast["learned_scale"] == 1.0, (step, s_fast["learned_scale"])
        if step == 1 and CONFIGS[name].get("base") in ("schedulefree", "muon") and CONFIGS[name].get("lr") == 1e-5:
            started = CONFIGS[name].get("_started", False)
            assert (s_fast["learned_scale"] > 100) == started, (name, s_fast["learned_scale"])
        if name in JOINS and step == JOINS[name] - 1:  # a tensor without a gradient, or not yet added, stays put
            assert torch.equal(fast_params[3], last_bias), (name, step)
    # The configurations really exercise what they are named for.
    assert s_fast["total_steps"] == STEPS - (5 if CONFIGS[name].get("_nan") else 0)
    if "clip" in name:
        assert clipped > 5, clipped  # fewer since a lowering after a clipped step starts from the radius's rate
    if name in JOINS:
        assert not torch.equal(fast_params[3], last_bias), name
    controller = CONFIGS[name].get("use_controller", CONFIGS[name].get("base") != "schedulefree")  # its default
    if controller:
        # (a run clipped at every step trains only the radius head, so the lr multiplier may stay at 1)
        assert s_fast["lr_multiplier"] != 1.0 or s_fast["trust_radius"] != CONFIGS[name].get("trust_radius", 0.1)
    if "_floor" in CONFIGS[name]:  # held at the bound, after rising above it (so it may end there)
        floor = CONFIGS[name]["_floor"]
        rose = next(i for i, v in enumerate(scales) if v > floor * 1.01)
        assert min(scales) == pytest.approx(floor, rel=1e-12), name
        assert any(v == pytest.approx(floor, rel=1e-12) for v in scales[rose:]), name
    elif CONFIGS[name].get("learn_scale", True):
        assert s_fast["learned_scale"] != 1.0 and s_fast["lr_multiplier"] != 1.0, name
    else:
        assert s_fast["learned_scale"] == 1.0, name


@pytest.mark.parametrize("default_dtype", [torch.float64], indirect=True)
def test_reference_catches_a_broken_fast_optimizer(default_dtype):
    """A slightly wrong beta2 in the fast optimizer is caught by the comparison within 20 steps."""
    def break_fast(opt):
        for group in opt.param_groups:
            group["betas"] = (group["betas"][0], group["betas"][1] - 1e-3)

    with pytest.raises(AssertionError):
        for _, fast_params, ref_params, _, _ in run_fast_and_reference(CONFIGS["adam_global"], 20, break_fast):
            for p, q in zip(fast_params, ref_params):
                assert torch.allclose(p, q, **TOLERANCE[default_dtype])
