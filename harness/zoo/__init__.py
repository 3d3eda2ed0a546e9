"""The toy world: a review grammar, a source LM, a reward classifier and an RLHF-tuned LM.

`zoo_checkpoint(name)` gives the shipped checkpoint of a zoo model; `build_world(seed)`
rebuilds all of them from scratch into a content-addressed cache.
"""

from harness.zoo.build import build_world
from harness.zoo.store import ZOO_NAMES, cache_root, zoo_checkpoint

__all__ = ["ZOO_NAMES", "build_world", "cache_root", "zoo_checkpoint"]
