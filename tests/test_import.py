"""`runlens import tensorboard` and `runlens import csv` on logs of real training.

The TensorBoard logs are written by `torch.utils.tensorboard.SummaryWriter` while a small
classifier trains, the CSV files in the layouts of Lightning's CSVLogger and of a W&B
history export. Each test imports through the real CLI and reads the run directory back
with the analyzer's DuckDB views.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pty
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tensorboard_crc32c
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from typer.testing import CliRunner

from runlens.analyze import Run
from runlens.cli import app
from runlens.importers import Signal, default_signal
from runlens.importers.tensorboard import crc32c

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = 60
EVAL_EVERY = 10
CLASSES = 3
BASE_TIME = 1_700_000_000.0


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def f32(value: float) -> float:
    """Return `value` as the float32 that a simple_value or float_val stores."""
    return float(np.float32(value))


# -- training that writes the logs -----------------------------------------------------------


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0, 0.0, 1.0], [-2.0, 1.0, 0.0, 0.0], [0.0, -2.0, 1.0, 0.0]])
    labels = torch.randint(0, CLASSES, (600,), generator=generator)
    inputs = centers[labels] + torch.randn(600, 4, generator=generator)
    return inputs, labels


def make_classifier() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.Adam([{"params": weights, "lr": 1e-2},
                                  {"params": biases, "lr": 5e-3}])
    return model, optimizer


def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(inputs)
        predicted = logits.argmax(dim=1)
        metrics = {"loss": nn.functional.cross_entropy(logits, labels).item(),
                   "accuracy": (predicted == labels).float().mean().item()}
        for class_id in range(CLASSES):
            members = labels == class_id
            metrics[f"recall_{class_id}"] = (predicted[members] == class_id).float().mean().item()
    return metrics


def train_and_log(logdir: Path) -> dict[str, dict[int, float]]:
    """Train the classifier for STEPS steps, logging to two event files in `logdir`.

    Returns tag -> step -> the value that an import must keep. The second writer, opened
    at step 30, writes a second event file, logs step 29's loss again with a later wall
    time (that value wins) and a temperature of step 5 with an earlier one (it loses).
    """
    train_inputs, train_labels = make_data(1)
    val_inputs, val_labels = make_data(2)
    model, optimizer = make_classifier()
    expected: dict[str, dict[int, float]] = {}

    def log(writer: SummaryWriter, tag: str, value: float, step: int, **options) -> None:
        writer.add_scalar(tag, value, step, walltime=BASE_TIME + step, **options)
        keep = value if options.get("double_precision") else f32(value)
        expected.setdefault(tag, {})[step] = keep

    writer = SummaryWriter(log_dir=str(logdir))
    for step in range(STEPS):
        if step == 30:
            writer.close()
            writer = SummaryWriter(log_dir=str(logdir))
        batch = torch.arange(step * 10, step * 10 + 10) % len(train_labels)
        loss = nn.functional.cross_entropy(model(train_inputs[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
        optimizer.step()
        log(writer, "train/loss", loss.item(), step)
        log(writer, "lr-Adam/pg1", optimizer.param_groups[0]["lr"], step)
        log(writer, "lr-Adam/pg2", optimizer.param_groups[1]["lr"], step)
        log(writer, "grad_norm", grad_norm.item(), step)
        log(writer, "custom/temperature", 1.0 + step / 100, step, new_style=True)
        log(writer, "throughput", 100.0 + step, step, new_style=True, double_precision=True)
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            metrics = evaluate(model, val_inputs, val_labels)
            log(writer, "val/loss", metrics["loss"], step)
            log(writer, "val_acc", metrics["accuracy"], step)
            for class_id in range(CLASSES):
                log(writer, f"recall/class_{class_id}", metrics[f"recall_{class_id}"], step)
    writer.add_scalar("train/loss", 9.25, 29, walltime=BASE_TIME + 1000)
    expected["train/loss"][29] = 9.25
    writer.add_scalar("custom/temperature", 55.0, 5, walltime=BASE_TIME - 1000)
    writer.add_scalar("last/marker", 7.0, STEPS - 1, walltime=BASE_TIME + STEPS)
    expected["last/marker"] = {STEPS - 1: 7.0}
    writer.close()
    return expected


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[int, float]]]:
    logdir = tmp_path_factory.mktemp("tensorboard") / "version_0"
    expected = train_and_log(logdir)
    return logdir, expected


@pytest.fixture(scope="module")
def imported(logged, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    logdir, _ = logged
    run_dir = tmp_path_factory.mktemp("imported") / "run"
    result = invoke("import", "tensorboard", logdir, run_dir)
    assert result.exit_code == 0, result.output
    return run_dir, result.stdout


def query(run_dir: Path, sql: str) -> list[tuple]:
    with Run.open(run_dir) as run:
        return run.connection.execute(sql).fetchall()


def event_files(logdir: Path) -> list[Path]:
    return sorted(logdir.rglob("events.out.tfevents.*"))


# -- TensorBoard: values, tables and steps ---------------------------------------------------


def test_logs_have_two_event_files(logged) -> None:
    logdir, _ = logged
    assert len(event_files(logdir)) == 2


def test_loss_lands_in_scalars(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    rows = dict(query(run_dir, "SELECT step, loss FROM scalars WHERE loss IS NOT NULL"))
    assert rows == expected["train/loss"]


def test_step_logged_twice_keeps_later_wall_time(imported) -> None:
    run_dir, _ = imported
    loss = query(run_dir, "SELECT loss FROM scalars WHERE step = 29")
    temperature = query(run_dir, "SELECT custom_temperature FROM scalars WHERE step = 5")
    assert loss == [(9.25,)]
    assert temperature == [(f32(1.05),)]


def test_scalars_time_is_latest_wall_time(imported) -> None:
    run_dir, _ = imported
    times = dict(query(run_dir, "SELECT step, time FROM scalars"))
    assert times[10] == BASE_TIME + 10
    assert times[29] == BASE_TIME + 1000


def test_grad_norm_lands_in_scalars(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    rows = dict(query(run_dir, "SELECT step, grad_norm FROM scalars WHERE grad_norm IS NOT NULL"))
    assert rows == expected["grad_norm"]


def test_lightning_lr_names_land_in_param_groups(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    rows = query(run_dir, 'SELECT "group", step, lr FROM param_groups ORDER BY "group", step')
    by_group: dict[int, dict[int, float]] = {}
    for group, step, lr in rows:
        by_group.setdefault(group, {})[step] = lr
    assert set(by_group) == {0, 1}
    assert by_group[0] == expected["lr-Adam/pg1"]
    assert by_group[1] == expected["lr-Adam/pg2"]


def test_validation_metrics_land_in_evals(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    rows = query(run_dir, "SELECT split, metric, step, value FROM evals")
    loss = {step: value for split, metric, step, value in rows if metric == "loss"}
    accuracy = {step: value for split, metric, step, value in rows if metric == "accuracy"}
    assert {split for split, *_ in rows} == {"val"}
    assert {metric for _, metric, *_ in rows} == {"loss", "accuracy"}
    assert loss == expected["val/loss"]
    assert accuracy == expected["val_acc"]


def test_per_class_recall_lands_in_classes(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    rows = query(run_dir, "SELECT split, class_id, step, recall FROM classes")
    assert {split for split, *_ in rows} == {"val"}
    for class_id in range(CLASSES):
        recall = {step: value for _, cid, step, value in rows if cid == class_id}
        assert recall == expected[f"recall/class_{class_id}"]


def test_other_tags_become_user_scalars(logged, imported) -> None:
    _, expected = logged
    run_dir, _ = imported
    temperature = dict(query(run_dir, "SELECT step, custom_temperature FROM scalars "
                                      "WHERE custom_temperature IS NOT NULL"))
    throughput = dict(query(run_dir, "SELECT step, throughput FROM scalars "
                                     "WHERE throughput IS NOT NULL"))
    assert temperature == expected["custom/temperature"]
    assert throughput == expected["throughput"]  # double_val keeps float64 exactly


def test_scalars_has_one_sorted_row_per_step(imported) -> None:
    run_dir, _ = imported
    steps = [step for (step,) in query(run_dir, "SELECT step FROM scalars")]
    assert steps == list(range(STEPS))


def test_reader_matches_tensorboard_loader(logged, imported) -> None:
    """Every scalar that TensorBoard's own loader reads is in the run, at the same step."""
    logdir, _ = logged
    run_dir, _ = imported
    loaded: dict[str, dict[int, tuple[float, float]]] = {}
    for path in event_files(logdir):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kept = loaded.setdefault(value.tag, {}).get(event.step)
                if kept is None or event.wall_time >= kept[1]:
                    number = value.simple_value if value.HasField("simple_value") else (
                        (list(value.tensor.float_val) + list(value.tensor.double_val))[0])
                    loaded[value.tag][event.step] = (number, event.wall_time)
    temperature = dict(query(run_dir, "SELECT step, custom_temperature FROM scalars "
                                      "WHERE custom_temperature IS NOT NULL"))
    assert temperature == {step: number for step, (number, _) in
                           loaded["custom/temperature"].items()}
    loss = dict(query(run_dir, "SELECT step, loss FROM scalars WHERE loss IS NOT NULL"))
    assert loss == {step: number for step, (number, _) in loaded["train/loss"].items()}


