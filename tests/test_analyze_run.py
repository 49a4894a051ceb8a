"""Run.open: validation of run directories, the views it creates, and the run summary."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runlens import format as fmt
from runlens.analyze import Run, RunError
from conftest import corrupt_data_pages, default_meta, steady_scalars, write_part, write_run


def test_open_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(RunError, match=r"no-such-run: run directory not found"):
        Run.open(missing)


def test_open_directory_without_run_json(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"not a runlens run directory \(no run\.json\)"):
        Run.open(tmp_path)


def test_open_file_instead_of_directory(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    with pytest.raises(
        RunError, match=r"run\.json: is a file; pass the run directory that contains run\.json$"
    ):
        Run.open(tmp_path / "run.json")


def test_open_run_json_is_directory(tmp_path: Path) -> None:
    (tmp_path / fmt.RUN_FILE).mkdir()
    with pytest.raises(RunError, match=r"run\.json: cannot read: is a directory; ") as info:
        Run.open(tmp_path)
    assert "check that it is a regular file and that this user may read it" in str(info.value)
    assert "corrupt" not in str(info.value)


def test_open_table_folder_is_file(tmp_path: Path) -> None:
    write_run(tmp_path, {"events": {"step": [0], "kind": ["x"]}})
    (tmp_path / "scalars").write_text("not a folder")
    with pytest.raises(RunError, match=r"/scalars: cannot list table folder: not a directory; "):
        Run.open(tmp_path)


def test_open_part_is_directory(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    part = tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 1)
    part.mkdir()
    with pytest.raises(RunError, match=r"part-0000-000001\.parquet: cannot read: is a directory"):
        Run.open(tmp_path)


def test_open_part_is_directory_not_skipped(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    (tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 1)).mkdir()
    with pytest.raises(RunError, match=r"cannot read: is a directory"):
        Run.open(tmp_path, skip_corrupt=True)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("optimizer", "adam", r"field 'optimizer': expected object or null, got str 'adam'"),
        ("params", 5, r"field 'params': expected array, got int 5"),
        ("segments", {}, r"field 'segments': expected array, got dict \{\}"),
        ("params", [{"shape": [2]}], r"field 'params\[0\]\.name': missing"),
        ("params", [{"name": 3}], r"field 'params\[0\]\.name': expected string, got int 3"),
        ("format_version", 0, r"field 'format_version': expected an integer of at least 1, got 0"),
        ("format_version", -5, r"field 'format_version': expected an integer of at least 1, "
                               r"got -5"),
        ("format_version", "1", r"field 'format_version': expected an integer, got '1'"),
    ],
)
def test_open_run_json_wrong_type(tmp_path: Path, field: str, value: object,
                                  problem: str) -> None:
    meta = default_meta() | {field: value}
    write_run(tmp_path, {"scalars": steady_scalars()}, meta)
    with pytest.raises(RunError, match=r"run\.json: " + problem):
        Run.open(tmp_path)


def test_open_run_json_param_group_wrong_type(tmp_path: Path) -> None:
    meta = default_meta()
    meta["optimizer"]["param_groups"][1]["params"] = "encoder.bias"
    write_run(tmp_path, {"scalars": steady_scalars()}, meta)
    with pytest.raises(
        RunError,
        match=r"field 'optimizer\.param_groups\[1\]\.params': expected array, got str",
    ):
        Run.open(tmp_path)


def test_open_run_json_lists_every_problem(tmp_path: Path) -> None:
    meta = default_meta() | {"params": 5, "segments": {}}
    write_run(tmp_path, {"scalars": steady_scalars()}, meta)
    with pytest.raises(RunError) as info:
        Run.open(tmp_path)
    assert len(info.value.lines) == 2
    assert "field 'params'" in info.value.lines[0]
    assert "field 'segments'" in info.value.lines[1]


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


def test_summary_corrupt_data_pages(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    part = corrupt_data_pages(tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0))
    with Run.open(tmp_path) as run:
        with pytest.raises(RunError, match=rf"^{part}: cannot read Parquet data: ") as info:
            run.summary()
    assert "Snappy decompression failure" in str(info.value)
    assert str(info.value).endswith(
        "the part may be corrupt; move it aside or rerun with --skip-corrupt"
    )
    assert len(info.value.lines) == 1


def test_open_skip_corrupt_reads_data_pages(tmp_path: Path) -> None:
    scalars = steady_scalars(200)
    good = {name: values[:100] for name, values in scalars.items()}
    bad = {name: values[100:] for name, values in scalars.items()}
    write_run(tmp_path, {"scalars": [good, bad]})
    part = corrupt_data_pages(tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 1))
    with Run.open(tmp_path, skip_corrupt=True) as run:
        assert len(run.warnings) == 1
        assert str(part) in run.warnings[0]
        assert run.parts["scalars"] == [tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0)]
        assert run.summary().steps == 100


def test_open_without_skip_corrupt_checks_footers_only(tmp_path: Path) -> None:
    write_run(tmp_path, {"scalars": steady_scalars()})
    corrupt_data_pages(tmp_path / "scalars" / "rank-0" / fmt.part_name(0, 0))
    with Run.open(tmp_path) as run:
        assert run.warnings == []
        assert len(run.parts["scalars"]) == 1


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
