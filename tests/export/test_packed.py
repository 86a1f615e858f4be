"""The packed export: real sizes, exact logits after reload, and corrupted files refused."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import rewrite_safetensors_header
from hybridopt.errors import UserError
from hybridopt.export.packed import PACKED_NAME, export_packed, load_packed, safetensors_tensor_bytes
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.quant.quantizers import TERNARY


def _qat_model(bits, act_bits=None, group_size=None, tie=False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=32, tie_word_embeddings=tie))
    quantize_(model, QATConfig(bits=bits, act_bits=act_bits, group_size=group_size))
    return model.eval()


@pytest.mark.parametrize("bits,act_bits,group_size,tie", [
    (1, None, None, False), (TERNARY, None, None, False), (TERNARY, 8, 32, True), (2, None, None, False),
    (4, 8, 16, False), (8, None, None, False)])
def test_exported_logits_equal_qat_logits(tmp_path, bits, act_bits, group_size, tie):
    model = _qat_model(bits, act_bits, group_size, tie)
    export_packed(model, tmp_path, dtype=torch.float32)
    loaded = load_packed(tmp_path)
    x = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_packed_sizes_are_real(tmp_path):
    model = _qat_model(TERNARY)
    export_packed(model, tmp_path)
    sizes = safetensors_tensor_bytes(tmp_path / PACKED_NAME)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert sizes[f"{q}.packed"] == -(-64 * 64 // 5)  # 5 trits per byte
    assert sizes[f"{q}.scale"] == 64 * 2  # float16 per output channel
    assert "lm_head.weight" in sizes and sizes["lm_head.weight"] == 200 * 64 * 2
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "llama"


def test_one_bit_export_is_packed_bits(tmp_path):
    export_packed(_qat_model(1), tmp_path)
    sizes = safetensors_tensor_bytes(tmp_path / PACKED_NAME)
    assert sizes["model.layers.0.mlp.up_proj.weight.packed"] == 128 * 64 // 8


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    export_packed(_qat_model(TERNARY), tmp_path)
    path = tmp_path / PACKED_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        load_packed(tmp_path)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match="checksum"):
        load_packed(tmp_path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="truncated or corrupted"):
        load_packed(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_packed(tmp_path / "elsewhere")


def test_two_bit_files_from_before_the_mid_rise_grid_still_load(tmp_path):
    """'int2' (written before 2-bit moved to the (q + 1/2) grid) decodes as plain q * scale."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hybridopt.quant.packing import unpack_signed

    export_packed(_qat_model(2), tmp_path, dtype=torch.float32)
    path = tmp_path / PACKED_NAME
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    quant = json.loads(metadata["quant"])
    key = "model.layers.0.self_attn.q_proj.weight"
    assert quant[key]["packing"] == "int2mid"
    for info in quant.values():
        info["packing"] = "int2"
    # Such files are packed format 1 (their checksum covers the tensors only), which still loads.
    from hybridopt.export.packed import _digest

    save_file(tensors, path, metadata={**metadata, "quant": json.dumps(quant), "format_version": "1",
                                       "sha256": _digest(tensors)})
    q = unpack_signed(tensors[f"{key}.packed"], 2, 64 * 64).reshape(64, 64).float()
    want = q * tensors[f"{key}.scale"].float()  # one scale per output row
    torch.testing.assert_close(load_packed(tmp_path).state_dict()[key], want)


def _forge(path, edit, rehash=True):
    """Rewrite the metadata of a packed file, and (as a forger would) its checksum to match."""
    from safetensors.torch import load_file

    from hybridopt.export.packed import _digest

    tensors = load_file(path)

    def forge(header):
        meta = header["__metadata__"]
        original = dict(meta)
        parsed = {"config": json.loads(meta["config"]), "quant": json.loads(meta["quant"])}
        edit(meta, parsed["config"], parsed["quant"])
        for key, value in parsed.items():  # the edited objects, unless the edit replaced or removed the entry
            if key in meta and meta[key] == original[key]:
                meta[key] = json.dumps(value)
        if rehash:
            meta["sha256"] = _digest(tensors, meta if meta.get("format_version") == "2" else None)

    rewrite_safetensors_header(path, forge)


Q = "model.layers.0.self_attn.q_proj.weight"


# Forged, edited and malformed headers: the table in test_bad_input.py.


def test_format_1_files_still_load_with_a_warning(tmp_path, capsys):
    model = _qat_model(TERNARY)
    export_packed(model, tmp_path, dtype=torch.float32)
    _forge(tmp_path / PACKED_NAME, lambda m, c, q: m.update(format_version="1"))  # digest of the tensors only
    loaded = load_packed(tmp_path)
    assert "packed format 1, whose checksum does not cover its header" in capsys.readouterr().err
    x = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_inspect_refuses_forged_headers_and_reports_in_one_line(tmp_path, capsys):
    from hybridopt.cli import main

    export_packed(_qat_model(TERNARY), tmp_path)
    (tmp_path / "quant_report.json").write_text('{"mode": "QAT"}')  # hand-edited: fields missing
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "quant_report.json that is not readable" in err and len(err.strip().splitlines()) == 1
    _forge(tmp_path / PACKED_NAME, lambda m, c, q: q[Q].update(shape="64x64"))
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a valid packed model" in err and "Traceback" not in err
