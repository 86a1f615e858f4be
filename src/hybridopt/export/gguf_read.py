"""GGUF in: a `.gguf` file (or a folder holding one) as a teacher, through `transformers`' GGUF support
(dequantized weights, the tokenizer rebuilt from the file), and the checks before it: is this GGUF, did
hybridopt write it, can transformers and the gguf package read it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
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
        raise ValueError(f"'{path}' is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
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
    return arch


def load_gguf(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a GGUF file (or a folder holding one), dequantized to float32,
    frozen and in eval mode: what `modeling.load_teacher` returns for a Hugging Face folder.

    Raises:
        ValueError: no GGUF there, or one of an architecture or tensor type transformers cannot load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = find_gguf(path)
    if file is None:
        raise ValueError(f"'{path}' is not a .gguf file nor a folder holding one")
    check_gguf(file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name, local_files_only=True,
                                                  trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32,
                                                     local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for files it cannot convert
        raise ValueError(f"cannot load the GGUF model '{file}': {str(e).splitlines()[0]}") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer
