"""Clipping signals: the total norm before clipping and the max norm of each clip call."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad


class ClippingProbe:
    """Wraps `torch.nn.utils.clip_grad_norm_` while recording.

    The wrapper calls the original function, keeps the total norm it returns (a tensor on
    the gradients' device, read only at a flush) and the max norm. When several clip
    calls happen in one step, the last one is recorded.

    NOTE: code that imported the function by name before the recorder opened
    (`from torch.nn.utils import clip_grad_norm_`) calls the original and is not seen.
    Such code can report its clipping with `Recorder.log_clip`.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._original: Callable[..., torch.Tensor] | None = None

    def install(self) -> None:
        original = torch.nn.utils.clip_grad_norm_
        if getattr(original, "_runlens_probe", None) is not None:
            return  # another recorder in this process already wraps it
        self._original = original

        @functools.wraps(original)
        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            total_norm = original(parameters, max_norm, *args, **kwargs)
            try:
                self.log(total_norm, max_norm)
            except Exception:  # noqa: BLE001 - the user's clipping must still return
                pass
            return total_norm

        clip_grad_norm_._runlens_probe = self
        torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
        torch.nn.utils.clip_grad.clip_grad_norm_ = clip_grad_norm_

    def remove(self) -> None:
        if self._original is not None:
            torch.nn.utils.clip_grad_norm_ = self._original
            torch.nn.utils.clip_grad.clip_grad_norm_ = self._original
            self._original = None

    def log(self, total_norm: torch.Tensor | float, max_norm: float | torch.Tensor) -> None:
        if isinstance(total_norm, torch.Tensor):
            total_norm = total_norm.detach().float()
        else:
            total_norm = float(total_norm)
        if isinstance(max_norm, torch.Tensor):
            max_norm = max_norm.detach().float()
        else:
            max_norm = float(max_norm)
        self._values = {"clip_total_norm": total_norm, "clip_max_norm": max_norm}

    def take(self) -> dict[str, Any]:
        values, self._values = self._values, {}
        return values
