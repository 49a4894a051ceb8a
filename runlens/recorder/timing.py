"""Per-rank host timings of each step: `step_time`, `data_time` and `compute_time`.

Under DDP every rank leaves the gradient all-reduce together, so the time between two
`Recorder.step` calls is the same on every rank and hides a slow one. What differs is
where each rank spends that time: a rank that loads its batch slowly starts its forward
late, and a rank that computes slowly finishes its backward late, while the other ranks
wait inside the all-reduce. The probe reads a timer in hooks:

- a forward pre-hook on the model, registered ahead of the hooks already on it (such as
  FSDP's all-gather), marks the start of the step's first training-mode forward;
- under DDP, a forward pre-hook on the wrapped module marks the start of the computation,
  after DDP's broadcast of rank 0's buffers, which waits for the slowest rank;
- a post-accumulate-grad hook on each parameter that requires grad marks the last
  gradient that the local backward wrote. DDP waits for its last all-reduce after that.

No hook reads a tensor or communicates, so the probe adds no host-device sync and no
collective.

NOTE: the times are host times. On a GPU, kernels run asynchronously, so these are the
times at which the host launched the work, and a wait for the device lands in whichever
interval contains the synchronizing call (such as a `loss.item()` in the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from runlens.recorder.optimizer_probe import is_sharded

AREA = "timing probe"


class TimingProbe:
    """Hooks that time the data and compute parts of each step with `timer`.

    `take()`, called by `Recorder.step`, returns the values of the step that ends then:

    - `step_time`: seconds since the previous `take`;
    - `data_time`: seconds from the previous `take` to the start of the first training-mode
      forward call of `model`;
    - `compute_time`: seconds from the start of that forward call (of the module inside
      a DDP wrapper) to the last gradient accumulated into a parameter.

    A value that lacks one of its two times is left out, as on the first step. Under
    FSDP (sharded parameters) `compute_time` is left out, because FSDP's all-gathers
    inside forward and backward wait for the slowest rank, so the fast ranks would show
    that wait as their own compute time.
    """

    def __init__(self, model: nn.Module | None, params: Iterable[torch.nn.Parameter],
                 timer: Callable[[], float], on_error: Callable[[str, Exception], None]) -> None:
        self._timer = timer
        self._on_error = on_error
        self.disabled = False
        self._previous: float | None = None
        self._forward_start: float | None = None
        self._compute_start: float | None = None
        self._last_gradient: float | None = None
        self._handles = []
        params = list(params)
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(self._on_forward,
                                                                 prepend=True))
            if isinstance(model, nn.parallel.DistributedDataParallel):
                self._handles.append(model.module.register_forward_pre_hook(
                    self._on_compute, prepend=True))
        if not any(is_sharded(param) for param in params):
            for param in params:
                # Torch allows the hook only on a tensor that requires grad, so a
                # parameter frozen now is not timed after it is unfrozen.
                if param.requires_grad:
                    self._handles.append(
                        param.register_post_accumulate_grad_hook(self._on_gradient))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _read(self) -> float | None:
        # The hooks run inside the user's forward and backward, so nothing may escape
        # unless the recorder is strict, in which case `on_error` raises.
        try:
            return self._timer()
        except Exception as error:  # noqa: BLE001
            self.disabled = True
            self._on_error(AREA, error)
            return None

    def _on_forward(self, module: nn.Module, args) -> None:
        if self.disabled or not module.training or self._forward_start is not None:
            return
        self._forward_start = self._read()

    def _on_compute(self, module: nn.Module, args) -> None:
        if self.disabled or not module.training or self._compute_start is not None:
            return
        self._compute_start = self._read()

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self.disabled:
            self._last_gradient = self._read()

    def take(self) -> dict[str, float]:
        """Return the timings of the step that ends now, and start timing the next step."""
        now = self._read()
        values: dict[str, float] = {}
        if now is None:
            return values
        if self._previous is not None:
            values["step_time"] = now - self._previous
            if self._forward_start is not None:
                values["data_time"] = self._forward_start - self._previous
        compute_start = self._compute_start
        if compute_start is None:
            compute_start = self._forward_start
        if (compute_start is not None and self._last_gradient is not None
                and self._last_gradient >= compute_start):
            values["compute_time"] = self._last_gradient - compute_start
        self._previous = now
        self._forward_start = self._compute_start = self._last_gradient = None
        return values