def test_run_json_describes_the_import(logged, imported) -> None:
    logdir, _ = logged
    run_dir, _ = imported
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["format_version"] == 1
    assert meta["imported_from"]["kind"] == "tensorboard"
    assert meta["imported_from"]["path"] == str(logdir.resolve())
    assert meta["imported_from"]["signals"]["train/loss"] == "scalars.loss"
    assert "params" not in meta
    assert meta["optimizer"] is None
    assert len(meta["segments"]) == 1
    assert meta["segments"][0]["segment"] == 0
    assert "flush_every" in meta["settings"]


def test_parts_are_segment_zero_rank_zero(imported) -> None:
    run_dir, _ = imported
    parts = sorted(path.relative_to(run_dir).as_posix() for path in run_dir.rglob("*.parquet"))
    assert parts == ["classes/rank-0/part-0000-000003.parquet",
                     "evals/rank-0/part-0000-000002.parquet",
                     "param_groups/rank-0/part-0000-000001.parquet",
                     "scalars/rank-0/part-0000-000000.parquet"]
    assert not [path for path in run_dir.parent.iterdir() if path.name.startswith(".tmp-")]


def test_summary_lists_mapping_and_user_scalars(imported) -> None:
    _, stdout = imported
    mapped, _, rest = stdout.partition("user scalars")
    assert "train/loss" in mapped
    assert "-> scalars.loss" in mapped
    assert "-> param_groups.lr.1" in mapped
    assert "-> classes.val.2.recall" in mapped
    assert "-> evals.val.accuracy" in mapped
    assert "custom/temperature" in rest
    assert "-> scalars.custom_temperature" in rest


