"""Checkpoints: when one is taken, what goes in, how it is written, and how many are kept.

Filled in by the checkpointing work that follows the foundation; the package exists now so the layout shows
where it belongs.
"""
