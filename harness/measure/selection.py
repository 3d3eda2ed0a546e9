"""The former name of `harness.measure.patch_masks` (the masks a patch replaces), kept so that
imports written before the rename still work."""

from harness.measure.patch_masks import *  # noqa: F403
from harness.measure.patch_masks import selection_masks  # noqa: F401
