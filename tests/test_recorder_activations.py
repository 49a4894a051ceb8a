"""Tests of the activation probe: the `activations` and `batchnorm` tables.

Each test trains a tiny seeded CPU model and compares the rows read back from Parquet
with statistics computed by plain torch from tensors that the test's own forward hooks
capture.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import runlens
from runlens import format as run_format
from runlens.recorder import activation_probe
from recorder_helpers import SYNCING_METHODS, forbid_in_runlens, read_rows, rows_at

MICRO_BATCH = 8


class ActivationNet(nn.Module):
    """Linear, BatchNorm and ReLU, then Tanh and Sigmoid of one hidden layer, then logits.

    `tanh_scale` multiplies the input of Tanh and Sigmoid, so a large value saturates them.
    """

    def __init__(self, tanh_scale: float = 1.0, track_running_stats: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8, track_running_stats=track_running_stats)
        self.relu = nn.ReLU()
        self.hidden = nn.Linear(8, 8)
        self.tanh = nn.Tanh()
        self.sigmoid = nn.Sigmoid()
        self.out = nn.Linear(8, 2)
        self.tanh_scale = tanh_scale

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.norm(self.linear(inputs)))
        hidden = self.hidden(features) * self.tanh_scale
        return self.out(self.tanh(hidden) * self.sigmoid(hidden))


def make_net(**options) -> ActivationNet:
    torch.manual_seed(0)
    return ActivationNet(**options)


def make_micro_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2000 + index)
    inputs = torch.randn(MICRO_BATCH, 4, generator=generator)
    return inputs, inputs[:, :2] * 3.0


class ForwardCapture:
    """Test-side forward hooks that keep clones of each call's input, output and buffers.

    `calls[name]` lists one dict per forward call of that module, in call order, with
    the `step` that the test sets before each optimizer step.
    """

    def __init__(self, model: nn.Module) -> None:
        self.step = 0
        self.calls: dict[str, list[dict]] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in model.named_modules() if name]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            call = {"step": self.step, "training": module.training,
                    "input": inputs[0].detach().clone(), "output": output.detach().clone()}
            if getattr(module, "running_var", None) is not None:
                call["running_mean"] = module.running_mean.detach().clone()
                call["running_var"] = module.running_var.detach().clone()
            self.calls.setdefault(name, []).append(call)
        return hook

    def first_training_call(self, name: str, step: int) -> dict:
        return next(call for call in self.calls[name]
                    if call["step"] == step and call["training"])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def train(run_dir: Path, model: nn.Module, steps: int, micro_batches: int = 1,
          eval_every_step: bool = False, **options) -> ForwardCapture:
    """Train with SGD, `micro_batches` forwards per optimizer step, and return the capture.

    With `eval_every_step`, an eval pass (model.eval() and no_grad) of 3 examples runs
    before each step's training forwards, as an evaluation between steps does.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    capture = ForwardCapture(model)
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True,
                        **options) as rec:
        for step in range(steps):
            capture.step = step
            if eval_every_step:
                model.eval()
                with torch.no_grad():
                    model(make_micro_batch(10_000 + step)[0][:3])
                model.train()
            for micro_step in range(micro_batches):
                inputs, targets = make_micro_batch(step * micro_batches + micro_step)
                loss = nn.functional.mse_loss(model(inputs), targets)
                (loss / micro_batches).backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    capture.remove()
    return capture


def row_of(rows: list[dict], step: int, module: str) -> dict:
    matches = [row for row in rows_at(rows, step) if row["module"] == module]
    assert len(matches) == 1, f"expected one row of {module!r} at step {step}, got {matches}"
    return matches[0]


# -- watched modules ------------------------------------------------------------------------


def test_activations_default_modules(tmp_path):
    train(tmp_path, make_net(), steps=1)
    rows = read_rows(tmp_path, "activations")
    types = {row["module"]: row["module_type"] for row in rows}
    batchnorm_rows = read_rows(tmp_path, "batchnorm")
    assert types == {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "out": "Linear"}
    assert [row["module"] for row in batchnorm_rows] == ["norm"]


def test_activations_watch_modules_replace_default(tmp_path):
    model = make_net()
    train(tmp_path, model, steps=1, watch_modules=[model.hidden, model.tanh])
    rows = read_rows(tmp_path, "activations")
    assert sorted(row["module"] for row in rows) == ["hidden", "tanh"]
    assert len(read_rows(tmp_path, "batchnorm")) == 1


def test_activations_watch_false_records_none(tmp_path):
    train(tmp_path, make_net(), steps=3, param_stats_every=1, watch_activations=False)
    assert read_rows(tmp_path, "activations") == []
    assert len(read_rows(tmp_path, "batchnorm")) == 3
    assert len(read_rows(tmp_path, "scalars")) == 3


