"""The files of a distillation run, named once.

    <run>/
      run_config.json        the resolved config (what --resume reads back)
      checkpoint.pt          model, optimizer, scheduler, RNG and data position (every epoch)
      precision_plan.json    with --param_clusters: the width of every quantized layer
      metrics*.csv/jsonl     with --save_metrics
      student/               the full-precision (latent) student, Hugging Face format, with its tokenizer
      export/                with a quantized run: model.packed.safetensors, config, tokenizer, quant_report.json
      baseline/              the same student trained without a teacher (its own checkpoint)
      results.json           everything measured, at the end
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybridopt.checkpoint import CHECKPOINT_NAME

RUNS_ROOT = Path("hybridopt-runs")
RUN_CONFIG = "run_config.json"
RESULTS = "results.json"
PLAN_NAME = "precision_plan.json"
METRICS_NAME = "metrics.csv"


def occupied(path: Path) -> bool:
    """Whether something is at `path` that a new output must not replace: a file, or a folder with anything in it."""
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / RUN_CONFIG

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def plan(self) -> Path:
        return self.root / PLAN_NAME

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_NAME

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME
