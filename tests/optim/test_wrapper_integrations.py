"""`hybrid(base)` over bases outside the four built in (RMSprop, Adagrad, torch.optim.Muon, Schedule-Free) where
PyTorch users put optimizers: a plain loop, transformers' Trainer, Lightning and GradScaler.

test_wrapper.py holds what these build on: the base's steps bit for bit with the scale frozen (every base
here too), the slow reference (AdamW and RMSprop), param groups, schedulers and GradScaler over AdamW. Here:
the first two steps over RMSprop and Adagrad against the rule written out by hand, a wrong rate over RMSprop,
Adagrad and Muon, a checkpoint resumed exactly over Muon, Adagrad and Schedule-Free, GradScaler's unscaled and
skipped steps over each base, and the wrapper inside the Trainer and Lightning (with their schedulers, mixed
precision, and the Trainer switching a Schedule-Free base between train and eval).
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from hybridopt import hybrid

try:
    import schedulefree
except ImportError:  # optional
    schedulefree = None

needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
needs_schedulefree = pytest.mark.skipif(schedulefree is None, reason="schedulefree is not installed")


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    """8 -> 32 -> 1 tanh MLP, the same weights for the same seed (bias-free: matrices only, for Muon)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32, bias=bias), nn.Tanh(), nn.Linear(32, 1, bias=bias))


def regression(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """x `(n, 8)`, y = sin(x w) + 0.1 x_1^2 `(n, 1)`, fixed by its own generator."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.1 * x[:, :1] ** 2


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def batches(steps: int, n: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` minibatches of the regression data, the same list every call."""
    x, y = regression(1024)
    g = torch.Generator().manual_seed(1)
    return [(x[i], y[i]) for i in (torch.randint(0, len(x), (n,), generator=g) for _ in range(steps))]


def _schedule_free(params, lr: float):
    opt = schedulefree.AdamWScheduleFree(params, lr=lr, warmup_steps=3)
    opt.train()  # schedulefree builds its optimizers in eval mode
    return opt


# (make(params, lr), bias-free model, a rate) for each base outside the four built in. At the rate, with radius 0.01
# and threshold 0, 10 steps both clip and move the scale (measured: RMSprop 1 clip, scale 0.28; Adagrad 1, 0.052;
# Muon 6, 1.34; Schedule-Free, whose z step is clipped, 3, 2.10); at 2x to 4x the rate Muon and Schedule-Free clip
# every step and keep it at 1.
BASES = {
    "rmsprop": (lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5), True, 1e-3),
    "adagrad": (lambda ps, lr: torch.optim.Adagrad(ps, lr=lr), True, 0.05),
    "muon": pytest.param((lambda ps, lr: torch.optim.Muon(ps, lr=lr), False, 5e-3), marks=needs_muon),
    "schedulefree": pytest.param((_schedule_free, True, 1e-3), marks=needs_schedulefree),
}


def _snapshot(opt) -> tuple[dict, dict, list[torch.Tensor]]:
    """Everything a step may change in a wrapper: its scalars, the base's per-tensor state, its buffers."""
    base_state = {k: v.clone() if torch.is_tensor(v) else v for st in opt.state.values() for k, v in st.items()}
    buffers = [b["update"].clone() for b in opt._buffers.values()]
    return dataclasses.asdict(opt.hybrid_state), base_state, buffers


def _same_snapshot(a, b) -> bool:
    (sa, ba, ua), (sb, bb, ub) = a, b
    return (sa == sb and ba.keys() == bb.keys() and len(ua) == len(ub)
            and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(ba.values(), bb.values()))
            and all(torch.equal(x, y) for x, y in zip(ua, ub)))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors]).double()


# ---------------------------------------------------------------------- a plain loop: the rule by hand
@pytest.mark.parametrize("make", [lambda ps: torch.optim.RMSprop(ps, lr=0.05, momentum=0.5),
                                  lambda ps: torch.optim.Adagrad(ps, lr=0.5)], ids=["rmsprop", "adagrad"])