def test_summary_counts_steps_logged_twice(imported) -> None:
    _, stdout = imported
    line = next(line for line in stdout.splitlines() if line.startswith("steps logged twice"))
    assert line.endswith("was kept: custom/temperature 1, train/loss 1")


# -- the default mapping and --map -----------------------------------------------------------


@pytest.mark.parametrize(("name", "signal"), [
    ("loss", Signal("scalars", "loss")),
    ("train/loss", Signal("scalars", "loss")),
    ("Loss/train", Signal("scalars", "loss")),
    ("training_loss", Signal("scalars", "loss")),
    ("train_loss_step", Signal("scalars", "loss")),
    ("train/grad_norm", Signal("scalars", "grad_norm")),
    ("gradient_norm", Signal("scalars", "grad_norm")),
    ("grad_2.0_norm_total", Signal("scalars", "grad_norm")),
    ("lr", Signal("param_groups", "lr", group=0)),
    ("train/learning_rate", Signal("param_groups", "lr", group=0)),
    ("lr-AdamW", Signal("param_groups", "lr", group=0)),
    ("lr-SGD/pg3", Signal("param_groups", "lr", group=2)),
    ("lr-Adam/pg2-weight_decay", Signal("param_groups", "weight_decay", group=1)),
    ("val_loss", Signal("evals", "value", split="val", metric="loss")),
    ("validation/loss", Signal("evals", "value", split="val", metric="loss")),
    ("eval_loss", Signal("evals", "value", split="val", metric="loss")),
    ("Loss/test", Signal("evals", "value", split="test", metric="loss")),
    ("val_acc", Signal("evals", "value", split="val", metric="accuracy")),
    ("eval_accuracy", Signal("evals", "value", split="val", metric="accuracy")),
    ("val/f1", Signal("evals", "value", split="val", metric="f1")),
    ("val_loss_epoch", Signal("evals", "value", split="val", metric="loss")),
    ("recall/class_4", Signal("classes", "recall", split="val", class_id=4)),
    ("val/recall_2", Signal("classes", "recall", split="val", class_id=2)),
    ("test/precision/class_1", Signal("classes", "precision", split="test", class_id=1)),
    ("lr-Adam-momentum", None),
    ("eval_runtime", None),
    ("train_acc", None),
    ("custom/temperature", None),
])
def test_default_mapping(name: str, signal: Signal | None) -> None:
    assert default_signal(name) == signal


