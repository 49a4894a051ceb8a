"""Per-class recall and precision for `Recorder.log_classes`, counted on the host."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from runlens.recorder.values import describe


class InvalidClassInput(ValueError):
    """Input to `log_classes` that gives no valid counts. `kind` groups the warnings."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def class_rows(targets: Any, predictions: Any, num_classes: Any) -> list[dict[str, Any]]:
    """Return one row per class with recall, precision, support and predicted count.

    `targets` and `predictions` are tensors, numpy arrays or lists of class indices, and
    `predictions` may instead hold scores of shape (N, C), reduced by argmax over the last
    dimension. Raises InvalidClassInput before counting anything when the input is invalid.
    Reading the tensors synchronizes with their device.
    """
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, numbers.Integral)
                                    or num_classes < 1):
        raise InvalidClassInput("num_classes", "num_classes must be a positive integer or "
                                f"None, got {num_classes!r}.")
    targets = _as_tensor(targets, "targets")
    predictions = _as_tensor(predictions, "predictions")
    if targets.numel() == 0 or predictions.numel() == 0:
        raise InvalidClassInput("empty", f"targets or predictions are empty (got "
                                f"{targets.numel()} targets and {predictions.numel()} "
                                "predictions).")
    if predictions.dim() > 1:
        predictions = predictions.argmax(dim=-1)
    targets = targets.reshape(-1).long().cpu()
    predictions = predictions.reshape(-1).long().cpu()
    if len(targets) != len(predictions):
        raise InvalidClassInput("length", f"got {len(targets)} targets but "
                                f"{len(predictions)} predictions. Pass one class index, or "
                                "one row of scores, per target.")
    for name, indices in (("targets", targets), ("predictions", predictions)):
        smallest, largest = int(indices.min()), int(indices.max())
        if smallest < 0:
            raise InvalidClassInput("index", f"negative class index {smallest} in {name}. "
                                    "Class indices start at 0.")
        if num_classes is not None and largest >= num_classes:
            raise InvalidClassInput("index", f"class index {largest} in {name} is not below "
                                    f"num_classes={num_classes}.")
    if num_classes is None:
        num_classes = int(max(targets.max(), predictions.max())) + 1
    return _count_rows(targets, predictions, int(num_classes))


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidClassInput("type", f"{name} must be a tensor, a numpy array or a list "
                                    f"of class indices, got {describe(value)}.") from None
    if tensor.dtype.is_complex:
        raise InvalidClassInput("type", f"{name} must hold real class indices or scores, got "
                                f"dtype {str(tensor.dtype).removeprefix('torch.')}.")
    return tensor


def _count_rows(targets: torch.Tensor, predictions: torch.Tensor,
                num_classes: int) -> list[dict[str, Any]]:
    support = torch.bincount(targets, minlength=num_classes)
    predicted = torch.bincount(predictions, minlength=num_classes)
    correct = torch.bincount(targets[targets == predictions], minlength=num_classes)
    rows = []
    for class_id in range(num_classes):
        n_support, n_predicted = int(support[class_id]), int(predicted[class_id])
        n_correct = int(correct[class_id])
        rows.append({
            "class_id": class_id,
            "recall": n_correct / n_support if n_support else None,
            "precision": n_correct / n_predicted if n_predicted else None,
            "support": n_support,
            "predicted": n_predicted,
        })
    return rows
