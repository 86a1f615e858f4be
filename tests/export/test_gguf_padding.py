"""GGUF export with `pad`: a model whose widths llama.cpp's 256-blocks do not divide is written at padded
widths as the same function. Read back by transformers, it computes the same logits; the zero query heads sit
in their KV groups; a model already whole is written byte for byte as without padding."""

from __future__ import annotations

import math

import gguf
import pytest
import torch
from transformers import LlamaConfig

from hybridopt.export.gguf import export_gguf
from hybridopt.export.gguf_read import load_gguf
from hybridopt.export.padding import plan_padding
from hybridopt.models.modeling import build_model
from hybridopt.quant.qat import QATConfig, qat_layers, quantizable_linears, quantize_
from hybridopt.quant.quantizers import TERNARY, quantize_dequantize
from test_gguf import _ids, _model, tok  # noqa: F401 - tok is a fixture

# SmolLM2-135M's shape in small: 3 query heads per KV head (GQA), hidden 192 -> 256, 6 heads of 32 -> 8 (a zero
# head after every 3 real ones), intermediate 320 -> 512.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 192, 6, 2, 32, 320


def _odd_model(tok, bits=TERNARY, tied=True, group_size=None, layer_bits=None):
    """A 2-layer Llama of the widths above; embeddings float16-exact, norms away from 1 (a norm left unscaled
    shows), quantized if asked."""
    config = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    model = build_model(config, 0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float() if p.ndim == 2 else torch.linspace(0.5, 1.5, p.numel()))
    if bits is not None:
        quantize_(model, QATConfig(bits=bits, group_size=group_size, layer_bits=layer_bits))
    return model


def _same_logits(path, model, tok, atol=1e-5):
    """The GGUF at `path`, read back by transformers, against `model` on the same tokens; returns the read model."""
    loaded, _ = load_gguf(path)
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=atol)
    return loaded


@pytest.mark.parametrize("gguf_type, tied", [("tq2_0", True), ("tq1_0", False)])
def test_a_padded_ternary_model_computes_the_same_logits(tok, tmp_path, gguf_type, tied):
    model = _odd_model(tok, tied=tied)
    with pytest.raises(ValueError, match="multiples of 256, but model.layers.0.self_attn.q_proj has 192"):
        export_gguf(model, tmp_path / "refused.gguf", tok, gguf_type)
    path = tmp_path / "p.gguf"
    report = export_gguf(model, path, tok, gguf_type, embed_type="f16", pad=True)
    # Ternary codes and float16 embeddings are held exactly: only the norms' sqrt(H/H') and float summation round.
    loaded = _same_logits(path, model, tok)
    c = loaded.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        256, 8, KV_HEADS, HEAD_DIM, 512)
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["llama.rope.dimension_count"].contents() == HEAD_DIM
    assert fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5 * HIDDEN / 256)
    # The report counts the real model; its bits per weight are per real weight, and a note says what was padded.
    real_linear = sum(layer.weight.numel() for layer in qat_layers(model).values())
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.linear_parameters == real_linear and report.layer_types == {f"ternary -> {gguf_type}": 14}
    stored_linear = sum(loaded.get_submodule(n).weight.numel() for n in qat_layers(model))
    block_bits = {"tq1_0": 54 * 8 / 256, "tq2_0": 66 * 8 / 256}[gguf_type]
    assert report.linear_bits_per_weight == pytest.approx(block_bits * stored_linear / real_linear)
    assert ("hidden 192 -> 256, query heads 6 -> 8 (1 zero after every 3 real, 2 KV heads), intermediate 320 -> 512"
            in report.notes[0])


def test_zero_heads_sit_after_the_real_ones_of_their_kv_group(tok, tmp_path):
    """Weight by weight, in Hugging Face's layout (transformers undoes the rotary permutation with 8 heads)."""
    model = _odd_model(tok, tied=False)
    export_gguf(model, tmp_path / "p.gguf", tok, "tq2_0", embed_type="f16", pad=True)
    loaded, _ = load_gguf(tmp_path / "p.gguf")
    real = {n: quantize_dequantize(layer.weight, TERNARY) for n, layer in qat_layers(model).items()}
    attn, padded = "model.layers.1.self_attn", loaded.model.layers[1].self_attn
    q = padded.q_proj.weight.reshape(KV_HEADS, 4, HEAD_DIM, 256)  # (kv group, head in group, head_dim, hidden')
    want = real[f"{attn}.q_proj"].reshape(KV_HEADS, 3, HEAD_DIM, HIDDEN)
    torch.testing.assert_close(q[:, :3, :, :HIDDEN], want, rtol=0, atol=0)  # real head 3j+i at 4j+i
    assert not q[:, 3].any() and not q[..., HIDDEN:].any()
    o = padded.o_proj.weight.reshape(256, KV_HEADS, 4, HEAD_DIM)  # (hidden', kv group, head in group, head_dim)
    torch.testing.assert_close(o[:HIDDEN, :, :3], real[f"{attn}.o_proj"].reshape(HIDDEN, KV_HEADS, 3, HEAD_DIM),
                               rtol=0, atol=0)
    assert not o[:, :, 3].any() and not o[HIDDEN:].any()
    torch.testing.assert_close(padded.k_proj.weight[:, :HIDDEN], real[f"{attn}.k_proj"], rtol=0, atol=0)
    assert padded.k_proj.weight.shape == (KV_HEADS * HEAD_DIM, 256) and not padded.k_proj.weight[:, HIDDEN:].any()
    down = loaded.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(down[:HIDDEN, :INTERMEDIATE], real["model.layers.1.mlp.down_proj"], rtol=0, atol=0)
    assert not down[:, INTERMEDIATE:].any() and not loaded.model.layers[1].mlp.up_proj.weight[INTERMEDIATE:].any()
    for padded_w, w in ((loaded.model.embed_tokens.weight, model.model.embed_tokens.weight),
                        (loaded.lm_head.weight, model.lm_head.weight)):
        torch.testing.assert_close(padded_w[:, :HIDDEN], w, rtol=0, atol=0)
        assert not padded_w[:, HIDDEN:].any()
    norm = loaded.model.layers[1].input_layernorm.weight
    torch.testing.assert_close(norm[:HIDDEN], model.model.layers[1].input_layernorm.weight * math.sqrt(HIDDEN / 256))
    assert not norm[HIDDEN:].any()


