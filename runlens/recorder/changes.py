"""Events for changes that training code makes between steps without telling anyone.

A change of `requires_grad`, of the optimizer's param groups, of the loss weights or of a
split's data alters what the optimizer is doing, and several rules need to know the step
where it happened. Each check reads host-side Python attributes only (flags, list lengths,
float weights), so it costs no host-device synchronization.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from runlens import format as run_format

# At most this many parameter names are listed in a freeze or unfreeze event; `count`
# always gives the full number.
MAX_LISTED_PARAMS = 50

Emit = Callable[[str, dict[str, Any]], None]


class ParamWatcher:
    """Emits `freeze`, `unfreeze` and `param_groups_change` events at `check()`.

    The state at construction is the baseline, so the flags a run starts with emit nothing.
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]],
                 optimizer: torch.optim.Optimizer | None, emit: Emit) -> None:
        self._params = params
        self._optimizer = optimizer
        self._emit = emit
        self._flags = self._read_flags()
        self._groups = self._read_groups()

    def _read_flags(self) -> list[bool]:
        return [param.requires_grad for _, param in self._params]

    def _read_groups(self) -> tuple[int, ...]:
        if self._optimizer is None:
            return ()
        return tuple(len(group["params"]) for group in self._optimizer.param_groups)

    def check(self) -> None:
        flags = self._read_flags()
        if flags != self._flags:
            frozen, unfrozen = [], []
            for (name, _), before, after in zip(self._params, self._flags, flags):
                if before and not after:
                    frozen.append(name)
                elif after and not before:
                    unfrozen.append(name)
            for kind, names in ((run_format.EVENT_FREEZE, frozen),
                                (run_format.EVENT_UNFREEZE, unfrozen)):
                if names:
                    self._emit(kind, {"count": len(names), "params": names[:MAX_LISTED_PARAMS]})
            self._flags = flags
        groups = self._read_groups()
        if groups != self._groups:
            self._emit(run_format.EVENT_PARAM_GROUPS_CHANGE,
                       {"groups_before": list(self._groups), "groups_after": list(groups)})
            self._groups = groups


# A weight counts as changed when it moves by at least this factor from its value at the
# last event, or changes sign, or moves to or from zero. A slow ramp (KL annealing, say)
# then writes an event each time it has grown by half, not one on every step.
WEIGHT_CHANGE_FACTOR = 1.5


class LossWeightWatcher:
    """Emits a `loss_weight_change` event when the tasks or their float weights change.

    Weights are compared with those of the last event, so that gradual drift adds up to a
    change. Tensor weights are not compared, since reading them would synchronize; the
    `losses` table still contains their values.
    """

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._weights: dict[str, float | str | None] | None = None

    def check(self, losses: Mapping[str, Any], weights: Mapping[str, Any]) -> None:
        if not losses:
            return
        current = {str(task): _plain_weight(weights.get(task)) for task in losses}
        previous = self._weights
        if previous is None:
            self._weights = current
            return
        if set(current) == set(previous) and not any(
                _weight_changed(previous[task], current[task]) for task in current):
            return
        self._weights = current
        self._emit(run_format.EVENT_LOSS_WEIGHT_CHANGE, {
            "weights_before": previous,
            "weights_after": current,
            "added": sorted(set(current) - set(previous)),
            "removed": sorted(set(previous) - set(current)),
        })


def _plain_weight(weight: Any) -> float | str | None:
    """Return a float weight as a float, a tensor as "tensor", anything else as None."""
    if isinstance(weight, torch.Tensor):
        return "tensor"
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        value = float(weight)
        return value if math.isfinite(value) else None
    return None


def _weight_changed(before: float | str | None, after: float | str | None) -> bool:
    if not isinstance(before, float) or not isinstance(after, float):
        return before != after
    if before == after:
        return False
    if before * after <= 0:
        return True
    small, large = sorted((abs(before), abs(after)))
    return large >= WEIGHT_CHANGE_FACTOR * small


class DatasetWatcher:
    """Emits a `dataset_change` event when a split's description differs from its last one.

    Descriptions are kept per source (`log_dataset` or `split_groups`) and split, so the
    two calls never compare against each other.
    """

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._last: dict[tuple[str, str], dict[str, Any]] = {}

    def seen(self, key: tuple[str, str]) -> bool:
        return key in self._last

    def update(self, key: tuple[str, str], description: dict[str, Any]) -> None:
        """Store `description` for (source, split), emitting an event when it changed."""
        source, split = key
        previous = self._last.get(key)
        self._last[key] = description
        if previous is not None and previous != description:
            self._emit(run_format.EVENT_DATASET_CHANGE, {
                "split": split, "source": source, "before": previous, "after": description})
