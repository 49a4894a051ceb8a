"""The `Recorder`: the object that `runlens.record(...)` returns."""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyarrow.parquet as pq
import torch

import runlens
from runlens import format as run_format
from runlens.recorder import (activation_probe, arguments, batches, changes, class_metrics,
                              model_info, values)
from runlens.recorder.activation_probe import ActivationProbe
from runlens.recorder.buffers import TableBuffer
from runlens.recorder.checkpoint_probe import CheckpointProbe
from runlens.recorder.clipping_probe import ClippingProbe
from runlens.recorder.optimizer_probe import OptimizerProbe, local_tensor
from runlens.recorder.scaler_probe import ScalerProbe
from runlens.recorder.task_probe import TaskProbe
from runlens.recorder.timing import TimingProbe
from runlens.recorder.trajectory import TrajectoryProbe, projected_params
from runlens.recorder.writer import PartWriter

logger = logging.getLogger("runlens.record")


class Recorder:
    """Records per-step training signals into a run directory.

    Args:
        run_dir: the run directory. A new one is created; an existing one gets a new
            segment (a resume) and nothing in it is overwritten.
        model: the model, for parameter names and kinds and checkpoint-load events.
        optimizer: the optimizer whose steps define `step`; its hooks supply gradient
            norms, learning rates and optimizer state.
        scheduler: the LR scheduler, for its class and checkpoint-load events.
        scaler: the AMP `GradScaler`, for the loss scale and skipped steps.
        config: user configuration stored in run.json: a mapping, a dataclass instance,
            an object with attributes such as an `argparse.Namespace`, or None. Its values
            are converted with `model_info.json_value`.
        shared_params: a module or parameters shared by all tasks, for the task probe.
        watch_activations: record the `activations` table from forward hooks on stats
            steps (default True; needs `model`). BatchNorm modules are recorded into
            `batchnorm` either way.
        watch_modules: the modules of `model` whose outputs go to `activations`, in place
            of the default: every ReLU, LeakyReLU, GELU, SiLU, ELU, Tanh and Sigmoid,
            and the output layer (the last leaf module with parameters).
        param_stats_every: steps between per-parameter statistics (default 100).
        task_probe_every: steps between task-gradient probes (default 100).
        trajectory_every: steps between points of the `trajectory` table, the parameters
            projected onto two fixed random directions (default None: off; needs
            `model`). A point is also taken on each segment's first step.
        trajectory_seed: the seed of those random directions (default 0, a non-negative
            integer). Runs overlay in `runlens compare` only with equal seeds.
        flush_every: steps between writes of part files (default 500).
        flush_seconds: seconds between writes, whichever comes first (default 10, a
            positive finite number). A killed run loses at most the rows since the last
            write.
        step: the global step of this segment's first step. Defaults to one past the
            last recorded step, or 0 for a new run.
        strict: raise recorder errors into training instead of logging them (default
            False, for tests of the recorder itself). Invalid values passed to `step`,
            `log_eval`, `log_classes`, `log_batch` or `log_split_groups` are dropped
            with a warning in both modes.
        rank: this process's rank. Defaults to `torch.distributed`'s rank, or 0.
        timer: the source of the `step_time`, `data_time` and `compute_time` columns, in
            seconds. These columns are recorded when a timer is given, and with
            `time.perf_counter` when a process group of more than one rank is initialized.

    Raises:
        TypeError, ValueError: an argument is invalid, or run_dir contains a run.json that
            is not a runlens run file. Nothing is written then.
        NotADirectoryError: run_dir is a file.
        clock: the source of the `time` columns and run.json timestamps, in seconds since
            the epoch (default `time.time`). A fake clock makes recordings reproducible.
    """

    def __init__(self, run_dir: str | os.PathLike, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 scaler: Any = None, config: Any = None,
                 shared_params: torch.nn.Module | Iterable[torch.nn.Parameter] | None = None,
                 watch_activations: bool = True,
                 watch_modules: Iterable[torch.nn.Module] | None = None,
                 param_stats_every: int = 100, task_probe_every: int = 100,
                 trajectory_every: int | None = None, trajectory_seed: int = 0,
                 flush_every: int = 500, flush_seconds: float = 10.0,
                 step: int | None = None, strict: bool = False,
                 rank: int | None = None, clock: Callable[[], float] = time.time,
                 timer: Callable[[], float] | None = None) -> None:
        # Every argument is checked before the run directory or any hook is touched.
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"run_dir {self.run_dir} is a file, not a directory. "
                                     "Pass the path of a new or existing run directory.")
        self.param_stats_every = arguments.check_step_count("param_stats_every",
                                                            param_stats_every)
        self.task_probe_every = arguments.check_step_count("task_probe_every",
                                                           task_probe_every)
        self.trajectory_every = arguments.check_optional_step_count("trajectory_every",
                                                                    trajectory_every)
        self.trajectory_seed = arguments.check_seed("trajectory_seed", trajectory_seed)
        trajectory_params = projected_params(model, self.trajectory_every)
        self.flush_every = arguments.check_step_count("flush_every", flush_every)
        self.flush_seconds = arguments.check_flush_seconds(flush_seconds)
        rank = arguments.check_rank(rank)
        step = arguments.check_first_step(step)
        if timer is not None and not callable(timer):
            raise TypeError(f"timer must be a callable that returns seconds, got {timer!r}. "
                            "Pass a function such as time.perf_counter, or None.")
        config_values = arguments.config_dict(config)
        watched = activation_probe.select_modules(model, watch_activations, watch_modules)
        self.strict = strict
        self.rank = _default_rank() if rank is None else rank
        self._clock = clock
        self.error_counts: dict[str, int] = {}
        self._dropped = values.DropLog()
        # Invalid values that were dropped, by the key that their warning names.
        self.dropped_counts = self._dropped.counts
        self.closed = False
        self._disabled: set[str] = set()
        self._buffers = {table: TableBuffer(table) for table in run_format.TABLES}
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._tasks_probed_at: int | None = None
        self._batch = batches.BatchAccumulator()
        self._warned_device_groups = False

        self._trajectory = None
        if trajectory_params:
            self._trajectory = TrajectoryProbe(trajectory_params, self.trajectory_seed,
                                               self._is_trajectory_step,
                                               lambda: self.step_index,
                                               self._add_probe_row, self._report_error)
        params, names = model_info.describe_params(model)
        if optimizer is not None:
            names = model_info.param_names_for(optimizer, names)
        self.segment, self.step_index = self._open_run_dir(
            model, optimizer, scheduler, scaler, config_values, params, names, step)
        self._writer = PartWriter(self.run_dir, self.rank, self.segment)
        self._install_probes(model, optimizer, scheduler, scaler, shared_params, names)
        self._segment_first_step = self.step_index
        if self._trajectory is not None and optimizer is not None:
            self._trajectory.watch_optimizer(optimizer)
        self._activations = None
        if watched.activations or watched.batchnorms:
            self._activations = ActivationProbe(model, watched, self._is_stats_step,
                                                lambda: self.step_index,
                                                self._add_probe_row, self._report_error)
        self._timing = None
        if timer is not None or _world_size() > 1:
            trained = [param for _, param in _watched_params(model, optimizer, names)]
            self._timing = TimingProbe(model, trained, timer or time.perf_counter,
                                       self._report_error)
        self.event(run_format.EVENT_SEGMENT_START, segment=self.segment)

    # -- set-up ---------------------------------------------------------------------------

    def _open_run_dir(self, model, optimizer, scheduler, scaler, config, params, names,
                      step) -> tuple[int, int]:
        run_file = self.run_dir / run_format.RUN_FILE
        started = datetime.fromtimestamp(self._clock(), timezone.utc).isoformat()
        if run_file.exists():
            meta = _read_run_file(run_file)
            version = meta.get("format_version")
            if version != run_format.FORMAT_VERSION:
                raise ValueError(
                    f"{run_file} has format version {version!r}; this runlens writes version "
                    f"{run_format.FORMAT_VERSION}. Record into a new run directory.")
            segment = len(meta.get("segments", []))
            first_step = _last_recorded_step(self.run_dir) + 1 if step is None else step
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            meta = {
                "format_version": run_format.FORMAT_VERSION,
                "runlens_version": runlens.__version__,
                "torch_version": torch.__version__,
                "python_version": platform.python_version(),
                "created": started,
                "world_size": _world_size(),
                "params": params,
                "optimizer": model_info.describe_optimizer(optimizer, names),
                "scheduler": None if scheduler is None else {"class": type(scheduler).__name__},
                "amp": _describe_scaler(scaler),
                "config": model_info.json_value(config),
                "settings": {"param_stats_every": self.param_stats_every,
                             "task_probe_every": self.task_probe_every,
                             "trajectory_every": self.trajectory_every,
                             "trajectory_seed": self.trajectory_seed,
                             "trajectory_projection": self._trajectory_definition(),
                             "flush_every": self.flush_every,
                             "flush_seconds": self.flush_seconds},
                "segments": [],
            }
            segment = 0
            first_step = 0 if step is None else step
        meta.setdefault("segments", []).append({
            "segment": segment,
            "start_step": first_step,
            "started": started,
            "argv": list(sys.argv),
            "optimizer": model_info.describe_optimizer(optimizer, names),
            "trajectory_projection": self._trajectory_definition(),
        })
        process_group = _describe_process_group()
        if process_group is not None:
            meta["segments"][-1]["distributed"] = process_group
        if self.rank == 0:
            _write_json_atomically(run_file, meta)
        if process_group is not None:
            segment, first_step = _share_segment(self.run_dir, self.rank, segment,
                                                 first_step, step)
        return segment, first_step

    def _install_probes(self, model, optimizer, scheduler, scaler, shared_params, names):
        self._optimizer = None
        if optimizer is not None:
            self._optimizer = OptimizerProbe(optimizer, names, self._is_stats_step,
                                             self._report_error)
        self._clipping = ClippingProbe()
        self._clipping.install()
        self._scaler = ScalerProbe(scaler) if scaler is not None else None
        self._checkpoints = CheckpointProbe(self._emit_quietly)
        if model is not None:
            self._checkpoints.watch_model(model)
        if optimizer is not None:
            self._checkpoints.watch_optimizer(optimizer)
        for obj, object_name in ((scheduler, "scheduler"), (scaler, "scaler")):
            if obj is not None and hasattr(obj, "load_state_dict"):
                self._checkpoints.watch_by_method(obj, object_name)
        self._params = changes.ParamWatcher(_watched_params(model, optimizer, names),
                                            optimizer, self._emit_quietly)
        self._loss_weights = changes.LossWeightWatcher(self._emit_quietly)
        self._datasets = changes.DatasetWatcher(self._emit_quietly)
        self._tasks = None
        if shared_params is not None:
            if isinstance(shared_params, torch.nn.Module):
                shared_params = shared_params.parameters()
            self._tasks = TaskProbe(list(shared_params))

    def _add_probe_row(self, table: str, row: dict[str, Any]) -> None:
        """Add a row of the step being computed, which `step()` records next."""
        keys = {"step": self.step_index, "segment": self.segment, "rank": self.rank}
        self._buffers[table].add_row({**keys, **row})

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and not issubclass(exc_type, GeneratorExit):
            self._emit_quietly("training_error", {"type": exc_type.__name__,
                                                  "message": str(exc)[:500]})
        self.close()

    # -- the step path --------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float | None = None, *,
             losses: Mapping[str, torch.Tensor | float] | None = None,
             loss_weights: Mapping[str, float] | None = None,
             **scalars: torch.Tensor | float) -> None:
        """Record one optimizer step. Call it once per step, after `optimizer.step()`.

        Args:
            loss: the loss of this step, as a tensor (no `.item()` needed) or a number.
            losses: raw per-task losses, for multi-task training.
            loss_weights: the weight of each task loss in the total loss.
            **scalars: other per-step values, stored as columns of `scalars`.
        """
        if self.closed or "recorder" in self._disabled:
            return
        try:
            self._record_step(loss, {} if losses is None else losses,
                              {} if loss_weights is None else loss_weights, scalars)
        except Exception as error:  # noqa: BLE001
            self._report_error("recorder", error)

    def _record_step(self, loss, losses, loss_weights, user_scalars) -> None:
        step = self.step_index
        self._guard("change events", self._params.check)
        keys = {"step": step, "segment": self.segment, "rank": self.rank}

        # optimizer, clipping and AMP values of this step
        row: dict[str, Any] = {**keys, "time": self._clock()}
        if self._timing is not None and not self._timing.disabled:
            row.update(self._timing.take())
        param_rows: list[dict[str, Any]] = []
        if self._optimizer is not None and "optimizer probe" not in self._disabled:
            row["step_skipped"] = not self._optimizer.stepped
            optimizer_values, param_rows = self._optimizer.take()
            row.update(optimizer_values)
            for group_row in self._optimizer.group_rows():
                self._buffers["param_groups"].add_row({**keys, **group_row})
        # Under FSDP2, clip_grad_norm_ returns a replicated DTensor, which the writer
        # cannot convert to numpy, so its local copy, the whole norm, is recorded.
        row.update({column: local_tensor(value) if isinstance(value, torch.Tensor) else value
                    for column, value in self._clipping.take().items()})
        if self._scaler is not None:
            row.update(self._scaler.take())
        row.update(self._take_batch_columns())

        # the loss, task losses and user scalars. An invalid value is dropped before its
        # row is added, so it costs only itself.
        loss_value = self._checked_scalar(loss, step, "loss", "'loss'", "loss")
        if loss_value is not None:
            row["loss"] = loss_value
            if isinstance(loss_value, torch.Tensor):
                row["nonfinite_loss"] = (~torch.isfinite(loss_value)).sum()
            else:
                row["nonfinite_loss"] = int(not math.isfinite(loss_value))
        for name, column, value in self._user_scalar_columns(user_scalars, step):
            row[column] = self._checked_scalar(value, step, name, repr(name), name)
        self._buffers["scalars"].add_row(row)
        losses = self._checked_mapping(losses, step, "losses", "task names to losses")
        loss_weights = self._checked_mapping(loss_weights, step, "loss_weights",
                                             "task names to weights")
        self._record_task_losses(keys, losses, loss_weights)
        self._guard("change events", self._loss_weights.check, losses, loss_weights)
        for param_row in param_rows:
            self._buffers["params"].add_row({**keys, **param_row})

        # a task probe that `probe_tasks` did not already run this step
        if losses and self._tasks is not None and self._is_task_probe_step() \
                and self._tasks_probed_at != step and "task probe" not in self._disabled:
            self._probe_tasks_now(losses, loss_weights)

        # a trajectory point that the optimizer's pre-hook did not take (no optimizer, or
        # a step that GradScaler skipped)
        if self._trajectory is not None:
            self._trajectory.take_if_due()

        # hand full buffers to the writer
        self.step_index += 1
        self._steps_since_flush += 1
        if (self._steps_since_flush >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def _record_task_losses(self, keys, losses, loss_weights) -> None:
        step = keys["step"]
        for task, task_loss in losses.items():
            loss_name = f"losses[{task!r}]"
            weight_name = f"loss_weights[{task!r}]"
            value = self._checked_scalar(task_loss, step, loss_name, loss_name, loss_name)
            weight = self._checked_scalar(loss_weights.get(task), step, weight_name,
                                          weight_name, weight_name)
            weighted = None if value is None or weight is None else value * weight
            self._buffers["losses"].add_row({**keys, "task": task, "loss": value,
                                             "weight": weight, "weighted_loss": weighted})

    def _checked_scalar(self, value: Any, step: int, key: str, label: str,
                        expression: str) -> torch.Tensor | float | None:
        """Return `value` converted for a float64 column, or None when it is None or invalid.

        An invalid value is counted under `key` and warned about once per key. `label`
        names it in the warning, and `expression` in the hint (such as ``loss.mean()``).
        """
        if value is None:
            return None
        try:
            return values.scalar_value(value, expression)
        except values.InvalidValue as invalid:
            self._dropped.drop(key, values.dropped_message(label, step, invalid))
            return None

    def _checked_mapping(self, value: Any, step: int, name: str,
                         content: str) -> Mapping[str, Any]:
        """Return `value` when it is a mapping, or else an empty dict, with a warning."""
        if isinstance(value, Mapping):
            return value
        self._dropped.drop(name, f"runlens dropped {name} at step {step}: expected a mapping "
                           f"of {content}, got {values.describe(value)}.")
        return {}

    def _user_scalar_columns(self, user_scalars: Mapping[Any, Any],
                             step: int) -> list[tuple[str, str, Any]]:
        """Return (name, column, value) of each user scalar whose name can be stored.

        A name of a built-in column is stored as ``user_<name>``. When the caller also
        passes ``user_<name>`` itself, that value is kept and the renamed one dropped.
        """
        columns = []
        for name, value in user_scalars.items():
            if not isinstance(name, str) or not name:
                described = "an empty name" if name == "" else f"the name {name!r}"
                self._dropped.drop(f"user scalar name {name!r}",
                                   f"runlens dropped a user scalar with {described} at step "
                                   f"{step}: a user scalar name must be a non-empty string.")
                continue
            column = name
            if name in run_format.RESERVED_SCALARS:
                column = f"user_{name}"
                if column in user_scalars:
                    self._dropped.drop(name, (
                        f"runlens dropped {name!r} at step {step}: {name!r} is a built-in "
                        f"column of scalars, so it is stored as {column!r}, but {column!r} "
                        f"was also passed, and that value is kept. Rename one of them."))
                    continue
            columns.append((name, column, value))
        return columns

    def _is_stats_step(self) -> bool:
        return self.step_index % self.param_stats_every == 0

    def _is_task_probe_step(self) -> bool:
        return self.step_index % self.task_probe_every == 0

    def _is_trajectory_step(self) -> bool:
        return (self.trajectory_every is not None
                and (self.step_index % self.trajectory_every == 0
                     or self.step_index == self._segment_first_step))

    def _trajectory_definition(self) -> dict[str, Any] | None:
        return None if self._trajectory is None else self._trajectory.definition()

    def probe_tasks(self, losses: Mapping[str, torch.Tensor],
                    loss_weights: Mapping[str, float] | None = None) -> None:
        """Measure each task's gradient on the shared parameters, on probe steps only.

        Call it before `backward()`, with the raw task losses of the step about to be
        recorded, and the weights of the total loss. On other steps it returns at once.
        """
        if self.closed or self._tasks is None or "task probe" in self._disabled:
            return
        if not self._is_task_probe_step():
            return
        self._probe_tasks_now(losses, loss_weights or {})

    def _probe_tasks_now(self, losses: Mapping[str, torch.Tensor],
                         loss_weights: Mapping[str, float]) -> None:
        try:
            task_rows, pair_rows = self._tasks.measure(dict(losses), dict(loss_weights))
        except Exception as error:  # noqa: BLE001 - probe_tasks runs in the training loop
            if "backward through the graph a second time" in str(error):
                error = RuntimeError(
                    "the task losses no longer hold their graph; call rec.probe_tasks(losses) "
                    "before backward(), or backward(retain_graph=True) on probe steps")
            self._report_error("task probe", error)
            return
        keys = {"step": self.step_index, "segment": self.segment, "rank": self.rank}
        for row in task_rows:
            self._buffers["tasks"].add_row({**keys, **row})
        for row in pair_rows:
            self._buffers["task_pairs"].add_row({**keys, **row})
        self._tasks_probed_at = self.step_index

    # -- other signals --------------------------------------------------------------------

    def log_clip(self, total_norm: torch.Tensor | float, max_norm: float) -> None:
        """Record a clip of this step done by something other than `clip_grad_norm_`.

        `total_norm` is the gradient norm before clipping and `max_norm` the threshold.
        An invalid value of either drops the call, with a warning.
        """
        if self.closed:
            return
        step = self.step_index
        total_norm = self._checked_scalar(total_norm, step, "log_clip total_norm",
                                          "total_norm of log_clip", "total_norm")
        max_norm = self._checked_scalar(max_norm, step, "log_clip max_norm",
                                        "max_norm of log_clip", "max_norm")
        if total_norm is not None and max_norm is not None:
            self._guard("clipping probe", self._clipping.log, total_norm, max_norm)

    def log_eval(self, split: str, metrics: Mapping[str, torch.Tensor | float],
                 step: int | None = None) -> None:
        """Record evaluation metrics of `split` at the current step (or at `step`).

        A metric whose value is not a scalar is dropped with a warning, and the others
        are recorded.
        """
        self._guard("eval logging", self._log_eval, split, metrics, step)

    def _log_eval(self, split, metrics, step) -> None:
        at = self._call_step(step, f"log_eval({split!r})")
        if at is None:
            return
        if not isinstance(metrics, Mapping):
            self._dropped.drop(f"log_eval({split!r})", (
                f"runlens recorded no metrics of split {split!r} at step {at}: expected a "
                f"mapping of metric names to values, got {values.describe(metrics)}."))
            return
        keys = {"step": at, "segment": self.segment, "rank": self.rank}
        for metric, value in metrics.items():
            checked = self._checked_scalar(value, at, f"log_eval({split!r})[{metric!r}]",
                                           f"metric {metric!r} of split {split!r}",
                                           f"metrics[{metric!r}]")
            if checked is not None:
                self._buffers["evals"].add_row({**keys, "split": split, "metric": metric,
                                                "value": checked})

    def _call_step(self, step: Any, call: str) -> int | None:
        """Return the step that a `log_*` call records at, or None with a warning."""
        if step is None:
            return self._last_step()
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            self._dropped.drop(f"{call} step", (
                f"runlens recorded nothing for {call} with step={step!r}: step must be a "
                "non-negative integer, or None for the last recorded step."))
            return None
        return int(step)

    def log_classes(self, split: str, targets: torch.Tensor, predictions: torch.Tensor,
                    num_classes: int | None = None, step: int | None = None) -> None:
        """Record per-class recall, precision and support of `split` from tensors.

        `predictions` contains class indices, or scores of shape (N, C), which are reduced
        by argmax. This call synchronizes with the device, so use it at evaluation time.
        Empty input, a length mismatch or an out-of-range class index records nothing
        for the call, with a warning.
        """
        self._guard("class metrics", self._log_classes, split, targets, predictions,
                    num_classes, step)

    def _log_classes(self, split, targets, predictions, num_classes, step) -> None:
        at = self._call_step(step, f"log_classes({split!r})")
        if at is None:
            return
        try:
            rows = class_metrics.class_rows(targets, predictions, num_classes)
        except class_metrics.InvalidClassInput as error:
            self._dropped.drop(f"log_classes({split!r}) {error.kind}",
                               f"runlens recorded no class metrics for split {split!r} at "
                               f"step {at}: {error}")
            return
        keys = {"step": at, "segment": self.segment, "rank": self.rank}
        for row in rows:
            self._buffers["classes"].add_row({**keys, "split": split, **row})

    def log_batch(self, size: int | None = None, groups: Any = None) -> None:
        """Add one micro-batch (or a whole batch) to the composition of the current step.

        Call it once per micro-batch before `step()`. `groups` contains one group id (a str
        or an int, such as a scene or patient id) per example, as a list, tuple, numpy
        array or integer tensor. `size` defaults to ``len(groups)``. A CPU tensor adds no
        sync, but reading a CUDA tensor synchronizes, with one warning. An invalid call
        is dropped with a warning, and the step's batch columns are then null.
        """
        self._guard("batch logging", self._log_batch, size, groups)

    def _log_batch(self, size, groups) -> None:
        try:
            if size is None and groups is None:
                raise batches.InvalidGroups("missing", "pass size, groups or both.")
            if size is not None:
                size = batches.check_size(size)
            counts = None
            if groups is not None:
                self._warn_if_device_groups(groups, "log_batch")
                counts = batches.count_groups(groups, allow_mapping=False)
                group_size = sum(counts.values())
                if size is None:
                    size = group_size
                elif size != group_size:
                    raise batches.InvalidGroups("length", f"size={size} but groups has "
                                                f"{group_size} ids. Pass one id per example.")
        except batches.InvalidGroups as error:
            self._batch.mark_invalid()
            self._dropped.drop(f"log_batch {error.kind}", (
                f"runlens dropped a log_batch call at step {self.step_index}, so the batch "
                f"columns of that step are null: {error}"))
            return
        self._batch.add(size, counts)

    def _take_batch_columns(self) -> dict[str, int | None]:
        """Return this step's batch columns, or {} when batch logging is off."""
        if "batch logging" in self._disabled:
            return {}
        try:
            return self._batch.take()
        except Exception as error:  # noqa: BLE001 - only batch logging turns off
            self._report_error("batch logging", error)
            return {}

    def log_split_groups(self, split: str, groups: Any) -> None:
        """Record which groups `split` contains, one `split_groups` row per group.

        `groups` is an iterable of group ids (str or int), one per example, or a mapping
        of group id to example count. Rows are written at the last recorded step (0
        before the first). Reading a CUDA tensor synchronizes, with one warning. Invalid
        input records nothing for the call, with a warning.
        """
        self._guard("split group logging", self._log_split_groups, split, groups)

    def _log_split_groups(self, split, groups) -> None:
        at = self._last_step()
        try:
            if not isinstance(split, str) or not split:
                raise batches.InvalidGroups("split", "split must be a non-empty string, got "
                                            f"{split!r}.")
            self._warn_if_device_groups(groups, "log_split_groups")
            counts = batches.count_groups(groups, allow_mapping=True)
        except batches.InvalidGroups as error:
            self._dropped.drop(f"log_split_groups({split!r}) {error.kind}", (
                f"runlens recorded no groups of split {split!r} at step {at}: {error}"))
            return
        keys = {"step": at, "segment": self.segment, "rank": self.rank}
        for group, examples in counts.items():
            self._buffers["split_groups"].add_row({**keys, "split": split, "group": group,
                                                   "examples": examples})
        self._datasets.update(("split_groups", split), {
            "groups": len(counts), "examples": sum(counts.values()),
            "fingerprint": batches.fingerprint(counts)})

    def log_dataset(self, split: str, **description: Any) -> None:
        """Describe the data that `split` draws from, such as a name, a version or a size.

        The first call for a split writes a `dataset` event; a later call whose description
        differs from the split's last one writes a `dataset_change` event, which rules use
        to explain loss spikes and metric shifts. Values are stored as JSON: str, numbers,
        lists and dicts as they are, numpy values and tensors by value (reading a CUDA
        tensor synchronizes), and other values as their `repr`.
        """
        self._guard("dataset logging", self._log_dataset, split, description)

    def _log_dataset(self, split, description) -> None:
        if not isinstance(split, str) or not split:
            self._dropped.drop("log_dataset split", (
                f"runlens dropped a log_dataset call at step {self.step_index}: split must "
                f"be a non-empty string, got {split!r}."))
            return
        description = model_info.json_value(description)
        key = ("log_dataset", split)
        if not self._datasets.seen(key):
            self._emit(run_format.EVENT_DATASET, {"split": split, **description})
        self._datasets.update(key, description)

    def _warn_if_device_groups(self, groups: Any, call: str) -> None:
        if self._warned_device_groups or not isinstance(groups, torch.Tensor):
            return
        if groups.device.type != "cpu":
            self._warned_device_groups = True
            logger.warning("runlens %s got group ids on %s. Reading them synchronizes the "
                           "host with the device; pass CPU ids (for example from the data "
                           "loader, before .to(device)) to avoid it. This warning is not "
                           "repeated.", call, groups.device)

    def event(self, kind: str, **detail: Any) -> None:
        """Record an event at the current step, such as a data change or a manual decision."""
        self._guard("events", self._emit, kind, detail)

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        self._buffers["events"].add_row({
            "step": self.step_index, "segment": self.segment, "rank": self.rank,
            "time": self._clock(), "kind": kind,
            "detail": json.dumps(model_info.json_value(detail), sort_keys=True),
        })
        if kind == run_format.EVENT_CHECKPOINT_LOAD and self._optimizer is not None:
            self._optimizer.measure_state_next_step = True

    def _emit_quietly(self, kind: str, detail: dict[str, Any]) -> None:
        self._guard("events", self._emit, kind, detail)

    def _last_step(self) -> int:
        """Return the step that was recorded last: evaluations belong to it."""
        return max(self.step_index - 1, 0)

    # -- flushing and closing -------------------------------------------------------------

    def flush(self) -> None:
        """Hand every buffered row to the background writer."""
        if self.closed:
            return
        for buffer in self._buffers.values():
            part = buffer.take()
            if part is not None:
                self._writer.submit(part)
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Write the remaining rows, wait for the writer, and remove every hook."""
        if self.closed:
            return
        try:
            self.flush()
            self._writer.close()
        except Exception as error:  # noqa: BLE001
            self._report_error("writer", error)
        finally:
            self.closed = True
            self._remove_probes()
        if self._writer.error_count:
            self.error_counts["writer"] = self._writer.error_count

    def _remove_probes(self) -> None:
        for remove in (self._optimizer.remove if self._optimizer else None,
                       self._activations.remove if self._activations else None,
                       self._trajectory.remove if self._trajectory else None,
                       self._timing.remove if self._timing else None,
                       self._clipping.remove, self._checkpoints.remove):
            if remove is not None:
                try:
                    remove()
                except Exception as error:  # noqa: BLE001
                    self._report_error("closing", error)

    # -- errors ---------------------------------------------------------------------------

    def _guard(self, area: str, function, *args) -> None:
        if self.closed or area in self._disabled:
            return
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001
            self._report_error(area, error)

    def _report_error(self, area: str, error: Exception) -> None:
        """Count an internal error, log its first occurrence, and turn `area` off.

        With strict=True the error is raised instead, so tests see it.
        """
        if self.strict:
            raise error
        self.error_counts[area] = self.error_counts.get(area, 0) + 1
        self._disabled.add(area)
        if self.error_counts[area] == 1:
            logger.warning("runlens %s disabled after an error: %s: %s. Training goes on; "
                           "other signals are still recorded.", area,
                           type(error).__name__, error)
            if area != "events":
                self._guard("events", self._emit, run_format.EVENT_RECORDER_ERROR,
                            {"area": area, "error": f"{type(error).__name__}: {error}"[:500]})


def _watched_params(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
                    names: dict[int, str]) -> list[tuple[str, torch.nn.Parameter]]:
    """Return the model's parameters and any others that the optimizer holds, with names."""
    params: dict[int, torch.nn.Parameter] = {}
    if model is not None:
        params.update((id(param), param) for param in model.parameters())
    if optimizer is not None:
        params.update((id(param), param) for group in optimizer.param_groups
                      for param in group["params"])
    return [(names.get(key, "?"), param) for key, param in params.items()]


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _describe_process_group() -> dict[str, Any] | None:
    """Return the default process group's backend and world size, or None without one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return {"backend": str(torch.distributed.get_backend()),
            "world_size": torch.distributed.get_world_size()}


# NOTE: an estimate. Ranks open the recorder within seconds of each other, after the
# set-up collectives of DDP or FSDP. A rank that waits longer for rank 0 goes on with
# its own segment number, with a warning.
RANK_ZERO_WAIT_SECONDS = 60.0

# Openings of each run directory name in this process, which name the store keys.
_openings: dict[str, int] = {}


def _share_segment(run_dir: Path, rank: int, segment: int, first_step: int,
                   step: int | None) -> tuple[int, int]:
    """Return rank 0's segment number and first step for this opening, on every rank.

    Ranks open the run directory at slightly different times, and a rank that reads
    run.json after rank 0 appended this opening's segment record would number its
    segment one higher. So rank 0 publishes its numbers in the key-value store that
    `init_process_group` set up, and the other ranks wait for them there. A store lookup
    is no collective: a rank that does not record takes no part. An explicit `step=`
    argument is kept. The key counts the openings of the run directory's name in this
    process, which agree across ranks that open the same runs in the same order.
    """
    _openings[run_dir.name] = _openings.get(run_dir.name, 0) + 1
    key = f"runlens/{run_dir.name}/{_openings[run_dir.name]}"
    try:
        # NOTE: a private torch API, checked with torch 2.13.0 only, hence the fallback.
        store = torch.distributed.distributed_c10d._get_default_store()
        if rank == 0:
            store.set(key, json.dumps([segment, first_step]))
            return segment, first_step
        store.wait([key], timedelta(seconds=RANK_ZERO_WAIT_SECONDS))
        shared_segment, shared_first_step = json.loads(store.get(key))
    except (AttributeError, RuntimeError, ValueError, TypeError) as error:
        logger.warning("runlens rank %d did not get the segment number of %s from rank 0 "
                       "(%s: %s); it records segment %d, which may differ from rank 0's.",
                       rank, run_dir, type(error).__name__, error, segment)
        return segment, first_step
    return shared_segment, first_step if step is not None else shared_first_step


def _describe_scaler(scaler: Any) -> dict[str, Any]:
    if scaler is None:
        return {"scaler": None}
    enabled = bool(getattr(scaler, "is_enabled", lambda: False)())
    return {"scaler": type(scaler).__name__, "enabled": enabled}


def _read_run_file(run_file: Path) -> dict[str, Any]:
    """Read an existing run.json, or raise ValueError when it is not a runlens run file."""
    try:
        meta = json.loads(run_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{run_file} is not valid JSON ({error}). Record into a new run "
                         "directory.") from error
    if not isinstance(meta, dict) or not isinstance(meta.get("segments", []), list):
        raise ValueError(f"{run_file} is not a runlens run file: expected a JSON object "
                         "with a list of segments. Record into a new run directory.")
    return meta


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f"{run_format.TEMP_PREFIX}{path.name}")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(temporary, path)


def _last_recorded_step(run_dir: Path) -> int:
    """Return the largest step in the run's `scalars` parts, from Parquet statistics, or -1."""
    last = -1
    for part in (run_dir / "scalars").glob(f"rank-*/{run_format.PART_PREFIX}*"):
        try:
            metadata = pq.ParquetFile(part).metadata
        except Exception:  # noqa: BLE001 - a damaged part must not stop a resume
            warnings.warn(f"runlens: skipped unreadable part {part} while resuming",
                          RuntimeWarning, stacklevel=3)
            continue
        step_index = metadata.schema.to_arrow_schema().get_field_index("step")
        for group in range(metadata.num_row_groups):
            statistics = metadata.row_group(group).column(step_index).statistics
            if statistics is not None and statistics.has_min_max:
                last = max(last, int(statistics.max))
    return last
