"""Tiny seeded models and run-directory readers shared by the recorder tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

import runlens
from runlens import format as run_format

RUNLENS_DIR = str(Path(runlens.__file__).parent)

# Tensor methods that read a value on the host, and so synchronize with a CUDA device.
SYNCING_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


def forbid_in_runlens(name: str, original):
    """Wrap a Tensor method so that a call from any runlens frame raises."""
    def guarded(self, *args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.startswith(RUNLENS_DIR):
                raise AssertionError(f"runlens called Tensor.{name} on the step path")
            frame = frame.f_back
        return original(self, *args, **kwargs)
    return guarded


class TwoHeadNet(nn.Module):
    """A shared backbone with a LayerNorm and two regression heads."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU())
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(inputs)
        return self.head_a(features), self.head_b(features)


def make_model(seed: int = 0) -> TwoHeadNet:
    torch.manual_seed(seed)
    return TwoHeadNet()


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return inputs and two targets, the same for the same step in every test."""
    generator = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(16, 4, generator=generator)
    target_a = inputs.sum(dim=1, keepdim=True)
    target_b = -inputs[:, :1] * 2.0
    return inputs, target_a, target_b


def task_losses(model: TwoHeadNet, step: int) -> dict[str, torch.Tensor]:
    inputs, target_a, target_b = make_batch(step)
    output_a, output_b = model(inputs)
    return {"a": nn.functional.mse_loss(output_a, target_a),
            "b": nn.functional.mse_loss(output_b, target_b)}


def total_loss(model: TwoHeadNet, step: int) -> torch.Tensor:
    losses = task_losses(model, step)
    return losses["a"] + losses["b"]


def part_files(run_dir: Path, table: str) -> list[Path]:
    """List a table's complete part files in write order, skipping temporary files."""
    files = (Path(run_dir) / table).glob(
        f"rank-*/{run_format.PART_PREFIX}*{run_format.PART_SUFFIX}")
    return sorted(file for file in files if not file.name.startswith(run_format.TEMP_PREFIX))


def read_table(run_dir: Path, table: str) -> pa.Table | None:
    """Read every part of `table` with pyarrow, unioning the columns by name."""
    files = part_files(run_dir, table)
    if not files:
        return None
    return pa.concat_tables([pq.read_table(file) for file in files], promote_options="default")


def read_rows(run_dir: Path, table: str) -> list[dict[str, Any]]:
    """Return a table's rows as dicts, ordered by segment and step (stable within a step)."""
    table_data = read_table(run_dir, table)
    if table_data is None:
        return []
    rows = table_data.to_pylist()
    return sorted(rows, key=lambda row: (row["segment"], row["step"]))


def rows_at(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [row for row in rows if row["step"] == step]