def test_map_overrides_default(logged, tmp_path: Path) -> None:
    logdir, expected = logged
    run_dir = tmp_path / "run"
    result = invoke("import", "tensorboard", logdir, run_dir,
                    "--map", "custom/temperature=evals.val.temperature",
                    "--map", "grad_norm=scalars.clip_total_norm",
                    "--map", "throughput=skip",
                    "--map", "recall/class_1=classes.train.7.precision")
    assert result.exit_code == 0, result.output
    temperature = dict(query(run_dir, "SELECT step, value FROM evals "
                                      "WHERE split = 'val' AND metric = 'temperature'"))
    clip = dict(query(run_dir, "SELECT step, clip_total_norm FROM scalars "
                               "WHERE clip_total_norm IS NOT NULL"))
    precision = dict(query(run_dir, "SELECT step, precision FROM classes "
                                    "WHERE split = 'train' AND class_id = 7"))
    with Run.open(run_dir) as run:
        scalar_columns = run.columns("scalars")
    assert temperature == expected["custom/temperature"]
    assert clip == expected["grad_norm"]
    assert precision == expected["recall/class_1"]
    assert "throughput" not in scalar_columns
    assert query(run_dir, "SELECT count(grad_norm) FROM scalars") == [(0,)]
    assert "throughput -> skip" in " ".join(result.stdout.split())


def test_map_unknown_tag_is_error(logged, tmp_path: Path) -> None:
    logdir, _ = logged
    result = invoke("import", "tensorboard", logdir, tmp_path / "run",
                    "--map", "train/los=scalars.loss")
    assert result.exit_code == 2
    assert "runlens: error: --map train/los=...: no tag 'train/los'" in result.stderr
    assert "'train/loss'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("loss", "expected NAME=SIGNAL"),
    ("loss=scalars.step", "scalars.step is a column that the import fills itself"),
    ("loss=scalars.Bad-Name", "such as scalars.bad_name"),
    ("loss=param_groups.momentum", "param_groups takes lr or weight_decay"),
    ("loss=param_groups.lr.x", "GROUP must be a non-negative integer"),
    ("loss=evals.val", "evals takes a split and a metric"),
    ("loss=classes.val.x.recall", "CLASS_ID must be a non-negative integer"),
    ("loss=tasks.a", "expected one of scalars.COLUMN"),
])
def test_map_invalid_signal_is_error(logged, tmp_path: Path, value: str, message: str) -> None:
    logdir, _ = logged
    result = invoke("import", "tensorboard", logdir, tmp_path / "run", "--map", value)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: --map {value}: ")
    assert message in result.stderr


def test_map_two_tags_to_one_signal_is_error(logged, tmp_path: Path) -> None:
    logdir, _ = logged
    result = invoke("import", "tensorboard", logdir, tmp_path / "run",
                    "--map", "grad_norm=scalars.loss", "--map", "throughput=scalars.loss")
    assert result.exit_code == 2
    assert "both map to scalars.loss" in result.stderr


