"""Names for runs that a person can tell apart and say aloud."""

from __future__ import annotations

import secrets
import time

__all__ = ["generate_run_name"]

_ADJECTIVES = (
    "amber",
    "brisk",
    "calm",
    "dusty",
    "eager",
    "fading",
    "gentle",
    "hollow",
    "icy",
    "jolly",
    "keen",
    "lively",
    "mellow",
    "nimble",
    "olive",
    "patient",
    "quiet",
    "rapid",
    "steady",
    "tidy",
    "upbeat",
    "vivid",
    "wary",
    "young",
)
_NOUNS = (
    "alder",
    "badger",
    "cedar",
    "delta",
    "egret",
    "fjord",
    "granite",
    "heron",
    "ibex",
    "juniper",
    "kestrel",
    "lichen",
    "marmot",
    "newt",
    "otter",
    "pika",
    "quartz",
    "raven",
    "scree",
    "tarn",
    "umber",
    "vole",
    "willow",
    "yak",
)


def generate_run_name() -> str:
    """``<unix time>-<adjective>-<noun>``; drawn with ``secrets`` so it never consumes the seeded generators."""
    return f"{int(time.time())}-{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}"
