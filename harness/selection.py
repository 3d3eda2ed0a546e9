"""The former name of `harness.claim_filter` (which claims a run evaluates), kept so that
imports written before the rename still work."""

from harness.claim_filter import *  # noqa: F403
from harness.claim_filter import STATE_FILE, keyword_matcher, record_run, selector  # noqa: F401
