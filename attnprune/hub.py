"""Reaching the Hugging Face hub without waiting for it: a machine without network fails at once.

The hub client retries each file for about a minute before it gives up. :func:`hub_reachable` probes the endpoint
once per process, and :func:`offline_unless_hub_reachable` puts the client in offline mode (the local cache only) while
the hub cannot be reached, for every loader that downloads: timm names, ``hf:`` and ``open_clip:`` models, datasets.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import urllib.parse
from collections.abc import Iterator

import huggingface_hub

__all__ = ["hub_reachable", "offline_unless_hub_reachable"]


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub's endpoint opens within ``timeout`` seconds (asked once per
    process). Without one, the hub client would retry each file for about a minute before failing."""
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_unless_hub_reachable() -> Iterator[bool]:
    """Hub offline mode (``HF_HUB_OFFLINE``: the local cache only, no retries) while the hub cannot be reached.

    Yields:
        Whether the hub client is offline inside the block (a loader with its own switch, such as transformers'
        ``local_files_only``, passes it on).
    """
    constants = huggingface_hub.constants
    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield bool(constants.HF_HUB_OFFLINE)
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False
