"""GGUF export of a ternary QAT student: sizes, fidelity and (with llama-cpp-python) llama.cpp speed.

    python benchmarks/gguf_speed.py [--run DIR | --teacher DIR --alpha A --epochs 20] [--threads 2] [--out benchmarks/results]

1. The student: --run (a `hybridopt distill --ternary --qat` run folder), or one trained here (the default
   run with --ternary --qat --no-baseline --epochs N, and --teacher / --alpha if given).
2. It is written at f16, q8_0, tq2_0 and tq1_0 (each holds the ternary weights exactly; embeddings and head
   are f16 in the f16 file and q8_0 in the others, the exporter's defaults); per file: bytes and bits per
   weight (whole file, linear layers).
3. Validation perplexity on the run's held-out split, next to the PyTorch QAT model:
   * `gguf weights (PyTorch)`: the file read back by transformers (dequantized): the weights llama.cpp
     sees, computed in float32. The linear layers are exact, so this differs only by the embeddings' type.
   * `emulated llama.cpp`: the same with llama.cpp's CPU activation rounding imitated in PyTorch (inputs of a
     TQ matmul as Q8_K blocks of 256, of a q8_0 matmul as Q8_0 blocks of 32, of an f16 one in float16; the
     K/V cache and queries in float16). A prediction, not a measurement.
   * `llama.cpp`, when `llama_cpp` imports: perplexity, top-1 next-token agreement with the PyTorch QAT
     model, prompt-processing and generation tokens/s on --threads threads, as ratios to f16 in the same run.
4. The same for a wider random ternary student (1024 hidden, 8 layers), where the linear layers dominate:
   sizes, and speeds with llama.cpp; and the size of a 1-bit student of that shape in q1_0.

Writes gguf_speed.json and gguf_speed.md under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from hybridopt.config import DistillConfig
from hybridopt.data.splits import corpus_documents, token_splits
from hybridopt.data.blocks import TokenBlocks
from hybridopt.training.evaluation import evaluate_lm
from hybridopt.export.gguf import GGUFReport, export_gguf
from hybridopt.export.gguf_read import load_gguf
from hybridopt.export.llama_cpp import have_llama_cpp
from hybridopt.models.modeling import build_model
from hybridopt.quant.qat import QATConfig, quantize_
from hybridopt.recipes.distill import run_distill
from hybridopt.reporting import Reporter
from hybridopt.models.tokenizer import load_tokenizer

from common import RESULTS_DIR  # benchmarks/common.py, beside this script

TYPES = ("f16", "q8_0", "tq2_0", "tq1_0")


# ------------------------------------------------------------------------------------ llama.cpp emulation
def _q8_blocks(x: torch.Tensor, block: int, fp16_scale: bool) -> torch.Tensor:
    """ggml's quantize_row_q8_0 (block 32, d = amax / 127 stored as f16) or quantize_row_q8_K_ref (block 256,
    d = -max / 127 in f32, max the signed value of largest magnitude), dequantized: `(..., n)` -> same."""
    shape = x.shape
    xb = x.reshape(-1, shape[-1] // block, block)
    if fp16_scale:
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, xb / d, torch.zeros_like(xb)).round()
        d = d.half().float()
    else:
        idx = xb.abs().argmax(-1, keepdim=True)
        mx = xb.gather(-1, idx)
        iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = (iscale * xb).round().clamp(max=127)
        d = torch.where(mx != 0, 1 / iscale, torch.zeros_like(mx))
    return (q * d).reshape(shape)


def emulate_llama_cpp(model: torch.nn.Module, report: GGUFReport) -> list:
    """Hooks that round a Hugging Face Llama's activations as llama.cpp's CPU backend does for the tensor types
    in `report`; returns the hook handles."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        kind = report.tensor_types.get(names.get_name(name + ".weight", try_suffixes=(".weight",)))
        if kind is None:  # a tied head reads the embedding's type
            kind = report.tensor_types["token_embd.weight"]
        if kind in ("tq1_0", "tq2_0"):
            fn = lambda x: _q8_blocks(x, 256, False)  # noqa: E731
        elif kind in ("q8_0", "q4_0", "q1_0"):
            fn = lambda x: _q8_blocks(x, 32, True)  # noqa: E731
        else:
            fn = lambda x: x.half().float()  # noqa: E731
        handles.append(module.register_forward_pre_hook(lambda m, args, fn=fn: (fn(args[0]),)))
        if name.endswith(("q_proj", "k_proj", "v_proj")):  # f16 K/V cache; Q meets K in an f16 dot product
            handles.append(module.register_forward_hook(lambda m, args, out: out.half().float()))
    return handles


