"""`hybridopt` command line, generated from the config dataclasses.

    hybridopt distill [--epochs 20] [--teacher DIR] [--data FILE...] ...
    hybridopt teacher [--data FILE...] [--out DIR] ...
    hybridopt bench [--quick] [--task distill mlp] [--arms adamw_cosine hybrid_adam] ...

User errors print one line, `hybridopt: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from hybridopt import __version__
from hybridopt.config import BenchConfig, DistillConfig, ExportConfig, GenerateConfig, InspectConfig, TeacherConfig, default_teacher_config
from hybridopt.errors import UserError, for_flag


_PATH_FIELDS = frozenset({"teacher", "data", "out", "resume", "metrics_out"})


def _base_type(tp):
    """`int | None` -> int; `list[str]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _base_type(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        return typing.get_args(tp)[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, defaults=None) -> None:
    """One `--flag` per dataclass field, with its help, type and default, grouped by the class declaring it."""
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    for owner in [c for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]:
        own = [n for n in vars(owner).get("__annotations__", {}) if n in by_name]
        if not own:
            continue
        title = (owner.__doc__ or owner.__name__).strip().splitlines()[0].rstrip(".")
        group = parser.add_argument_group(title if owner is not cls else "run")
        for name in own:
            _add_field(group, by_name.pop(name), hints[name], defaults)


def _add_field(parser, f, hint, defaults) -> None:
    meta = dict(f.metadata)
    default = getattr(defaults, f.name) if defaults is not None else (
        f.default if f.default is not MISSING else f.default_factory())
    tp = _base_type(hint)
    help_text = meta.get("help", "")
    if tp is bool:
        # on by default, or decided by other flags when not given (None): --x and --no-x; off: --x
        parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction if default is not False else "store_true",
                            default=default, help=help_text)
        return
    kwargs = {"type": tp, "default": default,
              "help": help_text + (f" (default: {default})" if default not in (None, [], "") else "")}
    if "nargs" in meta:
        kwargs["nargs"] = meta["nargs"]
    if meta.get("nargs") == "?":
        kwargs["const"] = meta.get("const")
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    metavar = "PATH" if f.name in _PATH_FIELDS else f.name.upper()
    parser.add_argument(f"--{f.name}", metavar=metavar, **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as the rest of our user errors
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridopt", description="Distil a language model into a small low-bit Llama student.")
    parser.add_argument("--version", action="version", version=f"hybridopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.subcommands = sub.choices  # name -> its parser (main reads which flags were given)
    p = sub.add_parser("distill", help="distil a teacher into a small student",
                       description=DistillConfig.__doc__)
    add_dataclass_arguments(p, DistillConfig)
    p = sub.add_parser("teacher-cache", help="run the teacher once and cache its top-k targets for distill --teacher_topk",
                       description="Build the teacher-logit cache that `hybridopt distill` with the same flags and "
                                   "--teacher_topk reads (only --teacher, --data, --seq_len, --val_fraction, "
                                   "--teacher_topk, --temperature, --batch_size and --device matter here).")
    add_dataclass_arguments(p, DistillConfig)
    p = sub.add_parser("teacher", help="train the default teacher (or one on your data)",
                       description=TeacherConfig.__doc__)
    add_dataclass_arguments(p, TeacherConfig, defaults=default_teacher_config())
    p = sub.add_parser("export", help="pack a trained student (or any Llama-style model) to low bits",
                       description=ExportConfig.__doc__)
    add_dataclass_arguments(p, ExportConfig)
    p = sub.add_parser("generate", help="sample text from a student (packed or full precision)",
                       description=GenerateConfig.__doc__)
    add_dataclass_arguments(p, GenerateConfig)
    p = sub.add_parser("bench", help="compare the hybrid optimizer with AdamW, Schedule-Free, Prodigy, Muon and SGD",
                       description=BenchConfig.__doc__)
    add_dataclass_arguments(p, BenchConfig)
    p = sub.add_parser("inspect", help="show the precision plan, sizes and measured errors of an export",
                       description=InspectConfig.__doc__)
    p.add_argument("path", metavar="DIR", help=InspectConfig.__dataclass_fields__["path"].metadata["help"])
    return parser


_UNSET = object()


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a training loop (which stops at its next step boundary by itself): stop where it lands,
    as Ctrl-C does, so the run ends with a message and exit status 143 instead of silently."""

    exit_status = 128 + signal.SIGTERM


def _terminate(signum, frame) -> None:
    raise Terminated()


def given_flags(parser: argparse.ArgumentParser, argv: list[str], cls) -> frozenset[str]:
    """The fields of `cls` that `argv` gives as flags, even at their default values (argparse fills in a
    default only where the namespace has no value yet, so a namespace preset to a marker keeps the rest)."""
    namespace = argparse.Namespace(**{f.name: _UNSET for f in fields(cls)})
    parser.parse_args(argv, namespace)
    return frozenset(k for k, v in vars(namespace).items() if v is not _UNSET)


def main(argv: list[str] | None = None) -> int:
    """Run `hybridopt ARGV` (default: the command line); returns the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        # Ctrl-C while starting up (importing, parsing) or while exiting, where the command's own handling is not
        # in force: one line, no traceback. `_main` handles one during the command's work itself.
        if _launch_rank() == "0":
            print("hybridopt: interrupted", file=sys.stderr)
        return getattr(e, "exit_status", 128 + signal.SIGINT)


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars are noise for models this small
    values = {k: v for k, v in vars(args).items() if k != "command"}
    on_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if on_main else {}
    if previous.get(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        _COMMANDS[args.command](parser, argv, values)
    except UserError as e:
        # Under torchrun, an error every rank raises (bad flags, rank 0's refusal) is printed once, by rank 0.
        rank = _launch_rank()
        if rank == "0" or not getattr(e, "every_rank", False):
            print(f"hybridopt: error{'' if rank == '0' else f' (rank {rank})'}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        for sig in previous:  # a further Ctrl-C or SIGTERM must not cut this message into a traceback
            signal.signal(sig, signal.SIG_IGN)
        saved = getattr(e, "signum", None) is not None  # training.StopRequested: saved after a whole step
        hint = _interrupted_hint(args.command, e, saved)
        if _launch_rank() == "0":  # torchrun: rank 0 says it
            print(f"hybridopt: interrupted{hint}", file=sys.stderr)
        return 128 + e.signum if saved else getattr(e, "exit_status", 128 + signal.SIGINT)
    except OSError as e:
        # Disk full, permissions: the environment, not a bug. Checkpoints are written atomically.
        print(f"hybridopt: error: {e.strerror or e} ({e.filename or 'no file'})", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# ---------------------------------------------------------------------------- the commands
# Each takes the parser, the arguments as given (None: the command line) and the parsed flags' values; the
# recipes are imported when their command runs, so `hybridopt --help` stays quick.
def _run_distill(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    from hybridopt.recipes.distill import run_distill

    words = sys.argv[1:] if argv is None else argv
    given = given_flags(parser.subcommands["distill"], words[words.index("distill") + 1:], DistillConfig)
    try:
        cfg = DistillConfig(**values)
    except UserError as e:  # the flags are the same on every rank of a torchrun job
        e.every_rank = True
        raise
    run_distill(cfg, given=given)


def _run_teacher_cache(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    from hybridopt.recipes.distill import run_teacher_cache

    run_teacher_cache(DistillConfig(**values))


def _run_teacher(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    from hybridopt.recipes.teacher import run_teacher

    run_teacher(TeacherConfig(**values))


def _run_export(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    from hybridopt.recipes.export_student import export_student, export_student_gguf

    cfg = ExportConfig(**values)
    if cfg.format == "gguf":
        export_student_gguf(cfg, cfg.type, cfg.embed_type)
    else:
        export_student(cfg)


def _run_bench(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    from hybridopt.recipes.bench import run_bench

    words = sys.argv[1:] if argv is None else argv
    run_bench(BenchConfig(**values), command="hybridopt " + shlex.join(words))


def _run_generate(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    _generate(GenerateConfig(**values))


def _run_inspect(parser: argparse.ArgumentParser, argv: list[str] | None, values: dict) -> None:
    _inspect(InspectConfig(**values))


_COMMANDS = {"distill": _run_distill, "teacher-cache": _run_teacher_cache, "teacher": _run_teacher,
             "export": _run_export, "bench": _run_bench, "generate": _run_generate, "inspect": _run_inspect}


def _interrupted_hint(command: str, e: KeyboardInterrupt, saved: bool) -> str:
    """What `hybridopt: interrupted` adds for `command`: where its work was left and how to continue."""
    hint = ""
    if command == "distill":
        hint = _distill_resume_hint(getattr(e, "run_folder", None), saved)
    elif command == "teacher":
        hint = f"; {'a checkpoint was saved, ' if saved else 'from the last checkpoint, '}the same command continues"
    elif command == "bench":
        hint = "; the finished runs and a partial report are in --out; add --resume to continue"
    return hint


def _distill_resume_hint(folder: Path | None, saved: bool) -> str:
    """What an interrupted distill leaves to continue: `folder` is its run folder once written (None before)."""
    if folder is None:
        return "; nothing was saved yet"
    from hybridopt.training.layout import RunLayout

    if saved:
        where = "a checkpoint was saved"
    elif RunLayout(folder).checkpoint.exists():
        where = "from the last checkpoint"
    else:
        where = "no checkpoint yet, it starts over"
    return f"; {where}, continue with --resume {shlex.quote(str(folder))}"


def _launch_rank() -> str:
    """This process's rank as torchrun set it ("0" outside torchrun), read without checking the environment (the
    error paths use it)."""
    return os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"


def _generate(cfg: GenerateConfig) -> None:
    from hybridopt.recipes.generate import check_prompt, generate_text
    from hybridopt.training.saved import load_model
    from hybridopt.utils import resolve_device

    from hybridopt.export.gguf_read import find_gguf, load_gguf
    from hybridopt.export.llama_cpp import generate_gguf, have_llama_cpp

    with for_flag("--prompt"):  # before either path: llama.cpp's would blame --model
        check_prompt(cfg.prompt)
    with for_flag("--model"):
        gguf_file = find_gguf(cfg.model)
    if gguf_file is not None and have_llama_cpp():
        print(f"[GGUF {gguf_file}, llama.cpp]", file=sys.stderr)
        with for_flag("--model"):
            print(generate_gguf(gguf_file, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed))
        return
    with for_flag("--device"):
        device = resolve_device(cfg.device)
    with for_flag("--model"):
        if gguf_file is not None:  # dequantized, through transformers
            model, tokenizer = load_gguf(gguf_file, device)
            what = f"GGUF {gguf_file} dequantized by transformers (pip install llama-cpp-python to run it with llama.cpp)"
        else:
            model, tokenizer, what = load_model(cfg.model, device)
    print(f"[{what}]", file=sys.stderr)
    print(generate_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed))


def _inspect(cfg: InspectConfig) -> None:
    import json

    from hybridopt.export.packed import PACKED_NAME, read_packed
    from hybridopt.training.layout import RunLayout
    from hybridopt.quant.precision_plan import PrecisionPlan
    from hybridopt.training.quant_report import REPORT_NAME, describe_export, format_report

    path = Path(cfg.path)
    export = RunLayout(path).export
    folder = export if (export / PACKED_NAME).is_file() else path
    if not (folder / PACKED_NAME).is_file():
        raise UserError(f"'{path}' holds no packed export ({PACKED_NAME}); run distill with --qat, --ternary or --bits")
    print(f"{folder / PACKED_NAME}:")
    print(describe_export(folder / PACKED_NAME))
    metadata, _ = read_packed(folder / PACKED_NAME)
    try:  # the plan is under the checksum (format 2), the report file beside it is not
        if "precision_plan" in metadata:
            plan = PrecisionPlan.from_json(metadata["precision_plan"]).format()
            print(f"\n{plan}")
        if (folder / REPORT_NAME).is_file():
            report = format_report(json.loads((folder / REPORT_NAME).read_text()))
            print(f"\n{report}")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"'{folder}' holds a precision plan or {REPORT_NAME} that is not readable ({e!r}); "
                        "export the run again") from None


if __name__ == "__main__":
    sys.exit(main())
