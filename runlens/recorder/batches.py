"""Batch composition for `Recorder.log_batch` and split membership for
`Recorder.log_split_groups`, counted on the host.

Group ids are compared as ``str(id)``, the form that the `split_groups` table stores,
so the int 3 and the string "3" are the same group.
"""

from __future__ import annotations

import hashlib
import numbers
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from runlens.recorder.values import describe


class InvalidGroups(ValueError):
    """Input to `log_batch` or `log_split_groups` that records nothing. `kind` groups the
    warnings: size, missing, length, type, unhashable, counts or split.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_size(size: Any) -> int:
    """Return `size` as an int, or raise InvalidGroups when it is not a non-negative int."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
        raise InvalidGroups("size", f"size must be a non-negative int, got {size!r}.")
    return int(size)


def count_groups(groups: Any, *, allow_mapping: bool) -> Counter[str]:
    """Return the number of examples of each group id, keyed by ``str(id)``.

    `groups` is an iterable of ids, one per example (a list, tuple, numpy array or 1-D
    integer tensor), or, when `allow_mapping` is true, a mapping of id to example count.
    An id is a str or a non-bool int. Raises InvalidGroups before counting anything when
    the input is invalid. A tensor is read with `tolist`, which synchronizes when the
    tensor is on an accelerator.
    """
    if isinstance(groups, Mapping) and allow_mapping:
        return _count_mapping(groups)
    if isinstance(groups, torch.Tensor):
        ids = _tensor_ids(groups)
    elif isinstance(groups, np.ndarray):
        ids = _array_ids(groups)
    elif isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, Iterable):
        expected = ("an iterable of group ids or a mapping of group id to example count"
                    if allow_mapping else "a sequence of group ids, one per example")
        raise InvalidGroups("type", f"groups must be {expected}, got {describe(groups)}.")
    else:
        ids = list(groups)
    return Counter(_id_key(group) for group in _checked_ids(ids))


def fingerprint(counts: Mapping[str, int]) -> str:
    """Return a short hash of group ids and their counts, equal for equal splits."""
    digest = hashlib.sha256()
    for group in sorted(counts):
        digest.update(f"{len(group)}:{group}={counts[group]};".encode())
    return digest.hexdigest()[:16]


def _count_mapping(groups: Mapping[Any, Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for group, count in groups.items():
        _checked_ids([group])
        key = _id_key(group)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise InvalidGroups("counts", f"the example count of group {group!r} must be a "
                                f"non-negative int, got {count!r}.")
        counts[key] += int(count)
    return counts


def _tensor_ids(tensor: torch.Tensor) -> list[Any]:
    # Only metadata is read before `tolist`, the single conversion.
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.layout != torch.strided:
        raise InvalidGroups("type", f"groups must be a dense tensor, got a tensor with "
                            f"layout {tensor.layout}.")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise InvalidGroups("type", f"groups must be a tensor of integer ids, got a tensor "
                            f"of dtype {dtype}.")
    if tensor.dim() != 1:
        raise InvalidGroups("type", f"groups must be a 1-D tensor with one id per example, "
                            f"got a tensor of shape {tuple(tensor.shape)}.")
    return tensor.detach().tolist()


def _array_ids(array: np.ndarray) -> list[Any]:
    if array.dtype.kind not in "iuUO":
        raise InvalidGroups("type", "groups must be a numpy array of integer, string or "
                            f"object ids, got a numpy array of dtype {array.dtype}.")
    if array.ndim != 1:
        raise InvalidGroups("type", "groups must be a 1-D numpy array with one id per "
                            f"example, got a numpy array of shape {array.shape}.")
    return array.tolist()


def _checked_ids(ids: list[Any]) -> list[Any]:
    """Return `ids`, or raise InvalidGroups at the first id that is not a str or an int."""
    for group in ids:
        if isinstance(group, str):
            continue
        if isinstance(group, numbers.Integral) and not isinstance(group, (bool, np.bool_)):
            continue
        if not isinstance(group, Hashable):
            raise InvalidGroups("unhashable", f"unhashable group id {describe(group)}. "
                                "A group id must be a str or an int.")
        raise InvalidGroups("type", f"group id {group!r} is a {type(group).__name__}. "
                            "A group id must be a str or an int.")
    return ids


def _id_key(group: Any) -> str:
    if isinstance(group, str):
        return str(group)
    return str(int(group))


class BatchAccumulator:
    """Sizes and group counts of the `log_batch` calls since the last `Recorder.step`."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.calls = 0
        self.size = 0
        self.counts: Counter[str] = Counter()
        self.calls_without_groups = 0
        self.invalid = False

    def add(self, size: int, counts: Counter[str] | None) -> None:
        self.calls += 1
        self.size += size
        if counts is None:
            self.calls_without_groups += 1
        else:
            self.counts.update(counts)

    def mark_invalid(self) -> None:
        """Mark this step's batch as unknown, because a `log_batch` call was dropped."""
        self.invalid = True

    def take(self) -> dict[str, int | None]:
        """Return the `scalars` batch columns of this step and reset the accumulator.

        Every column is null without calls or after a dropped call. The group columns are
        also null when a call gave no `groups`, because counts over part of the step
        would understate it.
        """
        columns: dict[str, int | None] = dict.fromkeys(
            ("batch_size", "micro_batches", "batch_groups", "batch_largest_group"))
        if self.calls and not self.invalid:
            columns["batch_size"] = self.size
            columns["micro_batches"] = self.calls
            if not self.calls_without_groups:
                columns["batch_groups"] = len(self.counts)
                columns["batch_largest_group"] = max(self.counts.values(), default=0)
        self._reset()
        return columns
