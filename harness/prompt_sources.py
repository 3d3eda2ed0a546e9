"""Prompt families beyond literal texts and templates: files, HF datasets, the toy corpus.

All of them end as rows (`text`, and where the source has them `answer`, `foil`, `corrupt`).
Texts reach the tokenizer exactly as written: `first_words` cuts a text after its Nth word
(keeping everything before, leading spaces included), `strip` (off by default) removes
surrounding whitespace; both apply to `text` and `corrupt` alike. `limit` keeps the first N rows.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from harness.errors import HarnessError
from harness.files import UnreadableFile, read_regular_text, regular_file_problem

MAX_PROMPT_FILE_BYTES = 256_000_000   # a `file:` family; 100,000 prompts is ~10 MB
ROW_FIELDS = ("answer", "foil", "corrupt")   # per-row values a source may carry


def first_words(text: str, n: int | None) -> str:
    """`text` up to the end of its nth whitespace-separated word, as written (the whole text
    when it has fewer words, or when n is None)."""
    if not n:
        return text
    match = re.match(r"\s*(?:\S+\s+){%d}\S+" % (n - 1), text)
    return match.group(0) if match else text


def normalize_row(row: dict, words: int | None, strip: bool) -> dict:
    """Apply the entry's explicit text options to every text field of a row alike."""
    out = dict(row)
    for name in ("text", "corrupt"):
        if isinstance(out.get(name), str):
            out[name] = first_words(out[name], words)
            out[name] = out[name].strip() if strip else out[name]
    return out


def texts_from_file(path: Path, field: str = "text") -> list[dict]:
    """A .txt file (one prompt per non-empty line) or .jsonl (one object per line, with
    `field` and optionally `answer`, `foil`, `corrupt`; `line` records where)."""
    try:
        lines = read_regular_text(path, MAX_PROMPT_FILE_BYTES).splitlines()
    except OSError as exc:
        raise HarnessError(f"cannot read prompt file {path}: {exc.strerror}") from None
    except UnreadableFile as exc:
        raise HarnessError(f"cannot read prompt file: {exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise HarnessError(f"{path}:{line}: not UTF-8 (byte 0x{exc.object[exc.start]:02x}); "
                           "save the prompt file as UTF-8") from None
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
        if not isinstance(row, dict):
            raise HarnessError(f"{path}:{number}: a row must be a JSON object such as "
                               f'{{"{field}": "..."}}, got {line.strip()[:40]}')
        if field not in row:
            raise HarnessError(f"{path}:{number}: no field '{field}' (set `field:`)")
        rows.append({**{k: row[k] for k in ROW_FIELDS if k in row}, "text": row[field],
                     "line": number})
    return rows


def texts_from_dataset(name: str, split: str, field: str, data_files=None,
                       limit: int | None = None) -> list[dict]:
    """Rows of a HF dataset via `datasets` (a hub name, or a loader such as json/csv/text
    with `data_files`)."""
    import datasets

    for file in [data_files] if isinstance(data_files, str) else data_files or []:
        problem = regular_file_problem(file)
        if problem:
            raise HarnessError(f"cannot load dataset '{name}': {problem}")
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
    extra = [name for name in ROW_FIELDS if name in data.column_names]
    return [{"text": row[field], **{name: row[name] for name in extra}} for row in data]


@contextlib.contextmanager
def _offline_unless_reachable():
    """Without a reachable hub, ask only the local cache (seconds, not retries for minutes)."""
    import datasets.config
    import huggingface_hub.constants

    from harness.hub import hub_reachable

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
