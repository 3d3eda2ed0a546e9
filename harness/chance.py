"""A named selection against chance (`against: {random: N, seed: S}`): drawing N random
selections of the same size and kind from the same layers, and the named selection's
percentile and empirical p-value among them. Pure and seeded (the standard library's
`random.Random(seed)`): the same claim and seed give the same draws in any process.

A selection is a set of items (a head `(layer, head)`, a neuron `(layer, neuron)`, a
component, a feature), each in a group (its layer: random selections keep the named one's
count per group). The kinds say what their items and groups are (`ClaimBase.chance_pool`)
and measure the random selections, batched (`kinds/base.chance_measurement`)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from harness.errors import MeasureError

MAX_RANDOM = 10_000     # random selections one claim may ask for
GREATER, LESS = "greater", "less"


@dataclass(frozen=True)
class Pool:
    """The named selection by group, and every item of the same kind each group offers."""

    named: Mapping[Hashable, tuple]       # group -> the named items in it
    candidates: Mapping[Hashable, tuple]  # group -> every item of that kind in the group

    def alternatives(self) -> int:
        """How many selections of the same counts per group differ from the named one."""
        total = math.prod(math.comb(len(self.candidates[g]), len(items))
                          for g, items in self.named.items())
        return total - 1


def draw(pool: Pool, n: int, seed: int) -> list[tuple]:
    """`n` random selections (sorted item tuples), each with as many items per group as the
    named selection, drawn without replacement inside a selection, never equal to the named
    one (independent draws: they may repeat). When the layers offer at most `n` other
    selections, every one of them once, in a fixed order: the exact permutation test, whose
    p-value can go no lower than 1 / (alternatives + 1), as a p-value from so few must not."""
    for group, items in pool.named.items():
        missing = set(items) - set(pool.candidates.get(group, ()))
        if missing:
            raise MeasureError(f"named item {sorted(missing, key=repr)[0]!r} is not among the "
                               f"candidates of its group {group!r}")
    alternatives = pool.alternatives()
    if alternatives < 1:
        raise MeasureError("`against: random` needs other selections of the same size and "
                           "kind in the same layers, and there are none (every item of those "
                           "layers is named); name fewer items, or drop `against`")
    named = _key(pool.named.values())
    groups = sorted(pool.named, key=repr)
    if alternatives <= n:
        every = itertools.product(*(itertools.combinations(pool.candidates[g],
                                                           len(pool.named[g])) for g in groups))
        return [key for key in map(_key, every) if key != named]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        key = _key(rng.sample(list(pool.candidates[g]), len(pool.named[g])) for g in groups)
        if key != named:
            out.append(key)
    return out


def _key(groups) -> tuple:
    return tuple(sorted((item for items in groups for item in items), key=repr))


def direction(expect: Mapping) -> str:
    """Which way the claim says the named selection stands out: `less` when the expectation
    bounds the value from above (`<`, `<=`, `sign: negative`), else `greater`."""
    below = "<" in expect or "<=" in expect or expect.get("sign") == "negative"
    return LESS if below else GREATER


def p_value(n_random: int, n_extreme: int) -> float:
    """(1 + #random at least as extreme) / (N + 1): never 0, at least 1 / (N + 1)."""
    return (1 + n_extreme) / (n_random + 1)


def compare(named: float, random_values: Sequence[float], way: str) -> dict:
    """The named value among the random ones: `p_value` = (1 + #random at least as extreme)
    / (N + 1) (ties count against the claim), `percentile` = the share of random values it
    beats strictly, in percent."""
    n = len(random_values)
    if way == GREATER:
        extreme = sum(r >= named for r in random_values)
    else:
        extreme = sum(r <= named for r in random_values)
    return {"p_value": p_value(n, extreme), "percentile": 100.0 * (n - extreme) / n}


def summary(named: float, random_values: Sequence[float], expect: Mapping, seed: int) -> dict:
    """The `trust` entries of a claim measured against chance."""
    way = direction(expect)
    values = [float(v) for v in random_values]
    if not all(map(math.isfinite, values)):
        raise MeasureError("a random selection's value is not a finite number (NaN or inf)")
    return {**compare(float(named), values, way), "random": len(values), "random_seed": seed,
            "direction": way}


__all__ = ["GREATER", "LESS", "MAX_RANDOM", "Pool", "compare", "direction", "draw", "summary"]
