"""The CUDA path of `hybridopt distill`: bfloat16 autocast by default, QAT that stays on the GPU, compile.

Marked `gpu` and skipped without a CUDA device. Never run where this was written (no GPU was lent); the
README says so. The same code runs on CPU in test_autocast_compile.py.
"""

import math

import pytest
import torch

from conftest import tiny_distill_config

from hybridopt.recipes.distill import run_distill

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cfg(teacher, data, out, **kw):
    return tiny_distill_config(teacher, data, out, **{**dict(epochs=2, max_steps_per_epoch=3, eval_every=1,
                                                             device="cuda", baseline=False), **kw})


def test_ternary_hybrid_run_trains_on_the_gpu_in_bfloat16(tiny_teacher, corpus_file, tmp_path):
    """Every layer the student trains through runs on the GPU in bfloat16 (autocast's default there), the
    ternary fake-quantizers included (a CPU fallback would put an output on the CPU or fail on devices);
    the run ends with finite losses, a packed export and data clusters made on the GPU's features."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            seen.add((output.device.type, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        res = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "run", ternary=True, hybrid=True,
                               data_clusters=2))
    finally:
        handle.remove()
    assert seen == {("cuda", torch.bfloat16)}
    history = res["student"]["history"]
    assert math.isfinite(res["student"]["loss"]) and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "export" / "model.packed.safetensors").is_file()


def test_compiled_student_on_the_gpu_matches_eager(tiny_teacher, corpus_file, tmp_path):
    eager = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "eager", autocast="off"))
    compiled = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "compiled", autocast="off", compile=True))
    assert compiled["student"]["loss"] == pytest.approx(eager["student"]["loss"], rel=1e-3)
