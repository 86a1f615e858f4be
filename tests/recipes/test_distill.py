"""Training-loop behaviour: resume equivalence, and distillation beating the no-teacher student."""

import csv
import math
import os
import json

import pytest
import torch

from conftest import tiny_distill_config

from hybridopt.config import DistillConfig
from hybridopt.errors import UserError
from hybridopt.recipes.distill import run_distill


def _cfg(teacher, data, out, **kw):
    return tiny_distill_config(teacher, data, out, **{**dict(epochs=4, max_steps_per_epoch=4, eval_every=2,
                                                             save_metrics=True), **kw})


def _steps(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def _strip_time(history):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


def test_resumed_run_matches_uninterrupted_run(tiny_teacher, corpus_file, tmp_path):
    straight = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "straight"))
    interrupted = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "resumed"), stop_after_epoch=2)
    assert interrupted == {"interrupted_at_epoch": 2}
    assert not (tmp_path / "resumed" / "student").exists()
    resumed = run_distill(DistillConfig(resume=str(tmp_path / "resumed")))

    for key in ("student", "baseline"):
        assert resumed[key]["loss"] == straight[key]["loss"]
        assert _strip_time(resumed[key]["history"]) == _strip_time(straight[key]["history"])
    assert _steps(tmp_path / "resumed" / "metrics_steps.csv") == _steps(tmp_path / "straight" / "metrics_steps.csv")
    assert len(_steps(tmp_path / "resumed" / "metrics_steps.csv")) == 16


def test_resume_mid_epoch_drops_unsaved_rows(tiny_teacher, corpus_file, tmp_path):
    """Rows logged after the last checkpoint (a crash mid-epoch) are replaced, not duplicated."""
    out = tmp_path / "run"
    run_distill(_cfg(tiny_teacher, corpus_file, out, baseline=False), stop_after_epoch=1)
    with open(out / "metrics_steps.csv", "a") as f:  # a step that ran but was never checkpointed
        f.write("5,2,9.9,9.9,0,0.001,1.0,1280,1.0\n")
    run_distill(DistillConfig(resume=str(out)))
    steps = _steps(out / "metrics_steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 17))
    assert "9.9" not in {r["loss"] for r in steps}


def test_distillation_beats_the_no_teacher_student(tiny_teacher, corpus_file, tmp_path):
    """Same student, seed, data and steps: the teacher's soft targets lower validation loss."""
    res = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "kd", student_hidden=64, student_intermediate=128,
                           epochs=4, max_steps_per_epoch=10, eval_every=4, save_metrics=False, lr=5e-3,
                           alpha=0.5, temperature=1.0))
    assert res["student"]["steps"] == res["baseline"]["steps"] == 40
    assert res["student"]["loss"] < res["baseline"]["loss"] - 0.1, (res["student"]["loss"], res["baseline"]["loss"])
    assert res["teacher"]["loss"] < res["student"]["loss"]
    saved = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert saved["student"]["loss"] == res["student"]["loss"]


def test_non_finite_batches_are_skipped_not_applied(tiny_teacher, corpus_file, tmp_path, monkeypatch):
    """A NaN loss (e.g. from a corrupted batch) is skipped and reported; the weights stay finite."""
    from hybridopt.training import objectives

    calls = {"n": 0}
    real = objectives.kd_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] in (3, 7) else (loss, parts)

    monkeypatch.setattr(objectives, "kd_loss", flaky)
    res = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "nan", epochs=2, baseline=False))
    assert res["student"]["skipped_steps"] == 2 and res["student"]["steps"] == 8
    assert math.isfinite(res["student"]["loss"])  # neither NaN nor inf


