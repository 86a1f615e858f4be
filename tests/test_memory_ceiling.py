"""Memory ceilings for hostile files: a header claiming gigabytes is refused before anything is allocated, shown by
the real command line's peak RSS, not only by its message.

Each case runs `python -m hybridopt ...` in a fresh process on a file whose header claims a model of several GB
(100000 layers, a 10**8-wide MLP...) and asserts exit status 2, the one-sentence refusal the in-process tests expect
(tests/models/test_hostile_teachers.py, tests/export/test_hostile_gguf.py, tests/test_bad_input.py), and a peak RSS
within a margin of what the same command costs to refuse a missing teacher: importing torch and transformers.

How the peak is measured: a child's `ru_maxrss` (from `os.wait4`, or `RUSAGE_CHILDREN`) includes the RSS of the
process it was forked from before its `exec` (Linux carries the pre-exec peak over), and here that is pytest with
torch imported and models built: the CLI is started through `_LAUNCH`, a bare Python that forks and execs it, so the
number reported is the CLI's own peak (plus the launcher's few MiB).

Belt and braces: the launcher sets RLIMIT_DATA (inherited by the CLI) so a refusal that stops working fails on an
allocation error instead of taking the machine's memory. RLIMIT_DATA rather than RLIMIT_AS: torch imports under
either, but address space reserved and never used (malloc arenas per thread, a CUDA build's libraries) varies by
machine, while RLIMIT_DATA counts the private writable memory a model's tensors take, touched or not.

Linux only (`ru_maxrss` in KiB, RLIMIT_DATA covering mmap since Linux 4.7).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import overwrite_gguf_field, tiny_distill_args
from hybridopt.export.packed import PACKED_NAME, export_packed
from hybridopt.models.tokenizer import train_bpe_tokenizer
from hybridopt.training.layout import LOCK_NAME
from test_bad_input import config, drop_mlp, rewrite, tiny_qat_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB and RLIMIT_DATA are Linux's")

MiB, GiB = 2**20, 2**30
# Measured (CPU torch 2.13, transformers 5.25, Python 3.11): refusing a missing teacher peaks at 341 MiB, the hostile
# cases below at 340-346 MiB. The margin leaves room for a CUDA build of torch and for what reading a tokenizer and
# a header costs; every case claims at least 4 GB. With the header checks removed, the 100000-layer teacher folder
# reached 4072 MiB (MemoryError at DATA_LIMIT, after 139 s) and the packed file without its MLP 3419 MiB.
MARGIN = 384 * MiB
DATA_LIMIT = 4 * GiB  # the refusals hold ~330 MiB of data (VmData); a runaway one stops here, far below the 24 GiB machine
TIMEOUT = 60  # seconds; a refusal takes ~5 s, mostly imports

# Runs `python -m hybridopt ARGV...` as a grandchild under RLIMIT_DATA and writes "<exit status> <peak RSS in KiB>"
# to REPORT: the grandchild is forked from this small process, so its ru_maxrss is its own.
_LAUNCH = textwrap.dedent("""
    import os, resource, sys
    report, limit, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "hybridopt", *argv])
    _, status, usage = os.wait4(pid, 0)
    with open(report, "w") as f:
        f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
""")


def run_cli(argv: list[str], tmp_path) -> tuple[int, str, int]:
    """Exit status, stderr and peak RSS in bytes of `hybridopt ARGV` in a fresh process, its cache in `tmp_path`."""
    report = tmp_path / "rusage.txt"
    env = {**os.environ, "HYBRIDOPT_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(report), str(DATA_LIMIT), *map(str, argv)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=tmp_path, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and the CLI it forked
        proc.communicate()
        pytest.fail(f"`hybridopt {' '.join(map(str, argv))}` ran past {TIMEOUT} s")
    assert proc.returncode == 0, err.decode()  # the launcher itself
    status, maxrss_kib = map(int, report.read_text().split())
    return status, err.decode(), maxrss_kib * 1024


# ------------------------------------------------------------------------------------------- pristine files
@pytest.fixture(scope="module")
def tok():
    from pydoc_data.topics import topics

    return train_bpe_tokenizer([topics[k] for k in sorted(topics)[:20]], vocab_size=300)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tok):
    """A tiny file of each kind the CLI reads a model from: a Hugging Face folder (2 layers, 32 wide, as in
    test_hostile_teachers), a GGUF file (2 blocks, 64 wide, feed-forward 128, as in test_hostile_gguf) and a packed
    export (2 layers, 16 wide, as in test_bad_input)."""
    from hybridopt.export.gguf import export_gguf
    from hybridopt.models.modeling import build_model

    root = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    gguf_config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    export_gguf(build_model(gguf_config, 0), root / "teacher.gguf", tok, "f16")
    export_packed(tiny_qat_model(vocab=len(tok)), root / "packed", tok)
    return root


# ---------------------------------------------------------------------------------------------- forgeries
def hf_config(**fields):
    """Overwrite fields of a Hugging Face folder's config.json."""
    def edit(folder):
        claims = json.loads((folder / "config.json").read_text())
        claims.update(fields)
        (folder / "config.json").write_text(json.dumps(claims))
    return edit


