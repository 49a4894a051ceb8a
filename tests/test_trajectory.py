"""Tests of the recorder's trajectory: the parameters projected onto two random directions.

The references below draw the directions with their own seeded generators, from the
formula that docs/format.md gives, so a change to how the recorder draws or scales them
fails here.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import runlens
from runlens import format as run_format
from runlens.recorder.trajectory import TrajectoryProbe
from recorder_helpers import (SYNCING_METHODS, forbid_in_runlens, make_batch, make_model,
                              read_rows, total_loss)


def reference_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"runlens-trajectory:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def reference_point(params: list[torch.Tensor], seed: int) -> tuple[float, float]:
    """Project parameter values with directions drawn here, in float64 sums."""
    numel = sum(param.numel() for param in params)
    x = y = 0.0
    for index, param in enumerate(params):
        generator = torch.Generator().manual_seed(reference_seed(seed, index))
        u = torch.randn(param.shape, generator=generator)
        v = torch.randn(param.shape, generator=generator)
        x += float((u.double() * param.double()).sum())
        y += float((v.double() * param.double()).sum())
    return x / math.sqrt(numel), y / math.sqrt(numel)


def train(run_dir: Path, steps: int, optimizer_class=torch.optim.SGD, lr: float = 0.05,
          seed: int = 0, **options) -> list[list[torch.Tensor]]:
    """Train `make_model()` and return the parameters before each optimizer step."""
    model = make_model()
    optimizer = optimizer_class(model.parameters(), lr=lr)
    before_steps = []
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True,
                        trajectory_seed=seed, **options) as rec:
        for step in range(steps):
            loss = total_loss(model, step)
            loss.backward()
            before_steps.append([param.detach().clone() for param in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    return before_steps


def points(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {row["step"]: (row["x"], row["y"]) for row in read_rows(run_dir, "trajectory")}


# -- the projection ---------------------------------------------------------------------------


def test_projection_matches_reference(tmp_path):
    before_steps = train(tmp_path, steps=7, trajectory_every=3, seed=5)
    recorded = points(tmp_path)
    assert sorted(recorded) == [0, 3, 6]
    for step, (x, y) in recorded.items():
        expected_x, expected_y = reference_point(before_steps[step], seed=5)
        assert x == pytest.approx(expected_x, rel=1e-5, abs=1e-7)
        assert y == pytest.approx(expected_y, rel=1e-5, abs=1e-7)


def test_projection_differs_by_seed(tmp_path):
    train(tmp_path / "seed0", steps=1, trajectory_every=1, seed=0)
    train(tmp_path / "seed1", steps=1, trajectory_every=1, seed=1)
    assert points(tmp_path / "seed0")[0] != points(tmp_path / "seed1")[0]


def test_projection_scale_is_rms_change():
    # With directions scaled by 1/sqrt(numel), a coordinate of a vector d has mean square
    # |d|^2 / numel over seeds: the squared RMS of d's elements.
    model = nn.Linear(400, 250)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.01 * torch.randn(param.shape, generator=torch.Generator()
                                           .manual_seed(7)))
    params = list(model.named_parameters())
    rms = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for _, p in params)
                    / sum(p.numel() for _, p in params))
    squares = []
    for seed in range(200):
        probe = TrajectoryProbe(params, seed, lambda: True, lambda: 0, lambda *row: None,
                                lambda *error: None)
        squares += [float(value) ** 2 for value in probe.project()]
    assert math.sqrt(sum(squares) / len(squares)) == pytest.approx(rms, rel=0.25)


def test_sgd_and_adam_share_first_point(tmp_path):
    train(tmp_path / "sgd", steps=12, optimizer_class=torch.optim.SGD, lr=0.05,
          trajectory_every=1)
    train(tmp_path / "adam", steps=12, optimizer_class=torch.optim.Adam, lr=0.05,
          trajectory_every=1)
    sgd, adam = points(tmp_path / "sgd"), points(tmp_path / "adam")
    assert sgd[0] == adam[0]
    separation = math.hypot(sgd[11][0] - adam[11][0], sgd[11][1] - adam[11][1])
    sgd_distance = math.hypot(sgd[11][0] - sgd[0][0], sgd[11][1] - sgd[0][1])
    assert separation > 1e-3
    assert sgd_distance > 1e-3


def test_projected_params_are_trainable_floats(tmp_path):
    model = make_model()
    model.head_b.weight.requires_grad_(False)
    with runlens.record(tmp_path, model=model, trajectory_every=5):
        pass
    projection = json.loads((tmp_path / run_format.RUN_FILE).read_text())["settings"][
        "trajectory_projection"]
    expected = [name for name, param in model.named_parameters() if param.requires_grad]
    assert [param["name"] for param in projection["params"]] == expected
    assert projection["numel"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- when points are taken ------------------------------------------------------------------


def test_trajectory_off_by_default(tmp_path):
    train(tmp_path, steps=3)
    settings = json.loads((tmp_path / run_format.RUN_FILE).read_text())["settings"]
    assert read_rows(tmp_path, "trajectory") == []
    assert settings["trajectory_every"] is None
    assert settings["trajectory_projection"] is None


def test_run_json_describes_projection(tmp_path):
    train(tmp_path, steps=2, trajectory_every=10, seed=3)
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    settings = meta["settings"]
    model = make_model()
    assert settings["trajectory_every"] == 10
    assert settings["trajectory_seed"] == 3
    projection = settings["trajectory_projection"]
    assert projection["method"] == "gaussian-per-parameter-v1"
    assert projection["seed"] == 3
    assert projection["device_types"] == ["cpu"]
    assert projection["params"] == [
        {"name": name, "shape": list(param.shape), "device_type": "cpu"}
        for name, param in model.named_parameters()]
    assert meta["segments"][0]["trajectory_projection"] == projection


def test_resume_takes_point_at_segment_start(tmp_path):
    train(tmp_path, steps=5, trajectory_every=4)
    train(tmp_path, steps=5, trajectory_every=4)
    rows = read_rows(tmp_path, "trajectory")
    assert [(row["segment"], row["step"]) for row in rows] == [(0, 0), (0, 4), (1, 5),
                                                               (1, 8)]


def test_point_without_optimizer_taken_at_step(tmp_path):
    # Without an optimizer there is no pre-hook, so the point shows the parameters when
    # Recorder.step runs, after this loop's manual update.
    model = make_model()
    after_update = []
    with runlens.record(tmp_path, model=model, trajectory_every=2, strict=True) as rec:
        for step in range(3):
            loss = total_loss(model, step)
            loss.backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.05 * param.grad
                    param.grad = None
            after_update.append([param.detach().clone() for param in model.parameters()])
            rec.step(loss)
    recorded = points(tmp_path)
    assert sorted(recorded) == [0, 2]
    for step in (0, 2):
        expected_x, expected_y = reference_point(after_update[step], seed=0)
        assert recorded[step][0] == pytest.approx(expected_x, rel=1e-5, abs=1e-7)
        assert recorded[step][1] == pytest.approx(expected_y, rel=1e-5, abs=1e-7)


def test_skipped_optimizer_step_still_gets_point(tmp_path):
    # A step whose optimizer.step() does not run (as when GradScaler skips it) gets its
    # point from Recorder.step, and the parameters are those of the step anyway.
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, trajectory_every=1,
                        strict=True) as rec:
        for step in range(3):
            loss = total_loss(model, step)
            loss.backward()
            if step != 1:
                optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    assert sorted(points(tmp_path)) == [0, 1, 2]
    assert points(tmp_path)[1] == points(tmp_path)[2]


# -- cost: no sync, nothing kept --------------------------------------------------------------


def test_trajectory_makes_no_host_sync(tmp_path, monkeypatch):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with runlens.record(tmp_path, model=model, optimizer=optimizer, trajectory_every=2,
                        strict=True, flush_seconds=3600.0) as rec:
        for step in range(6):
            if step == 1:
                for name in SYNCING_METHODS:
                    monkeypatch.setattr(torch.Tensor, name,
                                        forbid_in_runlens(name, getattr(torch.Tensor, name)))
            loss = total_loss(model, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
        monkeypatch.undo()
    assert rec.error_counts == {}
    assert sorted(points(tmp_path)) == [0, 2, 4]


def _tensors_in(value, found: list[torch.Tensor], seen: set[int]) -> None:
    """Collect the tensors in `value`, descending into containers and plain attributes."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors_in(item, found, seen)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _tensors_in(item, found, seen)


