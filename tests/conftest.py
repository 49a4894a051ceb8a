"""Shared fixtures: run directories of real Parquet parts, and rule files.

`write_run` writes what the recorder writes: ``run.json`` and one Parquet part per
column dict under ``<table>/rank-<r>/``, with the Arrow types that runlens.format
declares for known columns.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Union

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from runlens import format as fmt

RULES_FIXTURES = Path(__file__).parent / "rules_fixtures"

Columns = dict[str, list[Any]]


@pytest.fixture(autouse=True)
def _no_job_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the analyses of the tests out of the job summary of a CI machine that runs them."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def default_meta() -> dict[str, Any]:
    return {
        "format_version": fmt.FORMAT_VERSION,
        "runlens_version": "0.1.0",
        "torch_version": "2.5.1",
        "world_size": 1,
        "params": [
            {"name": "encoder.weight", "shape": [16, 8], "dtype": "float32", "kind": "weight",
             "module_type": "Linear", "numel": 128, "requires_grad": True},
            {"name": "encoder.bias", "shape": [16], "dtype": "float32", "kind": "bias",
             "module_type": "Linear", "numel": 16, "requires_grad": True},
            {"name": "norm.weight", "shape": [16], "dtype": "float32", "kind": "norm",
             "module_type": "LayerNorm", "numel": 16, "requires_grad": True},
        ],
        "optimizer": {
            "class": "AdamW",
            "module": "torch.optim.adamw",
            "param_groups": [
                {"index": 0, "params": ["encoder.weight"],
                 "hyperparameters": {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999],
                                     "eps": 1e-8}},
                {"index": 1, "params": ["encoder.bias", "norm.weight"],
                 "hyperparameters": {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                     "eps": 1e-8}},
            ],
        },
        "segments": [{"segment": 0, "start_step": 0}],
    }


def write_part(run_dir: Path, table: str, columns: Columns, rank: int = 0, sequence: int = 0,
               segment: int = 0) -> Path:
    """Write one Parquet part of `table` and return its path."""
    declared = fmt.TABLES.get(table, {})
    arrays = {
        name: pa.array(values, pa.type_for_alias(declared[name]) if name in declared else None)
        for name, values in columns.items()
    }
    folder = run_dir / table / fmt.rank_folder(rank)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fmt.part_name(segment, sequence)
    pq.write_table(pa.table(arrays), path)
    return path


def write_run(run_dir: Path, tables: dict[str, Union[Columns, list[Columns]]],
              meta: dict[str, Any] | None = None) -> Path:
    """Write run.json and the tables; a list of column dicts writes one part per dict."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / fmt.RUN_FILE).write_text(json.dumps(meta or default_meta()), encoding="utf-8")
    for table, parts in tables.items():
        for sequence, columns in enumerate(parts if isinstance(parts, list) else [parts]):
            write_part(run_dir, table, columns, sequence=sequence)
    return run_dir


def steady_scalars(steps: int = 100, **overrides: list[Any]) -> Columns:
    """Scalars of a healthy run: a slowly falling loss, finite, never clipped."""
    columns: Columns = {
        "step": list(range(steps)),
        "segment": [0] * steps,
        "rank": [0] * steps,
        "loss": [2.0 - step / steps for step in range(steps)],
        "grad_norm": [1.0] * steps,
    }
    columns.update(overrides)
    return columns


def write_rule(folder: Path, rule: dict[str, Any] | str, name: str | None = None) -> Path:
    """Write a rule (a dict, dumped as YAML, or YAML text) into `folder` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = rule if isinstance(rule, str) else yaml.safe_dump(rule, sort_keys=False)
    rule_id = rule.get("id", "rule") if isinstance(rule, dict) else "rule"
    path = folder / (name or f"{rule_id}.yaml")
    path.write_text(text, encoding="utf-8")
    return path


def make_rule(**fields: Any) -> dict[str, Any]:
    """Return a valid rule dict that flags steps with loss above $threshold."""
    rule = {
        "id": "loss-above-threshold",
        "title": "Loss above a threshold",
        "severity": "error",
        "category": "test",
        "description": "Flags each step whose loss is above the threshold.",
        "remediation": "Lower the learning rate.",
        "params": {
            "threshold": {"type": "number", "default": 5.0, "description": "Loss limit."},
        },
        "requires": {"scalars": ["step", "loss"]},
        "query": "SELECT step AS step_start, step AS step_end, loss FROM scalars "
                 "WHERE loss > $threshold ORDER BY step",
        "message": "loss {loss:.2f} at step {step_start}",
    }
    rule.update(fields)
    return rule


def corrupt_data_pages(part: Path) -> Path:
    """Invert bytes 200-1199 of a part, which hits its data pages and leaves the footer valid.

    Parts that `write_part` writes are snappy-compressed (pyarrow's default), so reading
    the damaged pages fails with a decompression error while `pq.read_metadata` succeeds.
    """
    data = bytearray(part.read_bytes())
    assert len(data) > 1200 + 200, f"{part} is too small to damage only its data pages"
    data[200:1200] = bytes(byte ^ 0xFF for byte in data[200:1200])
    part.write_bytes(bytes(data))
    pq.read_metadata(part)  # the footer still reads
    return part


def tree_digest(folder: Path) -> dict[str, str]:
    """Return relative path -> SHA-256 of every file under `folder`."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def healthy_run(tmp_path: Path) -> Path:
    """A 100-step run with loss below 2 on every step."""
    return write_run(tmp_path / "healthy", {"scalars": steady_scalars()})


@pytest.fixture
def spiking_run(tmp_path: Path) -> Path:
    """A 100-step run whose loss is 9.0 on steps 40 and 41, in two parts."""
    scalars = steady_scalars()
    scalars["loss"][40] = 9.0
    scalars["loss"][41] = 9.0
    first = {name: values[:50] for name, values in scalars.items()}
    second = {name: values[50:] for name, values in scalars.items()}
    return write_run(tmp_path / "spiking", {"scalars": [first, second]})
