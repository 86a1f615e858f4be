"""Hostile files and bad input, one table: each case gets its own one-sentence `UserError` (exit status 2 on
the command line), nothing is allocated for a forged size, and nothing a user owns is replaced.

docs/RELIABILITY.md lists the same cases with the message each gets."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hybridopt.cli import main
from hybridopt.errors import UserError
from hybridopt.export.packed import PACKED_NAME, _digest, export_packed, load_packed
from hybridopt.training.layout import MARKER, OutputRefused, check_output, claim_output, made_by
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.quant.quantizers import TERNARY
from hybridopt.models.tokenizer import train_bpe_tokenizer

Q = "model.layers.0.self_attn.q_proj.weight"


def tiny_qat_model(vocab: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16))
    quantize_(model, QATConfig(bits=TERNARY))
    return model.eval()


def rewrite(path, edit, rehash: bool = True) -> None:
    """Call `edit(metadata, config, quant, tensors)` on a packed file (config and quant parsed; written back
    unless the edit replaced their entry) and save it, with a checksum recomputed as a forger would."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    original = dict(meta)
    config, quant = json.loads(meta["config"]), json.loads(meta["quant"])
    edit(meta, config, quant, tensors)
    for key, value in (("config", config), ("quant", quant)):
        if key in meta and meta[key] == original[key]:
            meta[key] = json.dumps(value)
    if rehash:
        meta["sha256"] = _digest(tensors, meta if meta.get("format_version") == "2" else None)
    save_file(tensors, str(path), metadata=meta)


def header(edit):
    return lambda path: rewrite(path, lambda m, c, q, t: edit(m, c, q))


def config(**fields):
    return header(lambda m, c, q: c.update(fields))


def entry(**fields):
    return header(lambda m, c, q: q[Q].update(fields))


def tensors(edit):
    return lambda path: rewrite(path, lambda m, c, q, t: edit(t))


def raw(edit):
    """Edit the file's bytes."""
    return lambda path: path.write_bytes(edit(path.read_bytes()))


def flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[-10] ^= 0xFF
    return bytes(out)


def edited_in_place(old: bytes, new: bytes):
    """Change a header value without touching the checksum (the same length keeps the file's layout)."""
    assert len(old) == len(new)

    def edit(data):
        assert old in data
        return data.replace(old, new, 1)
    return raw(edit)


def drop_mlp(m, c, q, t):
    """Remove every MLP weight and claim a 2**24-wide MLP: `from_config` would allocate 6.4 GB
    (2 layers x 3 matrices x 16 x 2**24 float32)."""
    c["intermediate_size"] = 2**24
    for key in [k for k in q if ".mlp." in k]:
        del q[key]
    for key in [k for k in t if ".mlp." in k]:
        del t[key]


