"""Where a run's console output goes: one small reporter instead of `print` calls all over.

Recipes and the training loop write through a `Reporter`; the CLI uses the default (stdout, progress
bars on a terminal), a benchmark or a test runs the same recipe with `Reporter(quiet=True)`. Warnings
go to stderr even when quiet. Per-step and per-epoch numbers go to files through `MetricsLogger`
(metrics.py), not through here.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm


class Reporter:
    """Console output of a run.

    Args:
        quiet: print nothing but warnings, and no progress bars.
        stream: where lines go (default: stdout at the time of each call).
        silent: print nothing at all, warnings included: the ranks after the first of a torchrun job, whose
            rank 0 prints the same lines.
    """

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, silent: bool = False):
        self.quiet = quiet or silent
        self.silent = silent
        self._stream = stream
        self._bar: tqdm | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def line(self, text: str = "") -> None:
        """One line (or block) of output, written above any progress bar."""
        if self.quiet:
            return
        if self._bar is not None:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        """A warning on stderr, `warning: <text>`, printed even when quiet (not when silent)."""
        if self.silent:
            return
        if self._bar is not None:
            tqdm.write(f"warning: {text}", file=sys.stderr)
        else:
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int = 0, desc: str = "") -> tqdm:
        """A progress bar (disabled when quiet or not on a terminal); close it when done."""
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                         disable=True if self.quiet else None, dynamic_ncols=True, file=sys.stderr)
        return self._bar

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