@pytest.mark.parametrize("options, error, message", [
    ({"watch_activations": 1}, TypeError, "watch_activations must be a bool"),
    ({"watch_modules": ["relu"]}, TypeError, "nn.Module"),
    ({"watch_modules": [nn.ReLU()]}, ValueError, "not a submodule of model"),
])
def test_activations_invalid_arguments_rejected(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        runlens.record(tmp_path, model=make_net(), **options)
    assert not (tmp_path / run_format.RUN_FILE).exists()


def test_activations_watch_modules_without_model_rejected(tmp_path):
    with pytest.raises(ValueError, match="needs model="):
        runlens.record(tmp_path, watch_modules=[nn.ReLU()])
    assert not (tmp_path / run_format.RUN_FILE).exists()


# -- values ---------------------------------------------------------------------------------


def test_activations_relu_zero_fraction_matches_output(tmp_path):
    capture = train(tmp_path, make_net(), steps=3, param_stats_every=2)
    rows = read_rows(tmp_path, "activations")
    for step in (0, 2):
        output = capture.first_training_call("relu", step)["output"]
        expected = (output == 0).float().mean().item()
        row = row_of(rows, step, "relu")
        assert 0.0 < expected < 1.0
        assert row["zero_fraction"] == pytest.approx(expected, abs=1e-7)
        assert row["saturated_fraction"] is None


def test_activations_tanh_saturation_matches_input(tmp_path):
    capture = train(tmp_path, make_net(tanh_scale=20.0), steps=1)
    rows = read_rows(tmp_path, "activations")
    for name, threshold in (("tanh", 2.65), ("sigmoid", 3.9)):
        inputs = capture.first_training_call(name, 0)["input"]
        expected = (inputs.abs() > threshold).float().mean().item()
        row = row_of(rows, 0, name)
        assert 0.3 < expected < 1.0
        assert row["saturated_fraction"] == pytest.approx(expected, abs=1e-7)


def test_activations_tanh_unsaturated_small_input(tmp_path):
    capture = train(tmp_path, make_net(tanh_scale=0.01), steps=1)
    inputs = capture.first_training_call("tanh", 0)["input"]
    row = row_of(read_rows(tmp_path, "activations"), 0, "tanh")
    assert inputs.abs().max().item() < 2.65
    assert row["saturated_fraction"] == 0.0


def test_activations_logits_match_output(tmp_path):
    capture = train(tmp_path, make_net(), steps=1)
    logits = capture.first_training_call("out", 0)["output"]
    row = row_of(read_rows(tmp_path, "activations"), 0, "out")
    assert row["module_type"] == "Linear"
    assert row["numel"] == MICRO_BATCH * 2
    assert row["max_abs"] == pytest.approx(logits.abs().max().item(), rel=1e-6)
    assert row["mean"] == pytest.approx(logits.mean().item(), rel=1e-5, abs=1e-7)
    assert row["std"] == pytest.approx(logits.std(correction=0).item(), rel=1e-5)
    assert row["saturated_fraction"] is None


def test_activations_every_module_matches_output(tmp_path):
    capture = train(tmp_path, make_net(), steps=1)
    rows = read_rows(tmp_path, "activations")
    assert len(rows) == 4
    for row in rows:
        output = capture.first_training_call(row["module"], 0)["output"]
        assert row["numel"] == output.numel()
        assert row["mean"] == pytest.approx(output.mean().item(), rel=1e-5, abs=1e-7)
        assert row["std"] == pytest.approx(output.std(correction=0).item(), rel=1e-5)
        assert row["max_abs"] == pytest.approx(output.abs().max().item(), rel=1e-6)
        assert row["zero_fraction"] == pytest.approx((output == 0).float().mean().item(),
                                                     abs=1e-7)


# -- steps, micro-batches and eval passes ---------------------------------------------------


def test_activations_rows_on_stats_steps_only(tmp_path):
    train(tmp_path, make_net(), steps=5, micro_batches=2, param_stats_every=2)
    rows = read_rows(tmp_path, "activations")
    batchnorm_rows = read_rows(tmp_path, "batchnorm")
    assert sorted({row["step"] for row in rows}) == [0, 2, 4]
    assert sorted({row["step"] for row in batchnorm_rows}) == [0, 2, 4]
    for step in (0, 2, 4):
        assert len(rows_at(rows, step)) == 4
        assert len(rows_at(batchnorm_rows, step)) == 1


def test_batchnorm_batch_size_first_micro_batch(tmp_path):
    train(tmp_path, make_net(), steps=5, micro_batches=4, param_stats_every=2)
    rows = read_rows(tmp_path, "batchnorm")
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert all(row["module"] == "norm" for row in rows)
    assert all(row["batch_size"] == MICRO_BATCH for row in rows)
    assert all(row["training"] is True for row in rows)


def test_batchnorm_running_stats_match_buffers(tmp_path):
    capture = train(tmp_path, make_net(), steps=3, micro_batches=4, param_stats_every=2)
    rows = read_rows(tmp_path, "batchnorm")
    for step in (0, 2):
        call = capture.first_training_call("norm", step)
        row = row_of(rows, step, "norm")
        assert row["running_mean_norm"] == pytest.approx(call["running_mean"].norm().item(),
                                                         rel=1e-6)
        assert row["running_var_mean"] == pytest.approx(call["running_var"].mean().item(),
                                                        rel=1e-6)
        assert row["running_var_max"] == pytest.approx(call["running_var"].max().item(),
                                                       rel=1e-6)


def test_activations_first_micro_batch_values(tmp_path):
    capture = train(tmp_path, make_net(), steps=1, micro_batches=4)
    first = capture.calls["relu"][0]["output"]
    last = capture.calls["relu"][3]["output"]
    row = row_of(read_rows(tmp_path, "activations"), 0, "relu")
    assert row["mean"] == pytest.approx(first.mean().item(), rel=1e-5)
    assert row["mean"] != pytest.approx(last.mean().item(), rel=1e-5)


def test_activations_eval_pass_adds_no_rows(tmp_path):
    capture = train(tmp_path, make_net(), steps=3, eval_every_step=True, param_stats_every=1)
    rows = read_rows(tmp_path, "activations")
    batchnorm_rows = read_rows(tmp_path, "batchnorm")
    assert len(rows) == 3 * 4
    assert len(batchnorm_rows) == 3
    assert all(row["batch_size"] == MICRO_BATCH for row in batchnorm_rows)
    for step in range(3):
        # The eval pass ran first in each step, but the rows hold the training forward.
        output = capture.first_training_call("relu", step)["output"]
        assert row_of(rows, step, "relu")["numel"] == output.numel()
        assert row_of(rows, step, "relu")["mean"] == pytest.approx(output.mean().item(),
                                                                   rel=1e-5)


def test_batchnorm_frozen_module_training_false(tmp_path):
    model = make_net()
    model.norm.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True) as rec:
        inputs, targets = make_micro_batch(0)
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        rec.step(loss)
    rows = read_rows(tmp_path, "batchnorm")
    assert len(rows) == 1
    assert rows[0]["training"] is False
    assert rows[0]["running_var_mean"] == pytest.approx(1.0)