def test_first_two_steps_are_the_bases_scaled_and_clipped_as_the_rule_says(make):
    """Step 0: the scale is 1, so \\Delta\\theta_0 = d_0 \\min(1, r_0), r_0 = \\rho \\max(\\|\\theta_0\\|, 10^{-3}) /
    \\|d_0\\|, with d_0 the bare base's own step from \\theta_0. Step 1 (threshold 0): the first hypergradient
    h_1 = g_1 \\cdot \\Delta\\theta_0 > 0 gives \\sigma = 1, and after the clip the lowering starts from the rate
    the radius allowed: \\ell_1 = \\log r_0 - \\kappa, then \\Delta\\theta_1 = e^{\\ell_1} d_1 \\min(1, \\mu_1 /
    (e^{\\ell_1} \\|d_1\\|)). RMSprop's and Adagrad's states hold gradients only, so a bare copy fed the same
    gradient at the same point takes the base's step d_t."""
    rho, kappa = 0.005, 0.1
    model, bare_model = mlp(), mlp()
    opt = hybrid(make(model.parameters()), trust_radius=rho, scale_threshold=0.0, scale_lr=kappa)
    bare = make(bare_model.parameters())
    log_scale, last_step, last_ratio = 0.0, None, None
    for t, (x, y) in enumerate(batches(2)):
        theta = _params(model)
        with torch.no_grad():
            for q, p in zip(bare_model.parameters(), theta):
                q.copy_(p)
        loss = mse(model, x, y)
        loss.backward()
        for p, q in zip(model.parameters(), bare_model.parameters()):
            q.grad = p.grad.clone()
        grad = _flat(p.grad for p in model.parameters())
        bare.step()
        d = _flat(q.detach() for q in bare_model.parameters()) - _flat(theta)  # the base's own step
        if t == 1:
            assert float(grad @ last_step) > 0  # h_1 > 0: the first step went past the minimum along it
            log_scale = math.log(last_ratio) - kappa
        radius = rho * max(float(_flat(theta).norm()), 1e-3)
        ratio = radius / (math.exp(log_scale) * float(d.norm()))
        expected = math.exp(log_scale) * min(1.0, ratio) * d
        opt.step(loss=loss)
        opt.zero_grad()
        applied = _flat(p.detach() for p in model.parameters()) - _flat(theta)
        torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-7, msg=f"step {t}")
        if t == 0:
            assert ratio < 0.5  # the clip acted: a wrapper that returned the base's step fails here
        last_step, last_ratio = applied, ratio
    assert opt.scale == pytest.approx(math.exp(log_scale), rel=1e-5) and log_scale < math.log(0.5)


# (make(params, lr), bias-free model, the rate, how much lower than the bare base the wrapper ends)
# Measured, 200 full-batch steps from 0.593 (Muon 0.566): RMSprop at 0.3 (best ~1e-2) 1.98 bare, 0.097 wrapped;
# Adagrad at 1.0 (best ~0.1) 0.140 against 0.082; Muon at 1.0 (best ~3e-2) 1.22 against 0.0056 and at 1e-3
# 0.486 against 0.0069.
WRONG_RATES = {
    "rmsprop_30x_too_high": (lambda ps, lr: torch.optim.RMSprop(ps, lr=lr), True, 0.3, 10),
    "adagrad_10x_too_high": (lambda ps, lr: torch.optim.Adagrad(ps, lr=lr), True, 1.0, 1.4),
    "muon_30x_too_high": pytest.param((lambda ps, lr: torch.optim.Muon(ps, lr=lr), False, 1.0, 50), marks=needs_muon),
    "muon_30x_too_low": pytest.param((lambda ps, lr: torch.optim.Muon(ps, lr=lr), False, 1e-3, 30), marks=needs_muon),
}


@pytest.mark.parametrize("case", WRONG_RATES.values(), ids=WRONG_RATES.keys())
def test_plain_loop_at_a_wrong_rate_ends_below_the_bare_base(case, one_thread):
    make, bias, lr, factor = case
    x, y = regression()

    def final_loss(wrap: bool) -> tuple[float, float]:
        model = mlp(1, bias)
        opt = hybrid(make(model.parameters(), lr)) if wrap else make(model.parameters(), lr)
        for _ in range(200):
            loss = mse(model, x, y)
            loss.backward()
            opt.step(loss=loss) if wrap else opt.step()
            opt.zero_grad()
        with torch.no_grad():
            return mse(model, x, y).item(), opt.scale if wrap else 1.0

    start = mse(mlp(1, bias), x, y).item()
    (bare, _), (wrapped, scale) = final_loss(False), final_loss(True)
    assert wrapped * factor < bare, (wrapped, bare)
    assert wrapped < start / 5, (start, wrapped)
    assert (scale < 0.5) if lr >= 0.3 else (scale > 2.0)  # the learned scale moved the rate the right way


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("base", [BASES[k] for k in ("adagrad", "muon", "schedulefree")],
                         ids=["adagrad", "muon", "schedulefree"])