def test_resume_refuses_changed_data(tiny_teacher, corpus_file, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(corpus_file.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    run_distill(_cfg(tiny_teacher, data, out, baseline=False, save_metrics=False), stop_after_epoch=1)
    first, rest = corpus_file.read_text(encoding="utf-8").split("\n", 1)
    data.write_text(json.dumps({"text": json.loads(first)["text"].upper()}) + "\n" + rest, encoding="utf-8")
    with pytest.raises(UserError, match="tokens differ from this run's"):
        run_distill(DistillConfig(resume=str(out)))
    assert (out / "checkpoint.pt").exists()  # nothing already written is lost


def test_resume_refuses_an_optimizer_state_it_cannot_read(tiny_teacher, corpus_file, tmp_path):
    """A hybrid checkpoint from before the optimizer's state format changed: one sentence, nothing lost."""
    import torch

    out = tmp_path / "run"
    run_distill(_cfg(tiny_teacher, corpus_file, out, baseline=False, save_metrics=False, hybrid=True),
                stop_after_epoch=1)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["optimizer"].pop("hybrid")
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(UserError, match="its optimizer state does not fit this optimizer"):
        run_distill(DistillConfig(resume=str(out)))
    assert (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(tiny_teacher, corpus_file, tmp_path, sig):
    """What schedulers and containers send (SIGTERM) and Ctrl-C (SIGINT): training stops after the step it
    interrupted, saves there, exits 128 + signal; --resume then ends exactly where an unbroken run ends."""
    import signal
    import subprocess
    import sys
    import threading

    kw = dict(epochs=20, max_steps_per_epoch=6, eval_every=20, baseline=False)
    straight = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "straight", **kw))
    out = tmp_path / "stopped"
    args = [sys.executable, "-u", "-m", "hybridopt", "distill", "--teacher", str(tiny_teacher), "--data",
            str(corpus_file), "--out", str(out), "--student_hidden", "32", "--student_layers", "1",
            "--student_intermediate", "64", "--student_heads", "2", "--seq_len", "32", "--batch_size", "8",
            "--epochs", "20", "--max_steps_per_epoch", "6", "--eval_every", "20", "--device", "cpu",
            "--save_metrics", "--no-baseline"]
    # the same intra-op threads as the in-process run: a float32 reduction over 1 or 2 threads rounds differently
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(300, proc.kill)  # a child that hangs before "Epoch 2" would block the reads forever
    watchdog.start()
    try:
        for line in proc.stdout:  # wait until training runs
            if line.startswith("Epoch 2,"):
                proc.send_signal(getattr(signal, sig))
                break
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:  # communicate timed out
            proc.kill()
            proc.wait(10)
    assert proc.returncode != -signal.SIGKILL, f"killed after 300 s, before it stopped: {err}"
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert f"a checkpoint was saved, continue with --resume {out}" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] < 120  # stopped before the end
    resumed = run_distill(DistillConfig(resume=str(out)))
    assert resumed["student"]["loss"] == straight["student"]["loss"]
    assert _strip_time(resumed["student"]["history"]) == _strip_time(straight["student"]["history"])
    assert [int(r["step"]) for r in _steps(out / "metrics_steps.csv")] == list(range(1, 121))


def test_resume_with_out_resumes_that_folder_and_refuses_changed_flags(tiny_teacher, corpus_file, tmp_path, capsys):
    """`--out DIR --resume` resumes DIR; a flag given with another value than the run's is refused by name (even
    at its default value, which --epochs 20 is), --device is honoured with a warning, and the run finishes with
    its own settings."""
    from hybridopt.cli import main

    out = tmp_path / "run"
    run_distill(_cfg(tiny_teacher, corpus_file, out, baseline=False, save_metrics=False), stop_after_epoch=1)
    capsys.readouterr()
    with pytest.raises(UserError) as e:
        run_distill(DistillConfig(out=str(out), resume="latest", epochs=8, lr=0.5))  # as `--out DIR --resume`
    assert str(e.value) == (f"cannot resume '{out}' with --epochs 8, --lr 0.5: the run was started with --epochs 4, "
                            "--lr 0.002, and its schedule, data and model follow from its settings; resume without "
                            "them, or start a new run with another --out")
    assert main(["distill", "--resume", str(out), "--epochs", "20", "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert err == (f"hybridopt: error: cannot resume '{out}' with --epochs 20: the run was started with --epochs 4, "
                   "and its schedule, data and model follow from its settings; resume without them, or start a new "
                   "run with another --out\n")  # --no-baseline is what the run has: not named
    with pytest.raises(UserError, match="name different folders"):
        run_distill(DistillConfig(out=str(tmp_path / "other"), resume=str(out)))
    assert main(["distill", "--out", str(out), "--resume", "--device", "auto", "--epochs", "4"]) == 0
    assert f"warning: resuming '{out}' with --device auto (it ran with --device cpu)" in capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["student"]["steps"] == 16  # the saved 4 epochs x 4 steps


def test_resume_refuses_a_finished_run_and_leaves_its_results(tiny_teacher, corpus_file, tmp_path):
    out = tmp_path / "done"
    run_distill(_cfg(tiny_teacher, corpus_file, out, baseline=False, save_metrics=False, epochs=1))
    before = (out / "results.json").read_text()
    with pytest.raises(UserError, match="is a finished run"):
        run_distill(DistillConfig(resume=str(out)))
    assert (out / "results.json").read_text() == before


def test_teacher_dtype_bfloat16_halves_the_teacher_and_keeps_its_targets(tiny_teacher, corpus_file, tmp_path):
    """--teacher_dtype bfloat16: the teacher's weights take half the bytes, its validation loss stays within
    bfloat16's rounding of float32's, and the student trained on its logits ends close to the float32 run."""
    from hybridopt.models.modeling import load_teacher

    f32, _ = load_teacher(tiny_teacher, torch.device("cpu"))
    bf16, _ = load_teacher(tiny_teacher, torch.device("cpu"), torch.bfloat16)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and size(bf16) * 2 == size(f32)
    kw = dict(epochs=1, max_steps_per_epoch=3, eval_every=3, baseline=False)
    full = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "f32", **kw))
    half = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "bf16", teacher_dtype="bfloat16", **kw))
    assert half["teacher"]["loss"] != full["teacher"]["loss"]  # it did run in bfloat16
    assert half["teacher"]["loss"] == pytest.approx(full["teacher"]["loss"], rel=0.01)
    assert half["student"]["loss"] == pytest.approx(full["student"]["loss"], rel=0.01)
    assert json.loads((tmp_path / "bf16" / "run_config.json").read_text())["teacher_dtype"] == "bfloat16"


