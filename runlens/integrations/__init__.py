"""Callbacks that record the training loops of framework trainers.

`runlens.integrations.lightning` has a Callback for the Lightning `Trainer`, and
`runlens.integrations.transformers` a TrainerCallback for the Hugging Face `Trainer`.
Each of those modules imports its framework, so importing `runlens` or this package
imports neither. The helpers below are shared by both callbacks; they import torch and
the recorder only when called.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("runlens.integrations")


def missing_framework(module: str, package: str, extra: str,
                      error: ModuleNotFoundError) -> ModuleNotFoundError:
    """Return the error to raise when `module` cannot import its framework `package`."""
    return ModuleNotFoundError(
        f"{module} needs the {package} package, which is not installed ({error}). "
        f"Install it with pip install 'runlens[{extra}]'.", name=package)


def check_recorder_options(options: Mapping[str, Any], set_by_callback: tuple[str, ...],
                           callback: str) -> dict[str, Any]:
    """Return the `runlens.record` options after checking their names.

    Raises TypeError for an option that the callback sets itself (such as `model`) or
    that `Recorder` does not take, so a typo fails when the callback is built, not when
    training starts. The values are checked by `Recorder` when the run directory opens.
    """
    from runlens.recorder.recorder import Recorder

    for name in options:
        if name in set_by_callback:
            raise TypeError(f"{callback} sets {name}= itself from the trainer; remove "
                            f"{name}= from its arguments.")
    accepted = inspect.signature(Recorder).parameters
    unknown = sorted(name for name in options if name not in accepted)
    if unknown:
        known = ", ".join(sorted(name for name in accepted
                                 if name != "run_dir" and name not in set_by_callback))
        raise TypeError(f"{callback} got unknown recorder options {unknown}. The options "
                        f"of runlens.record that it passes on are: {known}.")
    return dict(options)


def open_recorder(run_dir: str | os.PathLike, options: Mapping[str, Any], *, rank: int,
                  all_ranks: bool, **objects: Any):
    """Open a Recorder on a rank that records, or return None on the others.

    Rank 0 always records, and every other rank only with `all_ranks`. Each recording
    rank writes its parts into its own ``rank-<r>`` folders of the same run directory.
    """
    if rank != 0 and not all_ranks:
        return None
    import runlens

    return runlens.record(run_dir, rank=rank, **objects, **options)


def run_closure_first(optimizer) -> Any:
    """Register an optimizer pre-hook that runs a `step(closure)` call's closure first.

    Trainers that pass a closure to `optimizer.step` (Lightning does) compute the
    gradients inside `step`, after the step pre-hooks have run. The recorder measures
    `grad_norm` in its pre-hook, so it would see the previous step's gradients. This
    hook, registered before the recorder's, calls the closure, then hands `step` a
    closure that returns the same result, so every later pre-hook measures this step's
    gradients. It is registered only for torch.optim optimizers other than LBFGS, whose
    `step` calls the closure once. Returns the hook's handle, or None when it was not
    registered.
    """
    import torch

    built_in = type(optimizer).__module__.startswith("torch.optim.")
    if not built_in or isinstance(optimizer, torch.optim.LBFGS):
        return None

    def call_closure(optimizer, args, kwargs):
        if "closure" in kwargs:
            closure = kwargs["closure"]
        elif args:
            closure = args[0]
        else:
            return None
        if closure is None:
            return None
        with torch.enable_grad():
            result = closure()

        def finished_closure():
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": finished_closure}
        return (finished_closure, *args[1:]), kwargs

    return optimizer.register_step_pre_hook(call_closure)


def split_metrics(metrics: Mapping[str, Any], prefix: str,
                  skipped: Callable[[str], bool] = lambda name: False) -> dict[str, Any]:
    """Return `metrics` with `prefix` and a separator cut from the start of their names.

    With the prefix ``val``, ``val_loss``, ``val/loss`` and ``val.loss`` become ``loss``.
    A name without the prefix is kept whole, and names for which `skipped` returns True
    are left out.
    """
    result = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or skipped(name):
            continue
        short = name
        for separator in ("_", "/", "."):
            if name.startswith(prefix + separator) and len(name) > len(prefix) + 1:
                short = name[len(prefix) + 1:]
                break
        result.setdefault(short, value)
    return result


class WarnOnce:
    """Logs the first error of a callback hook and reports whether one happened.

    The callbacks call it from their training hooks, where nothing may escape into the
    training loop, so after the first error the hooks stop recording and only `close`
    still runs.
    """

    def __init__(self, callback: str) -> None:
        self.callback = callback
        self.failed = False

    def report(self, hook: str, error: Exception) -> None:
        if not self.failed:
            logger.warning("runlens %s stopped recording after an error in %s: %s: %s. "
                           "Training goes on.", self.callback, hook,
                           type(error).__name__, error)
        self.failed = True