def test_state_dict_round_trip_continues_exactly(base):
    """5 steps, a checkpoint through torch.save, a fresh model and wrapper loading it, 5 more steps: the same
    parameters, scale and base state, bit for bit, as 10 uninterrupted steps."""
    make, bias, lr = base
    options = dict(trust_radius=0.01, scale_threshold=0.0)

    def train(model, opt, data):
        for x, y in data:
            loss = mse(model, x, y)
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()

    data = batches(10)
    straight = mlp(bias=bias)
    straight_opt = hybrid(make(straight.parameters(), lr), **options)
    train(straight, straight_opt, data)

    first = mlp(bias=bias)
    first_opt = hybrid(make(first.parameters(), lr), **options)
    train(first, first_opt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(seed=7, bias=bias)  # other weights: the checkpoint's must win
    resumed.load_state_dict(saved["model"])
    resumed_opt = hybrid(make(resumed.parameters(), 1e-9), **options)  # the checkpoint's lr must win too
    resumed_opt.load_state_dict(saved["opt"])
    train(resumed, resumed_opt, data[5:])

    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed_opt.scale == straight_opt.scale and resumed_opt.hybrid_state.step == 10
    assert _same_snapshot(_snapshot(resumed_opt), _snapshot(straight_opt))
    assert straight_opt.hybrid_state.clipped_steps > 0 and straight_opt.scale != 1.0  # the wrapper acted


# ---------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("base", BASES.values(), ids=BASES.keys())
def test_grad_scaler_steps_as_without_it_and_an_inf_changes_nothing(base):
    """GradScaler on CPU: with a power-of-two scale, the scaled gradients unscaled are the plain ones exactly, so
    every step equals the plain run's; at an inf the scaler skips the step and the parameters, the base's state
    and the wrapper's (scalars and buffers) are left as they were."""
    make, bias, lr = base
    plain_model, scaled_model = mlp(bias=bias), mlp(bias=bias)
    plain = hybrid(make(plain_model.parameters(), lr), trust_radius=0.01, scale_threshold=0.0)
    scaled = hybrid(make(scaled_model.parameters(), lr), trust_radius=0.01, scale_threshold=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for t, (x, y) in enumerate(batches(10)):
        if t != 4:  # the plain run skips the step the scaler skips
            loss = mse(plain_model, x, y)
            loss.backward()
            plain.step(loss=loss)
            plain.zero_grad()
        loss = mse(scaled_model, x, y)
        scaler.scale(loss).backward()
        if t == 4:  # an overflow
            scaled_model[2].weight.grad[0, 0] = math.inf
            before, state = _params(scaled_model), _snapshot(scaled)
        scaler.step(scaled, loss=loss.detach())
        scaler.update()
        scaled.zero_grad()
        if t == 4:
            assert all(torch.equal(p, b) for p, b in zip(scaled_model.parameters(), before))
            assert _same_snapshot(_snapshot(scaled), state)
        for p, q in zip(plain_model.parameters(), scaled_model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=f"step {t}")
    assert scaler.get_scale() == 2.0 ** 11 and scaled.hybrid_state.step == 9
    plain.state_dict()  # reads the last step's trust ratio back
    assert plain.scale != 1.0 and plain.hybrid_state.clipped_steps > 0  # the scale and the clip were in play


# ---------------------------------------------------------------------- transformers' Trainer
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16))
    ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    return model, data, ids


def _lm_loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _training_args(tmp_path, **overrides):
    from transformers import TrainingArguments

    return TrainingArguments(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                                       report_to=[], logging_steps=100, save_strategy="no", use_cpu=True,
                                       disable_tqdm=True), **overrides})


@pytest.mark.parametrize("base, schedule", [("rmsprop", False), ("adagrad", True)],
                         ids=["rmsprop_trainer_schedule", "adagrad_own_warmup"])
def test_hugging_face_trainer_trains_with_the_wrapper(tmp_path, base, schedule):
    """12 steps inside transformers' Trainer (`optimizers=(wrapped, scheduler)`), every one through the wrapper;
    the training loss falls by a real margin (4.17 -> 3.52 over RMSprop, 4.17 -> 3.39 over Adagrad measured;
    no step leaves it at 4.17), and the scheduler the Trainer steps sets the base's lr."""
    pytest.importorskip("accelerate")
    from transformers import Trainer

    model, data, ids = _tiny_llama()
    before = _lm_loss(model, ids)
    if base == "rmsprop":
        opt = hybrid(torch.optim.RMSprop(model.parameters(), lr=3e-3))
    else:
        opt = hybrid(torch.optim.Adagrad(model.parameters(), lr=0.05))
    lr0 = opt.param_groups[0]["lr"]
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)) if schedule else None
    trainer = Trainer(model=model, args=_training_args(tmp_path), train_dataset=data, optimizers=(opt, warmup))
    result = trainer.train()
    assert result.global_step == 12 and opt.hybrid_state.step == 12 and opt.hybrid_state.skipped_steps == 0
    if schedule:  # ours, stepped by the Trainer: the warmup's end
        assert trainer.lr_scheduler is warmup and opt.param_groups[0]["lr"] == lr0
    else:  # the Trainer's linear decay, built over the wrapper, acts on the base: 0 after the last step
        assert opt.param_groups[0]["lr"] == 0.0 and opt.base.param_groups[0]["initial_lr"] == lr0
    assert _lm_loss(model, ids) < before - 0.15, (before, _lm_loss(model, ids))


