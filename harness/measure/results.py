"""Result types shared by measurements and expectations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jaxtyping import Float

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Grid:
    """A labelled vector or grid of numbers, e.g. DLA per component or a patching sweep.

    `values` is what expectations read (for patching: the normalized effect, mean over prompts);
    `raw` holds the raw metric (patched logit diff, mean over prompts) where one exists.
    `labels[i]` names the entries of axis `axes[i]` (ints for layers/heads/neurons, token strings
    for positions, component names such as "mlp3" or "L3H0" for components).
    """

    axes: tuple[str, ...]
    labels: tuple[tuple, ...]
    values: Float[Tensor, "..."]
    raw: Float[Tensor, "..."] | None = None
    method: str = "exact"  # "exact" or "attribution" (gradient approximation)
    extras: dict = field(default_factory=dict)  # e.g. {"from": 2.01, "into": -0.09}

    def __post_init__(self):
        if tuple(self.values.shape) != tuple(len(lab) for lab in self.labels):
            raise ValueError(f"values shape {tuple(self.values.shape)} does not match labels "
                             f"{[len(lab) for lab in self.labels]}")


@dataclass(frozen=True)
class PatchEffect:
    """One patch (or ablation) on a batch of prompts."""

    normalized: float                    # (mean patched - mean into) / (mean from - mean into)
    patched: Float[Tensor, " batch"]      # raw patched logit diff per prompt
    from_value: Float[Tensor, " batch"]   # logit diff of the `from` run per prompt
    into_value: Float[Tensor, " batch"]   # logit diff of the unpatched `into` run per prompt

    def normalized_per_prompt(self) -> Tensor:
        """Each prompt's (patched - into) on the claim's scale, the mean (from - into): what
        `per_prompt` judges. Their mean is `normalized`, so a claim false on the mean is false
        on some prompt; a prompt whose own from and into agree divides by nothing."""
        return (self.patched - self.into_value) / (self.from_value.mean() - self.into_value.mean())


def normalized_effect(patched: Tensor, from_value: Tensor, into_value: Tensor) -> Tensor:
    """(patched - into) / (from - into), computed on the means over prompts as the seed did."""
    return (patched.mean(-1) - into_value.mean()) / (from_value.mean() - into_value.mean())


def mean_value(means: dict) -> Tensor:
    """The value is the mean over prompts of the part `value`."""
    return means["value"]


def normalized_from_means(means: dict) -> Tensor:
    """A patching grid's normalized effect from the means of `patched` [..., *cells] and of
    `from` / `into` [...] (the same formula as `normalized_effect`)."""
    patched, from_value, into_value = means["patched"], means["from"], means["into"]
    shape = from_value.shape + (1,) * (patched.dim() - from_value.dim())
    return (patched - into_value.reshape(shape)) / (from_value - into_value).reshape(shape)


@dataclass(frozen=True)
class PromptParts:
    """A value measured over prompts, kept per prompt: `parts` are tensors [prompt, ...] and
    `combine` makes the value from their means over prompts (any leading axes, e.g. one per
    bootstrap resample, are kept). A resample of the prompts then recomputes the value from
    these tensors alone, with no forward pass (`harness/stability.py`). `read` turns one
    resample's combined tensor into what the expectation reads (None: the measurement's own
    value with these numbers, e.g. a Grid's values)."""

    parts: dict[str, Tensor]
    combine: Callable[[dict], Tensor] = mean_value
    read: Callable[[Tensor], object] | None = None

    @property
    def n_prompts(self) -> int:
        return int(next(iter(self.parts.values())).shape[0])


def grid_parts(per_prompt: Tensor) -> PromptParts:
    """The parts of a grid whose values are the mean over the last axis of `per_prompt`
    [*cells, prompt] (the layout of `Grid.extras["per_prompt"]`)."""
    return PromptParts({"value": per_prompt.movedim(-1, 0)})


__all__ = ["Grid", "PatchEffect", "PromptParts", "grid_parts", "mean_value",
           "normalized_effect", "normalized_from_means"]


def position_labels(bridge, tokens) -> tuple:
    """Labels of a patching grid's `pos` axis: the first prompt's tokens as text, or column
    numbers where the bridge has no tokenizer."""
    try:
        labels = tuple(bridge.to_str_tokens(tokens[0]))
        if len(labels) == tokens.shape[1]:
            return labels
    except Exception:  # noqa: BLE001 - a bridge without a tokenizer: column numbers
        pass
    return tuple(range(tokens.shape[1]))


def check_same_shape(from_shape: tuple, into_shape: tuple) -> None:
    """Patching copies activations row for row: both runs need one (batch, length) shape."""
    if tuple(from_shape) != tuple(into_shape):
        from harness.errors import MeasureError

        raise MeasureError(f"patching needs from and into runs of equal token shape (batch, "
                           f"length); got {tuple(from_shape)} and {tuple(into_shape)}")

