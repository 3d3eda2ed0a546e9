"""Whether the Hugging Face hub answers: models, SAEs and datasets all load offline-first, and
without a reachable hub they ask only the local cache (at once, instead of minutes of
retries). No torch import."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub answers at all (checked once per process)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1, or the hub does not answer: only the local cache is tried."""
    return os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable()
