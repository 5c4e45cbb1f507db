"""Incremental checkpoints: a manifest per save, and a folder of content-addressed chunks that saves share.

:mod:`.manifest` is the format, :mod:`.chunk_folder` the chunks on disk, :mod:`.files` the writing and reading of a
manifest with its chunks, :mod:`.garbage` the collection of chunks no manifest names any more.
"""