def test_probe_keeps_no_parameter_copies(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = runlens.record(tmp_path, model=model, optimizer=optimizer, trajectory_every=1,
                         strict=True, flush_seconds=3600.0)
    for step in range(3):
        loss = total_loss(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.step(loss)

    # Between steps the probe keeps references to the parameters and no tensor of their size.
    probe = rec._trajectory
    held: list[torch.Tensor] = []
    _tensors_in(vars(probe), held, set())
    parameter_ids = {id(param) for param in model.parameters()}
    assert held
    assert all(id(tensor) in parameter_ids for tensor in held)
    buffered = [tensor for _, tensor in
                rec._buffers["trajectory"].device_values.get("x", [])
                + rec._buffers["trajectory"].device_values.get("y", [])]
    assert len(buffered) == 6
    assert all(tensor.numel() == 1 for tensor in buffered)

    # The directions are drawn again for each point, the same every time.
    first = [float(value) for value in probe.project()]
    second = [float(value) for value in probe.project()]
    assert first == second
    expected = reference_point([param.detach() for param in model.parameters()], seed=0)
    assert first == pytest.approx(expected, rel=1e-5, abs=1e-7)
    rec.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_projection_matches_reference(tmp_path, monkeypatch):
    model = make_model().cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    before_steps = []
    with runlens.record(tmp_path, model=model, optimizer=optimizer, trajectory_every=2,
                        strict=True, flush_seconds=3600.0) as rec:
        for step in range(5):
            if step == 1:
                for name in SYNCING_METHODS:
                    monkeypatch.setattr(torch.Tensor, name,
                                        forbid_in_runlens(name, getattr(torch.Tensor, name)))
            inputs, target_a, target_b = (tensor.cuda() for tensor in make_batch(step))
            output_a, output_b = model(inputs)
            loss = (nn.functional.mse_loss(output_a, target_a)
                    + nn.functional.mse_loss(output_b, target_b))
            loss.backward()
            before_steps.append([param.detach().clone() for param in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
        monkeypatch.undo()
    projection = json.loads((tmp_path / run_format.RUN_FILE).read_text())["settings"][
        "trajectory_projection"]
    assert projection["device_types"] == ["cuda"]
    recorded = points(tmp_path)
    assert sorted(recorded) == [0, 2, 4]
    for step, (x, y) in recorded.items():
        params = before_steps[step]
        numel = sum(param.numel() for param in params)
        expected_x = expected_y = 0.0
        for index, param in enumerate(params):
            generator = torch.Generator(device=param.device)
            generator.manual_seed(reference_seed(0, index))
            u = torch.randn(param.shape, generator=generator, device=param.device)
            v = torch.randn(param.shape, generator=generator, device=param.device)
            expected_x += float((u.double() * param.double()).sum())
            expected_y += float((v.double() * param.double()).sum())
        assert x == pytest.approx(expected_x / math.sqrt(numel), rel=1e-5, abs=1e-7)
        assert y == pytest.approx(expected_y / math.sqrt(numel), rel=1e-5, abs=1e-7)


# -- arguments and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"trajectory_every": 0}, ValueError, "trajectory_every must be a positive integer"),
        ({"trajectory_every": -5}, ValueError, "or None"),
        ({"trajectory_every": True}, TypeError, "trajectory_every"),
        ({"trajectory_every": 2.5}, TypeError, "trajectory_every"),
        ({"trajectory_every": "10"}, TypeError, "trajectory_every"),
        ({"trajectory_seed": -1}, ValueError, "trajectory_seed must be a non-negative"),
        ({"trajectory_seed": None}, TypeError, "trajectory_seed"),
    ],
)
def test_invalid_trajectory_option_raises(tmp_path, options, error, match):
    run_dir = tmp_path / "run"
    with pytest.raises(error, match=match):
        runlens.record(run_dir, model=make_model(), **options)
    assert not run_dir.exists()


def test_trajectory_without_model_raises(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="trajectory_every needs model="):
        runlens.record(run_dir, trajectory_every=10)
    assert not run_dir.exists()


def test_trajectory_without_trainable_params_raises(tmp_path):
    model = make_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no floating-point parameter that requires grad"):
        runlens.record(tmp_path / "run", model=model, trajectory_every=10)


def test_reshaped_param_turns_probe_off(tmp_path, caplog):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with runlens.record(tmp_path, model=model, optimizer=optimizer,
                        trajectory_every=1) as rec:
        for step in range(3):
            if step == 2:
                model.head_a.bias.data = torch.zeros(2)
            loss = total_loss(model, step) if step < 2 else torch.tensor(1.0)
            if step < 2:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    errors = [json.loads(row["detail"]) for row in read_rows(tmp_path, "events")
              if row["kind"] == run_format.EVENT_RECORDER_ERROR]
    assert rec.error_counts == {"trajectory probe": 1}
    assert sorted(points(tmp_path)) == [0, 1]
    assert [error["area"] for error in errors] == ["trajectory probe"]
    assert "changed shape from [1] to [2]" in errors[0]["error"]
    assert len(read_rows(tmp_path, "scalars")) == 3


def test_reshaped_param_raises_when_strict(tmp_path):
    model = make_model()
    with runlens.record(tmp_path, model=model, trajectory_every=1, strict=True) as rec:
        model.head_a.bias.data = torch.zeros(2)
        with pytest.raises(RuntimeError, match="changed shape"):
            rec.step(torch.tensor(1.0))
