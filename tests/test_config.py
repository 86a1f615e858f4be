"""The configs by component: each validates its own values, the optimizer's by the optimizer's own rules (one
check per value, so the flag and `HybridOptimizer` refuse the same values), and the run configs compose them."""

import dataclasses
import json
import math

import pytest
import torch

from hybridopt.config import (DataConfig, DistillConfig, ExportOptions, LoopConfig, OptimizerConfig, QuantConfig,
                              StudentConfig, TeacherConfig, TrainConfig)
from hybridopt.errors import UserError
from hybridopt.optim.hybrid import HybridOptimizer


@pytest.mark.parametrize("flag, value, optimizer_kwarg", [
    ("lr", 0.0, "lr"), ("lr", math.nan, "lr"), ("scale_threshold", 1.0, "scale_threshold"),
    ("min_scale", 2.0, "min_scale"), ("radius_start", 1.5, "radius_start"), ("controller_lr", 0.0, "controller_lr"),
    ("weight_decay", -1.0, "weight_decay"), ("scale_lr", 0.0, "scale_lr"),
])
def test_the_flag_and_the_optimizer_refuse_the_same_values(flag, value, optimizer_kwarg):
    with pytest.raises(UserError, match=rf"^--{flag} "):
        DistillConfig(**{flag: value})
    with pytest.raises(ValueError, match=rf"^{optimizer_kwarg} "):
        HybridOptimizer([torch.nn.Parameter(torch.ones(2))], **{"lr": 1e-3, optimizer_kwarg: value})


def test_a_schedule_free_base_refuses_the_radius_adaptation_with_the_flags_named():
    with pytest.raises(UserError, match=r"^--adapt_radius is not supported with --hybrid_base schedulefree"):
        DistillConfig(hybrid=True, hybrid_base="schedulefree", adapt_radius=True)
    DistillConfig(hybrid_base="schedulefree", adapt_radius=True)  # without --hybrid neither is used


def test_the_run_configs_are_composed_of_the_components():
    components = (OptimizerConfig, LoopConfig, TrainConfig, StudentConfig, QuantConfig, DataConfig, ExportOptions)
    assert all(issubclass(DistillConfig, c) for c in components)
    assert issubclass(TeacherConfig, TrainConfig) and not issubclass(TeacherConfig, QuantConfig)
    distill = {f.name for f in dataclasses.fields(DistillConfig)}
    parts = set().union(*({f.name for f in dataclasses.fields(c)} for c in components))
    assert parts <= distill and len(distill) == 68  # every flag `hybridopt distill` has, none lost or doubled


def test_each_component_checks_its_own_values():
    with pytest.raises(UserError, match="--student_heads 3 must divide --student_hidden 256"):
        StudentConfig(student_heads=3)
    with pytest.raises(UserError, match="--ternary conflicts with --bits 4"):
        QuantConfig(ternary=True, bits=4)
    with pytest.raises(UserError, match="--cluster_sampling needs --data_clusters"):
        DataConfig(cluster_sampling="balanced")
    with pytest.raises(UserError, match="--grad_clip must be non-negative"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(UserError, match=r"--plan_after_epochs must lie in \[0, --epochs\)"):  # spans components
        DistillConfig(qat=True, ternary=True, param_clusters=2, plan_after_epochs=3, epochs=3)


@pytest.mark.parametrize("config, flag, value", [
    (DistillConfig, "lr", math.inf), (DistillConfig, "controller_lr", math.inf), (DistillConfig, "temperature", math.nan),
    (DistillConfig, "alpha", math.nan), (DistillConfig, "trust_radius", math.inf), (TeacherConfig, "lr", math.inf),
])
def test_every_float_flag_is_finite(config, flag, value):
    """inf and nan trained a NaN student (or every step was skipped) and the run still ended with exit 0."""
    with pytest.raises(UserError, match=rf"^--{flag} must be a finite number, got {value}$"):
        config(**{flag: value})


def test_an_exception_without_a_message_is_named_by_its_type():
    """`str(e).splitlines()[0]` raised IndexError for a bare MemoryError, hiding the real error."""
    from hybridopt.errors import first_line

    assert first_line(MemoryError()) == "MemoryError"
    assert first_line(OSError("disk full\nmore detail")) == "disk full"


def test_a_checkpoint_write_failing_without_a_message_is_one_sentence(tmp_path, monkeypatch):
    from hybridopt.training import checkpoint

    def fail(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(checkpoint.torch, "save", fail)
    with pytest.raises(UserError, match=r"cannot write the checkpoint .* \(RuntimeError\); is the disk full\?"):
        checkpoint.save_checkpoint(tmp_path, {"x": 1})


@pytest.mark.parametrize("field, value", [("autocast", "foo"), ("student", "gpt2"), ("kd_loss", "kl"),
                                          ("teacher_dtype", "int8")])
def test_a_run_config_naming_a_value_outside_a_flags_choices_is_unreadable(tmp_path, field, value):
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(UserError, match=rf"the run config '.*' is unreadable \({field} is '{value}'\)"):
        DistillConfig.from_file(path)
    path.write_text(json.dumps({field: DistillConfig.__dataclass_fields__[field].default}))
    DistillConfig.from_file(path)  # the default is accepted


def test_an_empty_out_is_refused():
    with pytest.raises(UserError, match="--out is empty"):
        DistillConfig(out=" ")
