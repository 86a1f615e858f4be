"""GGUF export and import: exact weights, logits equal after a round trip through transformers, the
tokenizer and hyperparameters as llama.cpp reads them, and clear refusals. Every file is built here."""

from __future__ import annotations

import json
from dataclasses import asdict

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from hybridopt.config import DistillConfig, ExportConfig
from hybridopt.errors import UserError
from hybridopt.export.packed import export_packed
from hybridopt.export.gguf import export_gguf
from hybridopt.export.gguf_codecs import dequantize
from hybridopt.export.gguf_read import find_gguf, load_gguf
from hybridopt.export.llama_cpp import context_length
from hybridopt.models.modeling import build_model
from hybridopt.quant.qat import QATConfig, qat_layers, quantizable_linears, quantize_
from hybridopt.quant.quantizers import TERNARY, quantize_dequantize
from hybridopt.recipes.export_student import export_student_gguf
from hybridopt.reporting import Reporter
from hybridopt.models.tokenizer import train_bpe_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog; naïve café — 東京 🙂\n\tdef f(x):\n    return x ** 2\n"


@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    return train_bpe_tokenizer([topics[k] for k in sorted(topics)[:20]], vocab_size=400)


def _model(tok, bits=None, hidden=256, intermediate=512, group_size=None, layer_bits=None, seed=0, layers=1):
    """A small Llama with grouped-query attention (4 heads, 2 key/value heads), quantized if asked.

    Embeddings and head are rounded to float16, so an f16 GGUF holds them exactly too."""
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
            else:  # norms away from 1, so a dropped or misplaced norm shows
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    if bits is not None or layer_bits:
        quantize_(model, QATConfig(bits=bits or TERNARY, group_size=group_size, layer_bits=layer_bits))
    return model


