"""How measurements share the memory budget (`--memory-budget-mb`): fractions of it.

The budget bounds the activations a session holds at any time, not the weights. A fifth is
left as headroom for what the estimates do not count (results, allocator slack).
"""

CACHE_SHARE = 0.4  # clean traces kept between claims (least recently used dropped first)
SLICE_SHARE = 0.2  # clean traces of the prompt slice in hand, when a run's traces are not kept
WORK_SHARE = 0.2   # batches of patched variants; a plain forward pass gets this plus SLICE_SHARE


def budget_bytes(memory_budget_mb: float, share: float) -> int:
    return int(memory_budget_mb * share * 2**20)
