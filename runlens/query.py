"""`runlens query`: run one ad-hoc SELECT over a run's views, in the rules' sandbox.

The run is opened with `Run.open`, whose DuckDB connection reads only the run's part
files and has its configuration locked, so a query can neither read another file nor
write one. The statement check below rejects everything but one SELECT before DuckDB
runs it. Results are printed as a table or written with pyarrow, because COPY is
blocked in the sandbox.
"""

from __future__ import annotations

import json

import math
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from runlens.analyze.errors import RunlensError, single_line
from runlens.analyze.run import Run

DEFAULT_LIMIT = 50
# Rows per Arrow record batch when a result streams in from DuckDB.
BATCH_ROWS = 10_000
# The maximum width of one cell of the printed table, in characters. Longer values are cut.
MAX_CELL_CHARS = 60


def check_single_select(sql: str) -> None:
    """Raise RunlensError unless `sql` is exactly one SELECT statement (CTEs allowed).

    This is the check that rule files get (runlens/analyze/rules.py), with messages
    for the command line.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise RunlensError(f"query: invalid SQL: {single_line(error)}") from None
    if len(statements) != 1:
        raise RunlensError(f"query: contains {len(statements)} statements; pass exactly "
                           "one SELECT")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise RunlensError(f"query: {statement.type.name} is not allowed; pass one SELECT "
                           "statement (CTEs allowed)")
    if statement.named_parameters:
        names = ", ".join(f"${name}" for name in sorted(statement.named_parameters))
        raise RunlensError(f"query: uses {names}, but runlens query binds no parameters; "
                           "write the values into the query")


def run_query(run: Run, sql: str, max_rows: int | None = None) -> tuple[pa.Table, int]:
    """Check and run `sql` on the open run; return its first rows and its row count.

    The table has the first `max_rows` rows, or every row when `max_rows` is None.
    Rows past `max_rows` are counted and dropped as they stream in, so printing the
    head of a large result does not hold the result in memory.

    Raises:
        RunlensError: the query is not one SELECT, or DuckDB rejected or failed it,
            including a read outside the run that the sandbox blocks.
    """
    check_single_select(sql)
    kept: list[pa.RecordBatch] = []
    total = 0
    try:
        reader = run.connection.sql(sql).to_arrow_reader(BATCH_ROWS)
        for batch in reader:
            if max_rows is None:
                kept.append(batch)
            elif total < max_rows:
                kept.append(batch.slice(0, max_rows - total))
            total += batch.num_rows
    except (duckdb.Error, OSError, pa.ArrowException) as error:
        # An error while the batches stream in, such as a failed cast, reaches Python
        # as an OSError from pyarrow that carries DuckDB's message.
        if run.is_data_error(error):  # type: ignore[arg-type]
            raise run.data_error(error) from None  # type: ignore[arg-type]
        raise RunlensError(f"query failed: {single_line(error)}") from None
    return pa.Table.from_batches(kept, schema=reader.schema), total


def check_output_path(path: Path, run_dir: Path, option: str) -> None:
    """Raise RunlensError when `path` lies inside the run directory."""
    if path.resolve().is_relative_to(run_dir.resolve()):
        raise RunlensError(
            f"{option} {path}: is inside the run directory {run_dir}, which runlens never "
            "modifies; write the file to another folder"
        )


def write_csv(table: pa.Table, path: Path) -> None:
    """Write `table` as CSV, with list, struct and map values as JSON text."""
    _write(lambda: pa_csv.write_csv(_flat_for_csv(table), str(path)), path, "--csv")


def _flat_for_csv(table: pa.Table) -> pa.Table:
    columns = []
    for column in table.columns:
        if pa.types.is_nested(column.type):
            column = pa.array([None if value is None else json.dumps(value, default=str)
                               for value in column.to_pylist()], type=pa.string())
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def write_parquet(table: pa.Table, path: Path) -> None:
    _write(lambda: pq.write_table(table, str(path)), path, "--parquet")


def _write(write: Any, path: Path, option: str) -> None:
    try:
        write()
    except (OSError, pa.ArrowException) as error:
        raise RunlensError(f"{option} {path}: cannot write the result: "
                           f"{single_line(error)}") from None


def render_table(shown: pa.Table, total_rows: int) -> str:
    """Render the rows of `shown` as aligned text, with a line that counts every row.

    `total_rows` counts the rows of the whole result, of which `shown` is the head.
    Numbers are right-aligned, other values left-aligned, and NULL is printed as NULL.
    """
    names = shown.column_names
    columns = [[_cell(value) for value in column.to_pylist()] for column in shown.columns]
    numeric = [_is_numeric(field.type) for field in shown.schema]
    widths = [
        max([len(name), *(len(value) for value in values)])
        for name, values in zip(names, columns)
    ]

    def line(cells: list[str]) -> str:
        padded = [cell.rjust(width) if right else cell.ljust(width)
                  for cell, width, right in zip(cells, widths, numeric)]
        return "  ".join(padded).rstrip()

    lines = [line(list(names)), line(["-" * width for width in widths])]
    lines += [line([values[row] for values in columns]) for row in range(shown.num_rows)]
    left_out = total_rows - shown.num_rows
    if left_out:
        lines.append(f"({total_rows} rows, {left_out} not shown; raise --limit or write "
                     "them all with --csv or --parquet)")
    else:
        lines.append(f"({total_rows} {'row' if total_rows == 1 else 'rows'})")
    return "\n".join(lines) + "\n"


def _is_numeric(arrow_type: pa.DataType) -> bool:
    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_decimal(arrow_type))


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:.6g}"
    else:
        text = str(value)
    text = text.replace("\r", " ").replace("\n", " ").replace("\t", " ")
    if len(text) > MAX_CELL_CHARS:
        text = text[: MAX_CELL_CHARS - 3] + "..."
    return text


def query_run(run_dir: Path, sql: str, *, limit: int = DEFAULT_LIMIT,
              csv_path: Path | None = None, parquet_path: Path | None = None) -> str:
    """Run `sql` on the run at `run_dir`, write the requested files, and return the output.

    Without a file, the output is the aligned table of the first `limit` rows. With
    one, it is a line per written file.

    Raises:
        RunlensError: an invalid run directory, query or output file.
    """
    targets = [("--csv", csv_path, write_csv), ("--parquet", parquet_path, write_parquet)]
    targets = [(option, path, write) for option, path, write in targets if path is not None]
    for option, path, _ in targets:
        check_output_path(path, run_dir, option)
    if csv_path is not None and parquet_path is not None and (
            csv_path.resolve() == parquet_path.resolve()):
        raise RunlensError(f"--csv and --parquet both name {csv_path}; give each its own file")
    with Run.open(run_dir) as run:
        table, total_rows = run_query(run, sql, max_rows=None if targets else limit)
    if not targets:
        return render_table(table, total_rows)
    lines = []
    for option, path, write in targets:
        write(table, path)
        lines.append(f"Wrote {_count(table.num_rows, 'row')} and "
                     f"{_count(table.num_columns, 'column')} to {path}")
    return "\n".join(lines) + "\n"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
