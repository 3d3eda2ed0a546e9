"""Runs and their clean traces, kept within the memory budget's cache share.

A *run* is a model (identified by `key` for caching) applied to a right-padded token batch. Its
clean trace holds every site of every layer; traces are shared by every claim of a session and
dropped least-recently-used first. Runs whose traces do not fit are measured in prompt slices.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from torch import Tensor

from harness.measure.forward import Acts


@dataclass(frozen=True, eq=False)
class Run:
    """A model (identified by `key` for caching) applied to a right-padded token batch."""

    key: str
    bridge: Any
    tokens: Int[Tensor, "batch pos"]
    final_pos: Int[Tensor, " batch"]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def rows(self, rows: slice) -> Run:
        """The same model on some of the prompts."""
        return Run(self.key, self.bridge, self.tokens[rows], self.final_pos[rows])


class TraceCache:
    """Clean traces by (model key, tokens), least recently used dropped first.

    `trace(run)` computes a trace, `nbytes(run)` its size; `cache_bytes` and `slice_bytes`
    are the budget's shares for kept traces and for the traces of one prompt slice.
    """

    def __init__(self, trace: Callable[[Run], Acts], nbytes: Callable[[Run], int],
                 cache_bytes: int, slice_bytes: int):
        self._trace, self._nbytes = trace, nbytes
        self.cache_bytes, self.slice_bytes = cache_bytes, slice_bytes
        self.entries: OrderedDict[tuple[str, str], tuple[Acts, int]] = OrderedDict()

    def kept_bytes(self) -> int:
        return sum(size for _, size in self.entries.values())

    def clean(self, run: Run) -> Acts:
        """Every activation of the unpatched run: kept for later claims if it fits."""
        key = (run.key, tokens_hash(run.tokens))
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        size = self._nbytes(run)
        if size > self.cache_bytes:
            return self._trace(run)
        self._evict(self.cache_bytes - size, keep=())
        self.entries[key] = (self._trace(run), size)
        return self.entries[key][0]

    def slices(self, *runs: Run) -> Iterator[tuple[slice, list[Run], list[Acts]]]:
        """The runs (of one batch size) in prompt slices whose clean traces fit the budget.

        Yields (prompts, runs restricted to them, their traces). One slice, with the traces
        kept for later claims, when the runs' whole traces fit the cache share.
        """
        batch = runs[0].shape[0]
        keys = [(r.key, tokens_hash(r.tokens)) for r in runs]
        sizes = {key: self._nbytes(r) for key, r in zip(keys, runs)}
        if sum(sizes.values()) <= self.cache_bytes:
            missing = sum(size for key, size in sizes.items() if key not in self.entries)
            self._evict(self.cache_bytes - missing, keep=sizes.keys())
            yield slice(0, batch), list(runs), [self.clean(r) for r in runs]
            return
        per_prompt = sum(sizes.values()) / batch
        step = max(1, int(self.slice_bytes // per_prompt))
        for start in range(0, batch, step):
            rows = slice(start, min(start + step, batch))
            subs = [r.rows(rows) for r in runs]
            traces: dict[tuple[str, str], Acts] = {}
            for key, sub in zip(keys, subs):
                if key not in traces:  # from and into may be one run (e.g. ablations)
                    cached = self.entries.get(key)
                    traces[key] = rows_of(cached[0], rows) if cached else self._trace(sub)
            yield rows, subs, [traces[key] for key in keys]

    def _evict(self, limit: float, keep) -> None:
        """Drop least recently used traces (not those in `keep`) until at most `limit` bytes."""
        for key in list(self.entries):
            if self.kept_bytes() <= limit:
                return
            if key not in keep:
                del self.entries[key]


PER_PROMPT_FIRST = ("final", "pos_embed")  # [batch, ...]; every other site [layer, batch]


def rows_of(acts: Acts, rows: slice) -> Acts:
    """A trace restricted to some prompts (views)."""
    return {name: t[rows] if name in PER_PROMPT_FIRST else t[:, rows] for name, t in acts.items()}


def tokens_hash(tokens: Tensor) -> str:
    data = tokens.detach().cpu().to(dtype=tokens.new_zeros(()).long().dtype).numpy().tobytes()
    return f"{tuple(tokens.shape)}:{hashlib.sha1(data).hexdigest()}"
