"""Sentiment reward through `transformers.pipeline("sentiment-analysis")`.

One code path for the toy reward model (`toy-reviews-reward`, a tiny learned GPT-2
classifier saved with `save_pretrained`) and for hub reward models such as the seed's
`lvwerra/distilbert-imdb`: both are loaded by the pipeline and read as label -> probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.errors import ModelUnavailable


def _label_scores(result) -> dict[str, float]:
    # top_k=2 gives a list of {"label", "score"} per text (a bare dict for a single label)
    if isinstance(result, dict):
        result = [result]
    return {d["label"].upper(): float(d["score"]) for d in result}


class SentimentReward:
    """`negative_score(texts)` / `positive_score(texts)`: class probabilities in [0, 1].

    `model` is a local checkpoint directory or a hub id; `device` is what the pipeline takes
    ("cpu", -1, 0, "cuda:0", ...).
    """

    def __init__(self, model: str | Path, device: str | int = "cpu", batch_size: int = 64):
        from transformers import pipeline

        self.model_id = str(model)
        try:
            self.pipe = pipeline("sentiment-analysis", model=self.model_id, top_k=2,
                                 truncation=True, batch_size=batch_size, device=device)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(f"could not load reward model '{self.model_id}' with "
                                   f"transformers.pipeline('sentiment-analysis'): {exc}") from exc
        labels = {v.upper() for v in self.pipe.model.config.id2label.values()}
        if not {"NEGATIVE", "POSITIVE"} <= labels:
            raise ModelUnavailable(f"reward model '{self.model_id}' has labels {sorted(labels)}; "
                                   "need NEGATIVE and POSITIVE")

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [_label_scores(r) for r in self.pipe(list(texts))]

    def negative_score(self, texts: Sequence[str]) -> list[float]:
        return [s["NEGATIVE"] for s in self.scores(texts)]

    def positive_score(self, texts: Sequence[str]) -> list[float]:
        return [s["POSITIVE"] for s in self.scores(texts)]

    def score(self, texts: Sequence[str], target: str = "negative") -> list[float]:
        if target not in ("negative", "positive"):
            raise ValueError(f"target must be 'negative' or 'positive', not {target!r}")
        return self.negative_score(texts) if target == "negative" else self.positive_score(texts)


def negative_score(texts: Sequence[str], model: str | Path, device: str | int = "cpu"
                   ) -> list[float]:
    """Probability of NEGATIVE for each text (loads the model each call; prefer the class)."""
    return SentimentReward(model, device).negative_score(texts)
