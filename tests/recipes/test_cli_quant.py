"""`distill --qat/--ternary`, `inspect` and `generate` as a user runs them."""

import json
import re

import pytest

from conftest import tiny_distill_args
from hybridopt.cli import main


@pytest.fixture(scope="module")
def ternary_qat_run(tiny_teacher, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("tqat") / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--ternary", "--qat", "--no-baseline",
                                  "--student_hidden", "64", "--student_intermediate", "128")) == 0
    return out


def test_ternary_qat_exports_and_reports(ternary_qat_run, capsys):
    report = json.loads((ternary_qat_run / "export" / "quant_report.json").read_text())
    assert report["mode"] == "QAT" and report["bits"] == [1.58] and report["quantized_layers"] == 7
    # 64x64 and 128x64 matrices: 5 trits per byte plus a float16 scale per row.
    assert 1.6 < report["linear_bits_per_weight"] < 1.6 + 16 / 64 + 0.01
    assert report["linear_compression"] == pytest.approx(32 / report["linear_bits_per_weight"])
    assert report["file_packed_bytes"] < report["file_fp32_bytes"]
    results = json.loads((ternary_qat_run / "results.json").read_text())
    # The student row of the report is the quantized model; the export reproduces it.
    assert results["student"]["loss"] == pytest.approx(report["val_loss_exported"], abs=1e-4)

    assert main(["inspect", str(ternary_qat_run)]) == 0
    out = capsys.readouterr().out
    assert "ternary5" in out and "bits/weight" in out and "model.layers.0.mlp.down_proj.weight" in out


def test_generate_from_the_packed_export(ternary_qat_run, capsys):
    assert main(["generate", "--model", str(ternary_qat_run), "--prompt", "The", "--max_new_tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "packed export" in captured.err
    sampled = captured.out
    assert sampled.startswith("The"), sampled
    assert main(["generate", "--model", str(ternary_qat_run), "--prompt", "The", "--max_new_tokens", "8"]) == 0
    again = capsys.readouterr().out
    assert again == sampled, (again, sampled)  # sampling is seeded: the same seed, the same text
    greedy = ["generate", "--model", str(ternary_qat_run), "--prompt", "The", "--max_new_tokens", "8",
              "--temperature", "0"]
    assert main(greedy) == 0
    first = capsys.readouterr().out
    assert main(greedy) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic


@pytest.mark.parametrize("flags,mode,bits", [(["--ternary"], "PTQ", 1.58), (["--qat"], "QAT", 1.0),
                                             (["--bits", "4", "--group_size", "32"], "PTQ", 4.0)])
def test_flag_semantics(tiny_teacher, corpus_file, tmp_path, capsys, flags, mode, bits):
    out = tmp_path / "run"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, out, "--epochs", "1", "--no-baseline", *flags)) == 0
    stdout = capsys.readouterr().out
    when = "quantization-aware training" if mode == "QAT" else "post-training quantization"
    assert re.search(rf"^Replaced 7 Linear modules with QATLinear \(.*; {when}\)$", stdout, re.M)
    assert stdout.count("Replaced ") == 1
    report = json.loads((out / "export" / "quant_report.json").read_text())
    assert report["mode"] == mode and report["bits"] == [bits]


def test_inspect_without_export(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds no packed export" in capsys.readouterr().err


def test_export_command_packs_a_full_precision_run(tiny_teacher, corpus_file, tmp_path, capsys, monkeypatch):
    run = tmp_path / "fp"
    assert main(tiny_distill_args(tiny_teacher, corpus_file, run, "--epochs", "1", "--no-baseline")) == 0
    assert not (run / "export").exists()
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--bits", "2"]) == 0
    out = capsys.readouterr().out
    assert "Packed 7 Linear modules (2-bit weights" in out and "bits/weight" in out
    report = json.loads((run / "export" / "quant_report.json").read_text())
    assert report["bits"] == [2.0] and "val_loss_exported" not in report
    assert main(["generate", "--model", str(run / "export"), "--prompt", "for", "--max_new_tokens", "4"]) == 0
    assert main(["export", "--model", str(tmp_path / "nothing")]) == 2
    assert "holds no Hugging Face model" in capsys.readouterr().err

    # A folder of the user's is never written into; the run's own export folder may be packed again.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert main(["export", "--model", str(run), "--out", str(mine)]) == 2
    assert "holds something hybridopt export did not write" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["config.json"] and (mine / "config.json").read_text() == "{}"
    assert main(["export", "--model", str(run), "--bits", "4"]) == 0

    # `--model .` inside a Hugging Face folder packs it beside that folder.
    monkeypatch.chdir(run / "student")
    assert main(["export", "--model", "."]) == 0
    assert (run / "student-packed" / "model.packed.safetensors").is_file()
