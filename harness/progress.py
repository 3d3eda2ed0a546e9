"""Progress of a run while it runs: one line per finished claim, and a bar for a long claim.

Measurements say how far their work has gone with `steps(total, unit)` (a counter they call
per batch of cells, senders or prompts); that costs nothing unless a front end is showing
progress. The front end (`ClaimProgress`) prints each claim's verdict as it finishes and, on a
terminal only, a tqdm bar (done / total, elapsed, estimate) for a claim that has run longer
than `delay` seconds (`HARNESS_PROGRESS_DELAY`, default 2). Non-terminal output (CI logs)
gets the lines but no bar; quiet runs get neither. `quiet_libraries` keeps the progress bars
of transformers and huggingface_hub out of the user's output unless asked.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

DELAY_ENV = "HARNESS_PROGRESS_DELAY"
LIBRARY_ENV = "HARNESS_LIBRARY_PROGRESS"   # "1": let the libraries' own bars through
DEFAULT_DELAY = 2.0

_bar = None   # the running claim's bar (a tqdm), while a front end shows one


def steps(total: int, unit: str = "cells") -> Callable[[int], None]:
    """A counter for `total` more units of the running claim's work: call it with how many
    just finished. A no-op unless a front end shows a bar."""
    bar = _bar
    if bar is None or total <= 0:
        return _nothing
    if bar.unit != unit and bar.n == 0:
        bar.unit = unit
    bar.total = (bar.total or 0) + total
    return bar.update


def _nothing(n: int = 1) -> None:
    pass


def delay_seconds() -> float:
    """How long a claim runs before its bar appears (`HARNESS_PROGRESS_DELAY`)."""
    try:
        return max(0.0, float(os.environ.get(DELAY_ENV, DEFAULT_DELAY)))
    except ValueError:
        return DEFAULT_DELAY


@contextmanager
def showing_bar(label: str, stream, delay: float | None = None):
    """While active, `steps` counters feed a tqdm bar on `stream`, drawn once the claim has
    run `delay` seconds and removed when it ends."""
    global _bar
    import shutil

    from tqdm import tqdm

    previous = _bar
    size = shutil.get_terminal_size()   # 80 x 24 where a terminal reports no size
    _bar = tqdm(total=0, desc=label, unit="cells", file=stream, leave=False, ncols=size.columns,
                nrows=size.lines,
                delay=delay_seconds() if delay is None else delay, disable=False,
                mininterval=0.2)
    try:
        yield _bar
    finally:
        _bar.close()
        _bar = previous


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ClaimProgress:
    """What `harness run` shows while claims run: `line(verdict)` after each claim (unless
    quiet) and, on a terminal, a bar during a long one (`with progress.claim(label):`)."""

    def __init__(self, stream=None, quiet: bool = False, bar: bool | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar = (not quiet and is_terminal(self.stream)) if bar is None else bar

    @contextmanager
    def claim(self, label: str):
        if not self.bar:
            yield
            return
        with showing_bar(label, self.stream):
            yield

    def line(self, verdict) -> None:
        """One finished claim: status, spec::claim, seconds."""
        if self.quiet:
            return
        print(f"{verdict.status.upper():<8} {verdict.spec}::{verdict.claim_id} "
              f"({verdict.seconds:.2f} s)", file=self.stream, flush=True)


class BarBelowLine:
    """A bar's stream under a front end that is still writing the current line (pytest's
    dots or `path::claim`): the bar takes the line below it and, once cleared, the cursor goes
    back to where that line ends, so the front end's next word lands where it would have.
    `column()` says how long that line is; `unshielded()` lets writes reach the terminal
    (pytest captures output while a test runs)."""

    def __init__(self, file, column: Callable[[], int], unshielded=nullcontext):
        self.file, self.column, self.unshielded = file, column, unshielded
        self.drawn = False

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        with self.unshielded():
            if not self.drawn:
                self.drawn = True
                self.file.write("\n")
            self.file.write(text)

    def flush(self) -> None:
        with self.unshielded():
            self.file.flush()

    def back_to_line(self) -> None:
        """After the bar is cleared: up to the front end's line, at its end."""
        if not self.drawn:
            return
        column = self.column()
        self.write("\r\x1b[A" + (f"\x1b[{column}C" if column else ""))
        self.flush()
        self.drawn = False


def quiet_libraries(*, transformer_lens_patching: bool = False) -> None:
    """Keep the progress bars of transformers ("Loading weights") and huggingface_hub
    (downloads) out of the output, unless `HARNESS_LIBRARY_PROGRESS=1`. (TransformerLens draws
    bars only in functions the harness does not call: its `patching` module, verbose
    `generate`; benches that call `patching` pass `transformer_lens_patching=True`. tqdm's
    `TQDM_DISABLE` is no way out: it silences every bar, the harness's too.)"""
    if os.environ.get(LIBRARY_ENV) == "1":
        return
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    if transformer_lens_patching:
        from functools import partial

        import transformer_lens.patching as patching

        patching.tqdm = partial(patching.tqdm, disable=True)
