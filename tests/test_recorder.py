"""Tests of the recorder against plain-torch references, with tiny seeded CPU training."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import runlens
from runlens.analyze import Run, evaluate, load_rules
from runlens import format as run_format
from runlens.recorder import optimizer_probe
from runlens.recorder.task_probe import TaskProbe
from recorder_helpers import (SYNCING_METHODS, forbid_in_runlens, make_batch, make_model,
                              part_files, read_rows, rows_at, task_losses, total_loss)



def _error_events(run_dir: Path) -> list[dict]:
    return [row for row in read_rows(run_dir, "events")
            if row["kind"] == run_format.EVENT_RECORDER_ERROR]


# -- gradient norm and clipping -------------------------------------------------------------


def _train_with_clipping(run_dir: Path, steps: int, max_norm: float):
    """Train with clipping and return, per step, the clip result and the post-clip norm."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    clip_results, received_norms = [], []
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            clip_results.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            grads = [param.grad for param in model.parameters()]
            received_norms.append(torch.nn.utils.get_total_norm(grads))
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    return clip_results, received_norms


def test_grad_norm_matches_get_total_norm(tmp_path):
    _, received_norms = _train_with_clipping(tmp_path, steps=4, max_norm=0.5)
    rows = read_rows(tmp_path, "scalars")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for row, expected in zip(rows, received_norms):
        assert row["grad_norm"] == pytest.approx(float(expected), rel=1e-5)


def test_clip_norms_match_clip_grad_norm(tmp_path):
    clip_results, received_norms = _train_with_clipping(tmp_path, steps=4, max_norm=0.5)
    rows = read_rows(tmp_path, "scalars")
    for row, clip_result, received in zip(rows, clip_results, received_norms):
        assert row["clip_total_norm"] == pytest.approx(float(clip_result), rel=1e-6)
        assert row["clip_max_norm"] == 0.5
        # The clip was active, so the optimizer received a smaller norm than the total.
        assert float(clip_result) > float(received)


def test_clip_patch_removed_after_close(tmp_path):
    original = torch.nn.utils.clip_grad_norm_
    rec = runlens.record(tmp_path, model=make_model())
    assert torch.nn.utils.clip_grad_norm_ is not original
    rec.close()
    assert torch.nn.utils.clip_grad_norm_ is original
    assert torch.nn.utils.clip_grad.clip_grad_norm_ is original


# -- per-parameter statistics -------------------------------------------------------------