# ------------------------------------------------------------------------------------ llama.cpp itself
def llama_cpp_eval(path: Path, val: TokenBlocks, reference_top1: list[torch.Tensor], threads: int, max_blocks: int) -> dict:
    """Perplexity and top-1 agreement of llama.cpp on the first `max_blocks` validation blocks, and its speed."""
    from hybridopt.export.llama_cpp import llama_cpp_logits, llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=val.seq_len, n_threads=threads, logits_all=True)
    nll, agree, count = 0.0, 0, 0
    for i in range(min(max_blocks, len(val))):
        inputs, labels = val.batch([i])
        logits = torch.from_numpy(llama_cpp_logits(llm, inputs[0].tolist()))
        nll += float(F.cross_entropy(logits, labels[0], reduction="sum"))
        agree += int((logits.argmax(-1) == reference_top1[i]).sum())
        count += labels.numel()
    speed = llama_cpp_speed(path, threads, val.seq_len)
    return {"llama_cpp_ppl": math.exp(nll / count), "llama_cpp_top1_agreement": agree / count,
            "llama_cpp_tokens": count, **speed}


def llama_cpp_speed(path: Path, threads: int, prompt_len: int, gen_tokens: int = 64, repeats: int = 3) -> dict:
    """Prompt processing (one batch of `prompt_len` tokens) and generation (`gen_tokens` single-token steps)
    tokens/s, the best of `repeats`."""
    from hybridopt.export.llama_cpp import llama_cpp_model

    llm = llama_cpp_model(path, n_ctx=prompt_len + gen_tokens, n_threads=threads)
    prompt = [(7 * i) % 200 + 10 for i in range(prompt_len)]
    pp, tg = [], []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        pp.append(prompt_len / (time.perf_counter() - start))
        start = time.perf_counter()
        for i in range(gen_tokens):
            llm.eval([(11 * i) % 200 + 10])
        tg.append(gen_tokens / (time.perf_counter() - start))
    return {"pp_tokens_per_s": max(pp), "tg_tokens_per_s": max(tg)}


# ------------------------------------------------------------------------------------ the runs
def student(args) -> tuple[torch.nn.Module, object, TokenBlocks, DistillConfig, Path]:
    """The QAT student of the run (trained here without --run), its tokenizer and validation blocks."""
    run = Path(args.run) if args.run else Path(args.out) / "runs" / "gguf-ternary-qat"
    if not (run / "results.json").is_file():
        print(f"training the default ternary QAT student into {run} ...", file=sys.stderr)
        run_distill(DistillConfig(epochs=args.epochs, ternary=True, qat=True, baseline=False, out=str(run),
                                  teacher=args.teacher, alpha=args.alpha), Reporter(quiet=True))
    cfg = DistillConfig.from_file(run / "run_config.json")
    tokenizer = load_tokenizer(run / "student")
    model = AutoModelForCausalLM.from_pretrained(str(run / "student"), dtype=torch.float32).eval()
    quantize_(model, QATConfig(bits=cfg.weight_bits, group_size=cfg.group_size, act_bits=cfg.act_bits,
                               include_head=cfg.quantize_head))
    docs, _ = corpus_documents(cfg.data)
    _, val = token_splits(docs, tokenizer, cfg.seq_len, cfg.val_fraction)
    return model, tokenizer, val, cfg, run


def size_row(report: GGUFReport) -> dict:
    return {"file_bytes": report.file_bytes, "bits_per_weight": report.bits_per_weight,
            "linear_bits_per_weight": report.linear_bits_per_weight, "parameters": report.parameters,
            "linear_parameters": report.linear_parameters, "layer_types": report.layer_types,
            "embed_type": report.embed_type}