def _hybrid_run_resumes_exactly(teacher, data, tmp_path, base: str) -> dict:
    """A --hybrid run over `base`, straight and stopped after epoch 2 then resumed: the same student loss and
    history. Returns the straight run's results (its folder: tmp_path / "straight")."""
    kw = dict(hybrid=True, hybrid_base=base, baseline=False, warmup_steps=2)
    straight = run_distill(_cfg(teacher, data, tmp_path / "straight", **kw))
    assert run_distill(_cfg(teacher, data, tmp_path / "resumed", **kw), stop_after_epoch=2) == \
        {"interrupted_at_epoch": 2}
    resumed = run_distill(DistillConfig(resume=str(tmp_path / "resumed")))
    assert resumed["student"]["loss"] == straight["student"]["loss"]
    assert _strip_time(resumed["student"]["history"]) == _strip_time(straight["student"]["history"])
    return straight


def test_schedulefree_hybrid_resumes_exactly_and_saves_the_average(tiny_teacher, corpus_file, tmp_path):
    """--hybrid_base schedulefree: validation and the saved student are at Schedule-Free's average x, the
    checkpoint at the training point y (so --resume reproduces the uninterrupted run), the rate constant
    after warmup."""
    from transformers import AutoModelForCausalLM

    from hybridopt.data.splits import corpus_documents, token_splits
    from hybridopt.training.evaluation import evaluate_lm
    from hybridopt.models.modeling import load_teacher

    straight = _hybrid_run_resumes_exactly(tiny_teacher, corpus_file, tmp_path, "schedulefree")

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "student")
    _, tokenizer = load_teacher(tiny_teacher, torch.device("cpu"))
    cfg = _cfg(tiny_teacher, corpus_file, tmp_path / "x")
    _, val = token_splits(corpus_documents([str(corpus_file)])[0], tokenizer, cfg.seq_len, cfg.val_fraction)
    assert evaluate_lm(student, val, 8, torch.device("cpu"))["loss"] == pytest.approx(straight["student"]["loss"],
                                                                                       rel=1e-6)
    y = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    moved = [name for name, p in student.state_dict().items() if not torch.equal(p, y[name])]
    assert moved  # the saved student is not the training point
    rates = {round(row["lr"] / row["lr_mult"], 12) for row in straight["student"]["history"][1:]}
    assert rates == {2e-3}  # --lr after warmup, no cosine decay


def test_muon_hybrid_orthogonalises_the_hidden_matrices_only_and_resumes_exactly(tiny_teacher, corpus_file, tmp_path):
    """--hybrid_base muon: Muon's step on the hidden matrices (one momentum buffer each), Adam's on the
    embeddings, head and norms (two moments); the checkpoint carries both and --resume reproduces the run."""
    straight = _hybrid_run_resumes_exactly(tiny_teacher, corpus_file, tmp_path, "muon")
    history = straight["student"]["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.2  # it learns (training loss)

    from transformers import AutoModelForCausalLM

    from hybridopt.models.modeling import param_groups

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "student")
    name_of = {id(p): n for n, p in student.named_parameters()}
    names = [name_of[id(p)] for g in param_groups(student, 0.0, muon=True) for p in g["params"]]  # the state's order
    ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["orthogonalize"] for g in groups] == [True, False, False]
    state = ckpt["optimizer"]["state"]
    hidden = [names[i] for i in groups[0]["params"]]
    assert hidden and all(".layers." in n and n.endswith(".weight") and "norm" not in n for n in hidden)
    assert all("exp_avg_sq" not in state[i] for i in groups[0]["params"])
    rest = [i for g in groups[1:] for i in g["params"]]
    assert {names[i] for i in rest} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert all("exp_avg_sq" in state[i] for i in rest)
