"""Record a Hugging Face Trainer run with runlens: `RunlensCallback`, a TrainerCallback.

    from runlens.integrations.transformers import RunlensCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   callbacks=[RunlensCallback("runs/exp42")])
    trainer.train()

The callback opens a Recorder at `on_train_begin` and closes it at `on_train_end`. It
records one step per optimizer step, at `on_step_end`, and the metrics of each
evaluation, at `on_evaluate`.

The Trainer logs its loss only every `logging_steps`, and callbacks get no loss at all.
The callback therefore takes each micro-batch's loss from a forward hook on the model:
the `loss` field of the output of each training-mode forward call. The hook keeps the
loss as a detached tensor, so recording adds no host-device synchronization, and it
combines the micro-batches of an optimizer step as the Trainer does for its own logged
loss. When the forward call got `num_items_in_batch`, the model normalized its loss over
the whole accumulated batch, so the micro-batch losses are summed. Otherwise each one
is a micro-batch mean, so they are averaged. docs/integrations.md describes the limits.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from runlens.integrations import (WarnOnce, check_recorder_options, missing_framework,
                                  open_recorder, split_metrics)

try:
    import transformers as _framework
except ModuleNotFoundError as error:
    if error.name != "transformers":
        raise
    raise missing_framework("runlens.integrations.transformers", "transformers",
                            "transformers", error) from error

import torch
import torch.nn.utils.clip_grad

# Recorder arguments that the callback takes from the Trainer.
_SET_BY_CALLBACK = ("model", "optimizer", "scheduler", "scaler", "rank")
# Metrics of `Trainer.evaluate` that measure speed, not the model.
_SPEED_METRICS = ("runtime", "samples_per_second", "steps_per_second", "tokens_per_second",
                  "model_preparation_time")


class RunlensCallback(_framework.TrainerCallback):
    """Records each `Trainer.train()` call into a runlens run directory."""

    def __init__(self, run_dir: str | os.PathLike, *, all_ranks: bool = False,
                 eval_split: str = "val", metric_prefix: str = "eval",
                 **recorder_options: Any) -> None:
        """Prepare to record into `run_dir`. Nothing is opened before training starts.

        Args:
            run_dir: the run directory. A new one is created; training again into an
                existing one (such as a resume with ``resume_from_checkpoint=``)
                appends a segment.
            all_ranks: record on every process, each into its own ``rank-<r>`` folders
                of the same run directory (default False: the main process only).
            eval_split: the split under which evaluation metrics are recorded (default
                ``val``, the split that the built-in rules read).
            metric_prefix: the `metric_key_prefix` of the evaluation (default ``eval``),
                cut from the metric names, so ``eval_loss`` is recorded as ``loss``.
                The speed metrics (``eval_runtime`` and the like) and ``epoch`` are
                left out.
            **recorder_options: other arguments of `runlens.record`, such as
                `param_stats_every` or `config`. `config` defaults to the Trainer's
                arguments and the model's configuration.

        Raises:
            TypeError: an option is unknown or one that the callback sets itself
                (model, optimizer, scheduler, scaler, rank).
        """
        if not isinstance(all_ranks, bool):
            raise TypeError(f"all_ranks must be True or False, got {all_ranks!r}.")
        for name, value in (("eval_split", eval_split), ("metric_prefix", metric_prefix)):
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty string, got {value!r}.")
        self.run_dir = run_dir
        self.all_ranks = all_ranks
        self.eval_split = eval_split
        self.metric_prefix = metric_prefix
        self.recorder_options = check_recorder_options(recorder_options, _SET_BY_CALLBACK,
                                                       type(self).__name__)
        self.recorder = None
        self._forward_hook = None
        self._clip_watch: _ClipWatch | None = None
        self._batch_losses: list[tuple[torch.Tensor, bool]] = []
        self._errors = WarnOnce(type(self).__name__)

    # -- opening and closing ---------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       lr_scheduler=None, **kwargs) -> None:
        self.close()
        self._batch_losses = []
        self._errors.failed = False
        # The Trainer hands callbacks accelerate's wrappers, which keep the torch
        # optimizer, the scheduler and the GradScaler as attributes.
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            torch_optimizer = None
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        options = dict(self.recorder_options)
        options.setdefault("config", _trainer_config(args, model))
        self.recorder = open_recorder(
            self.run_dir, options, rank=args.process_index, all_ranks=self.all_ranks,
            model=model, optimizer=torch_optimizer, scheduler=scheduler,
            scaler=getattr(optimizer, "scaler", None))
        if self.recorder is None:
            return
        if model is not None:
            self._forward_hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)
        self._clip_watch = _ClipWatch(self.recorder)
        if state.global_step > 0:
            self._record_resume(state, torch_optimizer)

    def _record_resume(self, state, optimizer) -> None:
        # A resume loads the checkpoint before on_train_begin, so the recorder's load hooks
        # miss those loads. A new optimizer has no state before its first step, so state
        # tensors now mean that the checkpoint's optimizer state was loaded.
        from runlens.recorder.optimizer_probe import count_state_tensors

        self.recorder.event("checkpoint_load", object="model", global_step=state.global_step)
        state_tensors = count_state_tensors(optimizer) if optimizer is not None else 0
        if state_tensors:
            self.recorder.event("checkpoint_load", object="optimizer",
                                state_tensors=state_tensors, global_step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        """Write what is buffered, close the recorder and remove the model hook.

        `on_train_end` calls it. A `Trainer.train()` call that raises never reaches
        `on_train_end`, so call `close()` in an ``except`` or ``finally`` block around it
        to keep the rows since the last flush.
        """
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        if self._clip_watch is not None:
            self._clip_watch.remove()
            self._clip_watch = None
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()

    # -- training steps ----------------------------------------------------------------------

    def _keep_loss(self, module, args, kwargs, output) -> None:
        if not module.training or self._errors.failed:
            return
        try:
            loss = output.get("loss") if isinstance(output, Mapping) else None
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                normalized = kwargs.get("num_items_in_batch") is not None
                self._batch_losses.append((loss.detach().reshape(()), normalized))
        except Exception as error:  # noqa: BLE001 - nothing may escape into training
            self._errors.report("the model's forward hook", error)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.recorder is None or self._errors.failed:
            return
        try:
            self.recorder.step(self._take_step_loss())
        except Exception as error:  # noqa: BLE001 - nothing may escape into training
            self._errors.report("on_step_end", error)

    def _take_step_loss(self) -> torch.Tensor | None:
        """Return the loss of the optimizer step that just ended, as the Trainer counts it."""
        losses, self._batch_losses = self._batch_losses, []
        if not losses:
            return None
        # The Trainer divides a micro-batch mean by the number of micro-batches in the
        # step, and takes a loss normalized by num_items_in_batch as it is. Dividing by a
        # Python number keeps the values on their device.
        count = len(losses)
        parts = [loss.float() if normalized else loss.float() / count
                 for loss, normalized in losses]
        return parts[0] if count == 1 else torch.stack(parts).sum()

    # -- evaluation --------------------------------------------------------------------------

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        if self.recorder is None or self._errors.failed or not isinstance(metrics, Mapping):
            return
        try:
            recorded = split_metrics(metrics, self.metric_prefix, self._is_speed_metric)
            if recorded:
                self.recorder.log_eval(self.eval_split, recorded)
        except Exception as error:  # noqa: BLE001 - nothing may escape into training
            self._errors.report("on_evaluate", error)

    def _is_speed_metric(self, name: str) -> bool:
        return name == "epoch" or any(name == f"{self.metric_prefix}_{speed}"
                                      for speed in _SPEED_METRICS)


class _ClipWatch:
    """Wraps `torch.nn.utils.clip_grads_with_norm_` and reports each clip to the recorder.

    accelerate (1.16) clips the Trainer's gradients with `get_total_norm` and
    `clip_grads_with_norm_` where torch.distributed is available, not with
    `clip_grad_norm_`, which the recorder watches itself. `clip_grads_with_norm_` gets the
    total norm before clipping and the max norm, which go to `Recorder.log_clip`.
    """

    def __init__(self, recorder) -> None:
        self._original = None
        # Older torch releases, such as 2.2, have no clip_grads_with_norm_, so nothing can
        # call it there and the watch is skipped.
        original = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
        if original is None or getattr(original, "_runlens_clip_watch", False):
            return  # another callback in this process already wraps it

        @functools.wraps(original)
        def clip_grads_with_norm_(parameters, max_norm, total_norm, *args, **kwargs):
            result = original(parameters, max_norm, total_norm, *args, **kwargs)
            try:
                recorder.log_clip(total_norm, max_norm)
            except Exception:  # noqa: BLE001 - the Trainer's clipping must still return
                pass
            return result

        clip_grads_with_norm_._runlens_clip_watch = True
        self._original = original
        torch.nn.utils.clip_grads_with_norm_ = clip_grads_with_norm_
        torch.nn.utils.clip_grad.clip_grads_with_norm_ = clip_grads_with_norm_

    def remove(self) -> None:
        if self._original is not None:
            torch.nn.utils.clip_grads_with_norm_ = self._original
            torch.nn.utils.clip_grad.clip_grads_with_norm_ = self._original
            self._original = None


def _trainer_config(args, model) -> dict[str, Any]:
    config: dict[str, Any] = {"training_args": args.to_dict()}
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "to_dict"):
        config["model_config"] = model_config.to_dict()
    return config


__all__ = ["RunlensCallback"]
