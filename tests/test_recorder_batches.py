"""Tests of batch composition (`Recorder.log_batch`) and split membership
(`Recorder.log_split_groups`), with tiny CPU training and the Parquet parts read back.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import runlens
from runlens import format as run_format
from runlens.recorder import batches
from recorder_helpers import make_model, read_rows, read_table, total_loss
from recorder_helpers import forbid_in_runlens

MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 16

# Scene ids of each micro-batch of optimizer step 0. Over the step: scene "a" has
# 8 + 4 = 12 examples, "b" 8 + 16 = 24, "c" 12 and "d" 16, so 4 groups and 24 in the
# largest group.
STEP_0_GROUPS = [
    ["a"] * 8 + ["b"] * 8,
    ["a"] * 4 + ["c"] * 12,
    ["d"] * 16,
    ["b"] * 16,
]
# Step 1: "e" has 16 + 2 = 18 examples, "f" 14 + 16 = 30, "g" 16. So 3 groups, largest 30.
STEP_1_GROUPS = [
    ["e"] * 16,
    ["e"] * 2 + ["f"] * 14,
    ["f"] * 16,
    ["g"] * 16,
]


def _record_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "runlens.record" and record.levelno >= logging.WARNING]


def _train_accumulating(run_dir: Path, steps: int, log_micro_batch, **options):
    """Train with 4 micro-batches per optimizer step and call
    `log_micro_batch(rec, step, micro_step)` after each micro-batch's backward pass.
    """
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(run_dir, model=model, optimizer=optimizer,
                        flush_seconds=3600.0, **options) as rec:
        for step in range(steps):
            for micro_step in range(MICRO_BATCHES):
                loss = total_loss(model, step * MICRO_BATCHES + micro_step)
                (loss / MICRO_BATCHES).backward()
                log_micro_batch(rec, step, micro_step)
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    return rec


def _batch_columns(row: dict) -> tuple:
    # A column that is null in every row of a part is absent from that part.
    return (row.get("batch_size"), row.get("micro_batches"), row.get("batch_groups"),
            row.get("batch_largest_group"))


# -- log_batch ------------------------------------------------------------------------------


def test_log_batch_accumulates_micro_batches(tmp_path):
    def log_micro_batch(rec, step, micro_step):
        if step == 0:
            rec.log_batch(groups=STEP_0_GROUPS[micro_step])
        elif step == 1:
            rec.log_batch(MICRO_BATCH_SIZE, groups=STEP_1_GROUPS[micro_step])

    rec = _train_accumulating(tmp_path, 3, log_micro_batch, strict=True)
    rows = read_rows(tmp_path, "scalars")
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert _batch_columns(rows[0]) == (MICRO_BATCHES * MICRO_BATCH_SIZE, MICRO_BATCHES, 4, 24)
    assert _batch_columns(rows[1]) == (MICRO_BATCHES * MICRO_BATCH_SIZE, MICRO_BATCHES, 3, 30)
    assert rec.dropped_counts == {}
    assert rec.error_counts == {}


def test_log_batch_step_without_calls_null(tmp_path):
    def log_micro_batch(rec, step, micro_step):
        if step == 1:
            rec.log_batch(groups=STEP_1_GROUPS[micro_step])

    _train_accumulating(tmp_path, 3, log_micro_batch, strict=True)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (None, None, None, None)
    assert _batch_columns(rows[1]) == (64, 4, 3, 30)
    assert _batch_columns(rows[2]) == (None, None, None, None)


def test_log_batch_arrow_types(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=["a", "b"])
        rec.step(1.0)
    schema = read_table(tmp_path, "scalars").schema
    for column in ("batch_size", "micro_batches", "batch_groups", "batch_largest_group"):
        assert str(schema.field(column).type) == run_format.TABLES["scalars"][column]


def test_log_batch_size_only(tmp_path):
    def log_micro_batch(rec, step, micro_step):
        rec.log_batch(MICRO_BATCH_SIZE)

    rec = _train_accumulating(tmp_path, 2, log_micro_batch, strict=True)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (64, 4, None, None)
    assert _batch_columns(rows[1]) == (64, 4, None, None)
    assert rec.dropped_counts == {}


def test_log_batch_some_calls_without_groups(tmp_path):
    # Group counts over only part of the step would understate it, so they are null.
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=["a", "a", "b"])
        rec.log_batch(5)
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (8, 2, None, None)


def test_log_batch_zero_size_counted(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=[])
        rec.log_batch(groups=[7, 7])
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (2, 2, 1, 2)


@pytest.mark.parametrize("groups", [
    ["s1", "s2", "s2", "s3", "s3", "s3"],
    ("s1", "s2", "s2", "s3", "s3", "s3"),
    [1, 2, 2, 3, 3, 3],
    [np.int64(1), np.int32(2), 2, 3, 3, 3],
    np.array([1, 2, 2, 3, 3, 3]),
    np.array([1, 2, 2, 3, 3, 3], dtype=np.uint8),
    np.array(["s1", "s2", "s2", "s3", "s3", "s3"]),
    np.array(["s1", 2, 2, "s3", "s3", "s3"], dtype=object),
    torch.tensor([1, 2, 2, 3, 3, 3]),
    torch.tensor([1, 2, 2, 3, 3, 3], dtype=torch.int32),
    torch.tensor([[1, 2, 2], [3, 3, 3]]).reshape(-1),
    range(1, 2),
], ids=["str-list", "str-tuple", "int-list", "numpy-int-list", "numpy-int64",
        "numpy-uint8", "numpy-str", "numpy-object", "tensor-int64", "tensor-int32",
        "tensor-view", "range"])
def test_log_batch_group_id_forms(tmp_path, groups):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=groups)
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    expected = (1, 1, 1, 1) if isinstance(groups, range) else (6, 1, 3, 3)
    assert _batch_columns(rows[0]) == expected
    assert rec.dropped_counts == {}


def test_log_batch_ids_compared_as_strings(tmp_path):
    # The int 3 and the string "3" are the same group, as in the split_groups table.
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=[3, "3", 4])
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (3, 1, 2, 2)


def test_log_batch_accumulators_reset(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_batch(groups=["a", "a"])
        rec.step(1.0)
        rec.log_batch(groups=["b"])
        rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    assert _batch_columns(rows[0]) == (2, 1, 1, 2)
    assert _batch_columns(rows[1]) == (1, 1, 1, 1)


@pytest.mark.parametrize("arguments, key, match", [
    ({"size": -1}, "log_batch size", "size must be a non-negative int, got -1"),
    ({"size": 2.0}, "log_batch size", r"size must be a non-negative int, got 2\.0"),
    ({"size": True}, "log_batch size", "size must be a non-negative int, got True"),
    ({"size": torch.tensor(3)}, "log_batch size", "size must be a non-negative int"),
    ({}, "log_batch missing", "pass size, groups or both"),
    ({"size": 3, "groups": ["a", "b"]}, "log_batch length",
     "size=3 but groups has 2 ids"),
    ({"groups": [["a"], ["b"]]}, "log_batch unhashable", "unhashable group id"),
    ({"groups": [{"scene": 1}]}, "log_batch unhashable", "unhashable group id"),
    ({"groups": [1.5, 2.5]}, "log_batch type", "group id 1.5 is a float"),
    ({"groups": [None]}, "log_batch type", "group id None is a NoneType"),
    ({"groups": [True, False]}, "log_batch type", "group id True is a bool"),
    ({"groups": "scene-1"}, "log_batch type", "groups must be a sequence of group ids"),
    ({"groups": 7}, "log_batch type", "groups must be a sequence of group ids"),
    ({"groups": {"a": 2}}, "log_batch type", "groups must be a sequence of group ids"),
    ({"groups": torch.ones(4)}, "log_batch type", "a tensor of dtype float32"),
    ({"groups": torch.ones(2, 2, dtype=torch.long)}, "log_batch type",
     r"a tensor of shape \(2, 2\)"),
    ({"groups": torch.tensor(3)}, "log_batch type", r"a tensor of shape \(\)"),
    ({"groups": np.ones(3)}, "log_batch type", "a numpy array of dtype float64"),
    ({"groups": np.zeros((2, 2), dtype=int)}, "log_batch type",
     r"a numpy array of shape \(2, 2\)"),
])
def test_log_batch_invalid_input_warns_once(tmp_path, caplog, arguments, key, match):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, strict=True) as rec:
            rec.log_batch(groups=["a"])
            rec.log_batch(**arguments)
            rec.step(1.0)
            rec.log_batch(**arguments)
            rec.step(1.0)
            rec.log_batch(groups=["a", "b", "b"])
            rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert len(messages) == 1
    assert "at step 0" in messages[0]
    assert rec.dropped_counts == {key: 2}
    assert _batch_columns(rows[0]) == (None, None, None, None)
    assert _batch_columns(rows[1]) == (None, None, None, None)
    assert _batch_columns(rows[2]) == (3, 1, 2, 2)
    assert rec.error_counts == {}
    assert re.search(match, messages[0])


def test_log_batch_invalid_kinds_warn_separately(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_batch(-1)
            rec.log_batch(-2)
            rec.log_batch(groups=[[1]])
            rec.step(1.0)
    messages = _record_messages(caplog)
    assert len(messages) == 2
    assert rec.dropped_counts == {"log_batch size": 2, "log_batch unhashable": 1}


def test_log_batch_cpu_tensor_no_device_sync(tmp_path, monkeypatch):
    # Reading ids from a CPU tensor may use tolist, which waits on no device. The other
    # conversion methods are forbidden inside runlens from step 1 to the last step, and
    # allowed again for the flush at close.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True,
                        flush_seconds=3600.0) as rec:
        for step in range(3):
            if step == 1:
                for name in ("item", "__float__", "__int__", "__bool__", "cpu", "numpy"):
                    monkeypatch.setattr(torch.Tensor, name,
                                        forbid_in_runlens(name, getattr(torch.Tensor, name)))
            for micro_step in range(MICRO_BATCHES):
                loss = total_loss(model, step * MICRO_BATCHES + micro_step)
                (loss / MICRO_BATCHES).backward()
                rec.log_batch(groups=torch.tensor([micro_step % 2] * MICRO_BATCH_SIZE))
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
        monkeypatch.undo()
    rows = read_rows(tmp_path, "scalars")
    assert rec.error_counts == {}
    assert [_batch_columns(row) for row in rows] == [(64, 4, 2, 32)] * 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_log_batch_cuda_tensor_warns_once(tmp_path, caplog):
    ids = torch.tensor([1, 1, 2], device="cuda")
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, strict=True) as rec:
            rec.log_batch(groups=ids)
            rec.step(1.0)
            rec.log_batch(groups=ids)
            rec.step(1.0)
    rows = read_rows(tmp_path, "scalars")
    messages = _record_messages(caplog)
    assert len(messages) == 1
    assert "synchronizes" in messages[0]
    assert _batch_columns(rows[0]) == (3, 1, 2, 2)
    assert _batch_columns(rows[1]) == (3, 1, 2, 2)


def _broken_count_groups(groups, *, allow_mapping):
    raise RuntimeError("broken group counter for the test")


def test_log_batch_error_disables_only_batches(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(batches, "count_groups", _broken_count_groups)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            for step in range(3):
                rec.log_batch(groups=["a"])
                rec.step(float(step), extra=2.0)
    rows = read_rows(tmp_path, "scalars")
    errors = [row for row in read_rows(tmp_path, "events")
              if row["kind"] == run_format.EVENT_RECORDER_ERROR]
    messages = _record_messages(caplog)
    assert len(messages) == 1
    assert "batch logging disabled" in messages[0]
    assert rec.error_counts == {"batch logging": 1}
    assert len(errors) == 1
    assert json.loads(errors[0]["detail"])["area"] == "batch logging"
    assert [row["loss"] for row in rows] == [0.0, 1.0, 2.0]
    assert [row["extra"] for row in rows] == [2.0, 2.0, 2.0]
    assert [_batch_columns(row) for row in rows] == [(None, None, None, None)] * 3


def test_log_batch_error_strict_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "count_groups", _broken_count_groups)
    with runlens.record(tmp_path, strict=True) as rec:
        with pytest.raises(RuntimeError, match="broken group counter for the test"):
            rec.log_batch(groups=["a"])


# -- log_split_groups -----------------------------------------------------------------------


def _split_rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    return {(row["split"], row["group"]): row for row in read_rows(run_dir, "split_groups")}


def test_log_split_groups_rows_and_counts(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", ["s1", "s1", "s2", "s1", "s3"])
        rec.log_split_groups("val", np.array([4, 4, 5]))
        rec.step(1.0)
        rec.step(1.0)
        rec.log_split_groups("test", torch.tensor([9, 9]))
    rows = _split_rows(tmp_path)
    assert sorted(rows) == [("test", "9"), ("train", "s1"), ("train", "s2"),
                            ("train", "s3"), ("val", "4"), ("val", "5")]
    assert rows[("train", "s1")]["examples"] == 3
    assert rows[("train", "s2")]["examples"] == 1
    assert rows[("train", "s3")]["examples"] == 1
    assert rows[("val", "4")]["examples"] == 2
    assert rows[("val", "5")]["examples"] == 1
    assert rows[("test", "9")]["examples"] == 2
    assert rows[("train", "s1")]["step"] == 0
    assert rows[("test", "9")]["step"] == 1
    assert rows[("train", "s1")]["segment"] == 0
    assert rows[("train", "s1")]["rank"] == 0


def test_log_split_groups_arrow_types(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", [1, 2])
    schema = read_table(tmp_path, "split_groups").schema
    for column, type_name in run_format.TABLES["split_groups"].items():
        assert str(schema.field(column).type) == type_name


def test_log_split_groups_mapping(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", {"s1": 120, 7: np.int64(30), "s0": 0})
    rows = _split_rows(tmp_path)
    assert sorted(rows) == [("train", "7"), ("train", "s0"), ("train", "s1")]
    assert rows[("train", "s1")]["examples"] == 120
    assert rows[("train", "7")]["examples"] == 30
    assert rows[("train", "s0")]["examples"] == 0


def test_log_split_groups_merges_str_and_int(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", {3: 2, "3": 5})
        rec.log_split_groups("val", [3, "3"])
    rows = _split_rows(tmp_path)
    assert rows[("train", "3")]["examples"] == 7
    assert rows[("val", "3")]["examples"] == 2
    assert len(rows) == 2


def test_log_split_groups_generator(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", (f"scene-{index % 2}" for index in range(5)))
    rows = _split_rows(tmp_path)
    assert rows[("train", "scene-0")]["examples"] == 3
    assert rows[("train", "scene-1")]["examples"] == 2


@pytest.mark.parametrize("split, groups, key, match", [
    ("train", [["a"]], "log_split_groups('train') unhashable", "unhashable group id"),
    ("train", [1.5], "log_split_groups('train') type", "group id 1.5 is a float"),
    ("train", "scene-1", "log_split_groups('train') type",
     "groups must be an iterable of group ids or a mapping"),
    ("train", None, "log_split_groups('train') type",
     "groups must be an iterable of group ids or a mapping"),
    ("train", {"a": -1}, "log_split_groups('train') counts",
     "count of group 'a' must be a non-negative int, got -1"),
    ("train", {"a": 2.0}, "log_split_groups('train') counts",
     r"count of group 'a' must be a non-negative int, got 2\.0"),
    ("train", {1.5: 2}, "log_split_groups('train') type", "group id 1.5 is a float"),
    ("train", torch.ones(2), "log_split_groups('train') type", "a tensor of dtype float32"),
    (3, ["a"], "log_split_groups(3) split", "split must be a non-empty string, got 3"),
    ("", ["a"], "log_split_groups('') split", "split must be a non-empty string"),
])
def test_log_split_groups_invalid_records_nothing(tmp_path, caplog, split, groups, key,
                                                  match):
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, strict=True) as rec:
            rec.log_split_groups(split, groups)
            rec.log_split_groups(split, groups)
            rec.log_split_groups("later", ["x", "x"])
    rows = _split_rows(tmp_path)
    messages = _record_messages(caplog)
    assert list(rows) == [("later", "x")]
    assert rows[("later", "x")]["examples"] == 2
    assert len(messages) == 1
    assert rec.dropped_counts == {key: 2}
    assert rec.error_counts == {}
    assert re.search(match, messages[0])


def test_log_split_groups_error_disables_feature(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(batches, "count_groups", _broken_count_groups)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path) as rec:
            rec.log_split_groups("train", ["a"])
            rec.log_split_groups("val", ["b"])
            rec.step(1.0)
    messages = _record_messages(caplog)
    assert read_rows(tmp_path, "split_groups") == []
    assert len(messages) == 1
    assert "split group logging disabled" in messages[0]
    assert rec.error_counts == {"split group logging": 1}
    assert read_rows(tmp_path, "scalars")[0]["loss"] == 1.0


def test_log_split_groups_error_strict_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(batches, "count_groups", _broken_count_groups)
    with runlens.record(tmp_path, strict=True) as rec:
        with pytest.raises(RuntimeError, match="broken group counter for the test"):
            rec.log_split_groups("train", ["a"])
