"""Check a rule's query against empty views, so that rule files fail when they load.

The check binds the query, with the rule's default parameter values, against views that
have every column of the run format and no rows, and reads the result's column names
from DuckDB without running the query. An unknown table or column, a missing step
column, or a message field that is no result column would fail on every run, so the
loader reports them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import duckdb

from runlens import format as fmt
from runlens.analyze.errors import single_line
from runlens.analyze.messages import template_fields
from runlens.analyze.run import (
    RUN_PARAMS_VIEW,
    SEGMENTS_VIEW,
    build_run_params,
    create_table_views,
)

STEP_COLUMNS = ("step_start", "step_end")

# The fields that the recorder writes into each segment record of run.json, typed as
# `build_segments` types them. `optimizer` is a struct whose fields vary, so it has
# DuckDB's NULL type (None here), which binds in any expression.
SEGMENT_FIELDS = {
    "segment": "BIGINT",
    "start_step": "BIGINT",
    "started": "VARCHAR",
    "argv": "VARCHAR[]",
    "optimizer": None,
}


def check_result_columns(columns: Sequence[str], error_type: type[Exception]) -> None:
    """Raise `error_type` when the step columns are absent or a column name repeats."""
    absent = [name for name in STEP_COLUMNS if name not in columns]
    if absent:
        raise error_type(
            f"query result lacks column {', '.join(absent)}; every row needs step_start "
            f"and step_end (NULL for a run-level finding); columns: {', '.join(columns)}"
        )
    repeated = sorted({name for name in columns if list(columns).count(name) > 1})
    if repeated:
        raise error_type(
            f"query result has column {', '.join(repeated)} more than once; "
            "give each column its own alias"
        )


def query_result_problems(
    query: str,
    params: Mapping[str, Any],
    requires: Mapping[str, Sequence[str]],
    message: str,
) -> list[tuple[str, str]]:
    """Return (field, problem) pairs for a query and message that fail on every run.

    `params` are the values to bind, and `requires` adds the columns that the rule
    declares beyond the format (user scalars, hyperparameters) to the empty views.
    A query that reads a file is left to the run's sandbox, because whether the file
    is allowed depends on the run directory.
    """
    cursor = _empty_run_connection(_extra_columns(requires)).cursor()
    try:
        columns = cursor.sql(query, params=dict(params)).columns
    except duckdb.PermissionException:
        return []
    except duckdb.Error as error:
        return [("query", _query_error_text(error))]
    finally:
        cursor.close()

    try:
        check_result_columns(columns, ValueError)
    except ValueError as error:
        return [("query", str(error))]
    listed = ", ".join(columns)
    return [
        ("message", f"field {{{name}}} is not a column of the query result; columns: {listed}")
        for name in template_fields(message)
        if name not in columns
    ]


def _query_error_text(error: duckdb.Error) -> str:
    text = single_line(error)
    if isinstance(error, duckdb.BinderException) and "Referenced column" in text:
        text += (
            "; list user scalars and run.json fields that the query reads in 'requires', "
            "so that the check knows them"
        )
    return text


ExtraColumns = tuple[tuple[str, tuple[str, ...]], ...]


def _extra_columns(requires: Mapping[str, Sequence[str]]) -> ExtraColumns:
    """Return (view, columns) for the required columns that the empty views lack."""
    known = {table: set(columns) for table, columns in fmt.TABLES.items()}
    known[RUN_PARAMS_VIEW] = set(build_run_params({}).column_names)
    known[SEGMENTS_VIEW] = set(SEGMENT_FIELDS)
    extra = {
        view: tuple(sorted(set(columns) - known.get(view, set())))
        for view, columns in requires.items()
    }
    return tuple(sorted((view, columns) for view, columns in extra.items() if columns))


# Most rules read only columns of the format, so they share one database. Opening one
# with its views takes tens of milliseconds, which adds up over a rule pack.
@lru_cache(maxsize=32)
def _empty_run_connection(extra_columns: ExtraColumns) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB with the run's views, empty, and no file access."""
    requires = dict(extra_columns)
    connection = duckdb.connect(":memory:")
    try:
        create_table_views(connection, {}, extra_columns=requires)
        # A registered Arrow table is visible to its own connection only, not to the
        # cursors that the checks use, so its empty copy becomes a table.
        run_params = build_run_params({})
        connection.register("run_params_arrow", run_params)
        connection.execute("CREATE TABLE empty_run_params AS SELECT * FROM run_params_arrow")
        connection.unregister("run_params_arrow")
        _create_view(connection, RUN_PARAMS_VIEW, ["*"], "FROM empty_run_params",
                     set(run_params.column_names), requires)
        fields = [
            _null_column(name) if kind is None else f"CAST(NULL AS {kind}) AS {_quote_name(name)}"
            for name, kind in SEGMENT_FIELDS.items()
        ]
        _create_view(connection, SEGMENTS_VIEW, fields, "", set(SEGMENT_FIELDS), requires)
        connection.execute("SET autoinstall_known_extensions = false")
        connection.execute("SET enable_external_access = false")
        connection.execute("SET lock_configuration = true")
    except BaseException:
        connection.close()
        raise
    return connection


def _create_view(
    connection: duckdb.DuckDBPyConnection,
    view: str,
    select: list[str],
    source: str,
    present: set[str],
    requires: Mapping[str, Sequence[str]],
) -> None:
    """Create an empty view, with a NULL column for each required column it lacks."""
    extra = [_null_column(column) for column in requires.get(view, ()) if column not in present]
    columns = ", ".join(select + extra)
    connection.execute(f"CREATE VIEW {_quote_name(view)} AS SELECT {columns} {source} WHERE false")


def _null_column(name: str) -> str:
    return f"NULL AS {_quote_name(name)}"


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
