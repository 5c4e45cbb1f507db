"""How every transfer behaves, in one place: the pause between retries, and when a transfer shows a progress bar.

A leaf module (nothing from cairn), so that the stores, the uploader and the command line all use the same values.
"""

from __future__ import annotations

from tenacity import wait_exponential
from tenacity.wait import wait_base

__all__ = ["PROGRESS_BAR_BYTES", "RETRY_FIRST_WAIT_S", "RETRY_MAX_WAIT_S", "retry_wait"]

#: A retry waits this long after the first failure, and twice as long after each further one ...
RETRY_FIRST_WAIT_S = 0.2
#: ... but never longer than this: a store that is down for minutes is reported, not waited out.
RETRY_MAX_WAIT_S = 10.0

#: Transfers (downloads, uploads, the command line's reads) of at least this many bytes show a progress bar, on a
#: terminal: smaller ones finish before a bar would tell anyone anything.
PROGRESS_BAR_BYTES = 64 << 20


def retry_wait() -> wait_base:
    """The pause before each retry: 0.2 s, 0.4 s, 0.8 s, ..., at most :data:`RETRY_MAX_WAIT_S`."""
    return wait_exponential(multiplier=RETRY_FIRST_WAIT_S, max=RETRY_MAX_WAIT_S)