HOSTILE = [
    # What the safetensors container itself refuses.
    ("truncated", raw(lambda d: d[: len(d) // 2]), "truncated or corrupted"),
    ("not safetensors", raw(lambda d: b"not a safetensors file at all"), "truncated or corrupted"),
    ("huge header length", raw(lambda d: struct.pack("<Q", 2**62) + d[8:]), "truncated or corrupted"),
    ("header not JSON", raw(lambda d: d[:8] + b"{" * 40 + d[48:]), "truncated or corrupted"),
    # The checksum: over the tensors and (format 2) the header.
    ("flipped data byte", raw(flip), "checksum does not match"),
    ("rope_theta edited", edited_in_place(b'"rope_theta\\": 10000.0', b'"rope_theta\\": 90000.0'),
     "checksum does not match"),
    ("rms_norm_eps edited", edited_in_place(b'"rms_norm_eps\\": 1e-06', b'"rms_norm_eps\\": 1e-01'),
     "checksum does not match"),
    # The header, forged with a matching checksum: each field against its schema, before any allocation.
    ("future format_version", header(lambda m, c, q: m.update(format_version="3")),
     "has format version 3; this hybridopt reads 1, 2; it was written by a newer hybridopt: upgrade this one"),
    ("unknown format_version", header(lambda m, c, q: m.update(format_version="x")), "has format version x; this hybridopt reads 1, 2$"),
    ("another format", header(lambda m, c, q: m.update(format="other")), "is not a hybridopt packed model"),
    ("no config", header(lambda m, c, q: m.pop("config")), "lacks a readable 'config' or 'quant' entry"),
    ("quant not JSON", header(lambda m, c, q: m.update(quant="{not json")), "lacks a readable 'config' or 'quant'"),
    ("config a list", header(lambda m, c, q: m.update(config="[]")), "'config' and 'quant' must be JSON objects"),
    ("no model_type", header(lambda m, c, q: c.pop("model_type")), "model_type None; only 'llama' is read"),
    ("model_type with auto_map", config(model_type="custom", auto_map={"AutoModelForCausalLM": "evil/repo--m.M"}),
     "model_type 'custom'; only 'llama' is read"),
    ("vocab_size 2**31", config(vocab_size=2**31), r"vocab_size must be an integer in \[1, 16777216\], got 2147483648"),
    ("vocab_size that fits in memory", config(vocab_size=100_000),
     "tensor 'model.embed_tokens.weight' does not match the config"),
    ("hidden_size a string", config(hidden_size="16"), "hidden_size must be an integer in"),
    ("num_hidden_layers 2**24", config(num_hidden_layers=2**24), "num_hidden_layers is 16777216, but the file holds 2"),
    ("intermediate_size 2**24, MLP dropped", lambda p: rewrite(p, drop_mlp), "'model.layers.0.mlp.gate_proj.weight' is missing"),
    ("rms_norm_eps NaN", config(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number, got nan"),
    ("rope_theta negative", config(rope_theta=-1.0), "rope_theta must be a positive number"),
    ("unknown rope_type", header(lambda m, c, q: c["rope_parameters"].update(rope_type="evil")),
     "rope_parameters is not a rope setting Llama knows"),
    ("hidden_act unknown", config(hidden_act="os.system"), "hidden_act names no activation function"),
    ("tie_word_embeddings a string", config(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    ("eos_token_id negative", config(eos_token_id=-5), "eos_token_id must be a token id"),
    ("heads do not divide hidden", config(num_attention_heads=3, head_dim=None), "attention heads do not divide"),
    ("quant shape a string", entry(shape="16x16"), f"entry '{Q}' is malformed or does not match the config"),
    ("quant shape another size", entry(shape=[16, 8]), "is malformed or does not match the config"),
    ("quant entry not an object", header(lambda m, c, q: q.update({Q: "ternary"})), "is malformed"),
    ("quant bits 3", entry(bits=3), "has bit width 3"),
    ("quant bits against packing", entry(bits=4), "has bit width 4 but packing 'ternary5'"),
    ("quant group size", entry(group_size=5), "has group size 5, which does not divide its 16 columns"),
    ("quant act_bits", entry(act_bits=4), r"has activation bits 4 \(8 or none\)"),
    ("quant entry for no weight", header(lambda m, c, q: q.update({"evil.weight": q[Q]})), "names no weight"),
    ("packed tensor short", tensors(lambda t: t.update({f"{Q}.packed": t[f"{Q}.packed"][:-1].clone()})),
     "packed tensor of the wrong type or length"),
    ("packed tensor float", tensors(lambda t: t.update({f"{Q}.packed": t[f"{Q}.packed"].float()})),
     "packed tensor of the wrong type or length"),
    ("scale shape", tensors(lambda t: t.update({f"{Q}.scale": torch.ones(3, 1, dtype=torch.float16)})),
     "scale tensor of the wrong type or shape"),
    ("packed tensor missing", tensors(lambda t: t.pop(f"{Q}.scale")), "lacks its .packed or .scale tensor"),
    ("dense tensor missing", tensors(lambda t: t.pop("model.norm.weight")), "'model.norm.weight' is missing"),
    ("dense tensor of ints", tensors(lambda t: t.update({"model.norm.weight": torch.ones(16, dtype=torch.int64)})),
     "'model.norm.weight' does not match the config"),
    ("extra tensor", tensors(lambda t: t.update({"evil": torch.ones(1)})), "tensor 'evil' does not match the config"),
]


@pytest.mark.parametrize("damage,message", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_packed_files_are_refused_in_one_sentence(tmp_path, monkeypatch, damage, message):
    export_packed(tiny_qat_model(), tmp_path)
    damage(tmp_path / PACKED_NAME)
    init = LlamaForCausalLM.__init__

    def shapes_only(self, *args, **kwargs):  # refused before anything is allocated: a real model fails the test
        assert torch.get_default_device().type == "meta", "a model was allocated from a refused file"
        init(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", shapes_only)
    with pytest.raises(UserError, match=message) as e:
        load_packed(tmp_path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"'{tmp_path}")


@pytest.mark.parametrize("metadata", [None, {"format": "hybridopt-packed", "format_version": "3"}], ids=["foreign", "newer"])
def test_a_foreign_or_newer_file_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch, metadata):
    """A model of someone else's (safetensors, no packed header) is refused from its header alone, not read."""
    save_file({"model.embed_tokens.weight": torch.zeros(64, 16)}, tmp_path / PACKED_NAME, metadata=metadata)
    reads = []
    monkeypatch.setattr("safetensors.safe_open.get_tensor", lambda self, k: reads.append(k), raising=False)
    with pytest.raises(UserError, match="is not a hybridopt packed model|has format version 3") as e:
        load_packed(tmp_path)
    assert reads == [] and "\n" not in str(e.value)


def test_the_table_reaches_the_loader_unharmed_without_damage(tmp_path):
    """The untouched file loads (the table's refusals come from the damage, not the helper)."""
    export_packed(tiny_qat_model(), tmp_path)
    rewrite(tmp_path / PACKED_NAME, lambda m, c, q, t: None)
    assert type(load_packed(tmp_path)) is LlamaForCausalLM


def test_fields_that_could_name_code_are_dropped(tmp_path):
    """`auto_map` and `attn_implementation` (which can name a kernel on the Hub) never reach transformers."""
    model = tiny_qat_model()
    export_packed(model, tmp_path, dtype=torch.float32)
    config(auto_map={"AutoModelForCausalLM": "evil/repo--m.M"}, attn_implementation="kernels-community/evil",
           _attn_implementation="kernels-community/evil")(tmp_path / PACKED_NAME)
    loaded = load_packed(tmp_path)
    assert type(loaded) is LlamaForCausalLM and "evil" not in str(loaded.config._attn_implementation)
    assert not hasattr(loaded.config, "auto_map")
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_a_pickle_payload_in_a_checkpoint_never_runs(tmp_path):
    from hybridopt.training.checkpoint import CHECKPOINT_NAME, load_checkpoint

    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(witness), "w"))

    torch.save({"model": Payload()}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(UserError, match="is unreadable"):
        load_checkpoint(tmp_path)
    assert not witness.exists()


# ----------------------------------------------------------------------------------------- the command line
def _user_folder(path, files=("config.json", "tokenizer.json", "notes.txt")):
    path.mkdir()
    for name in files:
        (path / name).write_text(f"the user's own {name}")
    return path


def _foreign_gguf(path):
    """A valid GGUF file another tool wrote (no `general.quantized_by` = "hybridopt")."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("theirs")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _refused(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridopt: error: ") and err.count("\n") == 1 and message in err, err
    return err


def test_teacher_and_export_never_write_into_a_folder_of_yours(tmp_path, hf_model, corpus_file, tiny_teacher, capsys):
    mine = _user_folder(tmp_path / "mine")
    before, teacher_before = _snapshot(mine), _snapshot(tiny_teacher)
    # A finished teacher is not replaced either, though hybridopt made it.
    _refused(["teacher", "--data", str(corpus_file), "--out", str(tiny_teacher), "--epochs", "1"], capsys,
             f"'{tiny_teacher}' holds a trained teacher; choose another")
    assert made_by(tiny_teacher) == "teacher" and _snapshot(tiny_teacher) == teacher_before
    _refused(["teacher", "--data", str(corpus_file), "--out", str(mine), "--epochs", "1"], capsys,
             f"--out: '{mine}' exists and holds something hybridopt teacher did not write")
    _refused(["export", "--model", str(hf_model), "--out", str(mine)], capsys,
             f"--out: '{mine}' exists and holds something hybridopt export did not write")
    # The teacher works in `<out>.partial`: a folder of yours by that name is not taken over either.
    partial = _user_folder(tmp_path / "t.partial", ("notes.txt",))
    _refused(["teacher", "--data", str(corpus_file), "--out", str(tmp_path / "t"), "--epochs", "1"], capsys,
             f"'{partial}' exists and holds something hybridopt teacher did not write")
    (tmp_path / "notes.gguf").write_text("a file of yours")
    theirs = _foreign_gguf(tmp_path / "theirs.gguf")
    theirs_bytes = theirs.read_bytes()
    for gguf_file in (tmp_path / "notes.gguf", theirs):  # any file, and a GGUF model another tool wrote
        _refused(["export", "--model", str(hf_model), "--format", "gguf", "--out", str(gguf_file)], capsys,
                 "is not a GGUF file hybridopt wrote")
    assert _snapshot(mine) == before and [p.name for p in partial.iterdir()] == ["notes.txt"]
    assert (tmp_path / "notes.gguf").read_text() == "a file of yours" and theirs.read_bytes() == theirs_bytes
    assert not (tmp_path / "t").exists()
    # A GGUF file hybridopt wrote is replaced: the same export run twice.
    ours = tmp_path / "ours.gguf"
    for _ in range(2):
        assert main(["export", "--model", str(hf_model), "--format", "gguf", "--type", "f16", "--out", str(ours)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("command", [
    ["teacher", "--epochs", "1"], ["export", "--model", "HF"], ["distill", "--epochs", "1"], ["bench", "--quick"]])
@pytest.mark.parametrize("odd", [".", "..", "/", "FILE", "MINE"])
def test_odd_output_paths_are_refused(tmp_path, monkeypatch, hf_model, command, odd, capsys):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # "." is refused for its name (the message says so), before its contents count
    (work / "FILE").write_text("yours")
    _user_folder(work / "MINE", ("notes.txt",))
    argv = [str(hf_model) if a == "HF" else a for a in command] + ["--out", odd]
    message = {"FILE": "--out: 'FILE' is a file; choose a folder",
               "MINE": f"--out: 'MINE' exists and holds something hybridopt {command[0]} did not write"}.get(
                   odd, f"--out: '{odd}' is not a name for a new folder")
    _refused(argv, capsys, message)
    assert sorted(p.name for p in work.iterdir()) == ["FILE", "MINE"] and (work / "FILE").read_text() == "yours"
    assert [p.name for p in (work / "MINE").iterdir()] == ["notes.txt"]


def test_export_writes_again_only_into_its_own_folder(tmp_path, hf_model, capsys):
    out = tmp_path / "packed"
    assert main(["export", "--model", str(hf_model), "--out", str(out)]) == 0
    assert made_by(out) == "export" and json.loads((out / MARKER).read_text())["tool"] == "hybridopt"
    assert main(["export", "--model", str(hf_model), "--out", str(out), "--bits", "4"]) == 0  # ours: packed again
    assert type(load_packed(out)) is LlamaForCausalLM
    assert json.loads((out / "quant_report.json").read_text())["bits"] == [4.0]
    (out / MARKER).unlink()  # an export from before the marker: its packed file says it is ours
    assert main(["export", "--model", str(hf_model), "--out", str(out)]) == 0
    # A run from before the marker whose export/ holds only a GGUF file: the run's own export/ is ours.
    import shutil

    from hybridopt.config import DistillConfig

    run = tmp_path / "run"
    shutil.copytree(hf_model, run / "student")
    (run / "run_config.json").write_text(json.dumps({"ternary": True}))
    assert DistillConfig.from_file(run / "run_config.json").ternary
    (run / "export").mkdir()
    (run / "export" / "model-tq2_0.gguf").write_bytes(b"GGUF")
    assert main(["export", "--model", str(run)]) == 0
    assert (run / "export" / PACKED_NAME).is_file() and made_by(run / "export") == "export"
    capsys.readouterr()


def test_the_marker_rules(tmp_path):
    fresh = tmp_path / "a" / "b"
    assert check_output(fresh, "export") == fresh and not fresh.exists()  # checking creates nothing
    claim_output(fresh, "export")
    assert made_by(fresh) == "export"
    (fresh / "model.bin").write_text("x")
    assert check_output(fresh, "export") == fresh
    with pytest.raises(OutputRefused, match="hybridopt teacher did not write"):
        check_output(fresh, "teacher")  # another command's folder
    (fresh / MARKER).write_text("{not json")  # a damaged marker makes nothing ours
    with pytest.raises(OutputRefused):
        check_output(fresh, "export")
    assert check_output(fresh, "export", legacy=("model.bin",)) == fresh  # an older version's folder


def test_packed_file_refusals_on_the_command_line(tmp_path, capsys):
    """generate and inspect: exit 2, one line, and a foreign model type never reaches transformers' remote-code
    prompt (which would block on stdin)."""
    texts = [f"line {i} of a small text about packing and tokens" for i in range(50)]
    export_packed(tiny_qat_model(vocab=300), tmp_path, train_bpe_tokenizer(texts, 300))
    config(model_type="custom", auto_map={"AutoModelForCausalLM": "evil/repo--m.M"})(tmp_path / PACKED_NAME)
    for argv in (["generate", "--model", str(tmp_path), "--max_new_tokens", "2"], ["inspect", str(tmp_path)]):
        _refused(argv, capsys, "is not a valid packed model: model_type 'custom'; only 'llama' is read")


# ------------------------------------------------------------------------------------------------- caches
def test_a_damaged_corpus_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, capsys):
    from hybridopt.data.corpus import Document
    from hybridopt.data.splits import embedded_corpus_cached

    monkeypatch.setenv("HYBRIDOPT_CACHE", str(tmp_path))
    docs = [Document(f"d{i}", f"document {i}") for i in range(3)]
    monkeypatch.setattr("hybridopt.data.splits.embedded_corpus", lambda: docs)  # reading the stdlib takes 10 s a time
    assert embedded_corpus_cached() == docs
    (path,) = (tmp_path / "corpus").glob("*.jsonl")
    for damage in ("{not json\n", '{"id": "a"}\n', "", '{"id": "a", "text": "b", "extra": 1}\n'):
        path.write_text(damage)
        assert embedded_corpus_cached() == docs
        assert "ignoring the damaged corpus cache" in capsys.readouterr().err
        assert embedded_corpus_cached() == docs and capsys.readouterr().err == ""  # rewritten, read silently


def test_metrics_out_never_appends_to_a_file_of_yours(tmp_path, tiny_teacher, corpus_file, capsys):
    from conftest import tiny_distill_args

    for name in ("log.csv", "log_steps.csv", "log.jsonl", "log_baseline.jsonl"):  # each file a run would append to
        mine = tmp_path / name
        mine.write_text("the user's own rows\n")
        _refused(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "run", "--metrics_out", str(tmp_path / "log.csv")),
                 capsys, f"--metrics_out: '{mine}' exists; choose a new path (nothing is replaced)")
        assert mine.read_text() == "the user's own rows\n" and not (tmp_path / "run").exists()
        mine.unlink()


def test_a_bad_metrics_out_is_refused_before_the_run_folder_is_made(tmp_path, tiny_teacher, corpus_file, monkeypatch,
                                                                     capsys):
    """A --metrics_out the run could not write failed when the metrics opened, after the run folder was made: a rerun
    with the path corrected was refused (`already holds a run`), and so was `--resume` with it (`started with
    --metrics_out ...`). A .jsonl path got the CSV and the JSONL rows mixed in one file."""
    import os
    from pathlib import Path

    from conftest import tiny_distill_args

    (tmp_path / "afile").write_text("the user's own file")
    (tmp_path / "logs").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: the folder is made unwritable as the permission check sees it
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: Path(p) != locked and access(p, mode, *a, **k))
    run = tmp_path / "run"
    for path, message in [
        (tmp_path / "afile" / "m.csv", f"'{tmp_path / 'afile'}' is a file, so no folder can hold "
                                       f"'{tmp_path / 'afile' / 'm.csv'}'; choose another path"),
        (tmp_path / "afile" / "sub" / "m.csv", f"'{tmp_path / 'afile'}' is a file, so no folder can hold"),
        (tmp_path / "logs", f"'{tmp_path / 'logs'}' is a folder; name a file, e.g. '{tmp_path / 'logs' / 'metrics.csv'}'"),
        (tmp_path / "m.jsonl", f"'{tmp_path / 'm.jsonl'}' would hold both the per-epoch CSV rows and the JSONL rows; "
                               f"name the CSV, e.g. '{tmp_path / 'm.csv'}' (the JSONL rows then go to "
                               f"'{tmp_path / 'm.jsonl'}')"),
        (locked / "m.csv", f"cannot write in the folder '{locked}' (permission denied); choose another path"),
    ]:
        _refused(tiny_distill_args(tiny_teacher, corpus_file, run, "--metrics_out", str(path)), capsys,
                 f"hybridopt: error: --metrics_out: {message}")
        assert not run.exists()
    assert (tmp_path / "afile").read_text() == "the user's own file" and list((tmp_path / "logs").iterdir()) == []
    monkeypatch.undo()
    # corrected, the same command runs
    assert main(tiny_distill_args(tiny_teacher, corpus_file, run, "--metrics_out", str(tmp_path / "m.csv"), "--epochs",
                                  "1", "--max_steps_per_epoch", "2", "--no-baseline")) == 0
    assert [p.name for p in sorted(tmp_path.glob("m*"))] == ["m.csv", "m.jsonl", "m_steps.csv"]
    capsys.readouterr()
