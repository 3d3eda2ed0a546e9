"""Prompt families beyond literal texts and templates: files, HF datasets, the toy corpus.

All of them end as plain texts; `first_words` cuts each to its first N words (the seed's
"first 4 words of each IMDB review" recipe) and `limit` keeps the first N texts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from harness.errors import HarnessError


def first_words(text: str, n: int | None) -> str:
    return " ".join(text.split()[:n]) if n else text.strip()


def texts_from_file(path: Path, field: str = "text") -> list[dict]:
    """A .txt file (one prompt per non-empty line) or .jsonl (one object per line, with
    `field` and optionally `answer`, `foil`, `corrupt`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise HarnessError(f"cannot read prompt file {path}: {exc.strerror}") from None
    if path.suffix != ".jsonl":
        return [{"text": line} for line in lines if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HarnessError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if field not in row:
            raise HarnessError(f"{path}:{number}: no field '{field}' (set `field:`)")
        rows.append({**row, "text": row[field]})
    return rows


def texts_from_dataset(name: str, split: str, field: str, data_files=None,
                       limit: int | None = None) -> list[dict]:
    """Rows of a HF dataset via `datasets` (a hub name, or a loader such as json/csv/text
    with `data_files`)."""
    import datasets

    try:
        with _offline_unless_reachable():
            data = datasets.load_dataset(name, split=split, data_files=data_files)
    except Exception as exc:  # datasets raises many kinds for missing data and no network
        raise HarnessError(f"cannot load dataset '{name}' (split {split}): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if field not in data.column_names:
        raise HarnessError(f"dataset '{name}' has no field '{field}'; it has "
                           f"{', '.join(data.column_names)}")
    if limit:
        data = data.select(range(min(limit, len(data))))
    return [{"text": text} for text in data[field]]


@contextlib.contextmanager
def _offline_unless_reachable():
    """Without a reachable hub, ask only the local cache (seconds, not retries for minutes)."""
    import datasets.config
    import huggingface_hub.constants

    from harness.models import hub_reachable

    if hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def texts_from_corpus(n: int, seed: int) -> list[dict]:
    """Reviews from the toy world's grammar (harness.zoo.corpus)."""
    from harness.zoo.corpus import generate_corpus

    return [{"text": review.text} for review in generate_corpus(n, seed=seed)]