@needs_schedulefree
def test_hugging_face_trainer_switches_a_schedule_free_base(tmp_path):
    """The Trainer calls `optimizer.train()` before its steps and `optimizer.eval()` before evaluating: through
    the wrapper they reach the Schedule-Free base (built in eval mode, where the wrapper refuses to step), and the
    evaluation runs at the average x, not at the training point y (4.17 -> 3.71 there, measured)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer

    model, data, ids = _tiny_llama()
    before = _lm_loss(model, ids)
    base = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2, warmup_steps=2)
    opt = hybrid(base)
    trainer = Trainer(model=model, args=_training_args(tmp_path, per_device_eval_batch_size=32),
                      train_dataset=data, eval_dataset=data, optimizers=(opt, None))
    assert trainer.train().global_step == 12 and opt.hybrid_state.step == 12
    assert base.param_groups[0]["train_mode"] is True
    y_point = _params(model)
    eval_loss = trainer.evaluate()["eval_loss"]
    assert base.param_groups[0]["train_mode"] is False
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), y_point))  # moved to x
    assert eval_loss == pytest.approx(_lm_loss(model, ids), rel=1e-5)  # evaluated there
    assert eval_loss < before - 0.15, (before, eval_loss)


# ---------------------------------------------------------------------- Lightning
@pytest.mark.parametrize("base, precision", [("adagrad", "32-true"), ("rmsprop", "bf16-mixed")])
def test_lightning_configure_optimizers_returns_the_wrapper(base, precision):
    """40 steps of a linear regression inside Lightning, `configure_optimizers` returning the wrapper with a StepLR
    on it: the loss falls at least twentyfold (5.56 -> 0.12 over Adagrad, -> 0.19 over RMSprop under bf16
    autocast measured) and the weights head for the true 1s. Lightning steps it with its closure, so the wrapper
    sees each step's loss: the one step whose loss is nan (its gradients finite) is the one it skips."""
    pl = pytest.importorskip("lightning.pytorch")
    make, lr = (torch.optim.Adagrad, 0.5) if base == "adagrad" else (torch.optim.RMSprop, 0.03)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(4, 1)
            self.wrapped = None

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.mse_loss(self.layer(x), y)
            return loss + torch.tensor(math.nan) if self.global_step == 20 else loss

        def configure_optimizers(self):
            self.wrapped = hybrid(make(self.parameters(), lr=lr))
            return {"optimizer": self.wrapped,
                    "lr_scheduler": torch.optim.lr_scheduler.StepLR(self.wrapped, step_size=1, gamma=0.9)}

    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    before = nn.functional.mse_loss(module.layer(x), y).item()
    distance = (module.layer.weight.detach() - 1).abs().sum().item()
    pl.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", precision=precision).fit(module, loader)
    opt = module.wrapped
    assert module.optimizers().optimizer is opt
    assert opt.hybrid_state.step == 39 and opt.hybrid_state.skipped_steps == 1  # the nan loss reached it
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.9 ** 5)  # 5 epochs of 8 batches
    with torch.no_grad():
        after = nn.functional.mse_loss(module.layer(x), y).item()
    assert after < before / 20, (before, after)
    assert (module.layer.weight.detach() - 1).abs().sum().item() < distance / 2


# ---------------------------------------------------------------------- Muon, as torch ships it
@needs_muon
def test_muon_over_matrices_trains_and_refuses_vectors_itself():
    """The wrapper passes torch.optim.Muon's param groups through untouched: over a model's matrices it trains
    (the bias-free MLP's loss falls fivefold in 50 steps, 0.566 -> 0.060 measured), and biases get Muon's own
    refusal, not an error of the wrapper's."""
    x, y = regression()
    model = mlp(1, bias=False)
    opt = hybrid(torch.optim.Muon(model.parameters(), lr=0.1))
    assert opt.param_groups is opt.base.param_groups and opt.defaults["ns_steps"] == 5
    start = mse(model, x, y).item()
    for _ in range(50):
        loss = mse(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
    assert mse(model, x, y).item() < start / 5 and opt.hybrid_state.step == 50
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        hybrid(torch.optim.Muon(mlp().parameters(), lr=0.02))