def default_student(args, work: Path) -> dict:
    model, tokenizer, val, cfg, run = student(args)
    with torch.no_grad():
        return _measure_default(args, work, model, tokenizer, val, cfg, run)


def _measure_default(args, work: Path, model, tokenizer, val: TokenBlocks, cfg: DistillConfig, run: Path) -> dict:
    reference = evaluate_lm(model, val, cfg.batch_size, torch.device("cpu"))
    compared = min(args.max_blocks, len(val))
    logits = [model(input_ids=val.batch([i])[0]).logits[0] for i in range(compared)]
    top1 = [x.argmax(-1) for x in logits]
    # llama.cpp is compared on these blocks only: the PyTorch perplexity on the same blocks is its reference
    subset_nll = sum(float(F.cross_entropy(x, val.batch([i])[1][0], reduction="sum")) for i, x in enumerate(logits))
    reference["subset_ppl"] = math.exp(subset_nll / (compared * val.seq_len))
    print(f"PyTorch QAT: val loss {reference['loss']:.4f}, ppl {reference['ppl']:.2f}", file=sys.stderr)
    rows = {}
    for kind in TYPES:
        path = work / f"default-{kind}.gguf"
        report = export_gguf(model, path, tokenizer, kind, name="hybridopt-default-ternary")
        row = size_row(report)
        loaded, _ = load_gguf(path)
        plain = evaluate_lm(loaded, val, cfg.batch_size, torch.device("cpu"))
        handles = emulate_llama_cpp(loaded, report)
        emulated = evaluate_lm(loaded, val, cfg.batch_size, torch.device("cpu"))
        agree = sum(int((loaded(input_ids=val.batch([i])[0]).logits[0].argmax(-1) == t).sum()) for i, t in enumerate(top1))
        for h in handles:
            h.remove()
        row.update(gguf_weights_ppl=plain["ppl"], emulated_ppl=emulated["ppl"],
                   emulated_top1_agreement=agree / (len(top1) * val.seq_len))
        if args.llama_cpp:
            row.update(llama_cpp_eval(path, val, top1, args.threads, args.max_blocks))
            row["llama_cpp_ppl_ratio"] = row["llama_cpp_ppl"] / reference["subset_ppl"]
        print(f"{kind}: {json.dumps({k: v for k, v in row.items() if k != 'layer_types'})}", file=sys.stderr)
        rows[kind] = row
    return {"run": str(run), "reference": reference, "val_blocks_compared": len(top1), "seq_len": val.seq_len,
            "types": rows}


@torch.no_grad()
def wide_student(args, work: Path, tokenizer) -> dict:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ternary, one_bit = build_model(config, 0).eval(), build_model(config, 0).eval()
    quantize_(ternary, QATConfig())
    quantize_(one_bit, QATConfig(bits=1))
    rows = {}
    for kind in (*TYPES, "q1_0"):
        path = work / f"wide-{kind}.gguf"
        start = time.perf_counter()
        model = one_bit if kind == "q1_0" else ternary  # q1_0 holds 1-bit layers only
        report = export_gguf(model, path, tokenizer, kind, name="hybridopt-wide")
        row = {**size_row(report), "export_seconds": time.perf_counter() - start}
        if args.llama_cpp:
            row.update(llama_cpp_speed(path, args.threads, 128))
        print(f"wide {kind}: {json.dumps({k: v for k, v in row.items() if k != 'layer_types'})}", file=sys.stderr)
        rows[kind] = row
        if kind in ("f16", "q8_0"):
            path.unlink()  # hundreds of MB; the sizes are recorded
    return {"config": {"hidden": 1024, "layers": 8, "intermediate": 2816, "heads": 16}, "types": rows}


def ratios(rows: dict, key: str) -> dict:
    base = rows["f16"].get(key)
    return {k: r[key] / base for k, r in rows.items() if base and key in r}


