"""Checkpoint loads, seen through state-dict hooks on the model, optimizer, scheduler and scaler.

A load is recorded as a `checkpoint_load` event that names the object, so a resume that
restores the weights but not the optimizer shows that in the run's events.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from runlens.recorder.optimizer_probe import count_state_tensors

EventSink = Callable[[str, dict[str, Any]], None]


class CheckpointProbe:
    def __init__(self, emit: EventSink) -> None:
        # `emit` must not raise: the hooks run inside the user's load_state_dict calls.
        self._emit = emit
        self._handles: list[Any] = []
        self._patched: list[Any] = []

    def watch_model(self, model) -> None:
        def after_load(module, incompatible_keys) -> None:
            self._emit("checkpoint_load", {
                "object": "model",
                "missing_keys": len(incompatible_keys.missing_keys),
                "unexpected_keys": len(incompatible_keys.unexpected_keys),
            })
        self._handles.append(model.register_load_state_dict_post_hook(after_load))

    def watch_optimizer(self, optimizer) -> None:
        def after_load(optimizer) -> None:
            self._emit("checkpoint_load", {
                "object": "optimizer",
                "state_tensors": count_state_tensors(optimizer),
            })
        self._handles.append(optimizer.register_load_state_dict_post_hook(after_load))

    def watch_by_method(self, obj, object_name: str) -> None:
        """Wrap `obj.load_state_dict` on the instance, for classes with no load hook.

        LR schedulers and GradScaler have no public load hook, so the instance gets a
        wrapper that is deleted again when recording stops; the class is untouched.
        An LR scheduler's `state_dict()` copies its instance `__dict__`, so it would
        return the wrapper, a local function that `torch.save` cannot pickle. The instance
        therefore also gets a `state_dict` wrapper that leaves both wrappers out.
        """
        original_load = obj.load_state_dict
        original_state_dict = obj.state_dict

        @functools.wraps(original_load)
        def load_state_dict(*args, **kwargs):
            result = original_load(*args, **kwargs)
            self._emit("checkpoint_load", {"object": object_name})
            return result

        @functools.wraps(original_state_dict)
        def state_dict(*args, **kwargs):
            state = original_state_dict(*args, **kwargs)
            if isinstance(state, dict):
                wrappers = (load_state_dict, state_dict)
                state = {key: value for key, value in state.items()
                         if not any(value is wrapper for wrapper in wrappers)}
            return state

        obj.load_state_dict = load_state_dict
        obj.state_dict = state_dict
        self._patched.append(obj)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for obj in self._patched:
            for method in ("load_state_dict", "state_dict"):
                try:
                    delattr(obj, method)
                except AttributeError:
                    pass
        self._handles, self._patched = [], []
