"""Optimizer trajectories: the parameters projected onto two fixed random directions.

A trajectory point is (x, y) = (<u, theta>, <v, theta>) / sqrt(n), where theta is the
vector of all projected parameters (the model's floating-point parameters that require
grad when the recorder opens, in `named_parameters()` order), n its number of elements,
and u and v are standard Gaussian vectors. The scale 1/sqrt(n) makes a change of the
coordinate as large as the root-mean-square change of one parameter element.

u and v are never stored. For each projected parameter, at each point, a
`torch.Generator` on the parameter's device is seeded with `parameter_seed(seed, index)`
and draws that parameter's part of u and then of v into one temporary tensor. The
cost is that temporary (plus a float32 copy of a parameter of another dtype), one
parameter at a time, and only on trajectory steps. The coordinates stay 0-d tensors
on the device until the flush, so a point costs no host-device synchronization.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

AREA = "trajectory probe"
TABLE = "trajectory"
# Names the projection's definition in run.json. A change to how u and v are drawn or
# scaled needs a new name, so that compare never overlays runs with different directions.
PROJECTION_METHOD = "gaussian-per-parameter-v1"


def parameter_seed(seed: int, index: int) -> int:
    """Return the generator seed of the projected parameter at position `index`.

    The first 8 bytes of SHA-256 of ``runlens-trajectory:<seed>:<index>``, read as a
    little-endian integer and cut to 63 bits, so that seeds of different runs and
    parameters do not collide the way ``seed + index`` would.
    """
    digest = hashlib.sha256(f"runlens-trajectory:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def projected_params(model: nn.Module | None,
                     trajectory_every: int | None) -> list[tuple[str, nn.Parameter]]:
    """Return the (name, parameter) pairs to project, or [] when trajectories are off.

    Raises ValueError when `trajectory_every` is set without a model, or the model has
    no floating-point parameter that requires grad.
    """
    if trajectory_every is None:
        return []
    if model is None:
        raise ValueError("trajectory_every needs model=: the trajectory is a projection of "
                         "the model's parameters. Pass model=, or trajectory_every=None.")
    params = [(name, param) for name, param in model.named_parameters()
              if param.requires_grad and param.is_floating_point()]
    if not params:
        raise ValueError("trajectory_every is set, but the model has no floating-point "
                         "parameter that requires grad. Pass trajectory_every=None.")
    return params


class TrajectoryProbe:
    """Projects the parameters onto the two random directions on trajectory steps.

    A point is taken at most once per step: in the optimizer's step pre-hook, so it
    shows the parameters that the step's loss was computed with, or else in
    `Recorder.step` (no optimizer, or a step that `GradScaler` skipped).
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], seed: int,
                 is_due: Callable[[], bool], current_step: Callable[[], int],
                 add_row: Callable[[str, dict[str, Any]], None],
                 on_error: Callable[[str, Exception], None]) -> None:
        self.params = params
        self.seed = seed
        self.numel = sum(param.numel() for _, param in params)
        self.device_types = sorted({param.device.type for _, param in params})
        self.shapes = [tuple(param.shape) for _, param in params]
        self.param_device_types = [param.device.type for _, param in params]
        self._is_due = is_due
        self._current_step = current_step
        self._add_row = add_row
        self._on_error = on_error
        self._generators: dict[torch.device, torch.Generator] = {}
        self._taken_at: int | None = None
        self._handles: list[Any] = []
        self.disabled = False

    def definition(self) -> dict[str, Any]:
        """Describe the projection for run.json, so that compare can check that two runs match."""
        return {
            "method": PROJECTION_METHOD,
            "seed": self.seed,
            "numel": self.numel,
            "device_types": self.device_types,
            "params": [{"name": name, "shape": list(shape), "device_type": device_type}
                       for (name, _), shape, device_type
                       in zip(self.params, self.shapes, self.param_device_types)],
        }

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.take_if_due()

    def take_if_due(self) -> None:
        """Add this step's point to the `trajectory` table, unless it is taken or not due.

        It runs inside the user's `optimizer.step()` and `Recorder.step`, so an error
        turns the probe off and goes to `on_error`, which raises only when the recorder
        is strict.
        """
        if self.disabled:
            return
        try:
            self._take_if_due()
        except Exception as error:  # noqa: BLE001
            self.disabled = True
            self._on_error(AREA, error)

    def _take_if_due(self) -> None:
        step = self._current_step()
        if self._taken_at == step or not self._is_due():
            return
        self._taken_at = step
        x, y = self.project()
        self._add_row(TABLE, {"x": x, "y": y})

    @torch.no_grad()
    def project(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x, y) as 0-d float32 tensors on the first parameter's device."""
        # NOTE: only the CPU path has run where this was written (no GPU). The CUDA path
        # uses the same calls with CUDA generators; tests/test_trajectory.py checks it
        # when a GPU is present.
        scale = 1.0 / math.sqrt(self.numel)
        totals: dict[torch.device, torch.Tensor] = {}
        for index, (name, param) in enumerate(self.params):
            self._check_unchanged(index, name, param)
            generator = self._generator(param.device)
            generator.manual_seed(parameter_seed(self.seed, index))
            values = param.detach().reshape(-1).float()
            direction = torch.randn(values.shape, generator=generator, device=param.device,
                                    dtype=torch.float32)
            dot_u = torch.dot(direction, values)
            torch.randn(values.shape, generator=generator, out=direction)
            dot_v = torch.dot(direction, values)
            del direction, values
            pair = torch.stack((dot_u, dot_v))
            totals[param.device] = totals[param.device] + pair if param.device in totals \
                else pair
        devices = list(totals)
        # NOTE: parameters on several devices are summed on the first one; a copy between
        # a GPU and the CPU then synchronizes on trajectory steps.
        total = totals[devices[0]]
        for device in devices[1:]:
            total = total + totals[device].to(devices[0])
        total = total * scale
        return total[0], total[1]

    def _check_unchanged(self, index: int, name: str, param: nn.Parameter) -> None:
        """Raise RuntimeError when a parameter no longer matches the definition in run.json.

        Only host metadata is read, so the check does not synchronize.
        """
        if param.device.type != self.param_device_types[index]:
            raise RuntimeError(
                f"parameter {name!r} moved to {param.device} after the recorder opened with "
                f"it on {self.param_device_types[index]}, and random directions drawn there "
                "differ. Open the recorder after model.to(device).")
        if tuple(param.shape) != self.shapes[index]:
            raise RuntimeError(
                f"parameter {name!r} changed shape from {list(self.shapes[index])} to "
                f"{list(param.shape)} after the recorder opened, so the projection in "
                "run.json no longer describes it. Record into a new run directory.")

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            self._generators[device] = generator
        return generator
