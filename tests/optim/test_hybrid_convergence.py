"""optax-style: every configuration of HybridOptimizer (base x trust region x what learns) minimises a parabola and
the 2-D Rosenbrock function below a stated loss.

The bounds sit about 10x above the worst loss (trust region on or off) measured when these tests were written
(except fixed-rate SGD on Rosenbrock, still descending slowly: about 1.3x), so they fail on a real regression, not
on float noise. Starting losses: parabola 20.5, Rosenbrock 4.0. Plain SGD-momentum uses a learning rate well below
its stability limit on Rosenbrock (about 4e-3 at the minimum): the fixed-rate SGD runs are slow, which their looser
bound states, and the learned scale has something to fix. On Rosenbrock's curved valley the learned scale ends
worse than a well-chosen fixed Adam rate (about 7e-4 against 1e-9): the one-step hypergradient sees the
oscillation across the valley, not the distance along it; the bounds state that too.
"""

import itertools

import pytest
import torch

from hybridopt.optim.hybrid import HybridOptimizer


def parabola(x: torch.Tensor) -> torch.Tensor:
    """0.5 (x_1^2 + 10 x_2^2): convex, condition number 10, minimum 0 at the origin."""
    return 0.5 * (x[0] ** 2 + 10 * x[1] ** 2)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """(1 - x_1)^2 + 100 (x_2 - x_1^2)^2: minimum 0 at (1, 1), along a curved valley."""
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


PROBLEMS = {"parabola": (parabola, [1.0, -2.0], 500), "rosenbrock": (rosenbrock, [-1.0, 1.0], 1000)}
LR = {("parabola", "adam"): 0.1, ("parabola", "sgd"): 0.02, ("rosenbrock", "adam"): 0.02, ("rosenbrock", "sgd"): 1e-4}
# (problem, base, mode) -> loss bound; the trust region does not change the bound.
BOUND = {**{("parabola", base, mode): 1e-12 for base in ("adam", "sgd") for mode in ("fixed", "scale", "hybrid")},
         ("rosenbrock", "adam", "fixed"): 1e-7, ("rosenbrock", "adam", "scale"): 7e-3,
         ("rosenbrock", "adam", "hybrid"): 2e-3, ("rosenbrock", "sgd", "fixed"): 0.6,
         ("rosenbrock", "sgd", "scale"): 5e-2, ("rosenbrock", "sgd", "hybrid"): 7e-2}


MODES = {"fixed": dict(learn_scale=False, use_controller=False), "scale": dict(use_controller=False), "hybrid": {}}


def minimise(problem: str, base: str, use_trust_region: bool, mode: str) -> tuple[float, dict]:
    f, x0, steps = PROBLEMS[problem]
    x = torch.nn.Parameter(torch.tensor(x0))
    torch.manual_seed(0)
    opt = HybridOptimizer([x], lr=LR[problem, base], base=base, use_trust_region=use_trust_region, **MODES[mode])
    for _ in range(steps):
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        opt.step(loss=loss.item())
    return f(x).item(), opt.summary()


# Without the trust region the learned scale takes SGD-momentum on Rosenbrock to divergence (test below).
DIVERGES = {("rosenbrock", "sgd", False, "scale"), ("rosenbrock", "sgd", False, "hybrid")}


@pytest.mark.parametrize("problem,base,use_trust_region,mode",
                         [c for c in itertools.product(PROBLEMS, ["adam", "sgd"], [True, False], MODES)
                          if c not in DIVERGES])
def test_minimises(problem, base, use_trust_region, mode):
    loss, summary = minimise(problem, base, use_trust_region, mode)
    assert loss < BOUND[problem, base, mode], loss
    assert summary["total_steps"] == PROBLEMS[problem][2] and summary["skipped_steps"] == 0
    if mode == "fixed":
        assert summary["avg_lr_multiplier"] == 1.0 and summary["learned_scale"] == 1.0
    if not use_trust_region:
        assert summary["constraint_activation_rate"] == 0.0


def test_learned_scale_rescues_a_too_small_sgd_rate_on_rosenbrock():
    """At lr 1e-4 fixed SGD-momentum crawls along the valley; the learned scale raises the rate."""
    learned, summary = minimise("rosenbrock", "sgd", True, "scale")
    fixed, _ = minimise("rosenbrock", "sgd", True, "fixed")
    assert summary["avg_lr_multiplier"] > 5 and learned < fixed / 50, (learned, fixed)


@pytest.mark.parametrize("mode", ["scale", "hybrid"])
def test_trust_region_keeps_the_learned_scale_from_diverging(mode):
    """SGD-momentum at lr 1e-4 on Rosenbrock: the learned scale grows (the rate is 40x too small) and, unbounded,
    overshoots the stability limit in the curved valley; the trust region keeps the same run convergent."""
    bounded, summary = minimise("rosenbrock", "sgd", True, mode)
    unbounded, unbounded_summary = minimise("rosenbrock", "sgd", False, mode)
    assert bounded < BOUND["rosenbrock", "sgd", mode] and summary["skipped_steps"] == 0
    # diverged: the loss left every sane range (inf, or a finite 1e37 where the last finite step stopped) and
    # every later step was skipped as non-finite
    assert not unbounded < 1e6 and unbounded_summary["skipped_steps"] > 100, (unbounded, unbounded_summary)