def test_pad_changes_nothing_where_the_widths_are_whole(tok, tmp_path):
    model = _model(tok, TERNARY)  # hidden 256, 4 heads of 64, intermediate 512
    plain = export_gguf(model, tmp_path / "plain.gguf", tok, "tq2_0")
    padded = export_gguf(model, tmp_path / "pad.gguf", tok, "tq2_0", pad=True)
    assert (tmp_path / "plain.gguf").read_bytes() == (tmp_path / "pad.gguf").read_bytes()
    assert padded.notes == plain.notes == [] and padded.linear_parameters == plain.linear_parameters


def test_plans_for_smollm2_shapes():
    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    plan = plan_padding(smol, 256, {})
    assert (plan.hidden_to, plan.heads_to, plan.kv_heads, plan.head_dim, plan.intermediate_to) == (768, 12, 3, 64, 1536)
    assert plan.index("q").reshape(12, 64)[:, 0].tolist() == [0, 64, 128, -1, 192, 256, 320, -1, 384, 448, 512, -1]
    assert plan.describe() == ("to multiples of 256: hidden 576 -> 768, query heads 9 -> 12 (1 zero after every 3 "
                               "real, 3 KV heads), intermediate 1536")
    # SmolLM2-360M: 15 heads over 5 KV heads, 960 wide.
    plan = plan_padding(LlamaConfig(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                                    num_key_value_heads=5), 256, {})
    assert (plan.hidden_to, plan.heads_to, plan.intermediate_to) == (1024, 20, 2560)
    assert not plan_padding(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32), 256, {}).needed


def test_a_padded_full_precision_model_at_f16(tok, tmp_path):
    model = _odd_model(tok, bits=None, tied=False)
    report = export_gguf(model, tmp_path / "f16.gguf", tok, "f16", pad=True)
    assert _same_logits(tmp_path / "f16.gguf", model, tok).config.hidden_size == 256  # float16-exact weights
    assert set(report.tensor_types.values()) == {"f16", "f32"} and report.layer_types == {"full precision -> f16": 14}
    assert report.linear_parameters == sum(model.get_submodule(n).weight.numel() for n in quantizable_linears(model))


def test_padded_two_bit_and_one_bit_layers_stay_exact(tok, tmp_path):
    """The 2-bit grid has no zero level: its codes are re-expressed (2q + 1 over s / 2) and still go to q4_0."""
    names = quantizable_linears(_odd_model(tok, bits=None))
    plan = {n: (2.0, 1.0, TERNARY)[i % 3] for i, n in enumerate(names)}
    model = _odd_model(tok, layer_bits=plan)
    report = export_gguf(model, tmp_path / "m.gguf", tok, "tq2_0", embed_type="f16", pad=True)
    _same_logits(tmp_path / "m.gguf", model, tok)
    assert report.layer_types == {"1-bit -> tq2_0": 5, "2-bit -> q4_0": 5, "ternary -> tq2_0": 4}


def test_scale_groups_are_padded_whole_or_refused(tok, tmp_path):
    # Groups of 32 (one per head): every padded row is whole groups; q8_0's blocks of 32 hold them exactly.
    model = _odd_model(tok, group_size=32)
    report = export_gguf(model, tmp_path / "g.gguf", tok, "q8_0", embed_type="f16", pad=True)
    _same_logits(tmp_path / "g.gguf", model, tok)
    assert report.layer_types == {"ternary -> q8_0": 14}
    # Groups of 64 span two heads: o_proj's zero heads would split one.
    with pytest.raises(ValueError, match="padding cannot keep the 64-wide scale groups of model.layers.0.self_attn"
                                         r".o_proj whole, .* --group_size that divides 32$"):
        export_gguf(_odd_model(tok, group_size=64), tmp_path / "r.gguf", tok, "q8_0", pad=True)
    with pytest.raises(ValueError, match="pad must be True, False or a positive width"):
        export_gguf(model, tmp_path / "r.gguf", tok, "q8_0", pad=0)
    assert not (tmp_path / "r.gguf").exists()