def test_batchnorm_without_running_stats_no_rows(tmp_path):
    train(tmp_path, make_net(track_running_stats=False), steps=2, param_stats_every=1)
    assert read_rows(tmp_path, "batchnorm") == []
    assert len(read_rows(tmp_path, "activations")) == 2 * 4


def test_activations_segment_and_rank_keys(tmp_path):
    train(tmp_path, make_net(), steps=1, rank=3)
    rows = read_rows(tmp_path, "activations") + read_rows(tmp_path, "batchnorm")
    assert all(row["rank"] == 3 for row in rows)
    assert all(row["segment"] == 0 for row in rows)


# -- hooks and errors -----------------------------------------------------------------------


def test_activations_hooks_removed_after_close(tmp_path):
    model = make_net()
    rec = runlens.record(tmp_path, model=model)
    hooked = [name for name, module in model.named_modules() if module._forward_hooks]
    rec.close()
    assert sorted(hooked) == ["norm", "out", "relu", "sigmoid", "tanh"]
    assert all(not module._forward_hooks for module in model.modules())


def _broken_statistics(module, inputs, output):
    raise ValueError("broken activation probe for the test")


def test_activations_hook_error_logged_once_training_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(activation_probe, "activation_statistics", _broken_statistics)
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with caplog.at_level(logging.WARNING, logger="runlens.record"):
        with runlens.record(tmp_path, model=model, optimizer=optimizer,
                            param_stats_every=1) as rec:
            for step in range(3):
                inputs, targets = make_micro_batch(step)
                loss = nn.functional.mse_loss(model(inputs), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                rec.step(loss)
    messages = [record.getMessage() for record in caplog.records
                if record.name == "runlens.record"]
    errors = [row for row in read_rows(tmp_path, "events")
              if row["kind"] == run_format.EVENT_RECORDER_ERROR]
    scalars = read_rows(tmp_path, "scalars")
    assert len(messages) == 1
    assert "broken activation probe for the test" in messages[0]
    assert len(errors) == 1
    assert json.loads(errors[0]["detail"])["area"] == "activation probe"
    assert rec.error_counts == {"activation probe": 1}
    assert read_rows(tmp_path, "activations") == []
    assert [row["step"] for row in scalars] == [0, 1, 2]
    assert all(math.isfinite(row["loss"]) for row in scalars)


def test_activations_hook_error_strict_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(activation_probe, "activation_statistics", _broken_statistics)
    with pytest.raises(ValueError, match="broken activation probe for the test"):
        train(tmp_path, make_net(), steps=1)


# -- host-device synchronization ------------------------------------------------------------




def test_activations_stats_step_makes_no_host_sync(tmp_path, monkeypatch):
    model = make_net(tanh_scale=20.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, strict=True,
                        param_stats_every=1, flush_seconds=3600.0) as rec:
        for name in SYNCING_METHODS:
            monkeypatch.setattr(torch.Tensor, name,
                                forbid_in_runlens(name, getattr(torch.Tensor, name)))
        for step in range(3):
            inputs, targets = make_micro_batch(step)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
        monkeypatch.undo()
    assert rec.error_counts == {}
    assert len(read_rows(tmp_path, "activations")) == 3 * 4
    assert len(read_rows(tmp_path, "batchnorm")) == 3
