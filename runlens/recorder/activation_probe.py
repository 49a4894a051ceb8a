"""Activation and BatchNorm statistics, seen through forward hooks on stats steps.

A hook works only in the first training-mode forward call of its module on a stats step
(the first micro-batch under gradient accumulation). On every other call it returns
after a few Python checks. The statistics are 0-d tensors on the module's device, so
recording them costs no host-device synchronization before the flush.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

AREA = "activation probe"

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid)

# An input whose absolute value is above the threshold gives a derivative below 0.02:
# tanh'(2.65) = 1 - tanh(2.65)^2 is about 0.0198, and sigmoid'(3.9) about 0.0194.
SATURATION_THRESHOLDS = ((nn.Tanh, 2.65), (nn.Sigmoid, 3.9))

RowSink = Callable[[str, dict[str, Any]], None]


@dataclass
class WatchedModules:
    """(name, module) pairs whose forwards go to the `activations` and `batchnorm` tables."""

    activations: list[tuple[str, nn.Module]] = field(default_factory=list)
    batchnorms: list[tuple[str, nn.Module]] = field(default_factory=list)


def select_modules(model: nn.Module | None, watch_activations: Any,
                   watch_modules: Iterable[nn.Module] | None) -> WatchedModules:
    """Check the probe's constructor arguments and return the modules to watch.

    Raises TypeError or ValueError for invalid arguments, before anything is hooked.
    """
    if not isinstance(watch_activations, bool):
        raise TypeError(f"watch_activations must be a bool, got {watch_activations!r}. "
                        "Pass False to record no activations.")
    if watch_modules is not None:
        watch_modules = _check_watch_modules(model, watch_modules)
    if model is None:
        return WatchedModules()

    names = {id(module): name for name, module in model.named_modules()}
    if not watch_activations:
        activations = []
    elif watch_modules is not None:
        activations = watch_modules
    else:
        activations = [module for module in model.modules()
                       if isinstance(module, ACTIVATION_TYPES)]
        output = output_layer(model)
        if output is not None:
            activations.append(output)
    batchnorms = [module for module in model.modules() if isinstance(module, _BatchNorm)]
    return WatchedModules(
        activations=[(names[id(module)], module) for module in _unique(activations)],
        batchnorms=[(names[id(module)], module) for module in batchnorms])


def _check_watch_modules(model: nn.Module | None,
                         watch_modules: Iterable[nn.Module]) -> list[nn.Module]:
    if model is None:
        raise ValueError("watch_modules needs model= to name the modules. Pass the model "
                         "that contains them.")
    if isinstance(watch_modules, nn.Module) or not isinstance(watch_modules, Iterable):
        raise TypeError("watch_modules must be an iterable of nn.Module instances of the "
                        f"model, got {type(watch_modules).__name__}. Wrap one module in a "
                        "list.")
    modules = list(watch_modules)
    submodule_ids = {id(module) for module in model.modules()}
    for module in modules:
        if not isinstance(module, nn.Module):
            raise TypeError("watch_modules must contain nn.Module instances of the model, "
                            f"got {type(module).__name__} {module!r}.")
        if id(module) not in submodule_ids:
            raise ValueError(f"watch_modules contains {type(module).__name__} {module!r}, "
                             "which is not a submodule of model. Pass modules of the "
                             "recorded model.")
    return modules


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    seen: set[int] = set()
    unique = []
    for module in modules:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append(module)
    return unique


def output_layer(model: nn.Module) -> nn.Module | None:
    """Return the last leaf module with parameters in `model.modules()` order, or None.

    NOTE: this is the model's output layer only when the modules are registered in the
    order that forward calls them, as in most models.
    """
    last = None
    for module in model.modules():
        has_children = next(module.children(), None) is not None
        has_params = next(module.parameters(recurse=False), None) is not None
        if has_params and not has_children:
            last = module
    return last


def _first_tensor(inputs: tuple[Any, ...]) -> torch.Tensor | None:
    if inputs and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    return None


def _saturation_threshold(module: nn.Module) -> float | None:
    for module_type, threshold in SATURATION_THRESHOLDS:
        if isinstance(module, module_type):
            return threshold
    return None


@torch.no_grad()
def activation_statistics(module: nn.Module, inputs: tuple[Any, ...],
                          output: Any) -> dict[str, Any] | None:
    """Compute an `activations` row (without key columns) from one forward call.

    Returns None when the output is not a tensor. Every value but `numel`, `dtype` and
    `module_type` is a 0-d float32 tensor on the output's device.
    """
    if not isinstance(output, torch.Tensor):
        return None
    numel = output.numel()
    row: dict[str, Any] = {"module_type": type(module).__name__, "numel": numel,
                           "dtype": str(output.dtype).removeprefix("torch.")}
    if numel == 0:
        return row
    values = output.detach().float()
    std, mean = torch.std_mean(values, correction=0)
    row["mean"] = mean
    row["std"] = std
    row["max_abs"] = torch.linalg.vector_norm(values, ord=float("inf"))
    row["zero_fraction"] = (numel - torch.count_nonzero(values)) / numel

    threshold = _saturation_threshold(module)
    module_input = _first_tensor(inputs)
    if threshold is not None and module_input is not None and module_input.numel():
        saturated = torch.count_nonzero(module_input.detach().abs() > threshold)
        row["saturated_fraction"] = saturated / module_input.numel()
    return row


@torch.no_grad()
def batchnorm_statistics(module: _BatchNorm, inputs: tuple[Any, ...]) -> dict[str, Any] | None:
    """Compute a `batchnorm` row (without key columns), or None without running stats."""
    if module.running_mean is None or module.running_var is None:
        return None
    module_input = _first_tensor(inputs)
    running_var = module.running_var.detach().float()
    return {
        # The shape is host metadata, so reading it does not synchronize.
        "batch_size": None if module_input is None else module_input.shape[0],
        "training": module.training,
        "running_mean_norm": torch.linalg.vector_norm(module.running_mean.detach().float()),
        "running_var_mean": running_var.mean(),
        "running_var_max": running_var.amax(),
    }


class ActivationProbe:
    """Forward hooks on the watched modules that add rows on stats steps.

    Activation modules are recorded when the module itself is in training mode.
    BatchNorm modules are recorded when the model is in training mode, so a BatchNorm
    frozen with `.eval()` inside a training model still gets rows, with training false,
    and `model.eval()` passes get none.
    """

    def __init__(self, model: nn.Module, watched: WatchedModules,
                 is_stats_step: Callable[[], bool], current_step: Callable[[], int],
                 add_row: RowSink, on_error: Callable[[str, Exception], None]) -> None:
        self._model = model
        self._is_stats_step = is_stats_step
        self._current_step = current_step
        self._add_row = add_row
        self._on_error = on_error
        self.disabled = False
        self._handles = []
        for name, module in watched.activations:
            hook = self._activation_hook(name)
            self._handles.append(module.register_forward_hook(hook))
        for name, module in watched.batchnorms:
            hook = self._batchnorm_hook(name)
            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _activation_hook(self, name: str):
        recorded_at: int | None = None

        def hook(module, inputs, output) -> None:
            nonlocal recorded_at
            if self.disabled or not module.training or not self._is_stats_step():
                return
            step = self._current_step()
            if recorded_at == step:
                return
            recorded_at = step
            self._guarded(self._record_activation, name, module, inputs, output)
        return hook

    def _batchnorm_hook(self, name: str):
        recorded_at: int | None = None

        def hook(module, inputs, output) -> None:
            nonlocal recorded_at
            if self.disabled or not self._model.training or not self._is_stats_step():
                return
            step = self._current_step()
            if recorded_at == step:
                return
            recorded_at = step
            self._guarded(self._record_batchnorm, name, module, inputs)
        return hook

    def _guarded(self, record, *args) -> None:
        # The hooks run inside the user's forward pass, so nothing may escape unless the
        # recorder is strict, in which case `on_error` raises.
        try:
            record(*args)
        except Exception as error:  # noqa: BLE001
            self.disabled = True
            self._on_error(AREA, error)

    def _record_activation(self, name, module, inputs, output) -> None:
        row = activation_statistics(module, inputs, output)
        if row is not None:
            self._add_row("activations", {"module": name, **row})

    def _record_batchnorm(self, name, module, inputs) -> None:
        row = batchnorm_statistics(module, inputs)
        if row is not None:
            self._add_row("batchnorm", {"module": name, **row})
