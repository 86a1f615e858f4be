"""The one place an optimizer is stepped: the hybrid optimizer gets the batch's loss and data cluster, any other
optimizer the plain `step()`."""

import torch

from hybridopt.optim.hybrid import HybridOptimizer
from hybridopt.training.step import describe_optimizer, lr_multiplier, optimizer_metrics, step_optimizer


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _backward(net: torch.nn.Module) -> float:
    loss = net(torch.ones(2, 4)).square().mean()
    loss.backward()
    return loss.item()


def test_the_hybrid_optimizer_gets_the_loss_and_the_cluster():
    net = _net()
    opt = HybridOptimizer(net.parameters(), lr=1e-2, base="adam", adapt_radius=True, num_clusters=4)
    loss = _backward(net)
    step_optimizer(opt, loss, cluster=2)
    assert opt.hybrid_state.cluster_id == 2
    assert opt.hybrid_state.prev_loss == loss  # adapt_radius records the loss the step was given
    assert lr_multiplier(opt) == opt.lr_multiplier
    assert set(optimizer_metrics(opt)) == {"lr_mult", "trust_radius", "clipped"}
    assert describe_optimizer(opt).startswith("Optimizer: hybrid over AdamW (--hybrid_base adam)")


def test_any_other_optimizer_takes_its_plain_step():
    ours, theirs = _net(), _net()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    step_optimizer(opt_ours, _backward(ours), cluster=1)
    _backward(theirs)
    opt_theirs.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert lr_multiplier(opt_ours) is None and optimizer_metrics(opt_ours) == {}
    assert describe_optimizer(opt_ours) is None
