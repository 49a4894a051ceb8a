"""Checks of the values that callers pass to the recorder, made before a row is buffered.

A value that fails a check is dropped: the recorder stores null in its place, logs the
first drop under each key and counts the others. The checks of a tensor read only its
metadata (layout, dtype, numel, shape), so they never synchronize with the device.
"""

from __future__ import annotations

import logging
import numbers
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("runlens.record")

SCALAR_EXPECTED = "a scalar (a number or a one-element tensor)"
_MAX_REPR_CHARS = 40


class InvalidValue(ValueError):
    """A value that the recorder drops, with `got` describing it and `hint` the fix."""

    def __init__(self, got: str, hint: str = "") -> None:
        super().__init__(got)
        self.got = got
        self.hint = hint


def scalar_value(value: Any, expression: str) -> torch.Tensor | float:
    """Convert a per-step value to a float or to a 0-d float32 tensor on its device.

    Accepts a real number, a bool, a numpy scalar, and a tensor or numpy array with exactly
    one element. Raises InvalidValue for anything else. `expression` names the value as
    the caller wrote it (such as ``loss``) in the hint.
    """
    if isinstance(value, torch.Tensor):
        return _tensor_scalar(value, expression)
    if isinstance(value, np.ndarray):
        return _array_scalar(value, expression)
    if isinstance(value, (numbers.Real, np.bool_)):
        try:
            return float(value)
        except OverflowError:
            raise InvalidValue(f"{_type_phrase(value)} that does not fit a float") from None
    raise InvalidValue(describe(value))


def _tensor_scalar(tensor: torch.Tensor, expression: str) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if tensor.layout != torch.strided:
        raise InvalidValue(f"a tensor with layout {tensor.layout}", "Pass a dense tensor.")
    if tensor.dtype.is_complex:
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise InvalidValue(f"a tensor of dtype {dtype}",
                           f"Pass {expression}.abs() or {expression}.real.")
    if tensor.numel() == 0:
        raise InvalidValue(f"an empty tensor of shape {shape}")
    if tensor.numel() != 1:
        raise InvalidValue(f"a tensor of shape {shape}",
                           f"Pass {expression}.mean() or another reduction to one value.")
    # A copy, because a tensor that the caller updates in place (a running sum) would
    # otherwise be read at the flush with a later value.
    return tensor.detach().reshape(()).to(dtype=torch.float32, copy=True)


def _array_scalar(array: np.ndarray, expression: str) -> float:
    if array.dtype.kind not in "biuf":
        raise InvalidValue(f"a numpy array of dtype {array.dtype}")
    if array.size == 0:
        raise InvalidValue(f"an empty numpy array of shape {array.shape}")
    if array.size != 1:
        raise InvalidValue(f"a numpy array of shape {array.shape}",
                           f"Pass {expression}.mean() or another reduction to one value.")
    return float(array.reshape(()))


def describe(value: Any) -> str:
    """Describe a value for a message by its type and a short repr, such as "a str ('x')"."""
    text = repr(value)
    if len(text) > _MAX_REPR_CHARS:
        text = text[:_MAX_REPR_CHARS] + "..."
    return f"{_type_phrase(value)} ({text})"


def _type_phrase(value: Any) -> str:
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name}"


def dropped_message(label: str, step: int, invalid: InvalidValue) -> str:
    """Return the warning for a value that failed `scalar_value`."""
    hint = f" {invalid.hint}" if invalid.hint else ""
    return (f"runlens dropped {label} at step {step}: expected {SCALAR_EXPECTED}, "
            f"got {invalid.got}.{hint}")


class DropLog:
    """Counts of dropped values by key, with a warning for the first drop under each key."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def drop(self, key: str, message: str) -> None:
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        if count == 1:
            logger.warning("%s Recording goes on, and later drops of this kind are counted "
                           "in Recorder.dropped_counts[%r] without a warning.", message, key)