def markdown(result: dict) -> str:
    d, w = result["default"], result["wide"]
    ref = d["reference"]
    lines = [f"Default ternary QAT student ({d['types']['f16']['parameters'] / 1e6:.2f}M parameters), validation "
             f"perplexity of the PyTorch QAT model {ref['ppl']:.2f} on {ref['tokens']:,} tokens and "
             f"{ref['subset_ppl']:.2f} on the {d['val_blocks_compared']} blocks llama.cpp is compared on (its ppl "
             "ratio is to that); llama.cpp "
             f"{'on ' + str(result['threads']) + ' threads' if result['llama_cpp'] else 'not installed: its columns are empty'}.",
             "", "| type | file | bits/weight (file) | bits/weight (linear) | ppl, GGUF weights in PyTorch | ppl, emulated "
             "llama.cpp | top-1 agreement, emulated | ppl, llama.cpp | ppl ratio | top-1 agreement | pp tok/s (x f16) "
             "| tg tok/s (x f16) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pp, tg = ratios(d["types"], "pp_tokens_per_s"), ratios(d["types"], "tg_tokens_per_s")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for kind, r in d["types"].items():
        lcp = r.get("llama_cpp_ppl")
        lines.append(
            f"| {kind} | {r['file_bytes'] / 2**20:.2f} MiB | {r['bits_per_weight']:.2f} | {r['linear_bits_per_weight']:.4f} "
            f"| {fmt(r.get('gguf_weights_ppl'), '.2f')} | {fmt(r.get('emulated_ppl'), '.2f')} "
            f"| {fmt(r.get('emulated_top1_agreement'), '.4f')} | {fmt(lcp, '.2f')} "
            f"| {fmt(r.get('llama_cpp_ppl_ratio'), '.4f')} | {fmt(r.get('llama_cpp_top1_agreement'), '.4f')} "
            f"| {fmt(r.get('pp_tokens_per_s'), '.0f')} ({fmt(pp.get(kind), '.2f')}) "
            f"| {fmt(r.get('tg_tokens_per_s'), '.0f')} ({fmt(tg.get(kind), '.2f')}) |")
    pp, tg = ratios(w["types"], "pp_tokens_per_s"), ratios(w["types"], "tg_tokens_per_s")
    lines += ["", f"Wide random ternary student (1024 hidden, 8 layers, {w['types']['f16']['parameters'] / 1e6:.1f}M "
              "parameters; the q1_0 row is a 1-bit student of the same shape):", "", "| type | file | bits/weight (file) | bits/weight (linear) | export s | pp tok/s (x f16) "
              "| tg tok/s (x f16) |", "|---|---|---|---|---|---|---|"]
    for kind, r in w["types"].items():
        lines.append(f"| {kind} | {r['file_bytes'] / 2**20:.1f} MiB | {r['bits_per_weight']:.2f} "
                     f"| {r['linear_bits_per_weight']:.4f} | {r['export_seconds']:.1f} "
                     f"| {fmt(r.get('pp_tokens_per_s'), '.0f')} ({fmt(pp.get(kind), '.2f')}) "
                     f"| {fmt(r.get('tg_tokens_per_s'), '.0f')} ({fmt(tg.get(kind), '.2f')}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a `hybridopt distill --ternary --qat` run folder (default: train one)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the student trained without --run")
    parser.add_argument("--teacher", help="teacher of the student trained without --run (default: the default teacher)")
    parser.add_argument("--alpha", type=float, default=0.5, help="its hard-label weight (distill --alpha)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--max_blocks", type=int, default=64, help="validation blocks compared token by token")
    parser.add_argument("--no_wide", action="store_true", help="skip the 1024-hidden, 8-layer student")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    np.random.seed(0)
    args.llama_cpp = have_llama_cpp()
    out = Path(args.out)
    work = out / "runs" / "gguf-files"  # the .gguf files themselves (git-ignored with the runs)
    work.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "llama_cpp": args.llama_cpp, "torch_threads": torch.get_num_threads(),
              "command": " ".join(sys.argv)}
    result["default"] = default_student(args, work)
    tokenizer = load_tokenizer(Path(result["default"]["run"]) / "student")
    result["wide"] = wide_student(args, work, tokenizer) if not args.no_wide else None
    (out / "gguf_speed.json").write_text(json.dumps(result, indent=2))
    if result["wide"] is not None:
        (out / "gguf_speed.md").write_text(markdown(result))
        print(markdown(result))


if __name__ == "__main__":
    main()
