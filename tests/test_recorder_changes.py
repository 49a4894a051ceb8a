"""Events for freezing, param group changes, loss-weight changes and data changes, and
the per-parameter columns that rules about frozen parameters and fp16 underflow use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import runlens
from runlens import format as run_format
from recorder_helpers import (SYNCING_METHODS, forbid_in_runlens, make_model, read_rows,
                              task_losses, total_loss)


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [{"step": row["step"], **json.loads(row["detail"])}
            for row in read_rows(run_dir, "events") if row["kind"] == kind]


def _train(rec, model, optimizer, steps, before_step=None, **step_kwargs) -> None:
    for step in steps:
        if before_step is not None:
            before_step(step)
        loss = total_loss(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss, **step_kwargs)


def test_freeze_events_at_the_step_they_apply(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def toggle(step):
        if step == 3:
            model.backbone.requires_grad_(False)
        if step == 7:
            model.backbone[0].weight.requires_grad_(True)

    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        _train(rec, model, optimizer, range(10), toggle)
    assert _events(tmp_path, run_format.EVENT_FREEZE) == [{
        "step": 3, "count": 4,
        "params": ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight",
                   "backbone.1.bias"]}]
    assert _events(tmp_path, run_format.EVENT_UNFREEZE) == [
        {"step": 7, "count": 1, "params": ["backbone.0.weight"]}]


def test_freeze_events_skip_initial_flags(tmp_path):
    model = make_model()
    model.head_b.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        _train(rec, model, optimizer, range(3))
    assert _events(tmp_path, run_format.EVENT_FREEZE) == []
    assert _events(tmp_path, run_format.EVENT_UNFREEZE) == []


def test_freeze_event_lists_fifty_names(tmp_path):
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(40)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        rec.step(1.0)
        model.requires_grad_(False)
        rec.step(1.0)
    (event,) = _events(tmp_path, run_format.EVENT_FREEZE)
    assert event["count"] == 80
    assert event["params"] == [f"{index}.{kind}" for index in range(25)
                               for kind in ("weight", "bias")]


def test_param_groups_change_on_add_param_group(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.01)

    def add_heads(step):
        if step == 4:
            optimizer.add_param_group({"params": list(model.head_a.parameters())
                                       + list(model.head_b.parameters()), "lr": 0.001})

    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        _train(rec, model, optimizer, range(6), add_heads)
    assert _events(tmp_path, run_format.EVENT_PARAM_GROUPS_CHANGE) == [
        {"step": 4, "groups_before": [4], "groups_after": [4, 4]}]
    groups = {(row["step"], row["group"]) for row in read_rows(tmp_path, "param_groups")}
    assert (3, 1) not in groups
    assert (4, 1) in groups


def test_loss_weight_change_on_weight_or_task(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    schedule = {0: {"a": 1.0}, 1: {"a": 1.0}, 2: {"a": 1.0, "b": 0.5}, 3: {"a": 1.0, "b": 0.5},
                4: {"a": 1.0, "b": 2.0}}
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        for step, weights in schedule.items():
            losses = {task: loss for task, loss in task_losses(model, step).items()
                      if task in weights}
            loss = sum(weights[task] * value for task, value in losses.items())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss, losses=losses, loss_weights=weights)
    assert _events(tmp_path, run_format.EVENT_LOSS_WEIGHT_CHANGE) == [
        {"step": 2, "added": ["b"], "removed": [], "weights_before": {"a": 1.0},
         "weights_after": {"a": 1.0, "b": 0.5}},
        {"step": 4, "added": [], "removed": [], "weights_before": {"a": 1.0, "b": 0.5},
         "weights_after": {"a": 1.0, "b": 2.0}},
    ]


def _record_weights(run_dir: Path, schedule: list[dict]) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True) as rec:
        for step, weights in enumerate(schedule):
            losses = task_losses(model, step)
            loss = losses["a"] + losses["b"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss, losses=losses, loss_weights=weights)


def test_loss_weight_ramp_writes_an_event_per_half(tmp_path):
    # 0.1 to 0.9 in steps of 0.01: an event at the first weight that is at least 1.5 times
    # the weight of the last event (1.5 * 0.1 rounds above 0.15 in floating point).
    ramp = [{"a": 1.0, "b": round(0.1 + 0.01 * index, 2)} for index in range(81)]
    _record_weights(tmp_path, ramp)
    events = _events(tmp_path, run_format.EVENT_LOSS_WEIGHT_CHANGE)
    assert [event["weights_after"]["b"] for event in events] == [0.16, 0.24, 0.36, 0.54, 0.81]


def test_loss_weight_nan_or_text_is_no_change(tmp_path):
    schedule = [{"a": 1.0, "b": float("nan")}, {"a": 1.0, "b": float("nan")},
                {"a": 1.0, "b": "0.5"}, {"a": 1.0, "b": "0.7"}]
    _record_weights(tmp_path, schedule)
    assert _events(tmp_path, run_format.EVENT_LOSS_WEIGHT_CHANGE) == []


def test_loss_weight_mixed_key_types_keep_events(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        for step in range(3):
            losses = task_losses(model, step)
            loss = losses["a"] + losses["b"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            keyed = {1: losses["a"], "b": losses["b"]} if step else {1: losses["a"]}
            rec.step(loss, losses=keyed, loss_weights={1: 1.0, "b": 1.0})
    (event,) = _events(tmp_path, run_format.EVENT_LOSS_WEIGHT_CHANGE)
    assert event["added"] == ["b"]


def test_log_dataset_failure_keeps_other_events(tmp_path):
    class Unprintable:
        def __repr__(self):
            raise RuntimeError("no repr")

    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer) as rec:
        rec.log_dataset("train", source=Unprintable())
        _train(rec, model, optimizer, range(2))
        model.head_b.requires_grad_(False)
        _train(rec, model, optimizer, range(2, 3))
    assert rec.error_counts == {"dataset logging": 1}
    assert len(_events(tmp_path, run_format.EVENT_FREEZE)) == 1


def test_log_dataset_describes_and_marks_changes(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_dataset("train", name="shards-v1", size=1000)
        rec.step(1.0)
        rec.log_dataset("train", name="shards-v1", size=1000)
        rec.log_dataset("val", name="holdout")
        rec.step(1.0)
        rec.log_dataset("train", name="shards-v2", size=1200)
        rec.step(1.0)
    assert _events(tmp_path, run_format.EVENT_DATASET) == [
        {"step": 0, "split": "train", "name": "shards-v1", "size": 1000},
        {"step": 1, "split": "val", "name": "holdout"}]
    assert _events(tmp_path, run_format.EVENT_DATASET_CHANGE) == [
        {"step": 2, "split": "train", "source": "log_dataset",
         "before": {"name": "shards-v1", "size": 1000},
         "after": {"name": "shards-v2", "size": 1200}}]


def test_log_dataset_drops_invalid_split(tmp_path, caplog):
    with runlens.record(tmp_path) as rec:
        rec.log_dataset("", name="x")
        rec.log_dataset(3, name="x")
        rec.step(1.0)
    assert rec.dropped_counts["log_dataset split"] == 2
    assert _events(tmp_path, run_format.EVENT_DATASET) == []
    assert "split must be a non-empty string" in caplog.text


def test_split_groups_change_is_dataset_change(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_split_groups("train", ["a", "a", "b"])
        rec.step(1.0)
        rec.log_split_groups("train", {"b": 1, "a": 2})
        rec.step(1.0)
        rec.log_split_groups("train", ["a", "c"])
    (event,) = _events(tmp_path, run_format.EVENT_DATASET_CHANGE)
    before, after = event.pop("before"), event.pop("after")
    assert event == {"step": 2, "split": "train", "source": "split_groups"}
    assert (before["groups"], before["examples"]) == (2, 3)
    assert (after["groups"], after["examples"]) == (2, 2)
    assert before["fingerprint"] != after["fingerprint"]


def test_params_rows_have_freeze_and_zero_share(tmp_path):
    model = make_model()
    # Momentum and weight decay keep moving parameters that are frozen while their
    # gradients stay zero tensors, so the frozen backbone appears in the params rows.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, param_stats_every=2,
                        strict=True) as rec:
        for step in range(4):
            if step == 2:
                model.backbone.requires_grad_(False)
            loss = total_loss(model, step)
            loss.backward()
            if step == 0:
                model.head_a.weight.grad[0, :3] = 0.0
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            rec.step(loss)
    rows = {(row["step"], row["param"]): row for row in read_rows(tmp_path, "params")}
    head = rows[(0, "head_a.weight")]
    assert (head["numel"], head["requires_grad"]) == (8, True)
    assert head["grad_zero_fraction"] == pytest.approx(3 / 8)
    frozen = rows[(2, "backbone.0.weight")]
    assert frozen["requires_grad"] is False
    assert frozen["grad_zero_fraction"] == 1.0
    assert frozen["update_norm"] > 0


def test_activations_have_output_dtype(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = total_loss(model, 0)
        loss.float().backward()
        optimizer.step()
        rec.step(loss)
    dtypes = {row["module"]: row["dtype"] for row in read_rows(tmp_path, "activations")}
    assert dtypes["backbone.2"] == "bfloat16"


def test_change_checks_never_sync(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, param_stats_every=1000,
                        strict=True) as rec:
        for step in range(4):
            if step == 1:
                for name in SYNCING_METHODS:
                    monkeypatch.setattr(torch.Tensor, name,
                                        forbid_in_runlens(name, getattr(torch.Tensor, name)))
            if step == 2:
                model.head_b.requires_grad_(False)
            losses = task_losses(model, step)
            weights = {"a": 1.0, "b": 2.0 ** step}
            loss = losses["a"] + weights["b"] * losses["b"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss, losses=losses, loss_weights=weights)
        monkeypatch.undo()
    assert rec.error_counts == {}
    assert len(_events(tmp_path, run_format.EVENT_LOSS_WEIGHT_CHANGE)) == 3
    assert len(_events(tmp_path, run_format.EVENT_FREEZE)) == 1


def test_change_check_failure_is_contained(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer) as rec:
        def broken():
            raise RuntimeError("flag read failed")
        monkeypatch.setattr(rec._params, "check", broken)
        _train(rec, model, optimizer, range(3))
    assert rec.error_counts == {"change events": 1}
    assert len(read_rows(tmp_path, "scalars")) == 3