def gguf_field(key, value):
    """Overwrite an integer field of a GGUF header in place."""
    return lambda path: overwrite_gguf_field(path, key, value)


def packed(edit):
    """Apply a test_bad_input forgery (checksum recomputed) to a packed export folder's file."""
    return lambda folder: edit(folder / PACKED_NAME)


def hf_held(folder) -> int:
    """How many values a Hugging Face folder's safetensors hold (the refusal of an oversized field names it)."""
    return sum(t.numel() for t in load_file(folder / "model.safetensors").values())


LAYERS_MESSAGE = ("'{path}': config.json claims num_hidden_layers 100000 but its safetensors hold no tensor of layer 2; "
                  "the config does not describe these weights")
# id, pristine file, forgery, command, refusal after "hybridopt: error: ", bytes the claimed model's weights would
# take in float32 (what loading it without the refusal would try to allocate)
CASES = [
    ("teacher folder, 100000 layers", "hf", hf_config(num_hidden_layers=100000), "distill",
     "--teacher: " + LAYERS_MESSAGE, 100000 * 10_304 * 4),
    ("teacher folder, intermediate_size 1e8", "hf", hf_config(intermediate_size=10**8), "distill",
     "--teacher: '{path}': config.json claims intermediate_size 100000000, more than the {held} values its "
     "safetensors hold", 2 * 3 * 32 * 10**8 * 4),
    ("GGUF teacher, block_count 100000", "teacher.gguf", gguf_field("llama.block_count", 100000), "distill",
     "--teacher: '{path}' claims llama.block_count 100000 but holds no tensor of block 2", 100000 * 36_992 * 4),
    ("GGUF teacher, feed_forward_length 1e7", "teacher.gguf", gguf_field("llama.feed_forward_length", 10**7), "distill",
     "--teacher: '{path}' claims llama.feed_forward_length 10000000 but its blk.0.ffn_up.weight has shape (64, 128)",
     2 * 3 * 64 * 10**7 * 4),
    ("student folder, 100000 layers", "hf", hf_config(num_hidden_layers=100000), "generate",
     "--model: " + LAYERS_MESSAGE, 100000 * 10_304 * 4),
    ("packed export, 2**24 layers", "packed", packed(config(num_hidden_layers=2**24)), "generate",
     "'{path}/model.packed.safetensors' is not a valid packed model: config field num_hidden_layers is 16777216, "
     "but the file holds 2 layers",
     2**24 * 2_592 * 4),
    ("packed export, intermediate_size 2**24 and no MLP", "packed", packed(lambda p: rewrite(p, drop_mlp)), "generate",
     "'{path}/model.packed.safetensors' is not a valid packed model: tensor 'model.layers.0.mlp.gate_proj.weight' "
     "is missing",
     2 * 3 * 16 * 2**24 * 4),
]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, corpus_file) -> int:
    """Peak RSS of the CLI refusing a teacher that is not there: the imports, and nothing read."""
    tmp = tmp_path_factory.mktemp("baseline")
    status, err, rss = run_cli(tiny_distill_args(tmp / "absent", corpus_file, tmp / "run"), tmp)
    assert status == 2 and "is not a directory" in err, err
    return rss


@pytest.mark.parametrize("source, forge, command, message, claimed", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_forged_size_is_refused_within_the_memory_of_the_imports(pristine, baseline, corpus_file, tmp_path, source,
                                                                    forge, command, message, claimed):
    ceiling = baseline + MARGIN
    assert ceiling < claimed / 2, "the case's claim must dwarf the ceiling for the test to tell"
    path = tmp_path / source
    (shutil.copytree if (pristine / source).is_dir() else shutil.copy)(pristine / source, path)
    held = hf_held(path) if source == "hf" else None
    forge(path)
    out = tmp_path / "out"
    argv = {"distill": tiny_distill_args(path, corpus_file, out),
            "generate": ["generate", "--model", path, "--max_new_tokens", "2"]}[command]
    status, err, rss = run_cli(argv, tmp_path)
    assert (status, err) == (2, f"hybridopt: error: {message.format(path=path, held=held)}\n")
    assert rss < ceiling, (f"peak RSS {rss / MiB:.0f} MiB, over the {ceiling / MiB:.0f} MiB ceiling "
                           f"(imports alone: {baseline / MiB:.0f} MiB)")
    assert not out.exists() or [p.name for p in out.iterdir()] == [LOCK_NAME]  # a lock alone: nothing written
