"""tests/dist_scripts/train.py, with its ``--uploader`` given the store arguments (``backend_kwargs``) that a URI
cannot carry: a ``libcloud://`` store needs its provider and the provider's arguments. They come as JSON in the
environment variable ``CAIRN_TEST_BACKEND_KWARGS``, so that no secret shows on a command line."""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import train  # noqa: E402

if __name__ == "__main__":
    backend_kwargs = json.loads(os.environ["CAIRN_TEST_BACKEND_KWARGS"])
    train.RemoteUploaderDownloader = functools.partial(train.RemoteUploaderDownloader, backend_kwargs=backend_kwargs)
    train.main()
