"""Recording without code changes: global PyTorch hooks that find what to record.

`runlens record -- python train.py` starts the program with the folder of
`runlens/recorder/bootstrap/sitecustomize.py` first on PYTHONPATH. That file calls
`start`, which waits until the program imports torch and then installs the hooks of
`AutoRecorder`:

- optimizers: global optimizer step pre- and post-hooks. The first step of an optimizer
  opens a `Recorder` for it, and the post-hook of every step calls `Recorder.step`;
- the model: global module and parameter registration hooks note every module that is
  built. The model of an optimizer is the outermost module that contains its
  parameters and none of another optimizer's;
- the loss: wrappers of `torch.Tensor.backward` and `torch.autograd.backward` keep the
  scalar tensor of each backward call and sum the calls of one optimizer step;
- the LR scheduler, the GradScaler, `clip_grad_norm_` and checkpoint loads: wrappers of
  their classes' methods or of the function.

Every wrapper calls the wrapped function with the same arguments and returns its result.
The hooks catch their own errors: after an error, recording stops with one warning line
on stderr and the program goes on. This module imports torch only in `install`, which
runs after the program itself has imported torch. docs/recording.md describes the rules.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The environment variables that `runlens record` sets for the program. The bootstrap
# removes every variable with this prefix from os.environ before the program starts, so
# the processes that the program starts are not recorded.
ENV_PREFIX = "RUNLENS_RECORD_"
ENV_RUN_DIR = ENV_PREFIX + "DIR"
ENV_OPTIONS = ENV_PREFIX + "OPTIONS"
ENV_STATUS_FILE = ENV_PREFIX + "STATUS_FILE"

# The `Recorder` keyword arguments that `runlens record` passes through ENV_OPTIONS.
RECORDER_OPTIONS = ("param_stats_every", "trajectory_every", "trajectory_seed",
                    "flush_every", "flush_seconds", "watch_activations")

# Checkpoint loads are kept for recorders that are not open yet until every optimizer of
# the program has a recorder, or for this many recorded steps when an optimizer never
# steps.
MAX_DISCOVERY_STEPS = 100

# Outputs of `GradScaler.scale` kept for the loss until the next optimizer step. A program
# that scales without ever stepping would otherwise grow the map without bound.
MAX_SCALED_OUTPUTS = 64

TRAINING_ERROR_EVENT = "training_error"


@dataclass(frozen=True)
class Settings:
    """Settings that `runlens record` passes to the program: run directory and options."""

    run_dir: Path
    options: dict[str, Any]
    status_file: Path | None = None

    def environment(self) -> dict[str, str]:
        """Return the environment variables that carry these settings to the program."""
        variables = {ENV_RUN_DIR: str(self.run_dir), ENV_OPTIONS: json.dumps(self.options)}
        if self.status_file is not None:
            variables[ENV_STATUS_FILE] = str(self.status_file)
        return variables

    @classmethod
    def from_environment(cls, variables: dict[str, str]) -> Settings | None:
        """Read the settings from the variables that the bootstrap took, or return None.

        Raises ValueError when the options are not a JSON object of known options.
        """
        run_dir = variables.get(ENV_RUN_DIR)
        if not run_dir:
            return None
        options = json.loads(variables.get(ENV_OPTIONS) or "{}")
        if not isinstance(options, dict):
            raise ValueError(f"{ENV_OPTIONS} must be a JSON object, got {options!r}")
        unknown = sorted(set(options) - set(RECORDER_OPTIONS))
        if unknown:
            raise ValueError(f"{ENV_OPTIONS} has unknown options {unknown}")
        status_file = variables.get(ENV_STATUS_FILE)
        return cls(Path(run_dir), options, Path(status_file) if status_file else None)


def start(variables: dict[str, str]) -> AutoRecorder | None:
    """Start recording with the settings in `variables`, which the bootstrap took from os.environ.

    The hooks are installed at once when torch is already imported, and otherwise right
    after the program imports it. Returns None when `variables` hold no run directory.
    """
    settings = Settings.from_environment(variables)
    if settings is None:
        return None
    recorder = AutoRecorder(settings)
    recorder.write_status()
    if "torch" in sys.modules:
        recorder.install_safely()
    else:
        sys.meta_path.insert(0, _TorchImportWatcher(recorder.install_safely))
    return recorder


def warn(message: str) -> None:
    """Write one `runlens: warning:` line to stderr."""
    line = " ".join(message.split())
    try:
        print(f"runlens: warning: {line}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a closed stderr must not stop the program
        pass


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class _TorchImportWatcher:
    """A `sys.meta_path` finder that calls `on_import` once `import torch` has finished.

    It finds torch's spec through the other finders and wraps the loader's `exec_module`
    on that loader instance only, so torch itself loads as it would without it. The
    finder stays in place until torch has run: a library may call
    `importlib.util.find_spec("torch")` only to check that torch is installed.
    """

    def __init__(self, on_import: Callable[[], None]) -> None:
        self._on_import = on_import

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch":
            return None
        spec = None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is not self and find_spec is not None:
                spec = find_spec(name, path, target)
                if spec is not None:
                    break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_install(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                with contextlib.suppress(AttributeError):
                    del loader.exec_module
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            self._on_import()

        try:
            loader.exec_module = exec_then_install
        except Exception as error:  # noqa: BLE001 - torch must import as it would without us
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
            warn(f"recording is off: runlens could not watch the import of torch "
                 f"({describe_error(error)}). The program runs without recording.")
        return spec


@dataclass
class _Entry:
    """An optimizer that has stepped, and the recorder of its steps.

    The entry refers to its optimizer weakly: while recording, the Recorder keeps it
    alive, and a replaced optimizer (with its state) can be freed.
    """

    optimizer_ref: weakref.ref
    run_dir: Path
    recorder: Any = None
    model: Any = None
    scheduler: Any = None
    scaler: Any = None
    # "active", "failed" (the Recorder did not open) or "replaced" (a newer optimizer
    # took over the run directory).
    state: str = "active"
    warned_replaced: bool = False


@dataclass
class _PendingLoad:
    """A checkpoint load that happened before the recorder that it concerns was opened."""

    kind: str
    target: weakref.ref
    detail: dict[str, Any]


@dataclass
class _ScalerCall:
    """A `GradScaler.step(optimizer)` call in progress."""

    scaler: Any
    optimizer: Any
    stepped: bool = False


class AutoRecorder:
    """Finds the optimizers, models, losses and schedulers of a program and records them.

    Each optimizer that steps gets its own `Recorder`. When the program has one optimizer
    at the first step, the run directory is `settings.run_dir`. When it has several, each
    optimizer records into `<run_dir>/<index>-<OptimizerClass>`, numbered in the order of
    their first steps.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Forked children (DataLoader workers) inherit the hooks but must not record:
        # every hook compares the process id with this one.
        self.pid = os.getpid()
        self.disabled = False
        self._local = threading.local()
        self._entries: dict[int, _Entry] = {}
        self._layout: str | None = None
        self._next_index = 0
        self._optimizers: Any = weakref.WeakSet()
        # id -> LR scheduler, in the order in which they were created.
        self._schedulers: dict[int, weakref.ref] = {}
        # id -> module, for every module built since torch was imported.
        self._modules: dict[int, weakref.ref] = {}
        self._modules_pruned_at = 0
        self._discovering = True
        self._discovery_steps = 0
        self._pending_loss: Any = None
        self._pending_clip: tuple[Any, Any] | None = None
        self._scaled_outputs: dict[int, tuple[weakref.ref, Any]] = {}
        self._pending_loads: list[_PendingLoad] = []
        self._wrapped: set[tuple[type, str]] = set()
        self._opened_runs: list[dict[str, Any]] = []
        self._failed_run_dirs: list[Path] = []

    # -- installation ---------------------------------------------------------------------

    def install_safely(self) -> None:
        """Install the hooks, or turn recording off with one warning line when that fails."""
        try:
            self.install()
        except Exception as error:  # noqa: BLE001 - the program must run without recording
            self.disabled = True
            warn(f"recording is off: runlens could not install its hooks into torch "
                 f"({describe_error(error)}). The program runs without recording.")

    def install(self) -> None:
        """Install every global hook and wrapper. Call it after torch is imported."""
        import torch
        import torch.amp.grad_scaler
        import torch.nn.utils.clip_grad
        from torch.nn.modules.module import (register_module_module_registration_hook,
                                             register_module_parameter_registration_hook)
        from torch.optim import lr_scheduler
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)

        register_optimizer_step_pre_hook(self._before_optimizer_step)
        register_optimizer_step_post_hook(self._after_optimizer_step)
        # Registration hooks run only while modules are built. Global forward hooks would
        # run on every module call, and make torch.compile warn and recompile.
        register_module_module_registration_hook(self._note_submodule)
        register_module_parameter_registration_hook(self._note_parameter)

        self._wrap(torch.optim.Optimizer, "__init__", self._wrap_optimizer_init)
        self._wrap(torch.optim.Optimizer, "load_state_dict",
                   functools.partial(self._wrap_load, "optimizer"))
        self._wrap(torch.nn.Module, "load_state_dict",
                   functools.partial(self._wrap_load, "model"))
        self._wrap(torch.Tensor, "backward", self._wrap_tensor_backward)
        self._wrap(torch.autograd, "backward", self._wrap_autograd_backward)
        self._install_clip_wrapper(torch.nn.utils, torch.nn.utils.clip_grad)

        scaler_class = torch.amp.grad_scaler.GradScaler
        self._wrap(scaler_class, "scale", self._wrap_scaler_scale)
        self._wrap(scaler_class, "step", self._wrap_scaler_step)
        self._wrap(scaler_class, "load_state_dict",
                   functools.partial(self._wrap_load, "scaler"))

        self._scheduler_base = lr_scheduler.LRScheduler
        for scheduler_class in [self._scheduler_base, *_subclasses(self._scheduler_base)]:
            self._wrap_scheduler_class(scheduler_class)
        atexit.register(self.close)

    def _wrap(self, owner: Any, name: str, make_wrapper: Callable[[Any], Any]) -> None:
        """Replace `owner.name` with `make_wrapper(original)`, once per owner and name."""
        key = (owner, name)
        if key in self._wrapped:
            return
        original = getattr(owner, name)
        wrapper = make_wrapper(original)
        functools.update_wrapper(wrapper, original)
        setattr(owner, name, wrapper)
        self._wrapped.add(key)

    def _wrap_scheduler_class(self, scheduler_class: type) -> None:
        """Wrap the `__init__` and `load_state_dict` that `scheduler_class` itself defines.

        Subclasses such as ReduceLROnPlateau and SequentialLR do not call
        `LRScheduler.__init__`, so wrapping only the base class would miss them.
        """
        if "__init__" in vars(scheduler_class):
            self._wrap(scheduler_class, "__init__", self._wrap_scheduler_init)
        if "load_state_dict" in vars(scheduler_class):
            self._wrap(scheduler_class, "load_state_dict",
                       functools.partial(self._wrap_load, "scheduler"))

    def _install_clip_wrapper(self, utils_module: Any, clip_module: Any) -> None:
        original = clip_module.clip_grad_norm_
        wrapper = self._wrap_clip(original)
        functools.update_wrapper(wrapper, original)
        # The `Recorder`'s own clipping probe leaves a function with this attribute alone,
        # so the clip values reach the recorder only through `Recorder.log_clip`.
        wrapper._runlens_probe = self
        utils_module.clip_grad_norm_ = wrapper
        clip_module.clip_grad_norm_ = wrapper

    def _start_discovery(self) -> None:
        self._discovering = True
        self._discovery_steps = 0

    def _finish_discovery(self) -> None:
        self._discovering = False
        self._pending_loads.clear()

    # -- guards ---------------------------------------------------------------------------

    def _active(self) -> bool:
        return not self.disabled and os.getpid() == self.pid

    def _guard(self, area: str, function: Callable[..., Any], *args: Any) -> None:
        """Call `function` while recording is on. An error in it turns recording off."""
        if not self._active():
            return
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - never raise into the program
            self._fail(area, error)

    def _fail(self, area: str, error: Exception) -> None:
        """Turn recording off after an internal error, with one warning line."""
        if self.disabled:
            return
        self.disabled = True
        with contextlib.suppress(Exception):
            self._finish_discovery()
        warn(f"recording stopped: runlens failed in its {area} hook "
             f"({describe_error(error)}). The program goes on; the steps recorded so far "
             "are kept.")

    @contextlib.contextmanager
    def _outermost(self, name: str) -> Iterator[bool]:
        """Yield True only in the outermost of nested calls of the same kind in a thread."""
        depth = getattr(self._local, name, 0)
        setattr(self._local, name, depth + 1)
        try:
            yield depth == 0
        finally:
            setattr(self._local, name, depth)

    def _stepping(self) -> list[Any]:
        """Return this thread's optimizers whose step is in progress, outermost first."""
        stack = getattr(self._local, "stepping", None)
        if stack is None:
            stack = self._local.stepping = []
        return stack

    def _scaler_calls(self) -> list[_ScalerCall]:
        calls = getattr(self._local, "scaler_calls", None)
        if calls is None:
            calls = self._local.scaler_calls = []
        return calls

    # -- optimizer steps ------------------------------------------------------------------

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active():
            return
        try:
            stack = self._stepping()
            for index, stepping in enumerate(stack):
                if stepping is optimizer:
                    # A step of this optimizer raised before its post-hook ran.
                    del stack[index:]
                    break
            # NOTE: when another optimizer's step raised and that optimizer never steps
            # again, its stale entry makes every later step look nested, so unrecorded.
            nested = bool(stack)
            stack.append(optimizer)
            # The step of an optimizer inside another one's step (a wrapper such as
            # Lookahead) belongs to the outer optimizer.
            if not nested:
                self._entry_for(optimizer)
        except Exception as error:  # noqa: BLE001
            self._fail("optimizer step", error)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active():
            return
        try:
            stack = self._stepping()
            if stack and stack[-1] is optimizer:
                stack.pop()
            if stack:
                return
            for call in self._scaler_calls():
                if call.optimizer is optimizer:
                    call.stepped = True
            self._record_step(optimizer)
        except Exception as error:  # noqa: BLE001
            self._fail("optimizer step", error)

    def _record_step(self, optimizer: Any) -> None:
        """End one step of `optimizer`: hand the step's loss and clip to its recorder."""
        entry = self._entry_for(optimizer)
        loss, clip = self._pending_loss, self._pending_clip
        self._pending_loss, self._pending_clip = None, None
        self._scaled_outputs.clear()
        if entry.state == "replaced":
            if not entry.warned_replaced:
                entry.warned_replaced = True
                warn(f"the optimizer {type(optimizer).__name__} stepped again after a newer "
                     f"optimizer took over {entry.run_dir}; its steps are not recorded. "
                     "Record such a program with runlens.record.")
            return
        if entry.recorder is None:
            return
        if clip is not None:
            entry.recorder.log_clip(*clip)
        entry.recorder.step(loss)
        if self._discovering:
            self._discovery_steps += 1
            if (self._discovery_steps >= MAX_DISCOVERY_STEPS
                    or all(id(live) in self._entries for live in list(self._optimizers))):
                self._finish_discovery()

    def _entry_for(self, optimizer: Any) -> _Entry:
        """Return the entry of `optimizer`, and open its recorder at its first step."""
        entry = self._entries.get(id(optimizer))
        if entry is not None and entry.optimizer_ref() is optimizer:
            return entry
        layout = self._choose_layout()
        run_dir = self.settings.run_dir
        if layout == "several":
            run_dir = run_dir / f"{self._next_index}-{type(optimizer).__name__}"
            self._next_index += 1
        entry = _Entry(optimizer_ref=weakref.ref(optimizer), run_dir=run_dir)
        self._entries[id(optimizer)] = entry
        if layout is None:
            entry.state = "failed"
            return entry
        if layout == "single":
            self._replace_active_entries(entry, optimizer)
        self._open_recorder(entry, optimizer)
        return entry

    def _choose_layout(self) -> str | None:
        """Return "single" or "several" (fixed at the first step), or None on a conflict."""
        if self._layout is not None:
            return None if self._layout == "conflict" else self._layout
        live = len(self._optimizers)
        if live > 1:
            gc.collect()  # optimizers that only a reference cycle keeps alive do not count
            live = len(self._optimizers)
        layout = "several" if live > 1 else "single"
        run_dir = self.settings.run_dir
        existing = _existing_layout(run_dir)
        if existing is not None and existing != layout:
            self._layout = "conflict"
            self._failed_run_dirs.append(run_dir)
            self.write_status()
            warn(f"recording is off: {run_dir} contains the run of a program with "
                 f"{'several optimizers' if existing == 'several' else 'one optimizer'}, "
                 f"but this program has {live} optimizer{'s' if live != 1 else ''}. Pass a "
                 "new --run-dir.")
            return None
        self._layout = layout
        return layout

    def _replace_active_entries(self, new_entry: _Entry, optimizer: Any) -> None:
        """Close the recorder of an older optimizer whose run directory `new_entry` takes."""
        for entry in self._active_entries():
            if entry is new_entry:
                continue
            old_class = type(entry.optimizer_ref()).__name__
            entry.recorder.close()
            entry.recorder = entry.model = entry.scheduler = entry.scaler = None
            entry.state = "replaced"
            warn(f"a new optimizer {type(optimizer).__name__} replaced {old_class}; its "
                 f"steps go to {new_entry.run_dir} as a new segment.")

    def _open_recorder(self, entry: _Entry, optimizer: Any) -> None:
        from runlens.recorder.recorder import Recorder

        entry.model = self._find_model(optimizer)
        entry.scheduler = self._find_scheduler(optimizer)
        entry.scaler = next((call.scaler for call in reversed(self._scaler_calls())
                             if call.optimizer is optimizer), None)
        try:
            entry.recorder = Recorder(entry.run_dir, model=entry.model, optimizer=optimizer,
                                      scheduler=entry.scheduler, scaler=entry.scaler,
                                      **self.settings.options)
        except Exception as error:  # noqa: BLE001 - such as a corrupt run.json
            entry.state = "failed"
            self._failed_run_dirs.append(entry.run_dir)
            self.write_status()
            warn(f"recording is off for {entry.run_dir}: {describe_error(error)}")
            return
        self._opened_runs.append({"run_dir": str(entry.run_dir),
                                  "segment": entry.recorder.segment})
        self._deliver_pending_loads(entry, optimizer)
        self.write_status()

    # -- models and schedulers ------------------------------------------------------------

    # A registration hook that returns a value replaces the module or parameter, so these
    # two return None.
    def _note_submodule(self, module: Any, name: str, submodule: Any) -> None:
        self._guard("module registration", self._note_modules, module, submodule)

    def _note_parameter(self, module: Any, name: str, param: Any) -> None:
        self._guard("module registration", self._note_modules, module, None)

    def _note_modules(self, module: Any, submodule: Any) -> None:
        self._note_module(module)
        if submodule is not None:
            self._note_module(submodule)

    def _note_module(self, module: Any) -> None:
        key = id(module)
        known = self._modules.get(key)
        if known is not None and known() is module:
            return
        self._modules[key] = weakref.ref(module)
        if len(self._modules) > 2 * self._modules_pruned_at + 1000:
            self._modules = {key: ref for key, ref in self._modules.items()
                             if ref() is not None}
            self._modules_pruned_at = len(self._modules)

    def _find_model(self, optimizer: Any) -> Any:
        """Return the model of `optimizer`, or None when no module contains its parameters.

        The model is the outermost module that contains parameters of this optimizer and
        none of another optimizer's, so a GAN's generator and discriminator get separate
        models even when one module contains both. Separate modules (an encoder and a
        decoder that are not parts of one module) are returned in a `ModuleDict` named
        by class.
        """
        import torch

        trained = _param_ids(optimizer)
        others: set[int] = set()
        for other in list(self._optimizers):
            if other is not optimizer:
                others |= _param_ids(other)
        built = [module for module in (ref() for ref in list(self._modules.values()))
                 if module is not None]
        models = (_outermost_holders(built, trained, others)
                  or _outermost_holders(built, trained, set()))
        if not models:
            # Modules copied with copy.deepcopy or unpickled by torch.load were not built,
            # so no registration hook saw them: look for them among all live objects.
            # type() rather than isinstance(): isinstance reads __class__, which some
            # objects compute, and torch's deprecated aliases warn when it is read.
            found = [obj for obj in gc.get_objects()
                     if issubclass(type(obj), torch.nn.Module)]
            models = (_outermost_holders(found, trained, others)
                      or _outermost_holders(found, trained, set())
                      or _outermost_holders(found, trained, others, complete=False))
        if not models:
            return None
        if len(models) == 1:
            return models[0]
        named: dict[str, Any] = {}
        for module in models:
            name = type(module).__name__
            count = sum(1 for key in named if key == name or key.startswith(f"{name}_"))
            named[name if count == 0 else f"{name}_{count}"] = module
        return torch.nn.ModuleDict(named)

    def _note_scheduler(self, scheduler: Any) -> None:
        known = self._schedulers.get(id(scheduler))
        if known is not None and known() is scheduler:
            return  # noted already by the __init__ of a subclass or of the base class
        # A dead scheduler's id can be reused: the new one moves to the end.
        self._schedulers.pop(id(scheduler), None)
        self._schedulers[id(scheduler)] = weakref.ref(scheduler)
        # A user's scheduler class may define its own load_state_dict.
        for scheduler_class in type(scheduler).__mro__:
            if issubclass(scheduler_class, self._scheduler_base):
                self._wrap_scheduler_class(scheduler_class)

    def _find_scheduler(self, optimizer: Any) -> Any:
        """Return the LR scheduler of `optimizer` created last, skipping ones nested in another.

        SequentialLR and ChainedScheduler hold their parts in `_schedulers`: the program
        steps the outer one, which is the one the recorder describes.
        """
        schedulers = [scheduler for scheduler in (ref() for ref in self._schedulers.values())
                      if scheduler is not None
                      and getattr(scheduler, "optimizer", None) is optimizer]
        nested = {id(part) for scheduler in schedulers
                  for part in getattr(scheduler, "_schedulers", ())}
        outer = [scheduler for scheduler in schedulers if id(scheduler) not in nested]
        return outer[-1] if outer else None

    # -- losses and clipping --------------------------------------------------------------

    def _note_backward(self, tensors: Any, gradients: Any) -> None:
        """Add the scalar tensors of one backward call to the loss of the current step."""
        import torch

        if gradients is not None:
            return  # a backward with explicit gradients does not start from a loss
        if isinstance(tensors, torch.Tensor):
            tensors = (tensors,)
        elif not isinstance(tensors, (list, tuple)):
            return
        for tensor in tensors:
            if (not isinstance(tensor, torch.Tensor) or tensor.numel() != 1
                    or not tensor.is_floating_point()):
                continue
            value = self._unscaled(tensor).detach().float().reshape(())
            if self._pending_loss is None:
                self._pending_loss = value
            else:
                # Adding on the device keeps the sum a tensor, so it costs no sync.
                self._pending_loss = self._pending_loss + value.to(self._pending_loss.device)

    def _unscaled(self, tensor: Any) -> Any:
        """Return the loss that `GradScaler.scale` multiplied into `tensor`, or `tensor`."""
        known = self._scaled_outputs.pop(id(tensor), None)
        if known is not None and known[0]() is tensor:
            return known[1]
        return tensor

    def _note_scaled_output(self, output: Any, loss: Any) -> None:
        import torch

        if not isinstance(loss, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        if output is loss:
            return  # a disabled scaler returns its input
        if len(self._scaled_outputs) >= MAX_SCALED_OUTPUTS:
            self._scaled_outputs.clear()
        self._scaled_outputs[id(output)] = (weakref.ref(output), loss.detach())

    def _note_clip(self, total_norm: Any, max_norm: Any) -> None:
        self._pending_clip = (total_norm, max_norm)

    # -- checkpoint loads -----------------------------------------------------------------

    def _note_load(self, kind: str, target: Any, result: Any) -> None:
        """Record a `load_state_dict` of a model, optimizer, scheduler or scaler.

        A load that concerns an open recorder is written at once, unless that recorder's
        own hook already records it. While some optimizer has no recorder yet, the load
        is also kept, and written when the recorder that it concerns opens.
        """
        detail = self._load_detail(kind, target, result)
        for entry in self._active_entries():
            optimizer = entry.optimizer_ref()
            if (self._load_concerns(optimizer, entry, kind, target)
                    and not _recorder_sees_load(optimizer, entry, kind, target)):
                entry.recorder.event("checkpoint_load", **detail)
        if self._discovering:
            self._pending_loads.append(_PendingLoad(kind, weakref.ref(target), detail))

    def _load_detail(self, kind: str, target: Any, result: Any) -> dict[str, Any]:
        detail: dict[str, Any] = {"object": kind}
        if kind == "model":
            missing = getattr(result, "missing_keys", None)
            unexpected = getattr(result, "unexpected_keys", None)
            if missing is not None and unexpected is not None:
                detail["missing_keys"] = len(missing)
                detail["unexpected_keys"] = len(unexpected)
        elif kind == "optimizer":
            from runlens.recorder.optimizer_probe import count_state_tensors

            detail["state_tensors"] = count_state_tensors(target)
        return detail

    def _active_entries(self) -> list[_Entry]:
        return [entry for entry in self._entries.values()
                if entry.state == "active" and entry.recorder is not None]

    def _load_concerns(self, optimizer: Any, entry: _Entry, kind: str, target: Any) -> bool:
        if kind == "optimizer":
            return target is optimizer
        if kind == "scheduler":
            return getattr(target, "optimizer", None) is optimizer
        if kind == "scaler":
            return target is entry.scaler
        trained = _param_ids(optimizer)
        return any(id(param) in trained for param in target.parameters())

    def _deliver_pending_loads(self, entry: _Entry, optimizer: Any) -> None:
        for load in self._pending_loads:
            target = load.target()
            if target is not None and self._load_concerns(optimizer, entry, load.kind, target):
                entry.recorder.event("checkpoint_load", **load.detail)

    # -- wrappers -------------------------------------------------------------------------

    def _wrap_optimizer_init(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(optimizer, *args, **kwargs):
            original(optimizer, *args, **kwargs)
            self._guard("optimizer creation", self._note_optimizer, optimizer)
        return __init__

    def _note_optimizer(self, optimizer: Any) -> None:
        if optimizer not in self._optimizers:
            self._optimizers.add(optimizer)
            self._start_discovery()

    def _wrap_scheduler_init(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(scheduler, *args, **kwargs):
            original(scheduler, *args, **kwargs)
            self._guard("LR scheduler creation", self._note_scheduler, scheduler)
        return __init__

    def _wrap_load(self, kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def load_state_dict(target, *args, **kwargs):
            # A subclass's load_state_dict may call the base class's (SequentialLR loads
            # its parts): only the outermost call is one checkpoint load.
            with self._outermost("load") as outermost:
                result = original(target, *args, **kwargs)
            if outermost:
                self._guard("checkpoint load", self._note_load, kind, target, result)
            return result
        return load_state_dict

    def _wrap_tensor_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(tensor, *args, **kwargs):
            # Tensor.backward calls torch.autograd.backward, and a tensor subclass with
            # __torch_function__ calls Tensor.backward again: count the outermost call.
            with self._outermost("backward") as outermost:
                result = original(tensor, *args, **kwargs)
            if outermost:
                gradient = args[0] if args else kwargs.get("gradient")
                self._guard("backward", self._note_backward, tensor, gradient)
            return result
        return backward

    def _wrap_autograd_backward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def backward(*args, **kwargs):
            with self._outermost("backward") as outermost:
                result = original(*args, **kwargs)
            if outermost:
                tensors = args[0] if args else kwargs.get("tensors")
                gradients = args[1] if len(args) > 1 else kwargs.get(
                    "grad_tensors", kwargs.get("grad_variables"))
                self._guard("backward", self._note_backward, tensors, gradients)
            return result
        return backward

    def _wrap_clip(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
            total_norm = original(parameters, max_norm, *args, **kwargs)
            self._guard("clip_grad_norm_", self._note_clip, total_norm, max_norm)
            return total_norm
        return clip_grad_norm_

    def _wrap_scaler_scale(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def scale(scaler, outputs, *args, **kwargs):
            scaled = original(scaler, outputs, *args, **kwargs)
            self._guard("GradScaler.scale", self._note_scaled_output, scaled, outputs)
            return scaled
        return scale

    def _wrap_scaler_step(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def step(scaler, optimizer, *args, **kwargs):
            with self._outermost("scaler step") as outermost:
                if not outermost or not self._active():
                    return original(scaler, optimizer, *args, **kwargs)
                calls = self._scaler_calls()
                call = _ScalerCall(scaler, optimizer)
                calls.append(call)
                try:
                    result = original(scaler, optimizer, *args, **kwargs)
                finally:
                    with contextlib.suppress(ValueError):
                        calls.remove(call)
            if not call.stepped:
                # GradScaler skipped optimizer.step() because of inf or NaN gradients, so
                # no optimizer hook ran. The step still counts, as step_skipped.
                self._guard("GradScaler.step", self._record_skipped_step, call)
            return result
        return step

    def _record_skipped_step(self, call: _ScalerCall) -> None:
        calls = self._scaler_calls()
        calls.append(call)  # so that a recorder opened now finds its scaler
        try:
            self._record_step(call.optimizer)
        finally:
            calls.remove(call)

    # -- status and closing ---------------------------------------------------------------

    def write_status(self) -> None:
        """Write the run directories opened so far to the status file of `runlens record`."""
        path = self.settings.status_file
        if path is None:
            return
        status = {"loaded": True, "runs": self._opened_runs,
                  "failed": [str(run_dir) for run_dir in self._failed_run_dirs]}
        try:
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(status), encoding="utf-8")
            os.replace(temporary, path)
        except OSError:
            pass  # the summary line of `runlens record` is lost, the recording is not

    def close(self) -> None:
        """Close every recorder: write the remaining rows. Runs at interpreter exit."""
        if os.getpid() != self.pid:
            return
        # Python sets sys.last_exc (3.12) or sys.last_value before exit when the program
        # ends with an uncaught exception.
        error = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
        for entry in self._active_entries():
            try:
                if error is not None and not self.disabled:
                    entry.recorder.event(TRAINING_ERROR_EVENT, type=type(error).__name__,
                                         message=str(error)[:500])
                entry.recorder.close()
            except Exception as close_error:  # noqa: BLE001
                warn(f"runlens could not close the recording in {entry.run_dir}: "
                     f"{describe_error(close_error)}")


def _recorder_sees_load(optimizer: Any, entry: _Entry, kind: str, target: Any) -> bool:
    """Return whether the entry's `Recorder` records this load through its own hooks.

    The Recorder hooks its optimizer, wraps its scheduler and scaler instances, and
    hooks its model, whose load hook runs when the loaded module contains the model.
    """
    if kind == "optimizer":
        return target is optimizer
    if kind == "scheduler":
        return target is entry.scheduler
    if kind == "scaler":
        return target is entry.scaler
    return entry.model is not None and any(module is entry.model
                                           for module in target.modules())


def _param_ids(optimizer: Any) -> set[int]:
    return {id(param) for group in optimizer.param_groups for param in group["params"]}


def _outermost_holders(modules: list[Any], trained: set[int], others: set[int],
                       complete: bool = True) -> list[Any]:
    """Return the outermost of `modules` that contain `trained` parameters and no `others`.

    With `complete`, returns [] unless those modules contain every trained parameter. A
    module whose parameters another returned module also contains (a shared layer) is
    left out.
    """
    holders = []
    covered: set[int] = set()
    for module in modules:
        params = {id(param) for param in module.parameters()}
        contained = params & trained
        if contained and not params & others:
            holders.append((module, contained))
            covered |= contained
    if complete and covered != trained:
        return []
    inner = {id(child) for module, _ in holders for child in module.modules()
             if child is not module}
    outermost = [(module, contained) for module, contained in holders if id(module) not in inner]
    return [module for module, contained in outermost
            if not any(contained < other_contained for _, other_contained in outermost)]


def _existing_layout(run_dir: Path) -> str | None:
    """Return the layout of a run directory that a program recorded before, or None."""
    if (run_dir / "run.json").exists():
        return "single"
    if run_dir.is_dir() and any((child / "run.json").exists() for child in run_dir.iterdir()
                                if child.is_dir()):
        return "several"
    return None


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    for subclass in cls.__subclasses__():
        found.append(subclass)
        found.extend(_subclasses(subclass))
    return found