def _train_adam_with_snapshots(run_dir: Path, steps: int, param_stats_every: int):
    """Train with Adam and return per step the parameters before and after, and the state."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    names = {param: name for name, param in model.named_parameters()}
    snapshots = []
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True,
                        param_stats_every=param_stats_every) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            before = {names[p]: p.detach().clone() for p in model.parameters()}
            grads = {names[p]: p.grad.detach().clone() for p in model.parameters()}
            optimizer.step()
            after = {names[p]: p.detach().clone() for p in model.parameters()}
            state = {names[p]: {key: value.clone() for key, value in optimizer.state[p].items()}
                     for p in model.parameters()}
            snapshots.append({"before": before, "after": after, "grads": grads,
                              "state": state})
            optimizer.zero_grad()
            rec.step(loss)
    return model, snapshots


def test_params_rows_on_stats_steps_only(tmp_path):
    model, _ = _train_adam_with_snapshots(tmp_path, steps=5, param_stats_every=2)
    rows = read_rows(tmp_path, "params")
    param_count = len(list(model.parameters()))
    assert sorted({row["step"] for row in rows}) == [0, 2, 4]
    assert len(rows_at(rows, 2)) == param_count


def test_params_norms_match_manual_update(tmp_path):
    _, snapshots = _train_adam_with_snapshots(tmp_path, steps=3, param_stats_every=2)
    rows = read_rows(tmp_path, "params")
    for step in (0, 2):
        snapshot = snapshots[step]
        for row in rows_at(rows, step):
            name = row["param"]
            update = snapshot["after"][name] - snapshot["before"][name]
            assert row["param_norm"] == pytest.approx(
                float(snapshot["after"][name].norm()), rel=1e-5)
            assert row["update_norm"] == pytest.approx(float(update.norm()), rel=1e-4)
            assert row["grad_norm"] == pytest.approx(
                float(snapshot["grads"][name].norm()), rel=1e-5)


def test_params_adam_state_matches_optimizer(tmp_path):
    _, snapshots = _train_adam_with_snapshots(tmp_path, steps=3, param_stats_every=2)
    rows = read_rows(tmp_path, "params")
    for step in (0, 2):
        for row in rows_at(rows, step):
            state = snapshots[step]["state"][row["param"]]
            assert row["exp_avg_norm"] == pytest.approx(float(state["exp_avg"].norm()),
                                                        rel=1e-5)
            assert row["exp_avg_sq_norm"] == pytest.approx(float(state["exp_avg_sq"].norm()),
                                                           rel=1e-5)
            assert row["state_step"] == float(state["step"])
            assert row["state_matches_param"] is True
            assert row.get("momentum_buffer_norm") is None


# -- param groups and schedules -----------------------------------------------------------


def test_param_groups_lr_follows_scheduler(tmp_path):
    model = make_model()
    decay = [p for name, p in model.named_parameters() if name.endswith("weight")]
    no_decay = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    used_lrs = []
    with runlens.record(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                        strict=True) as rec:
        for step in range(4):
            loss = total_loss(model, step)
            loss.backward()
            used_lrs.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            rec.step(loss)
    rows = read_rows(tmp_path, "param_groups")
    assert len(rows) == 8
    for step in range(4):
        by_group = {row["group"]: row for row in rows_at(rows, step)}
        assert by_group[0]["lr"] == pytest.approx(used_lrs[step][0])
        assert by_group[1]["lr"] == pytest.approx(used_lrs[step][1])
        assert by_group[0]["weight_decay"] == 0.1
        assert by_group[1]["weight_decay"] == 0.0
    assert used_lrs[3][0] == pytest.approx(0.1 * 0.5 ** 3)


def test_step_count_with_gradient_accumulation(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gradient_accumulation_steps = 4
    optimizer_steps = 3
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        for step in range(optimizer_steps):
            for micro_step in range(gradient_accumulation_steps):
                loss = total_loss(model, step * gradient_accumulation_steps + micro_step)
                (loss / gradient_accumulation_steps).backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    rows = read_rows(tmp_path, "scalars")
    assert [row["step"] for row in rows] == list(range(optimizer_steps))
    assert not any(row["step_skipped"] for row in rows)


# -- AMP ----------------------------------------------------------------------------------


def _cpu_grad_scaler():
    # NOTE: GradScaler("cpu") works in torch 2.13. On a release whose unscale_ fails on the
    # CPU, the AMP tests skip with that error instead of failing.
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        probe = torch.ones(1, requires_grad=True)
        scaler.scale((probe * 1.0).sum()).backward()
        optimizer = torch.optim.SGD([probe], lr=0.0)
        scaler.unscale_(optimizer)
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        pytest.skip(f"GradScaler does not work on the CPU in torch {torch.__version__}: "
                    f"{error}")
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)


def _train_with_scaler(run_dir: Path, steps: int, inf_step: int):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = _cpu_grad_scaler()
    scales = []
    with runlens.record(run_dir, model=model, optimizer=optimizer, scaler=scaler,
                        strict=True) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            scaler.scale(loss).backward()
            if step == inf_step:
                model.head_a.weight.grad[0, 0] = math.inf
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scales.append(scaler.get_scale())
            rec.step(loss)
    return scales


def test_amp_scale_recorded(tmp_path):
    scales = _train_with_scaler(tmp_path, steps=3, inf_step=1)
    rows = read_rows(tmp_path, "scalars")
    assert [row["amp_scale"] for row in rows] == scales
    # The inf at step 1 halved the scale (backoff_factor 0.5).
    assert scales[1] == scales[0] / 2


def test_amp_inf_grad_step_skipped(tmp_path):
    _train_with_scaler(tmp_path, steps=3, inf_step=1)
    rows = read_rows(tmp_path, "scalars")
    assert [row["step_skipped"] for row in rows] == [False, True, False]


def test_run_json_amp_settings(tmp_path):
    _train_with_scaler(tmp_path, steps=1, inf_step=-1)
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    assert meta["amp"] == {"scaler": "GradScaler", "enabled": True}


# -- non-finite values --------------------------------------------------------------------


def test_nonfinite_loss_counted(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        for step, loss in enumerate([torch.tensor(1.0), torch.tensor(math.nan), math.nan]):
            rec.step(loss)
    rows = read_rows(tmp_path, "scalars")
    assert [row["nonfinite_loss"] for row in rows] == [0, 1, 1]


def test_nonfinite_grad_counted(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        for step in range(2):
            loss = total_loss(model, step)
            loss.backward()
            if step == 1:
                model.head_b.bias.grad.fill_(math.inf)
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    rows = read_rows(tmp_path, "scalars")
    assert rows[0]["nonfinite_grad_tensors"] == 0
    assert rows[1]["nonfinite_grad_tensors"] >= 1
    assert rows[1]["grad_norm"] == math.inf


# -- run.json -----------------------------------------------------------------------------


class KindsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.linear = nn.Linear(4, 4)
        self.layer_norm = nn.LayerNorm(4)
        self.batch_norm = nn.BatchNorm1d(4)


def test_run_json_param_kinds(tmp_path):
    with runlens.record(tmp_path, model=KindsNet()):
        pass
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    kinds = {param["name"]: param["kind"] for param in meta["params"]}
    assert meta["format_version"] == run_format.FORMAT_VERSION
    assert kinds == {"embed.weight": "embedding", "linear.weight": "weight",
                     "linear.bias": "bias", "layer_norm.weight": "norm",
                     "layer_norm.bias": "norm", "batch_norm.weight": "norm",
                     "batch_norm.bias": "norm"}


def test_run_json_optimizer_groups(tmp_path):
    model = KindsNet()
    optimizer = torch.optim.AdamW([
        {"params": [model.linear.weight], "weight_decay": 0.05},
        {"params": [model.linear.bias, model.embed.weight], "weight_decay": 0.0,
         "lr": 1e-4},
    ], lr=1e-3, betas=(0.9, 0.95))
    with runlens.record(tmp_path, model=model, optimizer=optimizer):
        pass
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    groups = meta["optimizer"]["param_groups"]
    assert meta["optimizer"]["class"] == "AdamW"
    assert groups[0]["params"] == ["linear.weight"]
    assert groups[1]["params"] == ["linear.bias", "embed.weight"]
    assert groups[0]["hyperparameters"]["weight_decay"] == 0.05
    assert groups[0]["hyperparameters"]["lr"] == 1e-3
    assert groups[0]["hyperparameters"]["betas"] == [0.9, 0.95]
    assert groups[1]["hyperparameters"]["lr"] == 1e-4
    assert meta["segments"][0]["optimizer"] == meta["optimizer"]


# -- multi-task gradients -----------------------------------------------------------------


def _manual_task_gradients(model, step: int, weights: dict[str, float]):
    losses = task_losses(model, step)
    shared = list(model.backbone.parameters())
    vectors = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss * weights[task], shared, retain_graph=True)
        vectors[task] = torch.cat([grad.reshape(-1) for grad in grads])
    return vectors


def _train_two_tasks(run_dir: Path, steps: int, weights: dict[str, float]):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    expected = []
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True,
                        shared_params=model.backbone, task_probe_every=2) as rec:
        for step in range(steps):
            expected.append(_manual_task_gradients(model, step, weights))
            losses = task_losses(model, step)
            rec.probe_tasks(losses, weights)
            loss = sum(weights[task] * value for task, value in losses.items())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss, losses=losses, loss_weights=weights)
    return expected


def test_tasks_grad_norm_matches_autograd(tmp_path):
    weights = {"a": 1.0, "b": 0.25}
    expected = _train_two_tasks(tmp_path, steps=3, weights=weights)
    rows = read_rows(tmp_path, "tasks")
    assert sorted({row["step"] for row in rows}) == [0, 2]
    for step in (0, 2):
        by_task = {row["task"]: row for row in rows_at(rows, step)}
        for task in ("a", "b"):
            assert by_task[task]["grad_norm"] == pytest.approx(
                float(expected[step][task].norm()), rel=1e-5)


def test_task_pairs_cosine_matches_manual(tmp_path):
    expected = _train_two_tasks(tmp_path, steps=3, weights={"a": 1.0, "b": 1.0})
    rows = read_rows(tmp_path, "task_pairs")
    for step in (0, 2):
        a, b = expected[step]["a"], expected[step]["b"]
        cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
        pairs = {(row["task"], row["other_task"]): row["cosine"] for row in rows_at(rows, step)}
        assert pairs[("a", "b")] == pytest.approx(cosine, rel=1e-5, abs=1e-6)
        assert pairs[("b", "a")] == pytest.approx(cosine, rel=1e-5, abs=1e-6)


def test_task_losses_rows_weighted(tmp_path):
    _train_two_tasks(tmp_path, steps=2, weights={"a": 1.0, "b": 0.25})
    rows = read_rows(tmp_path, "losses")
    row_b = [row for row in rows_at(rows, 1) if row["task"] == "b"][0]
    assert len(rows) == 4
    assert row_b["weight"] == 0.25
    assert row_b["weighted_loss"] == pytest.approx(row_b["loss"] * 0.25)


def test_task_losses_after_backward_warn_once(tmp_path, caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, model=model, optimizer=optimizer,
                            shared_params=model.backbone, task_probe_every=1) as rec:
            for step in range(3):
                losses = task_losses(model, step)
                loss = losses["a"] + losses["b"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                rec.step(loss, losses=losses)
    warnings = [record for record in caplog.records if record.name == "runlens.record"]
    assert len(warnings) == 1
    assert "probe_tasks" in warnings[0].getMessage()
    assert len(read_rows(tmp_path, "scalars")) == 3
    assert len(read_rows(tmp_path, "losses")) == 6


# -- evaluation ---------------------------------------------------------------------------


def test_log_eval_rows(tmp_path):
    with runlens.record(tmp_path, strict=True) as rec:
        rec.step(torch.tensor(1.0))
        rec.step(torch.tensor(0.5))
        rec.log_eval("val", {"loss": torch.tensor(0.75), "accuracy": 0.5})
        rec.log_eval("test", {"accuracy": 0.25}, step=7)
    rows = read_rows(tmp_path, "evals")
    values = {(row["split"], row["metric"]): (row["step"], row["value"]) for row in rows}
    assert values == {("val", "loss"): (1, 0.75), ("val", "accuracy"): (1, 0.5),
                      ("test", "accuracy"): (7, 0.25)}


def test_log_classes_match_confusion(tmp_path):
    # Predictions per target class, over classes 0, 1, 2, 3:
    #   target 0: predicted 0, 0, 1 -> recall 2/3; class 0 predicted 3 times -> precision 2/3
    #   target 1: predicted 1, 3    -> recall 1/2; class 1 predicted twice  -> precision 1/2
    #   target 2: predicted 0, 2    -> recall 1/2; class 2 predicted once   -> precision 1/1
    #   class 3: never a target, predicted once -> no recall, precision 0/1
    targets = torch.tensor([0, 0, 0, 1, 2, 2, 1])
    scores = torch.zeros(7, 4)
    for row, predicted in enumerate([0, 0, 1, 1, 0, 2, 3]):
        scores[row, predicted] = 1.0
    with runlens.record(tmp_path, strict=True) as rec:
        rec.log_classes("val", targets, scores)
    rows = {row["class_id"]: row for row in read_rows(tmp_path, "classes")}
    assert sorted(rows) == [0, 1, 2, 3]
    assert [rows[c]["support"] for c in range(4)] == [3, 2, 2, 0]
    assert [rows[c]["predicted"] for c in range(4)] == [3, 2, 1, 1]
    assert rows[0]["recall"] == pytest.approx(2 / 3)
    assert rows[0]["precision"] == pytest.approx(2 / 3)
    assert rows[1]["recall"] == pytest.approx(1 / 2)
    assert rows[1]["precision"] == pytest.approx(1 / 2)
    assert rows[2]["recall"] == pytest.approx(1 / 2)
    assert rows[2]["precision"] == pytest.approx(1.0)
    assert rows[3]["recall"] is None
    assert rows[3]["precision"] == 0.0


# -- checkpoints --------------------------------------------------------------------------


def test_checkpoint_load_events_name_objects(tmp_path):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    total_loss(model, 0).backward()
    optimizer.step()
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict()}
    with runlens.record(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                        strict=True):
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    loads = [json.loads(row["detail"]) for row in read_rows(tmp_path, "events")
             if row["kind"] == run_format.EVENT_CHECKPOINT_LOAD]
    assert [load["object"] for load in loads] == ["model", "optimizer", "scheduler"]
    assert loads[0]["missing_keys"] == 0
    assert loads[1]["state_tensors"] > 0


def test_scheduler_state_dict_saves_while_recording(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    expected_keys = set(scheduler.state_dict())
    with runlens.record(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler):
        state = scheduler.state_dict()
        torch.save(state, io.BytesIO())
    assert set(state) == expected_keys
    assert "load_state_dict" not in vars(scheduler)
    assert "state_dict" not in vars(scheduler)


# -- reliability --------------------------------------------------------------------------


def _train_plain(run_dir: Path, steps: int, **options) -> None:
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with runlens.record(run_dir, model=model, optimizer=optimizer, **options) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)


def _broken_state_statistics(state, param):
    raise ValueError("broken probe for the test")


def test_probe_error_logged_once_training_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(optimizer_probe, "state_statistics", _broken_state_statistics)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        _train_plain(tmp_path, steps=5, param_stats_every=2)
    messages = [record.getMessage() for record in caplog.records
                if record.name == "runlens.record"]
    rows = read_rows(tmp_path, "scalars")
    errors = _error_events(tmp_path)
    assert len(messages) == 1
    assert "broken probe for the test" in messages[0]
    assert len(errors) == 1
    assert json.loads(errors[0]["detail"])["area"] == "optimizer probe"
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert all(row["clip_max_norm"] == 1.0 for row in rows)


def test_probe_error_strict_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(optimizer_probe, "state_statistics", _broken_state_statistics)
    with pytest.raises(ValueError, match="broken probe for the test"):
        _train_plain(tmp_path, steps=2, param_stats_every=1, strict=True)


def test_task_probe_error_keeps_other_signals(tmp_path, monkeypatch, caplog):
    def broken_measure(self, losses, weights):
        raise ValueError("broken task probe for the test")

    monkeypatch.setattr(TaskProbe, "measure", broken_measure)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, model=model, optimizer=optimizer,
                            shared_params=model.backbone, task_probe_every=1) as rec:
            for step in range(3):
                losses = task_losses(model, step)
                rec.probe_tasks(losses)
                loss = losses["a"] + losses["b"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                rec.step(loss, losses=losses)
    rows = read_rows(tmp_path, "scalars")
    messages = [record.getMessage() for record in caplog.records
                if record.name == "runlens.record"]
    assert len(messages) == 1
    assert "task probe" in messages[0]
    assert read_rows(tmp_path, "tasks") == []
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["grad_norm"] > 0 for row in rows)
    assert len(read_rows(tmp_path, "losses")) == 6


_KILLED_RUN_SCRIPT = """
import os, signal, sys, time
import torch
import runlens
sys.path.insert(0, {tests_dir!r})
from recorder_helpers import make_model, total_loss

