"""The command line as a user meets it: output format, saved artefacts, and bad input."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_distill_args
from hybridopt.cli import main

EPOCH_LINE = re.compile(r"^Epoch (\d+), Loss: \d+\.\d{6}, LR: \d+\.\d{6}(, Val Loss: \d+\.\d{6}, Val PPL: \d+\.\d{2})?$")


def test_distill_prints_seed_lines_saves_student_and_reports(tiny_teacher, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--save_metrics")) == 0
    stdout = capsys.readouterr().out
    epochs = [line for line in stdout.splitlines() if line.startswith("Epoch ")]
    assert [EPOCH_LINE.match(line).group(1) for line in epochs] == ["1", "2", "3"]
    assert "student (distilled)" in stdout and "student (no teacher)" in stdout and "teacher" in stdout

    student = AutoModelForCausalLM.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 1
    assert (out / "student" / "model.safetensors").is_file()
    assert tokenizer("def f")["input_ids"] == AutoTokenizer.from_pretrained(tiny_teacher)("def f")["input_ids"]

    results = json.loads((out / "results.json").read_text())
    for key in ("teacher", "student", "baseline"):
        assert results[key]["ppl"] == pytest.approx(2.718281828 ** results[key]["loss"], rel=1e-6)
    assert results["student"]["steps"] == results["baseline"]["steps"] == 15
    assert results["config"]["epochs"] == 3
    with open(out / "metrics_steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(1, 16))
    with open(out / "metrics.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_seed_shim_runs_the_same_command():
    shim = Path(__file__).parents[2] / "distillation.py"
    proc = subprocess.run([sys.executable, str(shim), "--hybrid", "--epochs", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hybridopt: error: --epochs must be positive, got 0"


def _bad(argv, capsys, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"hybridopt( distill)?: error: ", err) and "\n" not in err and "Traceback" not in err
    assert re.search(match, err), err


def test_bad_numbers(capsys, tmp_path):
    _bad(["distill", "--epochs", "0"], capsys, "--epochs must be positive")
    _bad(["distill", "--batch_size", "-4"], capsys, "--batch_size must be positive")
    _bad(["distill", "--epochs", "two"], capsys, "invalid int value")
    _bad(["distill", "--student_heads", "3"], capsys, "must divide --student_hidden")
    _bad(["distill", "--hybrid", "--trust_radius", "0"], capsys, "--trust_radius must be positive")
    _bad(["distill", "--hybrid", "--min_scale", "2"], capsys, "--min_scale must be in .1e-4, 1., got 2.0")
    _bad(["distill", "--hybrid", "--radius_start", "1.5"], capsys, "--radius_start must be in .0, 1., got 1.5")
    _bad(["distill", "--data_clusters", "1"], capsys, "--data_clusters must be at least 2")
    _bad(["distill", "--cluster_sampling", "balanced"], capsys, "--cluster_sampling needs --data_clusters")
    _bad(["distill", "--param_clusters", "4"], capsys, "--param_clusters needs a quantized run")
    _bad(["distill", "--ternary", "--param_clusters", "4", "--avg_bits", "1"], capsys, "below the run's base width")
    _bad(["distill", "--bits", "3"], capsys, "--bits: unsupported weight bit width 3")
    _bad(["distill", "--ternary", "--bits", "4"], capsys, "--ternary conflicts with --bits 4")
    _bad(["distill", "--act_bits", "4"], capsys, "invalid choice")
    _bad(["distill", "--group_size", "32"], capsys, "need --qat, --ternary or --bits")


def test_bad_paths(capsys, tmp_path, tiny_teacher, corpus_file):
    _bad(["distill", "--teacher", str(tiny_teacher), "--data", str(tmp_path / "missing.txt")], capsys, "does not exist")
    _bad(["distill", "--teacher", str(tmp_path / "nope")], capsys, "is not a directory")
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_teacher / "config.json").read_text())
    _bad(["distill", "--teacher", str(no_tok)], capsys, "has no tokenizer")
    (tmp_path / "empty.txt").write_text("")
    _bad(["distill", "--teacher", str(tiny_teacher), "--data", str(tmp_path / "empty.txt")], capsys, "contains no text")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    _bad(["distill", "--teacher", str(tiny_teacher), "--data", str(tmp_path / "bin.txt")], capsys, "looks binary")
    (tmp_path / "latin.txt").write_bytes(b"Gr\xfc\xdfe aus K\xf6ln")
    _bad(["distill", "--teacher", str(tiny_teacher), "--data", str(tmp_path / "latin.txt")], capsys, "not valid UTF-8")
    _bad(["distill", "--teacher", str(tiny_teacher), "--data", str(corpus_file), "--seq_len", "4096"], capsys,
         "exceeds the teacher's context length 128")
    _bad(["distill", "--resume", str(tmp_path)], capsys, "is not a hybridopt run folder")


def test_existing_run_is_never_overwritten(tiny_teacher, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--epochs", "1", "--no-baseline", "--save_metrics")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    _bad(tiny_distill_args(tiny_teacher, corpus_file, out), capsys, "already holds a run; continue it with --resume")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybridopt", "distill", "--data", str(tmp_path / "x.txt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hybridopt: error: --data: path '{tmp_path / 'x.txt'}' does not exist"


def test_hybrid_prints_trust_radius_and_the_summary_block(tiny_teacher, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--hybrid", "--no-baseline", "--save_metrics")) == 0
    stdout = capsys.readouterr().out
    assert ("Optimizer: hybrid over Muon (hidden matrices) and AdamW (embeddings, head, norms) (--hybrid_base muon); "
            "learned scale on, controller on, trust region on") in stdout.splitlines()
    lines = [line for line in stdout.splitlines() if line.startswith("Epoch ")]
    assert len(lines) == 3
    assert all(re.match(r"^Epoch \d+, Loss: \d+\.\d{6}, LR: \d+\.\d{6}, Trust Radius: \d+\.\d{6}", ln) for ln in lines)
    block = stdout[stdout.index("HYBRID OPTIMIZATION SUMMARY"):]
    summary = json.loads((out / "results.json").read_text())["student"]["hybrid"]
    assert f"Total Steps: {summary['total_steps']}\n" in block and summary["total_steps"] == 15
    assert f"Avg Learning Rate Multiplier: {summary['avg_lr_multiplier']:.2f}x" in block
    assert f"Constraint Activation Rate: {100 * summary['constraint_activation_rate']:.1f}%" in block
    with open(out / "metrics_steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"lr_mult", "trust_radius", "clipped"} <= set(rows[0]) and rows[-1]["lr_mult"] != ""


def test_teacher_never_replaces_a_folder_that_holds_files(tmp_path, corpus_file, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["teacher", "--data", str(corpus_file), "--out", str(out), "--epochs", "1"]) == 2
    assert "holds something hybridopt teacher did not write" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_teacher_cache_key_tells_apart_what_shapes_a_hybrid_teacher(monkeypatch, tmp_path):
    from hybridopt.config import TeacherConfig
    from hybridopt.training.default_teacher import teacher_cache_path

    monkeypatch.setenv("HYBRIDOPT_CACHE", str(tmp_path))
    path = lambda **kw: teacher_cache_path(TeacherConfig(**kw), "f" * 64).name  # noqa: E731
    hybrid = path(hybrid=True, hybrid_base="adam", min_scale=None)
    assert path(hybrid=True, hybrid_base="schedulefree") != hybrid
    assert path(hybrid=True, hybrid_base="adam", min_scale=0.5) != hybrid
    assert path(hybrid=True, hybrid_base="adam", controller=False) != hybrid
    assert path(hybrid=True, hybrid_base="adam", radius_start=0.5) != hybrid
    # The update rule's version names hybrid teachers (one trained by an older rule is not reused), not AdamW ones.
    plain = path()
    monkeypatch.setattr("hybridopt.optim.hybrid.RULE_VERSION", -1)
    assert path(hybrid=True, hybrid_base="adam", min_scale=None) != hybrid and path() == plain
    assert path(hybrid_base="schedulefree", min_scale=0.5) == path()  # AdamW teachers ignore the hybrid's options


def test_teacher_hybrid_names_its_optimizer_as_distill_does(tmp_path, corpus_file, capsys):
    args = ["--data", str(corpus_file), "--vocab_size", "300", "--hidden", "32", "--layers", "1", "--intermediate",
            "64", "--heads", "2", "--seq_len", "32", "--epochs", "1", "--max_steps_per_epoch", "2", "--device", "cpu"]
    assert main(["teacher", *args, "--out", str(tmp_path / "a"), "--hybrid", "--hybrid_base", "schedulefree"]) == 0
    assert ("Optimizer: hybrid over Schedule-Free AdamW (--hybrid_base schedulefree); learned scale on, controller "
            "off, trust region on") in capsys.readouterr().out
    assert main(["teacher", *args, "--out", str(tmp_path / "b"), "--no-hybrid"]) == 0
    assert "Optimizer:" not in capsys.readouterr().out  # AdamW: no line, as distill
    assert main(["teacher", *args, "--out", str(tmp_path / "c")]) == 0  # the default teacher's optimizer
    assert "Optimizer: hybrid over Muon" in capsys.readouterr().out


def test_ctrl_c_while_starting_or_exiting_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    import signal

    import hybridopt.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    def status(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:  # pytest would stop the session instead of failing the test
            pytest.fail("Ctrl-C escaped main(): the user gets a traceback")

    with monkeypatch.context() as m:  # while starting: importing transformers, parsing the flags
        m.setattr(cli, "build_parser", interrupted)
        assert status(["inspect", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "hybridopt: interrupted\n"

    real, restoring = signal.signal, []

    def ctrl_c_lands_while_restoring(sig, handler):  # the command ended; its handlers are being put back
        if not restoring and sig == signal.SIGINT:
            restoring.append(sig)
            real(sig, handler)
            raise KeyboardInterrupt
        return real(sig, handler)

    with monkeypatch.context() as m:
        m.setattr(signal, "signal", ctrl_c_lands_while_restoring)
        assert status(["inspect", str(tmp_path)]) == 130  # inspect refused the empty folder (2), then Ctrl-C
    assert restoring and capsys.readouterr().err.endswith("hybridopt: interrupted\n")


def test_ctrl_c_during_setup_says_whether_and_where_to_resume(tiny_teacher, corpus_file, tmp_path, capsys,
                                                               monkeypatch):
    from hybridopt.recipes.distill import DistillRecipe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:  # before the run folder exists: nothing to resume
        m.setattr(DistillRecipe, "_resolve_run", interrupted)
        assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--no-baseline")) == 130
    assert capsys.readouterr().err == "hybridopt: interrupted; nothing was saved yet\n" and not out.exists()

    with monkeypatch.context() as m:  # the run folder is written, no checkpoint yet
        m.setattr(DistillRecipe, "_build_trainer", interrupted)
        assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--no-baseline")) == 130
    err = capsys.readouterr().err
    assert err == f"hybridopt: interrupted; no checkpoint yet, it starts over, continue with --resume {out}\n"
    assert main(["distill", "--resume", str(out)]) == 0  # what the message says works
    assert (out / "results.json").is_file()