def _ids(tok):
    return tok(TEXT * 2, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :48]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGML's rotary row order back to Hugging Face's: the inverse of convert_hf_to_gguf's permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _file_weights(path, model) -> dict[str, tuple[str, np.ndarray]]:
    """Every linear layer of the GGUF at `path` as llama.cpp reads it: `{module name: (type, (out, in))}`,
    in Hugging Face's row order."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for module in quantizable_linears(model):
        t = tensors[names.get_name(module + ".weight", try_suffixes=(".weight",))]
        kind = t.tensor_type.name.lower()
        w = dequantize(np.array(t.data), kind).reshape(model.get_submodule(module).weight.shape)
        heads = {"q_proj": 4, "k_proj": 2}.get(module.rsplit(".", 1)[-1])
        out[module] = (kind, _unpermute(w, heads) if heads else w)
    return out


@pytest.mark.parametrize("gguf_type", ["tq1_0", "tq2_0", "q8_0", "f16"])
def test_a_ternary_student_round_trips_with_equal_logits(tok, tmp_path, gguf_type):
    model = _model(tok, TERNARY)
    path = tmp_path / "s.gguf"
    report = export_gguf(model, path, tok, gguf_type, embed_type="f16")
    loaded, loaded_tok = load_gguf(path)
    ids = _ids(tok)
    with torch.no_grad():  # every weight is held exactly: only float summation order may differ
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert loaded_tok(TEXT, add_special_tokens=False)["input_ids"] == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert set(report.layer_types) == {f"ternary -> {gguf_type}"} and not report.widened
    assert report.file_bytes == path.stat().st_size
    expected_bits = {"tq1_0": 54 * 8 / 256, "tq2_0": 66 * 8 / 256, "q8_0": 34 * 8 / 32, "f16": 16}[gguf_type]
    assert report.linear_bits_per_weight == pytest.approx(expected_bits)


def test_full_precision_students_at_f16_and_q8_0(tok, tmp_path):
    model = _model(tok)
    ids = _ids(tok)
    with torch.no_grad():
        reference = model(ids).logits
    export_gguf(model, tmp_path / "f16.gguf", tok, "f16")
    with torch.no_grad():  # weights already float16: exact
        torch.testing.assert_close(load_gguf(tmp_path / "f16.gguf")[0](ids).logits, reference, rtol=0, atol=1e-5)
    report = export_gguf(model, tmp_path / "q8.gguf", tok, "q8_0")
    assert set(report.tensor_types.values()) == {"q8_0", "f32"}  # norms stay f32
    with torch.no_grad():
        q8 = load_gguf(tmp_path / "q8.gguf")[0](ids).logits
    err = (q8 - reference).abs().max().item()
    assert 0 < err < 0.05 * reference.abs().max().item()


def test_ternary_tensors_dequantize_to_exactly_our_ternary_weights(tok, tmp_path):
    model = _model(tok, TERNARY, seed=1)
    for gguf_type, block_bytes in (("tq1_0", 54), ("tq2_0", 66)):
        path = tmp_path / f"{gguf_type}.gguf"
        export_gguf(model, path, tok, gguf_type)
        for name, (kind, w) in _file_weights(path, model).items():
            layer = qat_layers(model)[name]
            assert kind == gguf_type
            np.testing.assert_array_equal(w, quantize_dequantize(layer.weight, TERNARY).numpy())
    # What the issue warns of: gguf's own TQ quantizer takes each block's absmax as its scale, not our absmean one.
    w = qat_layers(model)["model.layers.0.mlp.up_proj"].weight.detach()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.TQ2_0),
                                    gguf.GGMLQuantizationType.TQ2_0)
    assert not np.allclose(theirs, quantize_dequantize(w, TERNARY).numpy(), atol=1e-3)


def _q1_0_reference(block: bytes) -> list[float]:
    """ggml's dequantize_row_q1_0, line by line: d, then bit j % 8 of byte j / 8 gives +d or -d."""
    d = float(np.frombuffer(block[:2], dtype=np.float16)[0])
    return [d if (block[2 + j // 8] >> (j % 8)) & 1 else -d for j in range(128)]


def test_one_bit_students_go_to_q1_0_and_decode_like_ggml(tok, tmp_path):
    model = _model(tok, 1)
    report = export_gguf(model, tmp_path / "auto.gguf", tok)  # auto: the narrowest exact type
    assert report.layer_types == {"1-bit -> q1_0": 7}
    assert report.linear_bits_per_weight == pytest.approx(18 * 8 / 128)
    for name, (kind, w) in _file_weights(tmp_path / "auto.gguf", model).items():
        assert kind == "q1_0"
        np.testing.assert_array_equal(w, quantize_dequantize(qat_layers(model)[name].weight, 1).numpy())
    raw = next(t for t in gguf.GGUFReader(str(tmp_path / "auto.gguf")).tensors if t.name == "blk.0.ffn_down.weight")
    data = np.array(raw.data).reshape(-1)
    assert dequantize(data[:36].reshape(1, -1), "q1_0").reshape(-1).tolist() == (
        _q1_0_reference(data[:18].tobytes()) + _q1_0_reference(data[18:36].tobytes()))
    # Asked for a ternary type, 1-bit layers stay exact as codes +-1, and the report says what q1_0 would save.
    report = export_gguf(model, tmp_path / "tq.gguf", tok, "tq1_0")
    assert report.layer_types == {"1-bit -> tq1_0": 7} and "q1_0" in report.notes[0]
    with pytest.raises(ValueError, match="Q1_0, which the gguf package cannot dequantize"):
        load_gguf(tmp_path / "auto.gguf")


def test_mixed_precision_layers_take_the_nearest_exact_type(tok, tmp_path):
    model = _model(tok)
    names = quantizable_linears(model)
    widths = [TERNARY, 2.0, 4.0, 8.0, 1.0]
    plan = {n: widths[i % 5] for i, n in enumerate(names)}
    quantize_(model, QATConfig(bits=TERNARY, layer_bits=plan))
    report = export_gguf(model, tmp_path / "m.gguf", tok, "tq2_0", embed_type="f16")
    expected = {TERNARY: "tq2_0", 1.0: "tq2_0", 2.0: "q4_0", 4.0: "q4_0", 8.0: "q8_0"}
    for name, (kind, w) in _file_weights(tmp_path / "m.gguf", model).items():
        layer = qat_layers(model)[name]
        assert kind == expected[plan[name]], name
        np.testing.assert_array_equal(w, quantize_dequantize(layer.weight, layer.bits).numpy())
    assert report.widened == ["2 2-bit layer(s) to q4_0: tq2_0 cannot hold them exactly",
                              "1 4-bit layer(s) to q4_0: tq2_0 cannot hold them exactly",
                              "1 8-bit layer(s) to q8_0: tq2_0 cannot hold them exactly"]
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(tmp_path / "m.gguf")[0](ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_block_shapes_are_checked_up_front(tok, tmp_path):
    with pytest.raises(ValueError, match=r"multiples of 256, but model.layers.0.self_attn.q_proj has 320; "
                                         r"give the student --student_hidden"):
        export_gguf(_model(tok, TERNARY, hidden=320, intermediate=512), tmp_path / "a.gguf", tok, "tq2_0")
    with pytest.raises(ValueError, match=r"one scale per 256 weights, but .* has one per 64 \(--group_size 64\)"):
        export_gguf(_model(tok, TERNARY, group_size=64), tmp_path / "b.gguf", tok, "tq1_0")
    assert not list(tmp_path.iterdir())  # nothing written
    # q8_0 blocks of 32 hold both exactly.
    report = export_gguf(_model(tok, TERNARY, hidden=320, intermediate=512), tmp_path / "c.gguf", tok, "q8_0")
    assert report.layer_types == {"ternary -> q8_0": 7}


def test_hyperparameters_and_tokenizer_are_written_as_llama_cpp_reads_them(tok, tmp_path):
    model = _model(tok, TERNARY, layers=2)
    export_gguf(model, tmp_path / "s.gguf", tok, "tq2_0")
    fields = gguf.GGUFReader(str(tmp_path / "s.gguf")).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama"
    assert {k: value(f"llama.{k}") for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                             "attention.head_count", "attention.head_count_kv", "vocab_size",
                                             "rope.dimension_count")} == {
        "context_length": 64, "embedding_length": 256, "block_count": 2, "feed_forward_length": 512,
        "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": len(tok), "rope.dimension_count": 64}
    assert value("llama.rope.freq_base") == 5000.0
    assert context_length(tmp_path / "s.gguf") == 64  # what llama.cpp generation runs in
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    vocab = tok.get_vocab()
    assert value("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = value("tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.NORMAL) == len(tok) - 1
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert value("tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_token_id == value("tokenizer.ggml.bos_token_id")
    assert value("tokenizer.ggml.add_bos_token") is False


def test_export_recipe_reads_runs_and_packed_exports(tok, tmp_path):
    run = tmp_path / "run"
    model = _model(tok, TERNARY)
    model.save_pretrained(run / "student")
    tok.save_pretrained(run / "student")
    (run / "run_config.json").write_text(json.dumps(asdict(DistillConfig(ternary=True, qat=True))))
    quiet = Reporter(quiet=True)
    report = export_student_gguf(ExportConfig(model=str(run)), "tq2_0", reporter=quiet)
    assert report.path == str(run / "export" / "model-tq2_0.gguf")
    exact = {n: quantize_dequantize(layer.weight, TERNARY).numpy() for n, layer in qat_layers(model).items()}
    for name, (_, w) in _file_weights(report.path, model).items():
        np.testing.assert_array_equal(w, exact[name])
    export_packed(model, tmp_path / "packed", tok)  # the packed file's codes are written as they are
    report = export_student_gguf(ExportConfig(model=str(tmp_path / "packed"), out=str(tmp_path / "p.gguf")), "tq1_0",
                                 reporter=quiet)
    for name, (kind, w) in _file_weights(report.path, model).items():
        assert kind == "tq1_0"
        np.testing.assert_array_equal(w, exact[name])
    # A plain Hugging Face folder is ternarized (post-training) for a ternary type.
    plain = tmp_path / "plain"
    _model(tok).save_pretrained(plain)
    tok.save_pretrained(plain)
    report = export_student_gguf(ExportConfig(model=str(plain)), "tq1_0", reporter=quiet)
    assert report.path == str(tmp_path / "plain-tq1_0.gguf") and report.layer_types == {"ternary -> tq1_0": 7}
    # Refusals: one sentence naming the flag.
    (tmp_path / "notes.gguf").write_text("mine")
    with pytest.raises(UserError, match="--out .* is not a GGUF file hybridopt wrote"):
        export_student_gguf(ExportConfig(model=str(run), out=str(tmp_path / "notes.gguf")), "tq2_0", reporter=quiet)
    with pytest.raises(UserError, match="--out .* must name a .gguf file"):
        export_student_gguf(ExportConfig(model=str(run), out=str(tmp_path / "x.bin")), "tq2_0", reporter=quiet)
    with pytest.raises(UserError, match="^--type: tq2_0 holds one scale per 256 weights"):
        export_student_gguf(ExportConfig(model=str(plain), group_size=64, out=str(tmp_path / "g.gguf")), "tq2_0",
                            reporter=quiet)


def test_import_refuses_what_transformers_cannot_load(tok, tmp_path):
    assert find_gguf(tmp_path) is None
    export_gguf(_model(tok), tmp_path / "a.gguf", tok, "f16")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf" == find_gguf(tmp_path / "a.gguf")
    model, _ = load_gguf(tmp_path)  # a folder holding one .gguf
    assert model.config.num_key_value_heads == 2 and not model.training
    (tmp_path / "b.gguf").write_bytes((tmp_path / "a.gguf").read_bytes()[:5000])
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        load_gguf(tmp_path)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        load_gguf(tmp_path / "b.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="holds a 'bert' model, which transformers cannot load from GGUF"):
        load_gguf(tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="not a .gguf file nor a folder holding one"):
        load_gguf(tmp_path / "nothing")


@pytest.mark.slow
def test_llama_cpp_computes_what_pytorch_computes(tok, tmp_path, monkeypatch):
    """Needs llama-cpp-python (built from source: pip install llama-cpp-python); skipped without it."""
    pytest.importorskip("llama_cpp")
    from hybridopt.export import gguf as hgguf
    from hybridopt.export.llama_cpp import llama_cpp_logits, llama_cpp_model

    model = _model(tok, TERNARY)
    ids = _ids(tok)[0].tolist()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()

    def error(path) -> float:
        llm = llama_cpp_model(path, n_ctx=len(ids), n_threads=2, logits_all=True)
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok(TEXT, add_special_tokens=False)["input_ids"]
        return float(np.abs(llama_cpp_logits(llm, ids) - reference).max() / np.abs(reference).max())

    errors = {}
    for kind in ("f16", "tq2_0", "tq1_0", "q8_0"):
        export_gguf(model, tmp_path / f"{kind}.gguf", tok, kind, embed_type="f16")
        errors[kind] = error(tmp_path / f"{kind}.gguf")
    # f16 activations, or 8-bit activation blocks for the quantized types: close, not equal
    assert errors["f16"] < 0.01 and max(errors.values()) < 0.05, errors
    monkeypatch.setattr(hgguf, "_permute_rows", lambda w, n_head: w)  # HF's rotary layout left as it is
    export_gguf(model, tmp_path / "unpermuted.gguf", tok, "f16", embed_type="f16")
    assert error(tmp_path / "unpermuted.gguf") > 5 * errors["f16"]


@pytest.mark.slow
def test_llama_cpp_generation_stays_in_the_models_context(tok, tmp_path):
    """A 64-token model: a 200-token prompt keeps its end, and new tokens stop where the context is full."""
    pytest.importorskip("llama_cpp")
    from hybridopt.export.llama_cpp import generate_gguf, llama_cpp_continue, llama_cpp_model

    export_gguf(_model(tok, TERNARY), tmp_path / "s.gguf", tok, "tq2_0")
    llm = llama_cpp_model(tmp_path / "s.gguf", n_ctx=64, n_threads=2)
    prompt = tok(TEXT * 10, add_special_tokens=False)["input_ids"]
    assert len(prompt) > 200
    assert len(llama_cpp_continue(llm, prompt, 8, 64)) == 8
    assert len(llama_cpp_continue(llm, prompt, 100, 64)) == 63  # 100 do not fit: the prompt keeps 1 token
    assert generate_gguf(tmp_path / "s.gguf", TEXT * 10, 8, n_threads=2).startswith(TEXT * 10)


# ------------------------------------------------------------------------------------------ the command line
def test_cli_export_distill_and_generate_with_gguf(tiny_teacher, corpus_file, tmp_path, capsys):
    from conftest import tiny_distill_args
    from hybridopt.cli import main

    # A narrow type is refused before anything is loaded or trained, naming the flag.
    assert main(tiny_distill_args(tiny_teacher, corpus_file, tmp_path / "bad", "--ternary", "--qat",
                                  "--gguf", "tq2_0")) == 2
    assert "--gguf tq2_0 needs --student_hidden to be a multiple of 256, got 32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["export", "--model", str(tiny_teacher), "--type", "q8_0"]) == 2
    assert "--type and --embed_type need --format gguf" in capsys.readouterr().err
    # The teacher as a GGUF file; distill writes the student as one; generate reads it.
    assert main(["export", "--model", str(tiny_teacher), "--format", "gguf", "--type", "f16",
                 "--out", str(tmp_path / "teacher.gguf")]) == 0
    assert "Wrote" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(tiny_distill_args(tmp_path / "teacher.gguf", corpus_file, run, "--ternary", "--qat", "--no-baseline",
                                  "--gguf", "q8_0")) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["gguf"]["layer_types"] == {"ternary -> q8_0": 7} and (run / "export" / "model-q8_0.gguf").is_file()
    from hybridopt.models.modeling import load_teacher

    (hf, hf_tok), (gg, gg_tok) = load_teacher(tiny_teacher, "cpu"), load_teacher(tmp_path / "teacher.gguf", "cpu")
    ids = hf_tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert gg_tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():  # float16 weights in the file
        torch.testing.assert_close(gg(ids).logits, hf(ids).logits, rtol=0, atol=0.02)
    capsys.readouterr()
    assert main(["generate", "--model", str(run / "export" / "model-q8_0.gguf"), "--prompt", "The",
                 "--max_new_tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "GGUF" in captured.err and captured.out.startswith("The")
    # widths tq1_0's blocks do not divide are padded with zeros (the same function), the cost said
    assert main(["export", "--model", str(run), "--format", "gguf", "--type", "tq1_0"]) == 0
    out = capsys.readouterr().out
    assert "padded with zeros (the same function) to multiples of 256: hidden 32 -> 256" in out
    assert (run / "export" / "model-tq1_0.gguf").is_file()
