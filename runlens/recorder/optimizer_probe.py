"""Optimizer signals: gradient norms, learning rates, and per-parameter statistics.

All values are computed on the parameters' device inside the optimizer's step hooks and
kept as tensors, so a step costs no host-device synchronization.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support has no DTensor
    DTensor = None

_STATE_NORM_KEYS = {
    "exp_avg": "exp_avg_norm",
    "exp_avg_sq": "exp_avg_sq_norm",
    "momentum_buffer": "momentum_buffer_norm",
}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's part of a DTensor (FSDP2's `fully_shard`), or a plain tensor as is.

    A norm of a DTensor is itself a DTensor, which the writer cannot convert without a
    collective, so statistics are computed from the local part, with no communication.
    """
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Return whether `tensor` is a DTensor split across ranks (a `Shard` placement).

    NOTE: the shards of the older FullyShardedDataParallel wrapper (FSDP1) are plain
    tensors (FlatParameter), so they count as whole. FSDP1 raises an error on a machine
    without an accelerator (torch 2.13.0), so that case is untested.
    """
    if DTensor is None or not isinstance(tensor, DTensor):
        return False
    return any(placement.is_shard() for placement in tensor.placements)


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Return the 2-norm of each tensor, of its local part for a DTensor, as a float32 vector."""
    norms = torch._foreach_norm([local_tensor(tensor) for tensor in tensors])
    if all(norm.dtype == torch.float32 for norm in norms):
        return torch.stack(norms)
    return torch.stack([norm.float() for norm in norms])


class OptimizerProbe:
    """Hooks one optimizer and reports what happened in its last step.

    `grad_norm` is the 2-norm of all gradients viewed as one vector, as the optimizer
    receives them: after AMP unscaling and after clipping. `clip_total_norm` in the
    clipping probe carries the norm before clipping.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str],
                 is_stats_step, on_error) -> None:
        self.optimizer = optimizer
        self._on_error = on_error
        self.names = names
        self._is_stats_step = is_stats_step
        self._handles = [
            optimizer.register_step_pre_hook(self._guarded(self._before_step)),
            optimizer.register_step_post_hook(self._guarded(self._after_step)),
        ]
        self.stepped = False
        self.disabled = False
        self.measure_state_next_step = True
        self._group_rows: list[dict[str, Any]] | None = None
        self._scalars: dict[str, Any] = {}
        self._param_rows: list[dict[str, Any]] = []
        self._before: list[torch.Tensor] | None = None
        self._stats_params: list[torch.nn.Parameter] = []

    def _guarded(self, hook):
        # Optimizer hooks run inside the user's `optimizer.step()`, so nothing may escape.
        # After the first error both hooks return at once, so a broken probe costs no time.
        def guarded_hook(optimizer, args, kwargs):
            if self.disabled:
                return
            try:
                hook(optimizer, args, kwargs)
            except Exception as error:  # noqa: BLE001
                self._before = None
                self.disabled = True
                self._on_error("optimizer probe", error)
        return guarded_hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _params_with_grad(self) -> list[torch.nn.Parameter]:
        return [param for group in self.optimizer.param_groups for param in group["params"]
                if param.grad is not None and not param.grad.is_sparse]

    def _before_step(self, optimizer, args, kwargs) -> None:
        self.stepped = True
        # The schedulers of most loops step right after the optimizer, so the learning
        # rate that this step used is the one read here, not the one at `Recorder.step`.
        self._group_rows = self._read_groups()
        params = self._params_with_grad()
        stats_step = self._is_stats_step()
        if self.measure_state_next_step or stats_step:
            self._scalars["optimizer_state_tensors"] = count_state_tensors(optimizer)
            self.measure_state_next_step = False
        if not params:
            return
        grad_norms = _norms([param.grad for param in params])
        self._scalars["grad_norm"] = torch.linalg.vector_norm(grad_norms)
        self._scalars["nonfinite_grad_tensors"] = (~torch.isfinite(grad_norms)).sum()
        if stats_step:
            self._stats_params = params
            self._param_rows = [
                {"param": self.names.get(id(p), "?"), "grad_norm": norm,
                 "requires_grad": p.requires_grad, "numel": p.numel(),
                 "grad_zero_fraction": _zero_fraction(local_tensor(p.grad)),
                 "sharded": True if is_sharded(p) else None}
                for p, norm in zip(params, grad_norms.unbind())]
            # NOTE: the update norm needs the parameters before the step, so a stats step
            # keeps one temporary copy of the trained parameters on their device.
            self._before = [local_tensor(param).detach().clone() for param in params]

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        params = self._stats_params
        current = [local_tensor(param).detach() for param in params]
        param_norms = _norms(current)
        update_norms = _norms(torch._foreach_sub(current, self._before))
        self._before = None
        for row, param, param_norm, update_norm in zip(
                self._param_rows, params, param_norms.unbind(), update_norms.unbind()):
            row["param_norm"] = param_norm
            row["update_norm"] = update_norm
            row.update(state_statistics(optimizer.state.get(param, {}), param))

    def take(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Return this step's scalar values and per-parameter rows, and reset them."""
        scalars, rows = self._scalars, self._param_rows
        self._scalars, self._param_rows, self.stepped = {}, [], False
        self._stats_params = []
        return scalars, rows

    def group_rows(self) -> list[dict[str, Any]]:
        """Return lr and weight decay per param group as used by the last step.

        A skipped step (AMP found inf) used none, so the current values are returned.
        """
        rows, self._group_rows = self._group_rows, None
        return rows if rows is not None else self._read_groups()

    def _read_groups(self) -> list[dict[str, Any]]:
        rows = []
        for index, group in enumerate(self.optimizer.param_groups):
            rows.append({"group": index, "lr": _number(group.get("lr")),
                         "weight_decay": _number(group.get("weight_decay"))})
        return rows


def _zero_fraction(grad: torch.Tensor) -> torch.Tensor | float:
    """Return the share of exactly-zero elements of a gradient, as a device tensor."""
    numel = grad.numel()
    if numel == 0:
        return 0.0
    return (numel - torch.count_nonzero(grad)) / numel


def _number(value: Any) -> Any:
    # A tensor learning rate (capturable optimizers) stays a tensor and is read at the flush.
    if isinstance(value, torch.Tensor):
        return value.detach().float()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def count_state_tensors(optimizer: torch.optim.Optimizer) -> int:
    """Count the tensors held in the optimizer's per-parameter state (moments, step counts).

    A value of zero after a resume means the optimizer starts from fresh state.
    """
    return sum(1 for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor))


def state_statistics(state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """Return the norms of a parameter's optimizer state and whether its shapes match."""
    row: dict[str, Any] = {}
    matches = True
    for key, column in _STATE_NORM_KEYS.items():
        value = state.get(key)
        if isinstance(value, torch.Tensor):
            row[column] = torch.linalg.vector_norm(local_tensor(value).detach().float())
            matches = matches and value.shape == param.shape
    step = state.get("step")
    if isinstance(step, torch.Tensor):
        # The optimizer increments this tensor in place, so the probe keeps a copy.
        row["state_step"] = local_tensor(step).detach().float().reshape(()).clone()
    elif isinstance(step, (int, float)):
        row["state_step"] = float(step)
    if len(row):
        row["state_matches_param"] = matches
    return row
