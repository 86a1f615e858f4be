"""GGUF in: a `.gguf` file (or a folder holding one) as a teacher, through `transformers`' GGUF support
(dequantized weights, the tokenizer rebuilt from the file), and the checks before it: is this GGUF, did
hybridopt write it, can transformers and the gguf package read it, and do the sizes its header claims (blocks,
widths, heads, vocabulary) match the tensors it holds, so a forged header allocates nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from hybridopt.errors import first_line
import torch
from transformers import PreTrainedTokenizerBase


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def written_by_hybridopt(path: str | Path) -> bool:
    """Whether `path` is a GGUF file this tool wrote (`general.quantized_by` is "hybridopt"): the only kind an
    export may replace."""
    if not is_gguf_file(path):
        return False
    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.quantized_by")
        return field is not None and bytes(field.parts[-1]).decode() == "hybridopt"
    except Exception:  # noqa: BLE001 - a damaged file raises anything; it is then not ours to replace
        return False


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: a `.gguf` file, or a folder (without config.json) holding exactly one.

    Returns None when `path` is not a GGUF model (a Hugging Face folder, say).

    Raises:
        ValueError: the folder holds several `.gguf` files.
    """
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"'{path}' holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}); "
                         "pass the file itself")
    return found[0] if found else None


def check_gguf(path: Path) -> str:
    """The architecture of a GGUF file that `transformers` can load and dequantize; ValueError otherwise."""
    try:
        reader = gguf.GGUFReader(str(path))
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises anything from struct to KeyError
        raise ValueError(f"'{path}' is not a readable GGUF file ({first_line(e)})") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # those two are key groups
    if arch not in supported:
        raise ValueError(f"'{path}' holds a {arch!r} model, which transformers cannot load from GGUF; "
                         f"supported: {', '.join(supported)}")
    readable = {"F32", "F16", "BF16"} | {t.name for t in gguf.quants._type_traits}  # noqa: SLF001
    bad = sorted({t.tensor_type.name for t in reader.tensors} - readable)
    if bad:
        raise ValueError(f"'{path}' holds tensors of type {', '.join(bad)}, which the gguf package cannot "
                         "dequantize; convert it to another type (llama-quantize) first")
    check_gguf_shapes(path, reader, arch)
    return arch


def _count(path: Path, reader: gguf.GGUFReader, key: str, required: bool = True) -> int | None:
    """The positive integer field `key` of the file (None when absent and not `required`)."""
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"'{path}' has no {key} field")
        return None
    value = field.contents() if len(field.types) == 1 else None
    if type(value) is not int or value < 1:
        raise ValueError(f"'{path}' has {key} {value!r}, which is not a positive integer")
    return value


def check_gguf_shapes(path: Path, reader: gguf.GGUFReader, arch: str) -> None:
    """Check the sizes a GGUF header claims against the tensors it holds, before transformers builds a model of
    those sizes: every block of `block_count` has tensors; `embedding_length` is the width of `token_embd`; the
    vocabulary (`vocab_size`, the token list) is its row count; the head counts and `feed_forward_length` give
    the widths of block 0's attention and feed-forward tensors. GGML lists a tensor's shape innermost first:
    token_embd is (embedding_length, vocabulary).

    Raises:
        ValueError: one sentence naming the file and the field its tensors contradict.
    """
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    blocks = _count(path, reader, f"{arch}.block_count")
    held = {int(m.group(1)) for name in shapes if (m := re.match(r"blk\.(\d+)\.", name))}
    absent = next((i for i in range(min(blocks, len(held) + 1)) if i not in held), None)
    if absent is not None:  # the loop stops at the first gap: a forged count costs nothing
        raise ValueError(f"'{path}' claims {arch}.block_count {blocks} but holds no tensor of block {absent}")
    embd = _count(path, reader, f"{arch}.embedding_length")
    if len(shapes.get("token_embd.weight", ())) != 2:
        raise ValueError(f"'{path}' holds no 2-D token_embd.weight tensor")
    width, rows = shapes["token_embd.weight"]
    if embd != width:
        raise ValueError(f"'{path}' claims {arch}.embedding_length {embd} but its token_embd.weight is {width} wide")
    vocab = _count(path, reader, f"{arch}.vocab_size", required=False)
    if vocab is not None and vocab != rows:
        raise ValueError(f"'{path}' claims {arch}.vocab_size {vocab} but its token_embd.weight has {rows} rows")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != rows:
        raise ValueError(f"'{path}' holds {len(tokens.data)} tokens (tokenizer.ggml.tokens) but its "
                         f"token_embd.weight has {rows} rows")
    heads = _count(path, reader, f"{arch}.attention.head_count", required=False)
    kv_heads = _count(path, reader, f"{arch}.attention.head_count_kv", required=False) or heads
    if heads is not None:
        if heads % kv_heads:
            raise ValueError(f"'{path}' claims {arch}.attention.head_count_kv {kv_heads}, which does not divide "
                             f"{arch}.attention.head_count {heads}")
        key_length = _count(path, reader, f"{arch}.attention.key_length", required=False)
        if key_length is None and arch in ("llama", "mistral"):  # transformers reads head_dim from the rope width
            key_length = _count(path, reader, f"{arch}.rope.dimension_count", required=False)
        head_dim = key_length or embd // heads
        for name, count, field in (("attn_q", heads, "head_count"), ("attn_k", kv_heads, "head_count_kv")):
            shape = shapes.get(f"blk.0.{name}.weight")
            if shape is not None and (len(shape) != 2 or shape[1] != count * head_dim):
                raise ValueError(f"'{path}' claims {arch}.attention.{field} {count} ({head_dim} wide each) but its "
                                 f"blk.0.{name}.weight has shape {tuple(shape)}")
    ffn = _count(path, reader, f"{arch}.feed_forward_length", required=False)
    shape = shapes.get("blk.0.ffn_up.weight")
    if ffn is not None and shape is not None and shape[-1] != ffn:
        raise ValueError(f"'{path}' claims {arch}.feed_forward_length {ffn} but its blk.0.ffn_up.weight has shape "
                         f"{tuple(shape)}")


def load_gguf(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a GGUF file (or a folder holding one), dequantized to float32,
    frozen and in eval mode: what `modeling.load_teacher` returns for a Hugging Face folder.

    Raises:
        ValueError: no GGUF there, one of an architecture or tensor type transformers cannot load, one whose
            header claims sizes its tensors do not have, or a tokenizer larger than the embedding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = find_gguf(path)
    if file is None:
        raise ValueError(f"'{path}' is not a .gguf file nor a folder holding one")
    check_gguf(file)  # every size the header claims checked against its tensors before anything is built
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True,
                                                  trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for files it cannot convert
        raise ValueError(f"cannot load the GGUF model '{file}': {first_line(e)}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # its last ids could not be embedded: an IndexError mid-run otherwise
        raise ValueError(f"'{file}': its tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows")
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
