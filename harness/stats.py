"""Statistics for claims over many prompts: bootstrap confidence intervals of the mean."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def bootstrap_mean_ci(values: Float[Tensor, " n"], level: float = 0.95, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; seeded, so CI runs are reproducible."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 1:
        return float(values[0]), float(values[0])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (n_boot, values.numel()), generator=generator)
    means = values[idx].mean(dim=1)
    alpha = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(low), float(high)
