"""The `Recorder`: the object that `runlens.record(...)` returns."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pyarrow.parquet as pq
import torch

import runlens
from runlens import format as run_format
from runlens.recorder import model_info
from runlens.recorder.buffers import TableBuffer
from runlens.recorder.checkpoint_probe import CheckpointProbe
from runlens.recorder.clipping_probe import ClippingProbe
from runlens.recorder.optimizer_probe import OptimizerProbe
from runlens.recorder.scaler_probe import ScalerProbe
from runlens.recorder.task_probe import TaskProbe
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
        config: user configuration stored in run.json (JSON-serializable).
        shared_params: a module or parameters shared by all tasks, for the task probe.
        param_stats_every: steps between per-parameter statistics (default 100).
        task_probe_every: steps between task-gradient probes (default 100).
        flush_every: steps between writes of part files (default 500).
        flush_seconds: seconds between writes, whichever comes first (default 10).
            A killed run loses at most the rows since the last write.
        step: the global step of this segment's first step. Defaults to one past the
            last recorded step, or 0 for a new run.
        strict: raise recorder errors into training instead of logging them (default
            False, for tests of the recorder itself).
        rank: this process's rank. Defaults to `torch.distributed`'s rank, or 0.
        clock: the source of the `time` columns and run.json timestamps, in seconds since
            the epoch (default `time.time`). A fake clock makes recordings reproducible.
    """

    def __init__(self, run_dir: str | os.PathLike, *, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 scaler: Any = None, config: Mapping[str, Any] | None = None,
                 shared_params: torch.nn.Module | Iterable[torch.nn.Parameter] | None = None,
                 param_stats_every: int = 100, task_probe_every: int = 100,
                 flush_every: int = 500, flush_seconds: float = 10.0,
                 step: int | None = None, strict: bool = False,
                 rank: int | None = None, clock: Callable[[], float] = time.time) -> None:
        for name, value in (("param_stats_every", param_stats_every),
                            ("task_probe_every", task_probe_every),
                            ("flush_every", flush_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.run_dir = Path(run_dir)
        self.strict = strict
        self.param_stats_every = param_stats_every
        self.task_probe_every = task_probe_every
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.rank = _default_rank() if rank is None else rank
        self._clock = clock
        self.error_counts: dict[str, int] = {}
        self.closed = False
        self._disabled: set[str] = set()
        self._buffers = {table: TableBuffer(table) for table in run_format.TABLES}
        self._steps_since_flush = 0
        self._last_flush = time.monotonic()
        self._tasks_probed_at: int | None = None

        params, names = model_info.describe_params(model)
        if optimizer is not None:
            names = model_info.param_names_for(optimizer, names)
        self.segment, self.step_index = self._open_run_dir(
            model, optimizer, scheduler, scaler, config, params, names, step)
        self._writer = PartWriter(self.run_dir, self.rank, self.segment)
        self._install_probes(model, optimizer, scheduler, scaler, shared_params, names)
        self.event(run_format.EVENT_SEGMENT_START, segment=self.segment)

    # -- set-up ---------------------------------------------------------------------------

    def _open_run_dir(self, model, optimizer, scheduler, scaler, config, params, names,
                      step) -> tuple[int, int]:
        run_file = self.run_dir / run_format.RUN_FILE
        started = datetime.fromtimestamp(self._clock(), timezone.utc).isoformat()
        if run_file.exists():
            meta = json.loads(run_file.read_text())
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
                "config": model_info.json_value(dict(config or {})),
                "settings": {"param_stats_every": self.param_stats_every,
                             "task_probe_every": self.task_probe_every,
                             "flush_every": self.flush_every,
                             "flush_seconds": self.flush_seconds},
                "segments": [],
            }
            segment = 0
            first_step = 0 if step is None else step
        meta["segments"].append({
            "segment": segment,
            "start_step": first_step,
            "started": started,
            "argv": list(sys.argv),
            "optimizer": model_info.describe_optimizer(optimizer, names),
        })
        if self.rank == 0:
            _write_json_atomically(run_file, meta)
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
        self._tasks = None
        if shared_params is not None:
            if isinstance(shared_params, torch.nn.Module):
                shared_params = shared_params.parameters()
            self._tasks = TaskProbe(list(shared_params))

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
            self._record_step(loss, losses or {}, loss_weights or {}, scalars)
        except Exception as error:  # noqa: BLE001
            self._report_error("recorder", error)

    def _record_step(self, loss, losses, loss_weights, user_scalars) -> None:
        step = self.step_index
        keys = {"step": step, "segment": self.segment, "rank": self.rank}

        # optimizer, clipping and AMP values of this step
        row: dict[str, Any] = {**keys, "time": self._clock()}
        param_rows: list[dict[str, Any]] = []
        if self._optimizer is not None and "optimizer probe" not in self._disabled:
            row["step_skipped"] = not self._optimizer.stepped
            optimizer_values, param_rows = self._optimizer.take()
            row.update(optimizer_values)
            for group_row in self._optimizer.group_rows():
                self._buffers["param_groups"].add_row({**keys, **group_row})
        row.update(self._clipping.take())
        if self._scaler is not None:
            row.update(self._scaler.take())

        # the loss, task losses and user scalars
        if loss is not None:
            row["loss"] = _as_value(loss)
            if isinstance(row["loss"], torch.Tensor):
                row["nonfinite_loss"] = (~torch.isfinite(row["loss"])).sum()
            else:
                row["nonfinite_loss"] = int(not math.isfinite(row["loss"]))
        for name, value in user_scalars.items():
            column = name if name not in run_format.RESERVED_SCALARS else f"user_{name}"
            row[column] = _as_value(value)
        self._buffers["scalars"].add_row(row)
        self._record_task_losses(keys, losses, loss_weights)
        for param_row in param_rows:
            self._buffers["params"].add_row({**keys, **param_row})

        # a task probe that `probe_tasks` did not already run this step
        if losses and self._tasks is not None and self._is_task_probe_step() \
                and self._tasks_probed_at != step and "task probe" not in self._disabled:
            self._probe_tasks_now(losses, loss_weights)

        # hand full buffers to the writer
        self.step_index += 1
        self._steps_since_flush += 1
        if (self._steps_since_flush >= self.flush_every
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def _record_task_losses(self, keys, losses, loss_weights) -> None:
        for task, task_loss in losses.items():
            value = _as_value(task_loss)
            weight = loss_weights.get(task)
            weighted = None if weight is None else value * float(weight)
            self._buffers["losses"].add_row({**keys, "task": task, "loss": value,
                                             "weight": weight, "weighted_loss": weighted})

    def _is_stats_step(self) -> bool:
        return self.step_index % self.param_stats_every == 0

    def _is_task_probe_step(self) -> bool:
        return self.step_index % self.task_probe_every == 0

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
        """
        self._guard("clipping probe", self._clipping.log, total_norm, max_norm)

    def log_eval(self, split: str, metrics: Mapping[str, torch.Tensor | float],
                 step: int | None = None) -> None:
        """Record evaluation metrics of `split` at the current step (or at `step`)."""
        def add_rows() -> None:
            at = self._last_step() if step is None else step
            keys = {"step": at, "segment": self.segment, "rank": self.rank}
            for metric, value in metrics.items():
                self._buffers["evals"].add_row({**keys, "split": split, "metric": metric,
                                                "value": _as_value(value)})
        self._guard("eval logging", add_rows)

    def log_classes(self, split: str, targets: torch.Tensor, predictions: torch.Tensor,
                    num_classes: int | None = None, step: int | None = None) -> None:
        """Record per-class recall, precision and support of `split` from tensors.

        `predictions` holds class indices, or scores of shape (N, C), which are reduced
        by argmax. This call synchronizes with the device, so use it at evaluation time.
        """
        self._guard("class metrics", self._log_classes, split, targets, predictions,
                    num_classes, step)

    def _log_classes(self, split, targets, predictions, num_classes, step) -> None:
        targets = targets.detach().reshape(-1).long().cpu()
        predictions = predictions.detach()
        if predictions.dim() > 1:
            predictions = predictions.argmax(dim=-1)
        predictions = predictions.reshape(-1).long().cpu()
        if num_classes is None:
            num_classes = int(max(targets.max(), predictions.max())) + 1
        support = torch.bincount(targets, minlength=num_classes)
        predicted = torch.bincount(predictions, minlength=num_classes)
        correct = torch.bincount(targets[targets == predictions], minlength=num_classes)
        at = self._last_step() if step is None else step
        keys = {"step": at, "segment": self.segment, "rank": self.rank}
        for class_id in range(num_classes):
            n_support, n_predicted = int(support[class_id]), int(predicted[class_id])
            n_correct = int(correct[class_id])
            self._buffers["classes"].add_row({
                **keys, "split": split, "class_id": class_id,
                "recall": n_correct / n_support if n_support else None,
                "precision": n_correct / n_predicted if n_predicted else None,
                "support": n_support, "predicted": n_predicted,
            })

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


def _as_value(value: Any) -> Any:
    # A copy, because a tensor that the caller updates in place (a running sum) would
    # otherwise be read at the flush with a later value.
    if isinstance(value, torch.Tensor):
        return value.detach().float().clone()
    return float(value)


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _describe_scaler(scaler: Any) -> dict[str, Any]:
    if scaler is None:
        return {"scaler": None}
    enabled = bool(getattr(scaler, "is_enabled", lambda: False)())
    return {"scaler": type(scaler).__name__, "enabled": enabled}


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