def test_tags_competing_for_signal_keep_the_longer(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for step in range(5):
            writer.add_scalar("loss", 1.0 + step, step)
            writer.add_scalar("train/loss", 2.0 + step, step)
        writer.add_scalar("train/loss", 8.0, 5)
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    loss = dict(query(tmp_path / "run", "SELECT step, loss FROM scalars"))
    user_loss = dict(query(tmp_path / "run", "SELECT step, user_loss FROM scalars "
                                             "WHERE user_loss IS NOT NULL"))
    assert loss == {step: 2.0 + step for step in range(5)} | {5: 8.0}
    assert user_loss == {step: 1.0 + step for step in range(5)}
    assert "which 'train/loss' fills with more values" in result.stdout


# -- TensorBoard: layouts and encodings --------------------------------------------------------


def test_add_scalars_subfolders_name_the_split(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    with SummaryWriter(log_dir=str(logdir)) as writer:
        for step in range(4):
            writer.add_scalars("loss", {"train": 1.0 / (step + 1), "val": 2.0 + step}, step)
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    train = dict(query(tmp_path / "run", "SELECT step, loss FROM scalars"))
    val = dict(query(tmp_path / "run", "SELECT step, value FROM evals WHERE metric = 'loss'"))
    assert train == {step: f32(1.0 / (step + 1)) for step in range(4)}
    assert val == {step: 2.0 + step for step in range(4)}


def tensor_summary(tag: str, tensor: tensor_pb2.TensorProto) -> summary_pb2.Summary:
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, tensor=tensor,
                                                                 metadata=metadata)])


def test_tensor_content_scalars_of_each_dtype(tmp_path: Path) -> None:
    """Scalars as tensor_content bytes (as TensorFlow stores them) and as half_val."""
    logdir = tmp_path / "logs"
    scalar_shape = tensor_shape_pb2.TensorShapeProto()
    tensors = {
        "as_float": tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=scalar_shape,
                                           tensor_content=np.float32(0.25).tobytes()),
        "as_double": tensor_pb2.TensorProto(dtype=types_pb2.DT_DOUBLE,
                                            tensor_shape=scalar_shape,
                                            tensor_content=np.float64(0.1).tobytes()),
        "as_half": tensor_pb2.TensorProto(dtype=types_pb2.DT_HALF, tensor_shape=scalar_shape,
                                          half_val=[int(np.float16(1.5).view(np.uint16))]),
        "as_int64": tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=scalar_shape,
                                           int64_val=[-3]),
    }
    writer = SummaryWriter(log_dir=str(logdir))
    for tag, tensor in tensors.items():
        writer._get_file_writer().add_summary(tensor_summary(tag, tensor), 4, BASE_TIME)
    writer.close()
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    row = query(tmp_path / "run", "SELECT as_float, as_double, as_half, as_int64 FROM scalars "
                                  "WHERE step = 4")
    assert row == [(0.25, 0.1, 1.5, -3.0)]


def test_histograms_and_text_are_listed_as_not_imported(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    with SummaryWriter(log_dir=str(logdir)) as writer:
        writer.add_scalar("loss", 1.0, 0)
        writer.add_histogram("weights", np.arange(10.0), 0)
        writer.add_text("notes", "hello", 0)
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "weights: a histogram summary" in result.stdout
    assert "notes/text_summary: a summary of the text plugin" in result.stdout


def test_several_runs_need_run_option(tmp_path: Path) -> None:
    for name, value in (("exp1", 1.0), ("exp2", 2.0)):
        with SummaryWriter(log_dir=str(tmp_path / "logs" / name)) as writer:
            writer.add_scalar("loss", value, 0)
    refused = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run")
    chosen = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run",
                    "--run", "exp2")
    assert refused.exit_code == 2
    assert "contains 2 runs (exp1, exp2); pass --run NAME" in refused.stderr
    assert chosen.exit_code == 0, chosen.output
    assert query(tmp_path / "run", "SELECT loss FROM scalars") == [(2.0,)]


def test_run_option_must_pick_one_run(tmp_path: Path) -> None:
    for name in ("sweep/a", "sweep/b"):
        with SummaryWriter(log_dir=str(tmp_path / "logs" / name)) as writer:
            writer.add_scalar("loss", 1.0, 0)
    parent = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run",
                    "--run", "sweep")
    missing = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run",
                     "--run", "nope")
    outside = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run",
                     "--run", "../logs")
    assert parent.exit_code == 2
    assert "contains 2 runs (sweep/a, sweep/b)" in parent.stderr
    assert missing.exit_code == 2
    assert "--run nope: no event files in" in missing.stderr
    assert outside.exit_code == 2
    assert "--run ../logs: must be a folder inside LOGDIR" in outside.stderr


