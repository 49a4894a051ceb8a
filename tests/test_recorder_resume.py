"""Tests of resuming a run: a second opening of a run directory adds a segment."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import runlens
from runlens import format as run_format
from recorder_helpers import make_model, read_rows, total_loss


def _train_segment(run_dir: Path, first_batch: int, steps: int, checkpoint: dict | None = None,
                   restore_optimizer: bool = True, **options) -> dict:
    """Record `steps` Adam steps into `run_dir` and return a checkpoint of the end state.

    With a `checkpoint`, the model is restored from it inside the recording, and the
    optimizer too when `restore_optimizer` is true.
    """
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    with runlens.record(run_dir, model=model, optimizer=optimizer, strict=True,
                        param_stats_every=2, **options) as rec:
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            if restore_optimizer:
                optimizer.load_state_dict(checkpoint["optimizer"])
        for batch in range(first_batch, first_batch + steps):
            loss = total_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            rec.step(loss)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _file_digests(run_dir: Path) -> dict[str, str]:
    """Return the SHA-256 of every file under `run_dir` except run.json."""
    return {str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in run_dir.rglob("*")
            if path.is_file() and path.name != run_format.RUN_FILE}


def _optimizer_state_tensors(rows: list[dict], segment: int) -> list[int]:
    return [row["optimizer_state_tensors"] for row in rows
            if row["segment"] == segment and row.get("optimizer_state_tensors") is not None]


def test_resume_appends_segment(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    _train_segment(tmp_path, 5, 3, checkpoint)
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    assert [segment["segment"] for segment in meta["segments"]] == [0, 1]
    assert meta["segments"][1]["start_step"] == 5
    assert meta["segments"][1]["optimizer"]["class"] == "Adam"


def test_resume_keeps_segment0_parts_identical(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    before = _file_digests(tmp_path)
    _train_segment(tmp_path, 5, 3, checkpoint)
    after = _file_digests(tmp_path)
    assert before
    assert {name: after.get(name) for name in before} == before
    assert all("part-0001-" in name for name in set(after) - set(before))


def test_resume_continues_step_numbering(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    _train_segment(tmp_path, 5, 3, checkpoint)
    rows = read_rows(tmp_path, "scalars")
    assert [(row["segment"], row["step"]) for row in rows] == [
        (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6), (1, 7)]


def test_resume_step_argument_overrides(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    _train_segment(tmp_path, 5, 2, checkpoint, step=100)
    rows = read_rows(tmp_path, "scalars")
    meta = json.loads((tmp_path / run_format.RUN_FILE).read_text())
    assert [row["step"] for row in rows if row["segment"] == 1] == [100, 101]
    assert meta["segments"][1]["start_step"] == 100


def test_resume_without_optimizer_state_is_fresh(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    _train_segment(tmp_path, 5, 3, checkpoint, restore_optimizer=False)
    rows = read_rows(tmp_path, "scalars")
    assert _optimizer_state_tensors(rows, 0)[-1] > 0
    assert _optimizer_state_tensors(rows, 1)[0] == 0


def test_resume_with_optimizer_state_restored(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 5)
    _train_segment(tmp_path, 5, 3, checkpoint)
    rows = read_rows(tmp_path, "scalars")
    loads = [json.loads(row["detail"]) for row in read_rows(tmp_path, "events")
             if row["kind"] == run_format.EVENT_CHECKPOINT_LOAD]
    assert _optimizer_state_tensors(rows, 1)[0] > 0
    assert [load["object"] for load in loads] == ["model", "optimizer"]


def test_resume_segment_start_events(tmp_path):
    checkpoint = _train_segment(tmp_path, 0, 2)
    _train_segment(tmp_path, 2, 1, checkpoint)
    starts = [(row["segment"], row["step"]) for row in read_rows(tmp_path, "events")
              if row["kind"] == run_format.EVENT_SEGMENT_START]
    assert starts == [(0, 0), (1, 2)]
