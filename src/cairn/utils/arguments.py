"""Yes/no arguments and answers taken only as real booleans.

Python treats any non-empty string as true, so a config file that yields ``save_overwrite="False"`` would overwrite,
and a policy answering ``"no"`` would save every batch. A real ``bool`` (or numpy's, converted) is the only answer
that cannot be misread.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["check_flag", "plain_bool"]


def plain_bool(value: object, *, tensors: bool = False) -> bool | None:
    """``value`` as a Python ``bool`` when it is one (or a ``numpy.bool_``; with ``tensors``, a one-element bool
    tensor of no dimensions), else None. The common case, a real ``bool``, costs one ``isinstance``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if tensors and isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 0:
        return bool(value.item())
    return None


def check_flag(value: object, *, argument: str) -> bool:
    """``value`` as a ``bool``; anything else is a TypeError naming ``argument``, before training time is spent."""
    flag = plain_bool(value)
    if flag is None:
        raise TypeError(
            f"{argument}={value!r} is a {type(value).__name__}, not a bool, and would be read by truthiness "
            f"(the string 'False' counts as true); pass True or False"
        )
    return flag
