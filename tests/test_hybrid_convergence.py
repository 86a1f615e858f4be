"""optax-style: every configuration of HybridOptimizer (base x trust region x controller) minimises a parabola and
the 2-D Rosenbrock function below a stated loss.

The bounds sit at least 10x above the losses measured when these tests were written (except fixed-rate SGD on
Rosenbrock, still descending slowly: about 1.3x), so they fail on a real regression, not on float noise. Starting losses: parabola 20.5, Rosenbrock 4.0. Plain SGD-momentum uses a learning rate well below
its stability limit on Rosenbrock (about 4e-3 at the minimum), so that the controller's up-to-10x multiplier stays
stable; the fixed-rate SGD runs are then slow, which their looser bound states.
"""

import itertools

import pytest
import torch

from hybridopt.hybrid_optimizer import HybridOptimizer


def parabola(x: torch.Tensor) -> torch.Tensor:
    """0.5 (x_1^2 + 10 x_2^2): convex, condition number 10, minimum 0 at the origin."""
    return 0.5 * (x[0] ** 2 + 10 * x[1] ** 2)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """(1 - x_1)^2 + 100 (x_2 - x_1^2)^2: minimum 0 at (1, 1), along a curved valley."""
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


PROBLEMS = {"parabola": (parabola, [1.0, -2.0], 500), "rosenbrock": (rosenbrock, [-1.0, 1.0], 1000)}
LR = {("parabola", "adam"): 0.1, ("parabola", "sgd"): 0.02, ("rosenbrock", "adam"): 0.02, ("rosenbrock", "sgd"): 1e-4}
# (problem, base, use_controller) -> loss bound; the trust region does not change the bound.
BOUND = {("parabola", "adam", True): 1e-12, ("parabola", "adam", False): 1e-12,
         ("parabola", "sgd", True): 1e-12, ("parabola", "sgd", False): 1e-12,
         ("rosenbrock", "adam", True): 5e-3, ("rosenbrock", "adam", False): 1e-7,
         ("rosenbrock", "sgd", True): 2e-3, ("rosenbrock", "sgd", False): 0.6}


def minimise(problem: str, base: str, use_trust_region: bool, use_controller: bool) -> tuple[float, dict]:
    f, x0, steps = PROBLEMS[problem]
    x = torch.nn.Parameter(torch.tensor(x0))
    torch.manual_seed(0)
    opt = HybridOptimizer([x], lr=LR[problem, base], base=base, use_trust_region=use_trust_region,
                          use_controller=use_controller)
    for _ in range(steps):
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        opt.step(loss=loss.item())
    return f(x).item(), opt.summary()


@pytest.mark.parametrize("problem,base,use_trust_region,use_controller",
                         list(itertools.product(PROBLEMS, ["adam", "sgd"], [True, False], [True, False])))
def test_minimises(problem, base, use_trust_region, use_controller):
    loss, summary = minimise(problem, base, use_trust_region, use_controller)
    assert loss < BOUND[problem, base, use_controller], loss
    assert summary["total_steps"] == PROBLEMS[problem][2] and summary["skipped_steps"] == 0
    if not use_controller:
        assert summary["avg_lr_multiplier"] == 1.0
    if not use_trust_region:
        assert summary["constraint_activation_rate"] == 0.0


def test_controller_rescues_a_too_small_sgd_rate_on_rosenbrock():
    """At lr 1e-4 fixed SGD-momentum crawls along the valley; the controller raises the rate (to its 10x bound)."""
    learned, summary = minimise("rosenbrock", "sgd", True, True)
    fixed, _ = minimise("rosenbrock", "sgd", True, False)
    assert summary["avg_lr_multiplier"] > 5 and learned < fixed / 100, (learned, fixed)
