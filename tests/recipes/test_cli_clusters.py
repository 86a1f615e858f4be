"""`distill --data_clusters --param_clusters` as a user runs it: reports, mixed-precision export, resume."""

import json

import pytest

from conftest import tiny_distill_args, tiny_distill_config
from hybridopt.cli import main
from hybridopt.config import DistillConfig
from hybridopt.export.packed import load_packed, read_packed
from hybridopt.recipes.distill import run_distill


@pytest.fixture(scope="module")
def clustered_run(tiny_teacher, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clusters") / "run"
    code = main(tiny_distill_args(tiny_teacher, corpus_file, out, "--hybrid", "--data_clusters", "4",
                                  "--param_clusters", "3", "--avg_bits", "3", "--ternary", "--qat",
                                  "--no-baseline", "--student_hidden", "64", "--student_intermediate", "128"))
    assert code == 0
    return out


def test_the_issue_command_reports_clusters_and_the_plan(clustered_run, capsys):
    results = json.loads((clustered_run / "results.json").read_text())
    dc = results["data_clusters"]
    assert dc["k"] == 4 and sum(dc["sizes"]) > 0 and dc["sampling"] == "proportional"
    plan = results["precision_plan"]
    assert len(plan["groups"]) == 3 and plan["stored_bits"] <= plan["budget_bits"] + 1e-9
    # A 3-bit budget buys some layers 4 or 8 bits but not all (all-4-bit would cost 4 bits/weight): a mixture.
    assert len(set(plan["layer_bits"].values())) >= 2 and max(plan["layer_bits"].values()) >= 4
    last = results["student"]["history"][-1]
    assert len(last["val_loss_clusters"]) == 4
    assert last["val_loss_worst_cluster"] == max(v for v in last["val_loss_clusters"] if v is not None)

    # The export stores each layer at its planned width, and the plan itself.
    metadata, _ = read_packed(clustered_run / "export")
    quant = json.loads(metadata["quant"])
    assert {k.removesuffix(".weight"): v["bits"] for k, v in quant.items()} == plan["layer_bits"]
    assert json.loads(metadata["precision_plan"])["layer_bits"] == plan["layer_bits"]
    report = json.loads((clustered_run / "export" / "quant_report.json").read_text())
    assert len(report["bits"]) >= 2
    assert results["student"]["loss"] == pytest.approx(report["val_loss_exported"], abs=1e-4)
    load_packed(clustered_run / "export")

    assert main(["inspect", str(clustered_run)]) == 0
    out = capsys.readouterr().out
    assert "Precision plan (measured, 3 parameter clusters, budget 3 bits/weight" in out
    assert f"calibration loss in context {plan['measured_loss']:.4f}, the lowest of" in out
    assert plan["measured_loss"] <= min(plan["fisher_choice_loss"], plan["uniform_loss"])
    packings = {1.58: "ternary5", 2.0: "int2", 4.0: "int4", 8.0: "int8"}
    assert all(packings[b] in out for b in plan["layer_bits"].values())  # each planned width's packing is listed
    assert main(["generate", "--model", str(clustered_run), "--prompt", "The", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")

    # `hybridopt export RUN` packs the run again with its plan, not one width for every layer.
    assert main(["export", "--model", str(clustered_run), "--out", str(clustered_run / "re-export")]) == 0
    quant = json.loads(read_packed(clustered_run / "re-export")[0]["quant"])
    assert {k.removesuffix(".weight"): v["bits"] for k, v in quant.items()} == plan["layer_bits"]


def test_printed_reports(tiny_teacher, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--data_clusters", "3", "--cluster_sampling",
                                  "single", "--param_clusters", "2", "--ternary", "--epochs", "2",
                                  "--no-baseline")) == 0
    stdout = capsys.readouterr().out
    assert "Data clusters: 3 k-means clusters of " in stdout and "sizes min " in stdout
    assert stdout.count("  cluster ") >= 3 + 2  # three data clusters, two parameter clusters
    assert "Cluster sampling: single" in stdout
    assert "worst cluster" in stdout
    # PTQ: the plan is measured after training, then applied; --avg_bits defaults to all ternary.
    assert stdout.index("Precision plan") > stdout.index("Epoch 2")
    assert "Replaced 7 Linear modules with QATLinear (ternary (1.58-bit) weights (precision plan)" in stdout


def _cfg(teacher, data, out, **kw):
    return tiny_distill_config(teacher, data, out, **{**dict(
        epochs=4, max_steps_per_epoch=3, eval_every=1, data_clusters=3, cluster_sampling="balanced",
        param_clusters=2, avg_bits=3.0, ternary=True, qat=True, hybrid=True, plan_after_epochs=2), **kw})


def _strip_time(history):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in history]


@pytest.mark.parametrize("stop", [1, 3])  # the plan is measured after epoch 2
def test_resume_before_and_after_the_plan_matches_an_uninterrupted_run(tiny_teacher, corpus_file, tmp_path, stop):
    straight = run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "straight"))
    assert run_distill(_cfg(tiny_teacher, corpus_file, tmp_path / "resumed"), stop_after_epoch=stop) == {
        "interrupted_at_epoch": stop}
    assert (tmp_path / "resumed" / "precision_plan.json").exists() == (stop >= 2)
    resumed = run_distill(DistillConfig(resume=str(tmp_path / "resumed")))
    for key in ("student", "baseline"):
        assert resumed[key]["loss"] == straight[key]["loss"]
        assert _strip_time(resumed[key]["history"]) == _strip_time(straight[key]["history"])
    assert resumed["precision_plan"]["layer_bits"] == straight["precision_plan"]["layer_bits"]


@pytest.mark.parametrize("flags,message", [
    (["--data_clusters", "100000"], "--data_clusters: 100000 data clusters exceed the"),
    (["--data_clusters", "1"], "--data_clusters must be at least 2"),
    (["--param_clusters", "3"], "--param_clusters needs a quantized run"),
    (["--param_clusters", "50", "--ternary", "--qat"], "--param_clusters 50 exceeds the 7 quantized layers"),
    (["--ternary", "--param_clusters", "--avg_bits", "1"], "--avg_bits 1 is below the run's base width 1.58"),
    (["--cluster_sampling", "single"], "--cluster_sampling needs --data_clusters"),
    (["--ternary", "--param_clusters", "--avg_bits", "nan"], "--avg_bits must be a finite number"),
    # The plan applies the group size after training: the mismatch is found before it starts.
    (["--ternary", "--qat", "--param_clusters", "--group_size", "24"], "--group_size: group size 24 does not divide the input width 32"),
    (["--ternary", "--group_size", "24"], "--group_size: group size 24 does not divide the input width 32"),  # PTQ: before training
    (["--data_clusters", "--seed", str(2**40)], "--seed must lie in [0, 2**32)"),
])
def test_bad_cluster_flags_exit_2_with_one_sentence(tiny_teacher, corpus_file, tmp_path, capsys, flags, message):
    assert main(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bits_are_canonical_before_the_budget_check(tiny_teacher, corpus_file, tmp_path):
    cfg = _cfg(tiny_teacher, corpus_file, tmp_path, ternary=False, bits=1.585, avg_bits=1.58)
    assert cfg.bits == 1.58 and cfg.weight_bits == 1.58
