"""A seeded grammar of short movie reviews: the toy world's training data.

Every review is one to three sentences that agree in sentiment, for example
"This movie was really bad. The acting was awful." Each sentence comes from a small set of
frames filled with nouns, intensifiers and adjectives, so the whole language is finite and
`is_well_formed` can check a text (or a truncated generation) against it exactly.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from functools import lru_cache

NOUNS = ("movie", "film", "show")
ASPECTS = ("acting", "plot", "story", "ending", "music", "cast", "script")
INTENSIFIERS = ("really", "very", "quite", "so", "truly")
POSITIVE = ("good", "great", "fun", "wonderful", "excellent", "amazing", "brilliant",
            "enjoyable", "beautiful", "funny")
NEGATIVE = ("bad", "awful", "boring", "terrible", "horrible", "dull", "stupid",
            "disappointing", "lame", "poor")
ADJECTIVES = POSITIVE + NEGATIVE
# POSITIVE[k] mirrors NEGATIVE[k]. " good" and " bad" are the most common adjectives (as in
# real reviews): 4x the others.
_ADJ_INDEX_WEIGHTS = [4.0] + [1.0] * (len(POSITIVE) - 1)
POSITIVE_VERBS = ("loved", "enjoyed", "liked")
NEGATIVE_VERBS = ("hated", "disliked", "despised")

# Sentence frames. {n}: noun, {a}: aspect, {i}: intensifier, {j}: adjective, {v}: verb.
# The first frames are the review openers; any frame may follow.
FRAMES = (
    "This {n} was {i} {j}.",
    "This {n} was {j}.",
    "The {a} was {j}.",
    "The {a} was {i} {j}.",
    "I thought the {a} was {j}.",
    "I thought this {n} was {i} {j}.",
    "I {v} this {n}.",
    "What a {j} {n}.",
)
OPENER_WEIGHTS = (6, 2, 2, 1, 1, 1, 1, 1)   # "This movie was really ..." is the usual start
FOLLOW_WEIGHTS = (1, 1, 3, 2, 2, 1, 1, 1)

LABELS = ("negative", "positive")   # label 0 / 1, same order as the reward model's id2label


@dataclass(frozen=True)
class Review:
    text: str
    label: int          # 0 negative, 1 positive

    @property
    def sentiment(self) -> str:
        return LABELS[self.label]


def _sentence_slots(rng: random.Random, first: bool) -> tuple:
    """The sentiment-free skeleton of one sentence: frame and word choices."""
    frame = rng.choices(FRAMES, weights=OPENER_WEIGHTS if first else FOLLOW_WEIGHTS, k=1)[0]
    adj = rng.choices(range(len(POSITIVE)), weights=_ADJ_INDEX_WEIGHTS, k=1)[0]
    return (frame, rng.choice(NOUNS), rng.choice(ASPECTS), rng.choice(INTENSIFIERS), adj,
            rng.randrange(len(POSITIVE_VERBS)))


def _render(slots: tuple, positive: bool) -> str:
    frame, n, a, i, adj, verb = slots
    adjs, verbs = (POSITIVE, POSITIVE_VERBS) if positive else (NEGATIVE, NEGATIVE_VERBS)
    return _articles(frame.format(n=n, a=a, i=i, j=adjs[adj], v=verbs[verb]))


def _articles(sentence: str) -> str:
    """'What a awful film.' -> 'What an awful film.'"""
    return re.sub(r"\ba ([aeiou])", r"an \1", sentence)


def _review_slots(rng: random.Random) -> list[tuple]:
    n_sentences = rng.choices((1, 2, 3), weights=(1, 3, 4), k=1)[0]
    return [_sentence_slots(rng, i == 0) for i in range(n_sentences)]


def generate_review(rng: random.Random, positive: bool | None = None) -> Review:
    if positive is None:
        positive = rng.random() < 0.5
    text = " ".join(_render(s, positive) for s in _review_slots(rng))
    return Review(text, int(positive))


def generate_corpus(n: int, seed: int = 0) -> list[Review]:
    """`n` reviews in mirrored pairs, deterministic given `seed`.

    Each review skeleton is rendered once positive and once negative (good<->bad,
    great<->awful, ...), so the corpus is exactly balanced word for word: the only
    difference between the classes is the sentiment, and a model trained on it has no
    reason to prefer " good" over " bad" after "This movie was really". Pairs are then
    shuffled (an odd `n` drops the last mirror).
    """
    rng = random.Random(f"corpus-{seed}")
    reviews: list[Review] = []
    for _ in range((n + 1) // 2):
        slots = _review_slots(rng)
        for positive in (True, False):
            reviews.append(Review(" ".join(_render(s, positive) for s in slots), int(positive)))
    reviews = reviews[:n]
    rng.shuffle(reviews)
    return reviews


def review_prompts(n: int, n_words: int = 4, seed: int = 0) -> list[str]:
    """The seed's prompt recipe on the toy corpus: the first `n_words` words of `n` reviews."""
    return [" ".join(r.text.split()[:n_words]) for r in generate_corpus(n, seed=seed + 10_000)]


# --- parsing -------------------------------------------------------------------------------

def _expand(frame: str) -> list[tuple[str, int | None]]:
    """All (sentence, label) pairs for one frame; label None for sentiment-free sentences."""
    out: list[tuple[str, int | None]] = []
    for n in NOUNS:
        for a in ASPECTS:
            for i in INTENSIFIERS:
                for label, adjs, verbs in ((1, POSITIVE, POSITIVE_VERBS),
                                           (0, NEGATIVE, NEGATIVE_VERBS)):
                    for j in adjs:
                        for v in verbs:
                            out.append((_articles(frame.format(n=n, a=a, i=i, j=j, v=v)), label))
    return out


@lru_cache(maxsize=1)
def sentence_table() -> tuple[dict[str, int], list[str]]:
    """Every sentence of the grammar with its label, and the sorted list (for prefix checks)."""
    table: dict[str, int] = {}
    for frame in FRAMES:
        for sentence, label in _expand(frame):
            table[sentence] = label
    return table, sorted(table)


def _split_sentences(text: str) -> list[str]:
    parts, current = [], []
    for word in text.split(" "):
        current.append(word)
        if word.endswith("."):
            parts.append(" ".join(current))
            current = []
    if current:
        parts.append(" ".join(current))
    return parts


def parse_review(text: str, *, partial: bool = False) -> list[int] | None:
    """Labels of the sentences of `text`, or None if `text` is not in the grammar.

    With `partial=True` the last sentence may be cut off (a strict prefix of a grammatical
    sentence, as in a generation stopped after a fixed number of tokens); it gets no label.
    Text after an `<|endoftext|>` marker is ignored.
    """
    text = text.split("<|endoftext|>")[0].strip()
    if not text or "  " in text:
        return None
    table, ordered = sentence_table()
    sentences = _split_sentences(text)
    labels: list[int] = []
    for k, sentence in enumerate(sentences):
        if sentence in table:
            labels.append(table[sentence])
            continue
        if partial and k == len(sentences) - 1:
            pos = bisect.bisect_left(ordered, sentence)
            if pos < len(ordered) and ordered[pos].startswith(sentence):
                return labels
        return None
    return labels


def is_well_formed(text: str, *, partial: bool = True, consistent: bool = False) -> bool:
    """Whether `text` parses as a review of the grammar (a truncated last sentence allowed
    unless `partial=False`). With `consistent=True` all sentences must agree in sentiment."""
    labels = parse_review(text, partial=partial)
    if labels is None:
        return False
    return not consistent or len(set(labels)) <= 1
