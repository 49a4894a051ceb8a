"""Static facts about the model and optimizer for run.json: parameter kinds and param groups."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
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


# Containers nested deeper than this are stored as their repr, so a config that contains
# itself cannot recurse forever.
MAX_JSON_DEPTH = 20
# Tensors and numpy arrays with more elements are stored as {"shape", "dtype"} only.
MAX_JSON_ELEMENTS = 16
_MAX_CUT_REPR_CHARS = 200


def json_value(value: Any, depth: int = 0) -> Any:
    """Convert a hyperparameter or config value to JSON values.

    Tensors and numpy arrays of up to `MAX_JSON_ELEMENTS` elements become numbers or lists
    (reading a tensor synchronizes with its device), and larger ones their shape and
    dtype. Tuples become lists, mappings and dataclass instances objects, non-finite
    floats strings, and other objects their repr.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        return _tensor_json(value, depth)
    if isinstance(value, np.ndarray):
        return _array_json(value, depth)
    if isinstance(value, np.generic):
        return json_value(value.item(), depth)
    is_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if not isinstance(value, (Mapping, list, tuple)) and not is_dataclass:
        return repr(value)
    if depth >= MAX_JSON_DEPTH:
        text = repr(value)
        return text if len(text) <= _MAX_CUT_REPR_CHARS else text[:_MAX_CUT_REPR_CHARS] + "..."
    if isinstance(value, Mapping):
        return {str(key): json_value(item, depth + 1) for key, item in value.items()}
    if is_dataclass:
        return {field.name: json_value(getattr(value, field.name), depth + 1)
                for field in dataclasses.fields(value)}
    return [json_value(item, depth + 1) for item in value]


def _tensor_json(tensor: torch.Tensor, depth: int) -> Any:
    summary = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    if tensor.numel() > MAX_JSON_ELEMENTS:
        return summary
    try:
        values = tensor.detach().reshape(()).tolist() if tensor.numel() == 1 \
            else tensor.detach().tolist()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return summary  # a meta or sparse tensor has no values to read
    return json_value(values, depth)


def _array_json(array: np.ndarray, depth: int) -> Any:
    if array.size > MAX_JSON_ELEMENTS:
        return {"shape": list(array.shape), "dtype": str(array.dtype)}
    return json_value(array.tolist(), depth)
