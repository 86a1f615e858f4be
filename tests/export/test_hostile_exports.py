"""Hostile exports: a packed file whose scales are not finite, and a GGUF write that runs out of space. Each is
one sentence naming the tensor or the file, and a file already at the output path is left as it was."""

from __future__ import annotations

import re
import resource
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

from hybridopt.cli import main
from hybridopt.config import ExportConfig
from hybridopt.errors import UserError
from hybridopt.export.gguf import export_gguf, packed_codes
from hybridopt.export.packed import PACKED_NAME, _digest, export_packed
from hybridopt.models.modeling import build_model
from hybridopt.models.tokenizer import train_bpe_tokenizer
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.quant.quantizers import TERNARY
from hybridopt.recipes.export_student import export_student_gguf
from hybridopt.reporting import Reporter

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    return train_bpe_tokenizer([topics[k] for k in sorted(topics)[:20]], vocab_size=400)


def _ternary_model(tok):
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, 0).eval()
    quantize_(model, QATConfig(bits=TERNARY))
    return model


def test_nan_scales_in_a_packed_file_are_refused_naming_the_tensor(tok, tmp_path, capsys):
    folder = tmp_path / "packed"
    export_packed(_ternary_model(tok), folder, tok)
    path = folder / PACKED_NAME
    # Written so by a diverged run: the checksum matches the NaN.
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    tensors[f"{Q}.weight.scale"][3, 0] = float("nan")
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    message = re.escape(f"holds scales that are not finite (NaN or infinity) in tensor '{Q}.weight.scale'")
    with pytest.raises(ValueError, match=message):
        packed_codes(folder)
    out = tmp_path / "p.gguf"
    with pytest.raises(UserError, match=f"^--model: '{re.escape(str(folder))}' {message}"):
        export_student_gguf(ExportConfig(model=str(folder), out=str(out)), "tq2_0", reporter=Reporter(quiet=True))
    assert main(["export", "--model", str(folder), "--format", "gguf", "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()


def test_non_finite_scales_from_a_model_are_refused_naming_the_layer(tok, tmp_path):
    model = _ternary_model(tok)
    with torch.no_grad():
        model.get_submodule(Q).weight[5, 7] = float("inf")  # the absmean scale of that row is inf
    with pytest.raises(UserError, match=re.escape(f"the scales of layer '{Q}' are not finite (NaN or infinity)")):
        export_gguf(model, tmp_path / "m.gguf", tok, "tq2_0")
    assert not (tmp_path / "m.gguf").exists()


def test_a_full_disk_names_the_file_and_keeps_what_was_there(tok, tmp_path):
    model = _ternary_model(tok)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, tok, "tq2_0")
    before = path.read_bytes()
    # The disk fills part way through: writes past 64 KiB come up short, as on a full disk (numpy's tofile then
    # says only "N requested and M written").
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(UserError) as e:
            export_gguf(model, path, tok, "tq2_0")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(e.value).startswith(f"cannot write the GGUF file '{path}' (")
    assert "the disk may be full" in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before  # the earlier export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left behind


def _file_size_limit(limit: int):
    """Writes past `limit` bytes fail (EFBIG), as on a full disk; returns the undo."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

    def undo():
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    return undo


def test_a_full_disk_while_packing_names_the_file_and_keeps_the_earlier_export(tok, tmp_path, capsys):
    """safetensors reports the failed write as SafetensorError (a traceback before); config.json and the tokenizer
    are written with it, so an earlier export in the folder is left whole, every file of it."""
    model = _ternary_model(tok)
    folder = tmp_path / "packed"
    export_packed(model, folder, tok)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    hf = tmp_path / "hf"  # the same model as a Hugging Face folder, for `hybridopt export`
    build_model(model.config, 0).save_pretrained(hf)
    tok.save_pretrained(hf)
    capsys.readouterr()
    with torch.no_grad():
        model.get_submodule(Q).weight.neg_()  # a different export, which must not replace the earlier one
    undo = _file_size_limit(64 << 10)  # the packed file is ~300 KiB; config.json and the tokenizer fit
    try:
        with pytest.raises(UserError) as e:
            export_packed(model, folder, tok)
        assert main(["export", "--model", str(hf), "--out", str(folder)]) == 2
    finally:
        undo()
    path = folder / PACKED_NAME
    assert str(e.value) == (f"cannot write the packed export '{path}' (Error while serializing: I/O error: File too "
                            "large (os error 27)); is the disk full? Nothing in its folder was replaced; free some "
                            "space and run the command again")
    assert capsys.readouterr().err == f"hybridopt: error: {e.value}\n"
    after = {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".hybridopt")}
    assert after == before  # no temporary left, nothing replaced (the command's marker and lock aside)
