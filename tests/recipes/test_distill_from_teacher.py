"""`hybridopt distill --student teacher`: a student that starts from its teacher's weights, quantized and distilled
from the full-precision original, from a Hugging Face folder or a GGUF teacher."""

import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hybridopt.cli import main
from hybridopt.config import DistillConfig
from hybridopt.models.modeling import load_teacher
from hybridopt.quant.qat import qat_layers
from hybridopt.recipes.distill import DistillRecipe, run_distill
from hybridopt.reporting import Reporter


def _cfg(teacher, data, out, **kw):
    return DistillConfig(**{**dict(teacher=str(teacher), data=[str(data)], out=str(out), student="teacher",
                                   ternary=True, qat=True, seq_len=32, batch_size=8, epochs=2,
                                   max_steps_per_epoch=3, eval_every=1, device="cpu"), **kw})


def _args(teacher, data, out, *extra):
    return ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(out), "--student", "teacher",
            "--seq_len", "32", "--batch_size", "8", "--epochs", "2", "--max_steps_per_epoch", "3",
            "--device", "cpu", *extra]


def test_the_student_starts_as_the_teacher_quantized(tiny_teacher, corpus_file, tmp_path):
    recipe = DistillRecipe(_cfg(tiny_teacher, corpus_file, tmp_path / "run"), Reporter(quiet=True))
    try:
        recipe.setup()
        teacher, student = recipe.teacher.state_dict(), recipe.student.state_dict()
        assert teacher.keys() == student.keys()
        for name, tensor in teacher.items():
            assert torch.equal(student[name], tensor), name
        assert len(qat_layers(recipe.student)) == 7 * recipe.teacher.config.num_hidden_layers
        baseline = recipe.baseline()  # the CE-only comparison starts from the same weights
        for name, tensor in teacher.items():
            assert torch.equal(baseline.student.state_dict()[name], tensor), name
    finally:
        recipe.release()


def test_cli_distils_a_pruned_teacher_start_from_a_gguf_teacher(tiny_teacher, corpus_file, tmp_path, capsys):
    from hybridopt.export.gguf import export_gguf

    teacher, tokenizer = load_teacher(tiny_teacher, torch.device("cpu"))
    gguf_teacher = tmp_path / "teacher.gguf"
    export_gguf(teacher, gguf_teacher, tokenizer, "f16")
    out = tmp_path / "run"
    assert main(_args(gguf_teacher, corpus_file, out, "--student_layers", "1", "--ternary", "--qat",
                      "--quant_warmup", "2", "--kd_loss", "reverse_kl", "--hidden_distill", "1", "--attn_distill",
                      "1", "--gguf", "tq2_0")) == 0
    printed = capsys.readouterr().out
    assert "Depth pruning: keeping 1 of the teacher's 2 layers (evenly spaced): [1]" in printed
    assert "started from the teacher's weights" in printed and "student (CE only)" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["student"] == "teacher" and results["config"]["kd_loss"] == "reverse_kl"
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == teacher.config.hidden_size
    student, _ = load_teacher(out / "student", torch.device("cpu"))
    # layer 0 of the student was the teacher's layer 1; training moved it, but not its norms' shape or its name
    assert student.model.layers[0].input_layernorm.weight.shape == teacher.model.layers[1].input_layernorm.weight.shape
    assert (out / "export" / "model-tq2_0.gguf").is_file()
    assert results["gguf"]["type"] == "tq2_0"
    # the tokenizer the GGUF teacher carried is the student's
    assert main(["generate", "--model", str(out), "--prompt", "The", "--max_new_tokens", "3"]) == 0


def test_a_teacher_start_resumes_exactly(tiny_teacher, corpus_file, tmp_path):
    kw = dict(quant_warmup=3, hidden_distill=0.5, save_metrics=True)
    straight = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "straight", **kw), Reporter(quiet=True))
    run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "resumed", **kw), Reporter(quiet=True), stop_after_epoch=1)
    resumed = run_distill(DistillConfig(resume=str(tmp_path / "resumed")), Reporter(quiet=True))
    for key in ("student", "baseline"):
        assert resumed[key]["loss"] == straight[key]["loss"]


@pytest.mark.parametrize("extra, match", [
    (["--student_hidden", "64"], r"--student_hidden sizes a fresh student; with --student teacher"),
    (["--student_layers", "9"], r"--student_layers 9 exceeds the teacher's 2 layers"),
    (["--ternary", "--qat", "--quant_warmup", "6"], r"--quant_warmup 6 must be below the run's 6 steps"),
    (["--quant_warmup", "2"], r"--quant_warmup blends weights .* it needs --qat"),
    (["--teacher_topk", "--hidden_distill", "1"], r"--hidden_distill needs the teacher's activations"),
    (["--kd_loss", "tv", "--alpha", "1"], r"--kd_loss tv needs --alpha below 1"),
])
def test_bad_teacher_start_flags_are_one_sentence(tiny_teacher, corpus_file, tmp_path, capsys, extra, match):
    _bad(_args(tiny_teacher, corpus_file, tmp_path / "run", *extra), capsys, match)
    assert not (tmp_path / "run" / "results.json").exists()


def test_flags_that_need_a_teacher_start_say_so(tiny_teacher, corpus_file, tmp_path, capsys):
    args = _args(tiny_teacher, corpus_file, tmp_path / "run")
    fresh = [a for a in args if a not in ("--student", "teacher")]
    _bad([*fresh, "--hidden_distill", "1"], capsys, r"--hidden_distill pairs each student layer .* --student teacher")
    _bad([*fresh, "--layer_choice", "measured"], capsys, r"--layer_choice .* needs --student teacher")


def test_a_teacher_outside_the_llama_family_is_refused(corpus_file, tmp_path, capsys, tiny_teacher):
    from hybridopt.models.tokenizer import load_tokenizer

    folder = tmp_path / "gpt2"
    tokenizer = load_tokenizer(tiny_teacher)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer),
                               n_positions=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _bad(_args(folder, corpus_file, tmp_path / "run"), capsys,
         r"--student teacher: a student can start from Llama-family teachers only .* 'gpt2'")


def _bad(argv, capsys, match):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"hybridopt( distill)?: error: ", err) and "\n" not in err and "Traceback" not in err, err
    assert re.search(match, err), err
