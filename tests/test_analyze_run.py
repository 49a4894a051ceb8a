"""Run.open: validation of run directories, the views it creates, and the run summary."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runlens import format as fmt
from runlens.analyze import Run, RunError
from conftest import default_meta, steady_scalars, write_part, write_run


def test_open_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(RunError, match=r"no-such-run: run directory not found"):
        Run.open(missing)


def test_open_directory_without_run_json(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"not a runlens run directory \(no run\.json\)"):
        Run.open(tmp_path)


def test_open_file_instead_of_directory(tmp_path: Path) -> None:
    file = tmp_path / "run.json"
    file.write_text("{}")
    with pytest.raises(RunError, match=r"not a runlens run directory \(no run\.json\)"):
        Run.open(file)


def test_open_invalid_run_json(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    (tmp_path / fmt.RUN_FILE).write_text('{"format_version": 1,')
    with pytest.raises(RunError, match=r"run\.json: invalid JSON at line 1 column \d+"):
        Run.open(tmp_path)


def test_open_run_json_not_an_object(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    (tmp_path / fmt.RUN_FILE).write_text("[1, 2]")
    with pytest.raises(RunError, match=r"expected a JSON object"):
        Run.open(tmp_path)


def test_open_newer_format_version(tmp_path: Path) -> None:
    meta = default_meta() | {"format_version": fmt.FORMAT_VERSION + 1}
    write_run(tmp_path, {"scalars": steady_scalars()}, meta)
    with pytest.raises(RunError, match=r"field 'format_version': 2 is newer .* upgrade runlens"):
        Run.open(tmp_path)


def test_open_missing_format_version(tmp_path: Path) -> None:
    meta = default_meta()
    del meta["format_version"]
    write_run(tmp_path, {"scalars": steady_scalars()}, meta)
    with pytest.raises(RunError, match=r"field 'format_version': expected an integer, got None"):
        Run.open(tmp_path)


def test_open_garbage_part_names_file_and_fix(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    bad = tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 1)
    bad.write_bytes(b"this is not parquet at all")
    with pytest.raises(RunError, match=r"part-0000-000001\.parquet: corrupt Parquet part") as info:
        Run.open(tmp_path)
    assert "move the file out of the run directory" in str(info.value)
    assert "--skip-corrupt" in str(info.value)


def test_open_truncated_part(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    part = tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(RunError, match=r"part-0000-000000\.parquet: corrupt Parquet part"):
        Run.open(tmp_path)


def test_open_skip_corrupt_lists_warning(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars(10)})
    bad = tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 1)
    bad.write_bytes(b"garbage")
    with Run.open(tmp_path, skip_corrupt=True) as run:
        assert len(run.warnings) == 1
        assert str(bad) in run.warnings[0]
        assert run.parts["scalars"] == [tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0)]
        assert run.summary().steps == 10


def test_open_run_without_tables(tmp_path: Path) -> None:
    write_run(tmp_path, {})
    with pytest.raises(RunError, match=r"run has no recorded steps"):
        Run.open(tmp_path)


def test_open_scalars_without_rows(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": {"step": [], "loss": []}})
    with pytest.raises(RunError, match=r"run has no recorded steps"):
        Run.open(tmp_path)


def test_open_ignores_temporary_parts(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars(5)})
    temp = tmp_path / "scalars" / "rank-0" / (fmt.TEMP_PREFIX + fmt.part_name(0, 1))
    temp.write_bytes(b"half-written")
    with Run.open(tmp_path) as run:
        assert run.warnings == []
        assert run.summary().steps == 5


def test_views_union_parts_by_name(tmp_path: Path) -> None:
    first = {"step": [0, 1], "loss": [1.0, 2.0]}
    second = {"step": [2, 3], "loss": [3.0, 4.0], "clip_total_norm": [0.5, 0.6]}
    write_run(tmp_path, {"scalars": [first, second]})
    with Run.open(tmp_path) as run:
        rows = run.connection.execute(
            "SELECT step, loss, clip_total_norm FROM scalars ORDER BY step"
        ).fetchall()
    assert rows == [(0, 1.0, None), (1, 2.0, None), (2, 3.0, 0.5), (3, 4.0, 0.6)]


def test_views_reads_all_ranks(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars(4)})
    write_part(tmp_path, "scalars", steady_scalars(4, rank=[1] * 4), rank=1)
    with Run.open(tmp_path) as run:
        summary = run.summary()
    assert summary.ranks == 2
    assert summary.steps == 4


def test_absent_table_has_no_view(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        assert "params" not in run.tables
        assert run.columns("params") == []
        assert "scalars" in run.tables


def test_run_params_view_joins_param_groups(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        rows = run.connection.execute(
            'SELECT name, kind, module_type, shape, numel, "group", lr, weight_decay, betas '
            "FROM run_params ORDER BY name"
        ).fetchall()
    assert rows == [
        ("encoder.bias", "bias", "Linear", [16], 16, 1, 1e-3, 0.0, [0.9, 0.999]),
        ("encoder.weight", "weight", "Linear", [16, 8], 128, 0, 1e-3, 0.01, [0.9, 0.999]),
        ("norm.weight", "norm", "LayerNorm", [16], 16, 1, 1e-3, 0.0, [0.9, 0.999]),
    ]


def test_run_params_view_flat_param_groups(tmp_path: Path) -> None:
    meta = default_meta()
    meta["params"] = [{"name": "w", "shape": [2, 3]}, {"name": "b", "shape": [3]}]
    meta["optimizer"]["param_groups"] = [
        {"params": [0], "lr": "inf", "momentum": 0.9},
        {"params": [1, "extra"], "lr": 0.1, "momentum": 0.0},
    ]
    write_run(tmp_path, {"scalars": steady_scalars(3)}, meta)
    with Run.open(tmp_path) as run:
        rows = run.connection.execute(
            'SELECT name, numel, "group", lr, momentum FROM run_params ORDER BY name'
        ).fetchall()
    assert rows == [
        ("b", 3, 1, 0.1, 0.0),
        ("extra", None, 1, 0.1, 0.0),
        ("w", 6, 0, float("inf"), 0.9),
    ]


def test_run_params_view_without_optimizer(tmp_path: Path) -> None:
    meta = {"format_version": fmt.FORMAT_VERSION}
    write_run(tmp_path, {"scalars": steady_scalars(3)}, meta)
    with Run.open(tmp_path) as run:
        assert run.columns("run_params")[:3] == ["name", "kind", "module_type"]
        assert run.connection.execute("SELECT count(*) FROM run_params").fetchall() == [(0,)]


def test_segments_view(tmp_path: Path) -> None:
    meta = default_meta()
    meta["segments"] = [
        {"segment": 0, "start_step": 0},
        {"segment": 1, "start_step": 50, "restored": {"optimizer": True}},
    ]
    write_run(tmp_path, {"scalars": steady_scalars(100, segment=[0] * 50 + [1] * 50)}, meta)
    with Run.open(tmp_path) as run:
        rows = run.connection.execute(
            "SELECT segment, start_step FROM segments ORDER BY segment"
        ).fetchall()
        assert rows == [(0, 0), (1, 50)]
        assert run.summary().segments == 2


def test_meta_is_run_json(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        assert run.meta == json.loads((healthy_run / fmt.RUN_FILE).read_text())


def test_summary_counts_steps(spiking_run: Path) -> None:
    with Run.open(spiking_run) as run:
        summary = run.summary()
    assert (summary.steps, summary.first_step, summary.last_step) == (100, 0, 99)
    assert summary.path == str(spiking_run.resolve())
    assert summary.tables == ("scalars",)


def test_parts_match_format_names(healthy_run: Path) -> None:
    with Run.open(healthy_run) as run:
        part = run.parts["scalars"][0]
    assert part.name == fmt.part_name(0, 0)
    assert pq.read_metadata(part).num_rows == 100
