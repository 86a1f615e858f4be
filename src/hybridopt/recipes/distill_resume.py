"""Which folder a `hybridopt distill` run writes to, and on `--resume` the settings it continues with."""

from __future__ import annotations

import time
from pathlib import Path

from hybridopt.config import DistillConfig
from hybridopt.errors import UserError
from hybridopt.reporting import Reporter
from hybridopt.training.layout import RUNS_ROOT, RunLayout, occupied

# Flags a resumed run may change: where it runs. The others shape the result (schedule, data, model, what is
# written), so one given with a value other than the run's is refused rather than silently ignored.
_RESUME_MAY_CHANGE = frozenset({"device"})


def _flag(name: str, value) -> str:
    """`--name value` as a user would type it (lists space-separated, booleans on/off)."""
    if isinstance(value, bool):
        value = "on" if value else "off"
    elif isinstance(value, list):
        value = " ".join(map(str, value))
    return f"--{name} {value}"


def resolve_run(cfg: DistillConfig, reporter: Reporter | None = None,
                given: frozenset[str] | None = None) -> tuple[Path, bool, DistillConfig]:
    """Pick the run folder; on `--resume`, load that run's saved config. `--out DIR --resume` resumes DIR.

    Flags given with a value other than the saved one are refused in one sentence naming them, except
    `--device`, which is honoured and named in a warning.

    Args:
        cfg: the flags.
        reporter: where the warning goes.
        given: the names of the flags given on the command line (None: those that differ from the defaults).

    Returns:
        `(out_dir, resuming, config)`.
    """
    if cfg.resume:
        if cfg.resume == "latest" and cfg.out:
            out = Path(cfg.out)
        elif cfg.resume == "latest":
            runs = sorted(p for p in RUNS_ROOT.glob("distill-*") if RunLayout(p).config.is_file())
            if not runs:
                raise UserError(f"--resume found no run under '{RUNS_ROOT}'; pass the run folder: --resume DIR")
            out = runs[-1]
        elif cfg.out and Path(cfg.out).resolve() != Path(cfg.resume).resolve():
            raise UserError(f"--resume '{cfg.resume}' and --out '{cfg.out}' name different folders; "
                            "pass the run folder once: --resume DIR")
        else:
            out = Path(cfg.resume)
        layout = RunLayout(out)
        if not layout.config.is_file():
            raise UserError(f"--resume '{out}' is not a hybridopt run folder (no {layout.config.name})")
        if layout.results.is_file():
            raise UserError(f"--resume '{out}' is a finished run (its {layout.results.name} is written); "
                            "nothing to continue: start a new one with another --out")
        saved = DistillConfig.from_file(layout.config)
        defaults = DistillConfig()
        differ = [name for name in vars(cfg) if name not in ("resume", "out")
                  and (name in given if given is not None else getattr(cfg, name) != getattr(defaults, name))
                  and getattr(cfg, name) != getattr(saved, name)]
        refused = [name for name in differ if name not in _RESUME_MAY_CHANGE]
        if refused:
            asked = ", ".join(_flag(n, getattr(cfg, n)) for n in refused)
            had = ", ".join(_flag(n, getattr(saved, n)) for n in refused)
            raise UserError(f"cannot resume '{out}' with {asked}: the run was started with {had}, and its schedule, "
                            "data and model follow from its settings; resume without them, or start a new run "
                            "with another --out")
        for name in differ:  # the flags a resumed run may change
            if reporter is not None:
                reporter.warn(f"resuming '{out}' with {_flag(name, getattr(cfg, name))} "
                              f"(it ran with {_flag(name, getattr(saved, name))})")
            setattr(saved, name, getattr(cfg, name))
        return out, True, saved
    out = Path(cfg.out) if cfg.out else RUNS_ROOT / time.strftime("distill-%Y%m%d-%H%M%S")
    refuse_occupied(out)
    return out, False, cfg


def refuse_occupied(out: Path) -> None:
    """A new run's folder must be new or empty.

    Raises:
        UserError: it holds a run (continue it with --resume) or anything else.
    """
    if occupied(out):
        layout = RunLayout(out)
        if layout.config.exists() or layout.checkpoint.exists():
            raise UserError(f"--out '{out}' already holds a run; continue it with --resume {out} or choose another --out")
        raise UserError(f"--out '{out}' exists and is not empty; choose another --out")
