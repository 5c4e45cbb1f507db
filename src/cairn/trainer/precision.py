"""Numeric precision: which autocast context wraps the forward pass, and whether gradients need scaling."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch

__all__ = ["Precision", "autocast", "make_grad_scaler", "parse_precision"]


class Precision(str, enum.Enum):
    FP32 = "fp32"
    AMP_BF16 = "amp_bf16"  # bfloat16 autocast; same exponent range as fp32, so no loss scaling
    AMP_FP16 = "amp_fp16"  # float16 autocast with a GradScaler against underflow


def parse_precision(precision: str | Precision | None) -> Precision:
    """``None`` means fp32 on every device: predictable numerics unless the user asks for speed."""
    if precision is None:
        return Precision.FP32
    try:
        return Precision(precision)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in Precision)
        raise ValueError(f"precision={precision!r}: use one of {choices}") from None


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    if precision is Precision.FP32:
        yield
        return
    dtype = torch.bfloat16 if precision is Precision.AMP_BF16 else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision is Precision.AMP_FP16 else None
