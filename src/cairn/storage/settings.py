"""How every transfer behaves, in one place: the pause between retries, and when a transfer shows a progress bar.

A leaf module (nothing from cairn), so that the stores, the uploader and the command line all use the same values.
"""

from __future__ import annotations

from tenacity import wait_random_exponential
from tenacity.wait import wait_base

__all__ = ["PROGRESS_BAR_BYTES", "RETRY_FIRST_WAIT_S", "RETRY_MAX_WAIT_S", "retry_wait"]

#: A retry waits at most this long after the first failure, and at most twice as long after each further one ...
RETRY_FIRST_WAIT_S = 0.2
#: ... but never longer than this: a store that is down for minutes is reported, not waited out.
RETRY_MAX_WAIT_S = 10.0

#: Transfers (downloads, uploads, the command line's reads) of at least this many bytes show a progress bar, on a
#: terminal: smaller ones finish before a bar would tell anyone anything.
PROGRESS_BAR_BYTES = 64 << 20


def retry_wait() -> wait_base:
    """The pause before each retry: a random time up to 0.2 s, then up to 0.4 s, 0.8 s, ..., at most
    :data:`RETRY_MAX_WAIT_S` ("full jitter").

    Random, because after a blip every rank of a run (and every run sharing the store) fails at the same moment: with
    fixed pauses they would all retry together again, in lockstep, and a store that sheds load would refuse them
    together again. Spread over the whole window, the retries arrive one by one. Every retry in cairn waits through
    this one policy: each store call (:meth:`cairn.storage.base.ObjectStore._retrying`) and each upload of the
    uploader (:mod:`cairn.storage.transfer`).
    """
    return wait_random_exponential(multiplier=RETRY_FIRST_WAIT_S, max=RETRY_MAX_WAIT_S)
