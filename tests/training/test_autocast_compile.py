"""--autocast and --compile: the student's matrix products in bfloat16 with float32 weights, optimizer and
validation; a compiled student that trains as the eager one and saves the same checkpoint. Run on CPU
(torch.autocast and torch.compile both work there); the CUDA path is in test_gpu_path.py."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_distill_config

from hybridopt.recipes.distill import run_distill
from hybridopt.utils import autocast_dtype


def _cfg(teacher, data, out, **kw):
    return tiny_distill_config(teacher, data, out, **{**dict(epochs=1, max_steps_per_epoch=3, eval_every=1,
                                                             baseline=False), **kw})


class LinearDtypes:
    """Records (grad enabled, output dtype) of every nn.Linear call while active, and the autograd node
    names of the logits of every language model called with gradients."""

    def __enter__(self):
        self.seen, self.nodes = set(), set()

        def hook(module, args, output):
            if isinstance(module, torch.nn.Linear):
                self.seen.add((torch.is_grad_enabled(), output.dtype))
            if torch.is_grad_enabled() and hasattr(output, "logits"):
                self.nodes.add(type(output.logits.grad_fn).__name__)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_auto_is_bfloat16_on_cuda_only():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("off", torch.device("cuda")) is None
    assert autocast_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize("quant", [{}, {"ternary": True}])
def test_autocast_bfloat16_trains_in_bfloat16_and_keeps_float32_weights(tiny_teacher, corpus_file, tmp_path, quant):
    """With --autocast bfloat16 every layer the student trains through runs in bfloat16 (full precision and
    ternary QAT); the teacher, validation and the saved weights stay float32; the loss ends near float32's."""
    with LinearDtypes() as off:
        full = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "f32", **quant))
    with LinearDtypes() as on:
        half = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "bf16", autocast="bfloat16", **quant))
    assert off.seen == {(True, torch.float32), (False, torch.float32)}
    assert on.seen == {(True, torch.bfloat16), (False, torch.float32)}  # training bf16; teacher, validation f32
    assert half["student"]["loss"] != full["student"]["loss"]
    assert half["student"]["loss"] == pytest.approx(full["student"]["loss"], rel=0.01)
    weights = load_file(str(tmp_path / "bf16" / "student" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_compiled_student_trains_as_the_eager_one(tiny_teacher, corpus_file, tmp_path):
    """--compile (ternary QAT, hybrid optimizer): the same losses as eager (to float rounding; inductor fuses
    differently), a checkpoint with the same names and shapes (no `_orig_mod.` prefix) and a packed export."""
    with LinearDtypes() as plain:
        eager = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "eager", hybrid=True, ternary=True))
    with LinearDtypes() as fused:
        compiled = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "compiled", hybrid=True, ternary=True,
                                          compile=True))
    assert "CompiledFunctionBackward" in fused.nodes and "CompiledFunctionBackward" not in plain.nodes
    assert compiled["student"]["loss"] == pytest.approx(eager["student"]["loss"], rel=1e-4)
    a = load_file(str(tmp_path / "eager" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "student" / "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
    assert (tmp_path / "compiled" / "export" / "model.packed.safetensors").is_file()
