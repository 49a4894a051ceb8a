"""Checks of the `Recorder` constructor's arguments, made before anything is written."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

_CONFIG_EXPECTED = ("a mapping, a dataclass instance, an object with attributes (such as "
                    "argparse.Namespace) or None")


def check_step_count(name: str, value: Any) -> int:
    """Return `value` as an int, or raise unless it is a positive integer (bools rejected)."""
    return _check_integer(name, value, 1, "a positive integer",
                          "Pass a number of steps, such as 100.")


def check_optional_step_count(name: str, value: Any) -> int | None:
    """Return `value` as an int, or None, or raise unless it is a positive integer or None."""
    if value is None:
        return None
    return _check_integer(name, value, 1, "a positive integer or None",
                          "Pass a number of steps, such as 100, or None to turn it off.")


def check_seed(name: str, value: Any) -> int:
    return _check_integer(name, value, 0, "a non-negative integer", "Pass a seed such as 0.")


def check_rank(value: Any) -> int | None:
    if value is None:
        return None
    return _check_integer("rank", value, 0, "a non-negative integer",
                          "Pass this process's rank, or leave rank=None to read it from "
                          "torch.distributed.")


def check_first_step(value: Any) -> int | None:
    if value is None:
        return None
    return _check_integer("step", value, 0, "a non-negative integer or None",
                          "Pass the global step of this segment's first step, or None to "
                          "continue after the last recorded step.")


def _check_integer(name: str, value: Any, minimum: int, expected: str, fix: str) -> int:
    message = f"{name} must be {expected}, got {value!r}. {fix}"
    # bool is an int subclass, but rank=True or flush_every=True is a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(message)
    if value < minimum:
        raise ValueError(message)
    return int(value)


def check_flush_seconds(value: Any) -> float:
    message = (f"flush_seconds must be a positive number of seconds, got {value!r}. "
               "Pass a finite number such as 10.0.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(message)
    # `not value > 0` also rejects NaN. Infinity is rejected because run.json stores the
    # setting and JSON has no infinity.
    if not value > 0 or not math.isfinite(value):
        raise ValueError(message)
    return float(value)


def config_dict(config: Any) -> dict[str, Any]:
    """Convert the `config` argument to a dict, before its values are converted to JSON.

    A dataclass instance gives its fields (nested dataclasses stay objects here and are
    converted by `model_info.json_value`). Any other object with a ``__dict__``, such as
    an ``argparse.Namespace``, gives ``vars(config)``.
    """
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, type):
        raise TypeError(f"config must be {_CONFIG_EXPECTED}, got the class {config.__name__}. "
                        "Pass an instance of it.")
    if dataclasses.is_dataclass(config):
        return {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    if hasattr(config, "__dict__"):
        return dict(vars(config))
    raise TypeError(f"config must be {_CONFIG_EXPECTED}, got {type(config).__name__}. "
                    "Convert it to a dict first.")
