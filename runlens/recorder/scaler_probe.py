"""AMP signals: the GradScaler's loss scale."""

from __future__ import annotations

from typing import Any

import torch


class ScalerProbe:
    """Reads a GradScaler's current scale without synchronizing.

    NOTE: `GradScaler.get_scale()` calls `.item()`, which synchronizes with the device.
    The probe reads the private `_scale` tensor instead and clones it on the device,
    because `update()` changes that tensor in place.
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def enabled(self) -> bool:
        return bool(getattr(self.scaler, "is_enabled", lambda: False)())

    def take(self) -> dict[str, Any]:
        if not self.enabled():
            return {}
        scale = getattr(self.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return {"amp_scale": scale.detach().float().clone().reshape(())}
        return {"amp_scale": float(self.scaler.get_scale())}
