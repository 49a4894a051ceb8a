"""`runlens show` and `runlens query` on sample runs and fixture runs, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from runlens import format as fmt
from runlens.cli import app
from conftest import steady_scalars, tree_digest, write_run

SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"
RESUMED_RUN = SAMPLE_RUNS / "healthy-resume"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def show_json(run_dir: Path) -> dict:
    result = invoke("show", run_dir, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# runlens show


def test_show_lists_every_table_of_sample_run() -> None:
    on_disk = sorted(p.name for p in RESUMED_RUN.iterdir() if p.name in fmt.TABLES)
    info = show_json(RESUMED_RUN)
    assert sorted(table["name"] for table in info["tables"]) == on_disk
    text = invoke("show", RESUMED_RUN).stdout
    for table in on_disk:
        assert f"\n  {table} " in text


def test_show_sample_run_metadata() -> None:
    info = show_json(RESUMED_RUN)
    meta = json.loads((RESUMED_RUN / "run.json").read_text(encoding="utf-8"))
    assert info["path"] == str(RESUMED_RUN)
    assert info["format_version"] == 1
    assert info["created"] == meta["created"]
    assert info["torch_version"] == meta["torch_version"]
    assert info["world_size"] == 1
    assert info["ranks"] == [0]
    assert info["steps"] == {"count": 500, "first": 0, "last": 499}
    assert [(s["segment"], s["start_step"]) for s in info["segments"]] == [(0, 0), (1, 300)]
    assert info["segments"][1]["argv"] == meta["segments"][1]["argv"]
    assert info["optimizer"] == "Adam"
    assert info["params"]["count"] == len(meta["params"])
    assert info["params"]["numel"] == sum(p["numel"] for p in meta["params"])


def test_show_events_counts_and_first_steps() -> None:
    events = {e["kind"]: (e["count"], e["first_step"]) for e in show_json(RESUMED_RUN)["events"]}
    assert events == {"segment_start": (2, 0), "checkpoint_load": (2, 300)}


def test_show_signals_are_non_null_columns(tmp_path: Path) -> None:
    scalars = steady_scalars(20, amp_scale=[None] * 20)
    run_dir = write_run(tmp_path / "run", {"scalars": [scalars, steady_scalars(5)]})
    (table,) = show_json(run_dir)["tables"]
    assert table["name"] == "scalars"
    assert table["parts"] == 2
    assert table["rows"] == 25
    assert table["signals"] == ["loss", "grad_norm"]


def test_show_fixture_run_params(healthy_run: Path) -> None:
    info = show_json(healthy_run)
    assert info["params"] == {"count": 3, "numel": 160, "trainable": 3}
    assert info["optimizer"] == "AdamW"
    assert info["events"] == []
    text = invoke("show", healthy_run).stdout
    assert "parameters      3 tensors (3 trainable), 160 elements" in text
    assert "optimizer       AdamW" in text


def test_show_missing_run_dir(tmp_path: Path) -> None:
    result = invoke("show", tmp_path / "missing")
    assert result.exit_code == 2
    assert result.stderr == f"runlens: error: {tmp_path / 'missing'}: run directory not found\n"


def test_show_leaves_run_unchanged(healthy_run: Path) -> None:
    before = tree_digest(healthy_run)
    assert invoke("show", healthy_run).exit_code == 0
    assert tree_digest(healthy_run) == before


# runlens query


def test_query_prints_aligned_table(healthy_run: Path) -> None:
    result = invoke("query", healthy_run,
                    "SELECT step, loss, 'x' AS label FROM scalars ORDER BY step LIMIT 2")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "step  loss  label",
        "----  ----  -----",
        "   0     2  x",
        "   1  1.99  x",
        "(2 rows)",
    ]


def test_query_limit_counts_rows_left_out(healthy_run: Path) -> None:
    result = invoke("query", healthy_run, "SELECT step FROM scalars ORDER BY step",
                    "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[2:5] == ["   0", "   1", "   2"]
    assert lines[5].startswith("(100 rows, 97 not shown; raise --limit")


def test_query_limit_across_batches(healthy_run: Path) -> None:
    result = invoke("query", healthy_run, "SELECT range AS n FROM range(25000)",
                    "--limit", "10001")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + 10001 + 1
    assert lines[-2].strip() == "10000"
    assert lines[-1].startswith("(25000 rows, 14999 not shown;")


def test_query_default_limit_is_50(healthy_run: Path) -> None:
    result = invoke("query", healthy_run, "SELECT step FROM scalars")
    assert "(100 rows, 50 not shown;" in result.stdout


def test_query_null_and_views(healthy_run: Path) -> None:
    result = invoke("query", healthy_run,
                    "SELECT name, numel, NULL AS nothing FROM run_params ORDER BY name")
    assert result.exit_code == 0, result.output
    assert "encoder.bias       16  NULL" in result.stdout


@pytest.mark.parametrize(("sql", "problem"), [
    ("COPY (SELECT 1) TO 'out.csv'", "query: COPY is not allowed; pass one SELECT"),
    ("ATTACH 'other.db'", "query: ATTACH is not allowed; pass one SELECT"),
    ("SELECT 1; SELECT 2", "query: contains 2 statements; pass exactly one SELECT"),
    ("SELECT * FROM read_csv('/etc/passwd')",
     'query failed: Permission Error: Cannot access file "/etc/passwd"'),
    ("SELECT no_such_column FROM scalars", "query failed: Binder Error: "),
    ("SELEC 1", "query: invalid SQL: Parser Error: "),
    ("SELECT CAST(CASE WHEN step > 50 THEN 'x' ELSE '1' END AS INTEGER) FROM scalars",
     "query failed: Conversion Error: "),
    ("SELECT $threshold", "query: uses $threshold, but runlens query binds no parameters"),
])
def test_query_rejected(healthy_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        sql: str, problem: str) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree_digest(healthy_run)
    result = invoke("query", healthy_run, sql)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"runlens: error: {problem}")
    assert result.stderr.count("\n") == 1
    assert tree_digest(healthy_run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healthy"]


def test_query_parquet_reads_back(tmp_path: Path) -> None:
    output = tmp_path / "out" / "loss.parquet"
    output.parent.mkdir()
    result = invoke("query", RESUMED_RUN,
                    "SELECT step, segment, loss FROM scalars WHERE step >= 295 ORDER BY step",
                    "--parquet", output)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Wrote 205 rows and 3 columns to {output}\n"
    table = pq.read_table(output)
    assert table.column_names == ["step", "segment", "loss"]
    assert table.column("step").to_pylist() == list(range(295, 500))
    assert set(table.column("segment").to_pylist()[:10]) == {0, 1}


def test_query_csv_reads_back(healthy_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "steps.csv"
    result = invoke("query", healthy_run, "SELECT step, loss FROM scalars ORDER BY step",
                    "--csv", output)
    assert result.exit_code == 0, result.output
    table = pa_csv.read_csv(output)
    assert table.num_rows == 100
    assert table.column("loss").to_pylist()[:2] == [2.0, 1.99]


def test_query_csv_writes_lists_as_json(healthy_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "params.csv"
    result = invoke("query", healthy_run, "SELECT name, shape FROM run_params ORDER BY name",
                    "--csv", output)
    assert result.exit_code == 0, result.output
    rows = pa_csv.read_csv(output).to_pylist()
    assert rows[0] == {"name": "encoder.bias", "shape": "[16]"}


@pytest.mark.parametrize("option", ["--csv", "--parquet"])
def test_query_output_inside_run_rejected(healthy_run: Path, option: str) -> None:
    before = tree_digest(healthy_run)
    result = invoke("query", healthy_run, "SELECT step FROM scalars", option,
                    healthy_run / "out.file")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: {option} {healthy_run / 'out.file'}: "
                                    "is inside the run directory")
    assert tree_digest(healthy_run) == before


def test_query_csv_and_parquet_same_file(healthy_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "both"
    result = invoke("query", healthy_run, "SELECT step FROM scalars", "--csv", output,
                    "--parquet", output)
    assert result.exit_code == 2
    assert "--csv and --parquet both name" in result.stderr
    assert not output.exists()


def test_query_empty_result(healthy_run: Path) -> None:
    result = invoke("query", healthy_run, "SELECT step FROM scalars WHERE step < 0")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["step", "----", "(0 rows)"]


def test_query_missing_run_dir(tmp_path: Path) -> None:
    result = invoke("query", tmp_path / "missing", "SELECT 1")
    assert result.exit_code == 2
    assert result.stderr == f"runlens: error: {tmp_path / 'missing'}: run directory not found\n"
