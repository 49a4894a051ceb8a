"""Record a Lightning run with runlens: `RunlensCallback` for `lightning.pytorch.Trainer`.

    from runlens.integrations.lightning import RunlensCallback

    trainer = lightning.pytorch.Trainer(callbacks=[RunlensCallback("runs/exp42")])
    trainer.fit(module, datamodule=data)

The callback opens a Recorder when fitting starts and closes it when fitting ends or
fails. It records one step per optimizer step, with the mean loss of the batches that
the step accumulated, and the metrics logged during validation. docs/integrations.md
describes what is recorded and the limits.

`RunlensCallback` subclasses the Callback of the `lightning` package, or of the older
`pytorch_lightning` package when only that one is installed. With both installed, a
`pytorch_lightning.Trainer` needs `PytorchLightningCallback`, which has the same
arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from runlens.integrations import (WarnOnce, check_recorder_options, logger,
                                  missing_framework, open_recorder, run_closure_first,
                                  split_metrics)

try:
    import lightning.pytorch as _framework
except ModuleNotFoundError as lightning_error:
    if lightning_error.name not in ("lightning", "lightning.pytorch"):
        raise
    try:
        import pytorch_lightning as _framework
    except ModuleNotFoundError as pytorch_lightning_error:
        if pytorch_lightning_error.name != "pytorch_lightning":
            raise
        raise missing_framework("runlens.integrations.lightning", "lightning", "lightning",
                                lightning_error) from lightning_error

import torch

# Recorder arguments that the callback takes from the trainer.
_SET_BY_CALLBACK = ("model", "optimizer", "scheduler", "scaler", "rank")


class _RecordingHooks:
    """The hooks of `RunlensCallback`, independent of the package that defines Callback."""

    def __init__(self, run_dir: str | os.PathLike, *, all_ranks: bool = False,
                 eval_split: str = "val", **recorder_options: Any) -> None:
        """Prepare to record into `run_dir`. Nothing is opened before fitting starts.

        Args:
            run_dir: the run directory. A new one is created; fitting again into an
                existing one (such as a resume with ``ckpt_path=``) appends a segment.
            all_ranks: record on every rank, each into its own ``rank-<r>`` folders of
                the same run directory (default False: global rank 0 only).
            eval_split: the split under which validation metrics are recorded (default
                ``val``). A metric name that starts with it and ``_``, ``/`` or ``.``,
                such as ``val_loss``, is recorded without that prefix, as ``loss``.
            **recorder_options: other arguments of `runlens.record`, such as
                `param_stats_every` or `config`. `config` defaults to the module's
                `hparams`.

        Raises:
            TypeError: an option is unknown or one that the callback sets itself
                (model, optimizer, scheduler, scaler, rank).
        """
        super().__init__()
        if not isinstance(all_ranks, bool):
            raise TypeError(f"all_ranks must be True or False, got {all_ranks!r}.")
        if not isinstance(eval_split, str) or not eval_split:
            raise TypeError(f"eval_split must be a non-empty string, got {eval_split!r}.")
        self.run_dir = run_dir
        self.all_ranks = all_ranks
        self.eval_split = eval_split
        self.recorder_options = check_recorder_options(recorder_options, _SET_BY_CALLBACK,
                                                       type(self).__name__)
        self.recorder = None
        self._closure_hook = None
        self._errors = WarnOnce(type(self).__name__)
        self._reset_step_state()

    def _reset_step_state(self) -> None:
        self._batch_losses: list[torch.Tensor] = []
        self._last_global_step = 0
        self._metrics_before_validation: dict[str, Any] = {}

    # -- opening and closing ---------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        self.close()
        self._reset_step_state()
        self._errors.failed = False

        optimizers = trainer.optimizers
        optimizer = optimizers[0] if optimizers else None
        if len(optimizers) > 1:
            _log_once_more_optimizers(len(optimizers))
        schedulers = trainer.lr_scheduler_configs
        options = dict(self.recorder_options)
        options.setdefault("config", _hparams(pl_module))
        records = self.all_ranks or trainer.global_rank == 0
        if records and optimizer is not None:
            self._closure_hook = run_closure_first(optimizer)

        try:
            self.recorder = open_recorder(
                self.run_dir, options, rank=trainer.global_rank, all_ranks=self.all_ranks,
                model=pl_module, optimizer=optimizer,
                scheduler=schedulers[0].scheduler if schedulers else None,
                scaler=getattr(trainer.precision_plugin, "scaler", None))
        except BaseException:
            self._remove_closure_hook()
            raise
        if self.recorder is None:
            self._remove_closure_hook()
            return

        # The Trainer loads a checkpoint's weights before on_fit_start, so the recorder's
        # load hook misses it. The optimizer and scheduler states are restored after this
        # hook, and the recorder's hooks record those loads.
        ckpt_path = trainer.ckpt_path
        if ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup:
            self.recorder.event("checkpoint_load", object="model", path=str(ckpt_path))

    def on_train_start(self, trainer, pl_module) -> None:
        # The checkpoint's global step is restored after on_fit_start.
        self._last_global_step = trainer.global_step

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        recorder = self.recorder
        if recorder is not None and not recorder.closed:
            recorder.event("training_error", type=type(exception).__name__,
                           message=str(exception)[:500])
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Write what is buffered and close the recorder. Fitting again opens a new one."""
        self._remove_closure_hook()
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()

    def _remove_closure_hook(self) -> None:
        if self._closure_hook is not None:
            self._closure_hook.remove()
            self._closure_hook = None

    # -- training steps ----------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.recorder is None or self._errors.failed:
            return
        try:
            self._record_batch(trainer, pl_module, outputs)
        except Exception as error:  # noqa: BLE001 - nothing may escape into training
            self._errors.report("on_train_batch_end", error)

    def _record_batch(self, trainer, pl_module, outputs) -> None:
        loss = _batch_loss(outputs)
        if loss is not None:
            if pl_module.automatic_optimization:
                # Lightning divides the loss by accumulate_grad_batches before backward,
                # and `outputs` has that divided loss.
                loss = loss * trainer.accumulate_grad_batches
            self._batch_losses.append(loss)
        # global_step counts optimizer steps, and also steps that a GradScaler skipped.
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        losses, self._batch_losses = self._batch_losses, []
        step_loss = None
        if len(losses) == 1:
            step_loss = losses[0]
        elif losses:
            step_loss = torch.stack([value.float() for value in losses]).mean()
        self.recorder.step(step_loss)

    # -- validation --------------------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.recorder is None or self._errors.failed:
            return
        self._metrics_before_validation = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.recorder is None or self._errors.failed or trainer.sanity_checking:
            return
        try:
            self._record_validation(trainer)
        except Exception as error:  # noqa: BLE001 - nothing may escape into training
            self._errors.report("on_validation_end", error)

    def _record_validation(self, trainer) -> None:
        # callback_metrics also contains training metrics. Validation replaces the value
        # of each metric logged in it with a new tensor, so the metrics whose value
        # object changed since validation started are the validation metrics.
        before = self._metrics_before_validation
        logged = {name: value for name, value in trainer.callback_metrics.items()
                  if name not in before or before[name] is not value}
        metrics = split_metrics(logged, self.eval_split)
        if metrics:
            self.recorder.log_eval(self.eval_split, metrics)


