"""Tests of invalid input to the recorder: values, names, constructor arguments and config.

An invalid value that training passes to the recorder must cost only that value: the
rows around it are written, and recording goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runlens
from runlens import format as run_format
from runlens.recorder.buffers import TableBuffer
from runlens.recorder.recorder import Recorder
from recorder_helpers import make_batch, make_model, read_rows, total_loss
from recorder_helpers import SYNCING_METHODS, forbid_in_runlens


def _record_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "runlens.record" and record.levelno >= logging.WARNING]


def _train(run_dir: Path, steps: int, step_arguments, **options) -> Recorder:
    """Train for `steps` steps and call `rec.step(**step_arguments(step, loss))` on each.

    All steps fall into one flush, so a bad step would lose the part that contains every step.
    """
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        flush_seconds=3600.0, **options) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(**step_arguments(step, loss))
    return rec


def _per_sample_loss(model: nn.Module, step: int) -> torch.Tensor:
    inputs, target_a, _ = make_batch(step)
    output_a, _ = model(inputs)
    return nn.functional.mse_loss(output_a, target_a, reduction="none")


# -- invalid step values --------------------------------------------------------------------


def test_step_per_sample_loss_keeps_rows(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(tmp_path, model=model, optimizer=optimizer,
                        flush_seconds=3600.0) as rec:
        for step in range(5):
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(_per_sample_loss(model, step) if step == 2 else loss)
    rows = read_rows(tmp_path, "scalars")
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[2]["loss"] is None
    assert rows[2]["nonfinite_loss"] is None
    assert all(math.isfinite(rows[step]["loss"]) for step in (0, 1, 3, 4))
    assert all(row["grad_norm"] > 0 for row in rows)
    assert rec.error_counts == {}


def test_step_nonscalar_loss_warns_once(tmp_path, caplog):
    def arguments(step, loss):
        return {"loss": torch.ones(3) if step in (2, 3) else loss}

    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        rec = _train(tmp_path, 5, arguments)
    messages = _record_messages(caplog)
    assert len(messages) == 1
    assert "dropped 'loss' at step 2" in messages[0]
    assert "a number or a one-element tensor" in messages[0]
    assert "a tensor of shape (3,)" in messages[0]
    assert "loss.mean()" in messages[0]
    assert rec.dropped_counts == {"loss": 2}
    assert [row["loss"] is None for row in read_rows(tmp_path, "scalars")] == [
        False, False, True, True, False]


def test_step_nonscalar_user_scalar_dropped(tmp_path, caplog):
    def arguments(step, loss):
        return {"loss": loss, "acc": torch.ones(2) if step == 1 else torch.tensor(0.5)}

    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        _train(tmp_path, 4, arguments)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["acc"] for row in rows] == [0.5, None, 0.5, 0.5]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert len(messages) == 1
    assert "dropped 'acc' at step 1" in messages[0]
    assert "a tensor of shape (2,)" in messages[0]


def test_step_string_loss_dropped(tmp_path, caplog):
    def arguments(step, loss):
        return {"loss": "0.5" if step == 1 else loss}

    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        rec = _train(tmp_path, 3, arguments)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[1]["loss"] is None
    assert math.isfinite(rows[2]["loss"])
    assert len(messages) == 1
    assert "got a str ('0.5')" in messages[0]
    assert rec.error_counts == {}


@pytest.mark.parametrize("value, expected", [
    (torch.tensor([0.25]), 0.25),
    (torch.tensor([[3]]), 3.0),
    (torch.tensor(True), 1.0),
    (np.float32(0.5), 0.5),
    (np.int64(7), 7.0),
    (np.bool_(True), 1.0),
    (np.array([1.5]), 1.5),
    (True, 1.0),
    (4, 4.0),
    (math.inf, math.inf),
])
def test_step_scalar_forms_accepted(tmp_path, value, expected):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.step(value, extra=value)
    rows = read_rows(tmp_path, "scalars")
    assert rows[0]["loss"] == expected
    assert rows[0]["extra"] == expected
    assert rec.dropped_counts == {}


@pytest.mark.parametrize("value, got", [
    (torch.ones(0), "an empty tensor of shape (0,)"),
    (torch.ones(2, 2), "a tensor of shape (2, 2)"),
    (torch.tensor(1 + 2j), "a tensor of dtype complex64"),
    (np.ones(3), "a numpy array of shape (3,)"),
    (None, None),
    ([1.0], "a list"),
    pytest.param(10 ** 400, "an int that does not fit a float", id="huge-int"),
    (1 + 2j, "a complex"),
])
def test_step_invalid_scalar_forms_dropped(tmp_path, caplog, value, got):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, strict=True) as rec:
            rec.step(1.0, extra=value)
            rec.step(2.0, extra=0.5)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["loss"] for row in rows] == [1.0, 2.0]
    assert [row["extra"] for row in rows] == [None, 0.5]
    if got is None:
        # A caller passes None for a step without a value, so None is not a drop.
        assert messages == []
    else:
        assert len(messages) == 1
        assert f"got {got}" in messages[0]


def test_step_invalid_value_strict_dropped(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.step(torch.ones(3))
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert [row["loss"] for row in rows] == [None, 1.0]


def test_step_invalid_task_loss_keeps_others(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, flush_seconds=3600.0) as rec:
            rec.step(1.0, losses={"a": torch.tensor(0.5), "b": torch.ones(4)},
                     loss_weights={"a": 2.0, "b": 1.0})
            rec.step(1.0, losses={"a": torch.tensor(0.25), "b": 0.75},
                     loss_weights={"a": "heavy", "b": 1.0})
    rows = {(row["step"], row["task"]): row for row in read_rows(tmp_path, "losses")}
    messages = _record_messages(caplog)
    assert rows[(0, "a")]["weighted_loss"] == 1.0
    assert rows[(0, "b")]["loss"] is None
    assert rows[(0, "b")]["weighted_loss"] is None
    assert rows[(1, "a")]["loss"] == 0.25
    assert rows[(1, "a")]["weight"] is None
    assert rows[(1, "b")]["weighted_loss"] == 0.75
    assert len(read_rows(tmp_path, "scalars")) == 2
    assert len(messages) == 2
    assert "losses['b']" in messages[0]
    assert "loss_weights['a']" in messages[1]
    assert rec.error_counts == {}


def test_step_invalid_values_make_no_host_sync(tmp_path, monkeypatch):
    with runlens.record(tmp_path, strict=True, flush_seconds=3600.0) as rec:
        for name in SYNCING_METHODS:
            monkeypatch.setattr(torch.Tensor, name,
                                forbid_in_runlens(name, getattr(torch.Tensor, name)))
        rec.step(torch.ones(3), acc=torch.tensor([0.5]), empty=torch.ones(0),
                 losses={"a": torch.ones(2, 2)})
        monkeypatch.undo()
    rows = read_rows(tmp_path, "scalars")
    assert rows[0]["acc"] == 0.5
    assert rows[0].get("loss") is None
    assert rec.error_counts == {}


def test_log_clip_invalid_norm_dropped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, flush_seconds=3600.0) as rec:
            rec.log_clip(torch.ones(3), 1.0)
            rec.step(1.0)
            rec.log_clip(torch.tensor(2.0), 1.0)
            rec.step(2.0)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["loss"] for row in rows] == [1.0, 2.0]
    assert [row["clip_total_norm"] for row in rows] == [None, 2.0]
    assert len(messages) == 1
    assert "total_norm of log_clip" in messages[0]
    assert rec.error_counts == {}


# -- the row buffer -------------------------------------------------------------------------


def test_table_buffer_add_row_atomic():
    buffer = TableBuffer("scalars")
    buffer.add_row({"step": 0, "segment": 0, "rank": 0, "time": 1.0, "loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="'grad_norm'"):
        buffer.add_row({"step": 1, "segment": 0, "rank": 0, "time": 2.0,
                        "loss": torch.tensor(2.0), "grad_norm": torch.ones(3)})
    with pytest.raises(ValueError, match="'time'"):
        buffer.add_row({"step": 1, "segment": 0, "rank": 0, "time": "later",
                        "loss": torch.tensor(2.0)})
    buffer.add_row({"step": 1, "segment": 0, "rank": 0, "time": 3.0, "loss": 3.0})
    table = buffer.take().materialize()
    assert table.column("step").to_pylist() == [0, 1]
    assert table.column("time").to_pylist() == [1.0, 3.0]
    assert table.column("loss").to_pylist() == [1.0, 3.0]


# -- evaluation -----------------------------------------------------------------------------


def test_log_eval_invalid_metric_keeps_others(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.step(1.0)
            rec.log_eval("val", {"accuracy": "high", "loss": torch.tensor(0.5),
                                 "per_class": torch.ones(3)})
            rec.step(1.0)
            rec.log_eval("val", {"accuracy": 0.75})
    rows = read_rows(tmp_path, "evals")
    values = {(row["step"], row["metric"]): row["value"] for row in rows}
    messages = _record_messages(caplog)
    assert values == {(0, "loss"): 0.5, (1, "accuracy"): 0.75}
    assert len(messages) == 2
    assert "metric 'accuracy' of split 'val'" in messages[0]
    assert "got a str ('high')" in messages[0]
    assert "a tensor of shape (3,)" in messages[1]
    assert rec.error_counts == {}


def test_log_eval_metrics_not_mapping(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_eval("val", [0.5])
            rec.log_eval("val", {"accuracy": 0.5})
    rows = read_rows(tmp_path, "evals")
    messages = _record_messages(caplog)
    assert [row["metric"] for row in rows] == ["accuracy"]
    assert len(messages) == 1
    assert "expected a mapping of metric names to values, got a list" in messages[0]
    assert rec.error_counts == {}


def test_log_eval_invalid_step_records_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_eval("val", {"accuracy": 0.5}, step=-3)
            rec.log_eval("val", {"accuracy": 0.25}, step=4)
    rows = read_rows(tmp_path, "evals")
    messages = _record_messages(caplog)
    assert [(row["step"], row["value"]) for row in rows] == [(4, 0.25)]
    assert len(messages) == 1
    assert "step=-3" in messages[0]


def test_log_classes_empty_warns_once(tmp_path, caplog):
    empty = torch.zeros(0, dtype=torch.long)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_classes("val", empty, empty)
            rec.log_classes("val", empty, torch.zeros(0, 3))
            rec.log_classes("val", torch.tensor([0, 1]), torch.tensor([0, 0]))
    rows = read_rows(tmp_path, "classes")
    messages = _record_messages(caplog)
    assert [row["class_id"] for row in rows] == [0, 1]
    assert len(messages) == 1
    assert "split 'val'" in messages[0]
    assert "empty" in messages[0]
    assert rec.dropped_counts["log_classes('val') empty"] == 2
    assert rec.error_counts == {}


def test_log_classes_length_mismatch_records_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_classes("val", torch.tensor([0, 1, 1]), torch.zeros(1, 2))
            rec.log_classes("val", torch.tensor([0, 1]), torch.tensor([1, 1]))
    rows = read_rows(tmp_path, "classes")
    messages = _record_messages(caplog)
    assert [(row["class_id"], row["support"]) for row in rows] == [(0, 1), (1, 1)]
    assert len(messages) == 1
    assert "3 targets but 1 predictions" in messages[0]
    assert rec.error_counts == {}


@pytest.mark.parametrize("targets, predictions, num_classes, reason", [
    (torch.tensor([0, -1]), torch.tensor([0, 1]), None, "negative class index -1"),
    (torch.tensor([0, 5]), torch.tensor([0, 1]), 3, "class index 5"),
    (torch.tensor([0, 1]), torch.tensor([0, 1]), 0, "num_classes must be a positive"),
    ("cat", torch.tensor([0]), None, "targets"),
])
def test_log_classes_invalid_input_records_nothing(tmp_path, caplog, targets, predictions,
                                                   num_classes, reason):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_classes("val", targets, predictions, num_classes=num_classes)
            rec.log_classes("test", [0, 1], [1, 1])
    rows = read_rows(tmp_path, "classes")
    messages = _record_messages(caplog)
    assert {row["split"] for row in rows} == {"test"}
    assert len(messages) == 1
    assert reason in messages[0]
    assert rec.error_counts == {}


# -- user scalar names ----------------------------------------------------------------------


def test_step_empty_scalar_name_dropped(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.step(1.0, **{"": 2.0, "tokens": 16})
            rec.step(1.0, **{"": 2.0})
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["tokens"] for row in rows] == [16.0, None]
    assert "" not in rows[0]
    assert len(messages) == 1
    assert "empty name" in messages[0]
    assert rec.error_counts == {}


def test_step_reserved_scalar_name_prefixed(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.step(1.0, grad_norm=3.0)
    rows = read_rows(tmp_path, "scalars")
    assert rows[0]["user_grad_norm"] == 3.0
    assert rows[0].get("grad_norm") is None


def test_step_prefixed_name_collision_keeps_explicit(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.step(1.0, grad_norm=3.0, user_grad_norm=5.0)
            rec.step(1.0, user_grad_norm=6.0, grad_norm=4.0)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert [row["user_grad_norm"] for row in rows] == [5.0, 6.0]
    assert len(messages) == 1
    assert "dropped 'grad_norm' at step 0" in messages[0]
    assert "'user_grad_norm' was also passed" in messages[0]
    assert rec.dropped_counts == {"grad_norm": 2}


# -- constructor arguments ------------------------------------------------------------------


@pytest.mark.parametrize("options, error, match", [
    ({"rank": -1}, ValueError, r"rank must be a non-negative integer, got -1"),
    ({"rank": True}, TypeError, r"rank must be a non-negative integer, got True"),
    ({"rank": 1.0}, TypeError, r"rank must be a non-negative integer, got 1\.0"),
    ({"step": -5}, ValueError, r"step must be a non-negative integer or None, got -5"),
    ({"step": "3"}, TypeError, r"step must be a non-negative integer or None, got '3'"),
    ({"flush_seconds": 0}, ValueError, r"flush_seconds must be a positive number"),
    ({"flush_seconds": -1.0}, ValueError, r"flush_seconds must be a positive number"),
    ({"flush_seconds": math.nan}, ValueError, r"flush_seconds must be a positive number"),
    ({"flush_seconds": "10"}, TypeError, r"flush_seconds must be a positive number"),
    ({"flush_seconds": True}, TypeError, r"flush_seconds must be a positive number"),
    ({"param_stats_every": True}, TypeError, r"param_stats_every must be a positive integer"),
    ({"task_probe_every": 0}, ValueError, r"task_probe_every must be a positive integer"),
    ({"flush_every": 2.5}, TypeError, r"flush_every must be a positive integer, got 2\.5"),
    ({"config": [1, 2]}, TypeError, r"config must be a mapping.*got list"),
    ({"config": 3}, TypeError, r"config must be a mapping.*got int"),
    ({"config": "lr=0.1"}, TypeError, r"config must be a mapping.*got str"),
])
def test_record_invalid_argument_raises(tmp_path, options, error, match):
    original_clip = torch.nn.utils.clip_grad_norm_
    with pytest.raises(error, match=match):
        runlens.record(tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()
    assert torch.nn.utils.clip_grad_norm_ is original_clip


def test_record_numpy_rank_accepted(tmp_path):
    with runlens.record(tmp_path, rank=np.int64(2), flush_seconds=1) as rec:
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert rows[0]["rank"] == 2
    assert (tmp_path / "scalars" / "rank-2").is_dir()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format_version": 1, "segments": 3}'])
def test_record_invalid_run_json_raises(tmp_path, content):
    run_file = tmp_path / run_format.RUN_FILE
    run_file.write_text(content)
    with pytest.raises(ValueError, match=r"run\.json.*Record into a new run directory"):
        runlens.record(tmp_path)
    assert run_file.read_text() == content


def test_record_run_dir_is_file_raises(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=r"is a file, not a directory"):
        runlens.record(run_dir)


# -- config ---------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    layers: tuple = (2, 3)


class PlainConfig:
    def __init__(self) -> None:
        self.lr = 0.1
        self.name = "small"


def _stored_config(run_dir: Path) -> dict:
    return json.loads((run_dir / run_format.RUN_FILE).read_text())["config"]


@pytest.mark.parametrize("config, expected", [
    (argparse.Namespace(lr=0.1, name="small"), {"lr": 0.1, "name": "small"}),
    (TrainConfig(), {"lr": 0.1, "layers": [2, 3]}),
    (PlainConfig(), {"lr": 0.1, "name": "small"}),
    (None, {}),
    ({"nested": TrainConfig(lr=0.5)}, {"nested": {"lr": 0.5, "layers": [2, 3]}}),
])
def test_record_config_forms_stored(tmp_path, config, expected):
    with runlens.record(tmp_path, config=config):
        pass
    assert _stored_config(tmp_path) == expected


def test_record_config_dataclass_class_raises(tmp_path):
    with pytest.raises(TypeError, match=r"config must be .*got the class TrainConfig"):
        runlens.record(tmp_path / "run", config=TrainConfig)


def test_record_self_referencing_config_cut(tmp_path):
    config: dict = {"lr": 0.1}
    config["self"] = config
    with runlens.record(tmp_path, config=config):
        pass
    stored = _stored_config(tmp_path)
    depth = 0
    while isinstance(stored, dict):
        assert stored["lr"] == 0.1
        stored = stored["self"]
        depth += 1
    assert depth == 20
    assert isinstance(stored, str)
    assert stored.startswith("{'lr': 0.1")


def test_record_large_arrays_in_config_summarized(tmp_path):
    config = {"mask": torch.ones(4, 5), "table": np.zeros((17,), dtype=np.int32),
              "small": torch.tensor([1.0, 2.0]), "scale": np.float32(0.5),
              "bad": torch.tensor([1.0, math.nan])}
    with runlens.record(tmp_path, config=config):
        pass
    stored = _stored_config(tmp_path)
    assert stored["mask"] == {"shape": [4, 5], "dtype": "float32"}
    assert stored["table"] == {"shape": [17], "dtype": "int32"}
    assert stored["small"] == [1.0, 2.0]
    assert stored["scale"] == 0.5
    assert stored["bad"] == [1.0, "nan"]


# -- record without torch -------------------------------------------------------------------


_NO_TORCH_SCRIPT = """
import sys
sys.modules["torch"] = None
import runlens
try:
    runlens.record({run_dir!r})
except ModuleNotFoundError as error:
    print(type(error).__name__, error.name, str(error), sep="|")
"""


def test_record_without_torch_raises(tmp_path):
    script = _NO_TORCH_SCRIPT.format(run_dir=str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, timeout=60)
    kind, name, message = result.stdout.strip().split("|")
    assert result.returncode == 0
    assert kind == "ModuleNotFoundError"
    assert name == "torch"
    assert "runlens.record needs torch" in message
    assert "runlens[torch]" in message
    assert "analyzer" in message
    assert not (tmp_path / "run").exists()