def test_split_folders_are_one_run(tmp_path: Path) -> None:
    """Keras writes train/ and validation/ folders of one run."""
    for split, value in (("train", 1.0), ("validation", 3.0)):
        with SummaryWriter(log_dir=str(tmp_path / "logs" / split)) as writer:
            writer.add_scalar("loss", value, 2)
    result = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert query(tmp_path / "run", "SELECT loss FROM scalars") == [(1.0,)]
    assert query(tmp_path / "run", "SELECT split, metric, value FROM evals") == [
        ("val", "loss", 3.0)]


def test_missing_logdir_is_error(tmp_path: Path) -> None:
    result = invoke("import", "tensorboard", tmp_path / "absent", tmp_path / "run")
    assert result.exit_code == 2
    assert "runlens: error: LOGDIR" in result.stderr
    assert "not found" in result.stderr


def test_logdir_without_event_files_is_error(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    result = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run")
    assert result.exit_code == 2
    assert "no TensorBoard event files" in result.stderr


# -- TensorBoard: damaged files -----------------------------------------------------------------


def record_offsets(path: Path) -> list[int]:
    """Return the byte offset of each TFRecord, read from the length fields alone."""
    data = path.read_bytes()
    offsets, offset = [], 0
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8 + 4 + length + 4
    return offsets


def copy_logs(logged, tmp_path: Path) -> tuple[Path, Path]:
    logdir, _ = logged
    copy = tmp_path / "logs"
    shutil.copytree(logdir, copy)
    return copy, event_files(copy)[0]


@pytest.mark.parametrize(("position", "part"), [("data", "data"), ("length", "length")])
def test_corrupt_checksum_names_file_and_offset(logged, tmp_path: Path, position: str,
                                                part: str) -> None:
    logdir, path = copy_logs(logged, tmp_path)
    offset = record_offsets(path)[5]
    data = bytearray(path.read_bytes())
    flipped = offset + (12 + 3 if position == "data" else 1)
    data[flipped] ^= 0x01
    path.write_bytes(bytes(data))
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: {path}: corrupt record at byte offset "
                                    f"{offset}: the {part} checksum does not match")
    assert not (tmp_path / "run").exists()


def test_truncated_tail_is_skipped_with_warning(logged, tmp_path: Path) -> None:
    logdir, _ = copy_logs(logged, tmp_path)
    last_file = event_files(logdir)[-1]
    last_record = record_offsets(last_file)[-1]
    size = last_file.stat().st_size
    with open(last_file, "r+b") as handle:
        handle.truncate(size - 3)
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (f"runlens: warning: {last_file}: the last record, at byte offset {last_record}, "
            "is incomplete") in result.stderr
    with Run.open(tmp_path / "run") as run:
        columns = run.columns("scalars")
    assert "last_marker" not in columns
    assert query(tmp_path / "run", "SELECT loss FROM scalars WHERE step = 59") != [(None,)]


def test_crc32c_matches_tensorboard() -> None:
    generator = np.random.default_rng(0)
    for size in (0, 1, 9, 1000, 65_535, 65_536, 200_003):
        data = generator.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == tensorboard_crc32c(data), size


# -- RUN_DIR --------------------------------------------------------------------------------------


def test_existing_run_dir_is_refused_and_untouched(logged, tmp_path: Path) -> None:
    logdir, _ = logged
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*")}
    result = invoke("import", "tensorboard", logdir, run_dir)
    assert result.exit_code == 2
    assert f"runlens: error: RUN_DIR {run_dir}: exists and is not empty" in result.stderr
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*")}
    assert after == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_run_dir_that_is_a_file_is_refused(logged, tmp_path: Path) -> None:
    logdir, _ = logged
    (tmp_path / "run").write_text("a file")
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 2
    assert "is a file" in result.stderr
    assert (tmp_path / "run").read_text() == "a file"


def test_empty_run_dir_is_filled(logged, tmp_path: Path) -> None:
    logdir, _ = logged
    (tmp_path / "run").mkdir()
    result = invoke("import", "tensorboard", logdir, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "run.json").is_file()


# -- CSV ------------------------------------------------------------------------------------------