def _batch_loss(outputs: Any) -> torch.Tensor | None:
    """Return the detached loss of one batch's outputs, or None when it has none."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if not isinstance(outputs, torch.Tensor) or outputs.numel() != 1:
        return None
    return outputs.detach().reshape(())


def _hparams(pl_module) -> dict[str, Any]:
    hparams = getattr(pl_module, "hparams", None)
    return dict(hparams) if isinstance(hparams, Mapping) else {}


_warned_optimizers = False


def _log_once_more_optimizers(count: int) -> None:
    global _warned_optimizers
    if not _warned_optimizers:
        _warned_optimizers = True
        logger.warning("runlens records the first of the trainer's %d optimizers; the "
                       "others are not hooked.", count)


class RunlensCallback(_RecordingHooks, _framework.Callback):
    """Records each fit of the Trainer into a runlens run directory."""


def __getattr__(name: str):
    # Built on first use, so that importing this module does not import pytorch_lightning.
    if name == "PytorchLightningCallback":
        try:
            import pytorch_lightning
        except ModuleNotFoundError as error:
            raise missing_framework(f"{__name__}.PytorchLightningCallback",
                                    "pytorch_lightning", "lightning", error) from error
        if pytorch_lightning.Callback is _framework.Callback:
            callback = RunlensCallback
        else:
            callback = type("PytorchLightningCallback",
                            (_RecordingHooks, pytorch_lightning.Callback),
                            {"__doc__": RunlensCallback.__doc__, "__module__": __name__})
        globals()[name] = callback
        return callback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RunlensCallback"]