model = make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
rec = runlens.record({run_dir!r}, model=model, optimizer=optimizer, flush_every=10,
                     flush_seconds=3600.0, param_stats_every=5)
for step in range(100):
    if step == 55:
        # Let the writer finish the part of steps 40-49, as it would during a real step
        # that takes longer than writing a part.
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    loss = total_loss(model, step)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    rec.step(loss)
"""


def test_killed_run_keeps_flushed_steps(tmp_path):
    run_dir = tmp_path / "run"
    script = _KILLED_RUN_SCRIPT.format(tests_dir=str(Path(__file__).parent),
                                       run_dir=str(run_dir))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, timeout=60)
    # A half-written part, as a kill during a write leaves it.
    folder = run_dir / "scalars" / "rank-0"
    (folder / f"{run_format.TEMP_PREFIX}{run_format.part_name(0, 99)}").write_bytes(b"PAR1")
    steps = sorted(row["step"] for row in read_rows(run_dir, "scalars"))
    duckdb_steps = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{folder}/{run_format.PART_PREFIX}*')").fetchall()[0]
    assert result.returncode == -9
    assert steps[:50] == list(range(50))
    assert steps == list(range(len(steps)))
    assert duckdb_steps[0] == len(steps)
    assert all(pq.read_metadata(file).num_rows > 0 for file in part_files(run_dir, "params"))

    # The analyzer reads the killed run and evaluates the built-in rules on it.
    with Run.open(run_dir) as run:
        report = evaluate(run, load_rules())
        summary = run.summary()
    assert summary.steps == len(steps)
    assert report.errored == []
    assert "optimizer-state-mismatch" in report.passed


# -- host-device synchronization ----------------------------------------------------------




def test_step_makes_no_host_sync(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler,
                        shared_params=model.backbone, strict=True,
                        flush_seconds=3600.0) as rec:
        for step in range(6):
            if step == 1:
                for name in SYNCING_METHODS:
                    monkeypatch.setattr(torch.Tensor, name,
                                        forbid_in_runlens(name, getattr(torch.Tensor, name)))
            losses = task_losses(model, step)
            rec.probe_tasks(losses)
            loss = losses["a"] + losses["b"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            rec.step(loss, losses=losses, loss_weights={"a": 1.0, "b": 1.0},
                     tokens=torch.tensor(16.0))
        monkeypatch.undo()
    rows = read_rows(tmp_path, "scalars")
    assert rec.error_counts == {}
    assert [row["step"] for row in rows] == list(range(6))
    assert all(row["tokens"] == 16.0 for row in rows)
