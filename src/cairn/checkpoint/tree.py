"""Walking nested dicts, lists and tuples of tensors: the one walker that saving, loading and the tools share.

A checkpoint is a tree whose containers are dicts, lists and tuples (subclasses included: an ``OrderedDict``, a
named tuple); everything else, a tensor included, is a leaf. Every node has a ``/``-path, spelled here once for the
content hash, ``ignore_keys``, ``cairn ckpt diff`` and the snapshot's buffers alike: a dict entry is ``key`` at the
top and ``parent/key`` below it, a list or tuple item ``parent/index`` (``/0`` at the top). The hash covers these
paths, so the spelling is part of the file format: changing it would stop every saved checkpoint from verifying.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import torch

__all__ = ["CONTAINERS", "Container", "child_path", "children", "leaves", "map_tensors", "map_tree", "overlaps"]

Container: TypeAlias = dict[Any, Any] | list[Any] | tuple[Any, ...]
CONTAINERS = (dict, list, tuple)


def child_path(path: str, key_text: str) -> str:
    """The path of a dict entry under ``path``; ``key_text`` is its key as text."""
    return f"{path}/{key_text}" if path else key_text


def children(node: Container, path: str, key_text: Callable[[Any], str] = str) -> Iterator[tuple[Any, str, Any]]:
    """``(key, path, child)`` for each entry of a container, in its order (a list or tuple's keys are indices).

    ``key_text`` spells a dict key in the path: the content hash passes its own, which keeps keys whose text varies
    between processes (a frozenset's order follows the hash seed) out of the path. A generator, not a list: a list
    of a 20 000-entry dict's triples, alive at once, sets off the garbage collector, which then scans the whole tree.
    """
    if isinstance(node, dict):
        for key, item in node.items():
            yield key, child_path(path, key_text(key)), item
    else:
        for index, item in enumerate(node):
            yield index, f"{path}/{index}", item


def map_tree(node: Any, on_leaf: Callable[[str, Any], Any], path: str = "") -> Any:
    """A copy of the tree with every leaf replaced by ``on_leaf(path, leaf)``; containers are rebuilt as plain
    dicts, lists and tuples, so nothing in the copy is shared with ``node`` but what ``on_leaf`` returns."""
    if not isinstance(node, CONTAINERS):
        return on_leaf(path, node)
    if isinstance(node, dict):
        return {key: map_tree(item, on_leaf, child) for key, child, item in children(node, path)}
    mapped = [map_tree(item, on_leaf, child) for _, child, item in children(node, path)]
    return mapped if isinstance(node, list) else tuple(mapped)


def map_tensors(node: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of the tree with every tensor replaced by ``change(tensor)``; other leaves are kept as they are."""
    return map_tree(node, lambda _path, leaf: change(leaf) if isinstance(leaf, torch.Tensor) else leaf)


def leaves(node: Any, path: str = "", *, whole: Callable[[Any], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every leaf, depth first; a container that ``whole`` says yes to is yielded as one leaf
    instead of walked into. An empty container that is walked into yields nothing."""
    if not isinstance(node, CONTAINERS) or (whole is not None and whole(node)):
        yield path, node
        return
    for _, child, item in children(node, path):
        yield from leaves(item, child, whole=whole)


def overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of a view may share memory: each stride, smallest first, must step past everything
    the smaller ones reach (a plain, sliced or permuted view does; a zero stride does not)."""
    reach = 0
    for step, count in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
        if step <= reach:
            return True
        reach += (count - 1) * step
    return False