def write_lightning_csv(path: Path) -> dict[str, dict[int, float]]:
    """Train the classifier and write metrics.csv as Lightning's CSVLogger does.

    The CSVLogger adds `step` to each logged dict, the Trainer adds `epoch`, the
    LearningRateMonitor logs its own dicts without `epoch`, and the header is the sorted
    union of all keys, written with csv.DictWriter, so unlogged metrics are empty cells.
    """
    train_inputs, train_labels = make_data(1)
    val_inputs, val_labels = make_data(2)
    model, optimizer = make_classifier()
    rows: list[dict[str, float]] = []
    expected: dict[str, dict[int, float]] = {}
    for step in range(40):
        epoch = step // 10
        rows.append({"lr-Adam/pg1": optimizer.param_groups[0]["lr"],
                     "lr-Adam/pg2": optimizer.param_groups[1]["lr"], "step": step})
        batch = torch.arange(step * 10, step * 10 + 10)
        loss = nn.functional.cross_entropy(model(train_inputs[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows.append({"train_loss": loss.item(), "epoch": epoch, "step": step})
        expected.setdefault("train_loss", {})[step] = loss.item()
        expected.setdefault("lr-Adam/pg2", {})[step] = optimizer.param_groups[1]["lr"]
        expected.setdefault("epoch", {})[step] = float(epoch)
        if step % 10 == 9:
            metrics = evaluate(model, val_inputs, val_labels)
            rows.append({"val_loss": metrics["loss"], "val_acc": metrics["accuracy"],
                         "epoch": epoch, "step": step})
            expected.setdefault("val_loss", {})[step] = metrics["loss"]
            expected.setdefault("val_acc", {})[step] = metrics["accuracy"]
    keys = sorted(set().union(*rows))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return expected


def test_lightning_csv_values_land_in_tables(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    expected = write_lightning_csv(path)
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    loss = dict(query(run_dir, "SELECT step, loss FROM scalars WHERE loss IS NOT NULL"))
    epoch = dict(query(run_dir, "SELECT step, epoch FROM scalars WHERE epoch IS NOT NULL"))
    lr = dict(query(run_dir, "SELECT step, lr FROM param_groups WHERE \"group\" = 1"))
    val_loss = dict(query(run_dir, "SELECT step, value FROM evals WHERE metric = 'loss'"))
    val_acc = dict(query(run_dir, "SELECT step, value FROM evals WHERE metric = 'accuracy'"))
    assert loss == expected["train_loss"]
    assert epoch == expected["epoch"]
    assert lr == expected["lr-Adam/pg2"]
    assert val_loss == expected["val_loss"]
    assert val_acc == expected["val_acc"]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["imported_from"]["kind"] == "lightning-csv"
    assert "Lightning CSVLogger metrics" in result.stdout


def test_wandb_history_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame({
        "_step": [0, 1, 2, 3],
        "_runtime": [1.5, 2.5, 3.5, 4.5],
        "_timestamp": [BASE_TIME + 1, BASE_TIME + 2, BASE_TIME + 3, BASE_TIME + 4],
        "train/loss": [2.0, 1.5, 1.25, 1.0],
        "train/learning_rate": [0.1, 0.1, 0.05, 0.05],
        "eval/accuracy": [math.nan, 0.5, math.nan, 0.75],
        "train/epoch": [0.25, 0.5, 0.75, 1.0],
    })
    path = tmp_path / "history.csv"
    frame.to_csv(path)  # with pandas' unnamed index column, as an export has
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    scalars = query(run_dir, "SELECT step, time, loss, train_epoch FROM scalars")
    lr = dict(query(run_dir, "SELECT step, lr FROM param_groups"))
    accuracy = query(run_dir, "SELECT step, split, metric, value FROM evals")
    assert scalars == [(step, BASE_TIME + step + 1, loss, (step + 1) / 4)
                       for step, loss in enumerate([2.0, 1.5, 1.25, 1.0])]
    assert lr == {0: 0.1, 1: 0.1, 2: 0.05, 3: 0.05}
    assert accuracy == [(1, "val", "accuracy", 0.5), (3, "val", "accuracy", 0.75)]
    assert "_runtime: a W&B field, not a metric" in result.stdout
    assert json.loads((run_dir / "run.json").read_text())["imported_from"]["kind"] == "wandb-csv"


def test_csv_map_and_step_column(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("iteration,objective,acc\n0,3.0,\n1,2.0,0.5\n2,1.0,\n")
    result = invoke("import", "csv", path, tmp_path / "run", "--step-column", "iteration",
                    "--map", "objective=scalars.loss", "--map", "acc=evals.test.accuracy")
    assert result.exit_code == 0, result.output
    assert query(tmp_path / "run", "SELECT step, loss FROM scalars") == [
        (0, 3.0), (1, 2.0), (2, 1.0)]
    assert query(tmp_path / "run", "SELECT step, split, metric, value FROM evals") == [
        (1, "test", "accuracy", 0.5)]


def test_csv_without_step_column_is_error(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("iteration,loss\n0,1.0\n")
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 2
    assert "pass --step-column NAME" in result.stderr


def test_csv_text_column_is_dropped_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss,note\n0,1.0,\n1,0.5,warmup done\n")
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "column 'note' has non-numeric cells, such as 'warmup done' on line 3" \
        in result.stderr
    with Run.open(tmp_path / "run") as run:
        assert "note" not in run.columns("scalars")


def test_csv_short_last_row_is_skipped_with_warning(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n0,0,1.0\n0,1,0.5\n0,2")
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "line 4: the last row has 2 cells" in result.stderr
    assert query(tmp_path / "run", "SELECT step FROM scalars") == [(0,), (1,)]


def test_csv_short_middle_row_is_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train_loss\n0,0\n0,1,0.5\n")
    result = invoke("import", "csv", path, tmp_path / "run")
    assert result.exit_code == 2
    assert "line 2: 2 cells, but the header has 3 columns" in result.stderr


# -- analyzing an imported run -----------------------------------------------------------------


def test_analyze_imported_run_finds_loss_spike(tmp_path: Path) -> None:
    """A regression run with three corrupted batches: a real spike of the training loss.

    Gradient clipping keeps the bad batches from wrecking the model, so the loss comes
    back down and the run spikes without diverging.
    """
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(4000, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with SummaryWriter(log_dir=str(tmp_path / "logs")) as writer:
        for step in range(260):
            batch = slice(step * 15 % 3900, step * 15 % 3900 + 15)
            batch_targets = targets[batch] * (10.0 if step in (200, 201, 202) else 1.0)
            loss = nn.functional.mse_loss(model(inputs[batch]), batch_targets)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("lr", optimizer.param_groups[0]["lr"], step)
            if step % 20 == 19:
                with torch.no_grad():
                    val_loss = nn.functional.mse_loss(model(inputs[3900:]), targets[3900:])
                writer.add_scalar("val/loss", val_loss.item(), step)
    imported = invoke("import", "tensorboard", tmp_path / "logs", tmp_path / "run")
    assert imported.exit_code == 0, imported.output

    result = invoke("analyze", tmp_path / "run", "--format", "json", "--no-config")
    assert result.exit_code == 0, result.output  # loss-spike is a warning
    report = json.loads(result.stdout)
    spikes = [f for f in report["findings"] if f["rule_id"] == "loss-spike"]
    not_evaluated = {entry["rule_id"] for entry in report["not_evaluated"]}
    assert len(spikes) == 1
    assert spikes[0]["step_start"] == 200
    assert {"update-ratio-out-of-range", "stale-optimizer-state",
            "weight-decay-on-norm-or-bias"} <= not_evaluated
    assert not {"loss-spike", "divergence", "overfitting"} & not_evaluated
    assert report["errored"] == []


# -- progress and imports ------------------------------------------------------------------------


def run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run runlens with stderr on a pseudo-terminal; return exit code, stdout, terminal."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "runlens", *args], stdin=terminal,
                               stdout=subprocess.PIPE, stderr=terminal, env=env,
                               cwd=REPO_ROOT)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # Linux raises EIO once the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    stdout = process.stdout.read()
    process.wait()
    os.close(controller)
    return process.returncode, stdout, seen


@pytest.mark.parametrize(("ci", "shown"), [(None, True), ("true", False)])
def test_progress_in_terminal_unless_ci(logged, tmp_path: Path, ci: str | None,
                                        shown: bool) -> None:
    logdir, _ = logged
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci is not None:
        env["CI"] = ci
    code, stdout, terminal = run_in_terminal(
        ["import", "tensorboard", str(logdir), str(tmp_path / "run")], env)
    assert code == 0, terminal
    assert stdout.startswith(b"imported 2 event files")
    assert (b"reading event files" in terminal) is shown


def test_importers_do_not_import_torch() -> None:
    code = ("import sys, runlens.cli, runlens.importers.tensorboard, "
            "runlens.importers.csv_import, runlens.importers.writer; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
