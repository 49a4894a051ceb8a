"""Static facts about the model and optimizer for run.json: parameter kinds and param groups."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,  # NOTE: the public BatchNorm classes share this base.
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def param_kind(module: nn.Module, local_name: str) -> str:
    """Classify a parameter as weight, bias, norm or embedding by its owning module.

    A module whose class name contains "Norm" counts as normalization, so that custom
    RMSNorm or ScaleNorm layers are classified like the built-in ones.
    """
    if isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
        return "norm"
    if isinstance(module, _EMBEDDING_TYPES):
        return "embedding"
    if local_name == "bias" or local_name.endswith("_bias"):
        return "bias"
    return "weight"


def describe_params(model: nn.Module | None) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Return run.json's parameter list and a map from `id(param)` to its qualified name."""
    if model is None:
        return [], {}
    described: list[dict[str, Any]] = []
    names: dict[int, str] = {}
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in names:
                continue  # a tied parameter keeps its first name
            name = f"{module_name}.{local_name}" if module_name else local_name
            names[id(param)] = name
            described.append({
                "name": name,
                "kind": param_kind(module, local_name),
                "module_type": type(module).__name__,
                "shape": list(param.shape),
                "numel": param.numel(),
                "dtype": str(param.dtype).removeprefix("torch."),
                "requires_grad": param.requires_grad,
            })
    return described, names


def param_names_for(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[int, str]:
    """Extend `names` with positional names for optimizer parameters the model does not own."""
    complete = dict(names)
    for group_index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            complete.setdefault(id(param), f"group{group_index}.param{position}")
    return complete


def describe_optimizer(optimizer: torch.optim.Optimizer | None,
                       names: dict[int, str]) -> dict[str, Any] | None:
    if optimizer is None:
        return None
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        hyperparameters = {key: json_value(value) for key, value in group.items()
                           if key != "params"}
        groups.append({
            "index": index,
            "params": [names.get(id(param), f"group{index}.param{i}")
                       for i, param in enumerate(group["params"])],
            "hyperparameters": hyperparameters,
        })
    return {
        "class": type(optimizer).__name__,
        "module": type(optimizer).__module__,
        "param_groups": groups,
    }


def json_value(value: Any) -> Any:
    """Convert a hyperparameter to a JSON value: tensors to numbers, tuples to lists."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() != 1 else float(value)
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    return repr(value)
