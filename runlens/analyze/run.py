"""Open a run directory as a sandboxed DuckDB database for rule queries.

`Run.open` validates the directory, creates one view per table over its Parquet part
files, adds the `run_params` and `segments` views built from ``run.json``, and then
locks DuckDB so that rule queries can read the run directory and no other file.
The analyzer never writes into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from runlens import format as fmt
from runlens.analyze.errors import RunError, single_line
from runlens.analyze.run_json import read_run_json, unreadable_path_error

logger = logging.getLogger("runlens.analyze")

# Views that the analyzer builds from run.json, next to one view per table in fmt.TABLES.
RUN_PARAMS_VIEW = "run_params"
SEGMENTS_VIEW = "segments"
METADATA_VIEWS = (RUN_PARAMS_VIEW, SEGMENTS_VIEW)

# NOTE: 2 GB is an estimate of what the default rule pack needs on a 1M-step run, with
# headroom (a float64 column of 1M steps is 8 MB). Spilling to disk is off, so that
# DuckDB writes no temporary files, and a query over the limit fails instead.
DEFAULT_MEMORY_LIMIT = "2GB"


@dataclass(frozen=True)
class RunSummary:
    """Step range and shape of a run, for report headers."""

    path: str
    format_version: int
    steps: int
    first_step: int | None
    last_step: int | None
    segments: int
    ranks: int
    tables: tuple[str, ...]


@dataclass
class Run:
    """A validated run directory and the locked DuckDB connection over it.

    Attributes:
        path: absolute path of the run directory.
        meta: the parsed ``run.json``.
        parts: table name -> the Parquet part files that the table's view reads.
        warnings: problems that did not stop the analysis, such as skipped corrupt parts.
        connection: the DuckDB connection. Its configuration is locked and it can read
            only files under `path`.
        pages_verified: whether `open` read every data page of the parts (skip_corrupt).
    """

    path: Path
    meta: dict[str, Any]
    parts: dict[str, list[Path]]
    warnings: list[str]
    connection: duckdb.DuckDBPyConnection
    pages_verified: bool = False
    _non_null_counts: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        skip_corrupt: bool = False,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        threads: int | None = None,
    ) -> "Run":
        """Validate the run directory at `path` and open it for rule queries.

        Args:
            path: the run directory.
            skip_corrupt: read every part in full, data pages included, and leave out
                the parts that do not read, listing them in `warnings`. Without it, only
                each part's footer is read, which is cheap, and a corrupt footer raises.
            memory_limit: DuckDB's memory limit, such as ``"2GB"``.
            threads: DuckDB worker threads (default: the number of CPUs).

        Raises:
            RunError: the directory is missing, has no valid ``run.json``, was written
                by a newer format version, has a corrupt or unreadable part or table
                folder, or has no recorded steps.
        """
        run_dir = _resolve_run_dir(path)
        meta = read_run_json(run_dir)
        warnings: list[str] = []
        parts = _find_parts(run_dir, skip_corrupt, warnings)
        _check_has_steps(run_dir, parts)

        connection = duckdb.connect(":memory:")
        run = cls(run_dir, meta, parts, warnings, connection, pages_verified=skip_corrupt)
        try:
            try:
                create_table_views(connection, parts)
            except duckdb.Error as error:
                raise run.data_error(error) from None
            connection.register(RUN_PARAMS_VIEW, build_run_params(meta))
            connection.register(SEGMENTS_VIEW, build_segments(meta))
            _lock_sandbox(connection, parts, memory_limit, threads or os.cpu_count() or 1)
        except BaseException:
            connection.close()
            raise
        return run

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def tables(self) -> tuple[str, ...]:
        """Names of all views that rules may read: tables with parts, then metadata views."""
        return tuple(self.parts) + METADATA_VIEWS

    def columns(self, table: str) -> list[str]:
        """Return the column names of a view, or an empty list if the run lacks it."""
        if table not in self.tables:
            return []
        rows = self.connection.execute(f"DESCRIBE {_quote_name(table)}").fetchall()
        return [row[0] for row in rows]

    def non_null_counts(self, table: str, columns: Iterable[str]) -> dict[str, int]:
        """Return column -> rows of `table` where it is not NULL, in one scan per call.

        The columns must exist in the view. Counts are cached, because many rules
        require the same columns.

        Raises:
            RunError: DuckDB failed to read the table's parts.
        """
        columns = list(columns)
        uncached = [c for c in dict.fromkeys(columns) if (table, c) not in self._non_null_counts]
        if uncached:
            counts_sql = ", ".join(f"count({_quote_name(c)})" for c in uncached)
            sql = f"SELECT {counts_sql} FROM {_quote_name(table)}"
            counts = self._fetch_one(sql)
            self._non_null_counts.update(
                {(table, c): count for c, count in zip(uncached, counts)}
            )
        return {c: self._non_null_counts[(table, c)] for c in columns}

    def summary(self) -> RunSummary:
        """Count the steps, segments and ranks in the `scalars` table.

        Raises:
            RunError: DuckDB failed to read the `scalars` parts.
        """
        scalar_columns = self.columns("scalars")
        segment_sql = "count(DISTINCT segment)" if "segment" in scalar_columns else "NULL"
        rank_sql = "count(DISTINCT rank)" if "rank" in scalar_columns else "1"
        sql = (
            f"SELECT count(DISTINCT step), min(step), max(step), {segment_sql}, {rank_sql} "
            "FROM scalars"
        )
        steps, first, last, segments, ranks = self._fetch_one(sql)
        if segments is None:
            segments = max(len(self.meta.get("segments") or []), 1)
        return RunSummary(
            path=str(self.path),
            format_version=self.meta["format_version"],
            steps=steps,
            first_step=first,
            last_step=last,
            segments=segments,
            ranks=ranks,
            tables=tuple(self.parts),
        )


    def is_data_error(self, error: duckdb.Error) -> bool:
        """Return whether a DuckDB error came from reading the run's Parquet parts.

        DuckDB reports a corrupt page as an IO or invalid-input error that names the
        file, such as ``Failed to read file "...": Snappy decompression failure``.
        """
        return isinstance(error, duckdb.IOException) or self._part_named_in(str(error)) is not None

    def data_error(self, error: duckdb.Error) -> RunError:
        """Return the RunError for a DuckDB error raised while reading the run's data."""
        message = single_line(error)
        fix = "move it aside or rerun with --skip-corrupt"
        if self.pages_verified:
            # --skip-corrupt already read every page with pyarrow, so it would not help.
            fix = "move it aside"
        part = self._part_named_in(message)
        if part is not None:
            return RunError(
                f"{part}: cannot read Parquet data: {message}; the part may be corrupt; {fix}"
            )
        if self.is_data_error(error):
            return RunError(
                f"{self.path}: cannot read Parquet data: {message}; a part may be corrupt; {fix}"
            )
        return RunError(f"{self.path}: reading the run's data failed: {message}")

    def _part_named_in(self, message: str) -> Path | None:
        for files in self.parts.values():
            for file in files:
                if str(file) in message:
                    return file
        return None

    def _fetch_one(self, sql: str) -> tuple[Any, ...]:
        try:
            return self.connection.execute(sql).fetchall()[0]
        except duckdb.Error as error:
            raise self.data_error(error) from None


def _resolve_run_dir(path: str | os.PathLike[str]) -> Path:
    run_dir = Path(path).expanduser().resolve()
    try:
        if not run_dir.exists():
            raise RunError(f"{path}: run directory not found")
        if not run_dir.is_dir():
            raise RunError(
                f"{path}: is a file; pass the run directory that contains {fmt.RUN_FILE}"
            )
        has_run_file = (run_dir / fmt.RUN_FILE).exists()
    except OSError as error:
        raise unreadable_path_error(run_dir, "cannot list the run directory", error) from None
    if not has_run_file:
        raise RunError(
            f"{path}: not a runlens run directory (no {fmt.RUN_FILE}); "
            "pass the folder that the recorder created"
        )
    return run_dir


def _find_parts(run_dir: Path, skip_corrupt: bool, warnings: list[str]) -> dict[str, list[Path]]:
    """Return table -> readable part files, for the tables in the format that have parts.

    A table folder or rank folder that cannot be listed, and a part that cannot be
    opened, raise RunError: skipping them would drop data without a trace.
    """
    parts: dict[str, list[Path]] = {}
    for table in fmt.TABLES:
        candidates = _part_candidates(run_dir / table)
        readable = [file for file in candidates if _part_reads(file, skip_corrupt, warnings)]
        if readable:
            parts[table] = readable
    return parts


def _part_candidates(table_dir: Path) -> list[Path]:
    """Return the paths under ``<table>/rank-*/`` whose names are part names, sorted.

    Temporary parts (``.tmp-`` names) are left out. A path with a part name that is not
    a regular file is kept, so that opening it reports the problem.
    """
    if not os.path.lexists(table_dir):
        return []
    candidates = []
    for rank_dir in _list_folder(table_dir):
        if not (rank_dir.name.startswith("rank-") and rank_dir.is_dir()):
            continue
        candidates += [
            file
            for file in _list_folder(rank_dir)
            if file.name.startswith(fmt.PART_PREFIX) and file.name.endswith(fmt.PART_SUFFIX)
        ]
    return sorted(candidates)


def _list_folder(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise unreadable_path_error(folder, "cannot list table folder", error) from None


def _part_reads(file: Path, skip_corrupt: bool, warnings: list[str]) -> bool:
    """Return whether a part reads: its footer, or with `skip_corrupt` every data page.

    An OS error on opening (permission denied, a folder in place of the file) raises
    whether or not `skip_corrupt` is set, because the part is not corrupt.
    """
    try:
        handle = open(file, "rb")
    except OSError as error:
        raise unreadable_path_error(file, "cannot read", error) from None
    with handle:
        try:
            if skip_corrupt:
                pq.read_table(handle)
            else:
                pq.read_metadata(handle)
        except (OSError, pa.ArrowException) as error:
            # pyarrow raises OSError for corrupt data too, such as bad snappy pages.
            return _corrupt_part(file, single_line(error), skip_corrupt, warnings)
    return True


def _corrupt_part(file: Path, problem: str, skip_corrupt: bool, warnings: list[str]) -> bool:
    if not skip_corrupt:
        raise RunError(
            f"{file}: corrupt Parquet part ({problem}); move the file out of the run "
            "directory, or pass --skip-corrupt to analyze the run without it"
        )
    warnings.append(f"skipped corrupt Parquet part {file}: {problem}")
    logger.warning("skipped corrupt Parquet part %s: %s", file, problem)
    return False


def _check_has_steps(run_dir: Path, parts: dict[str, list[Path]]) -> None:
    rows = sum(pq.read_metadata(file).num_rows for file in parts.get("scalars", []))
    if rows == 0:
        raise RunError(
            f"{run_dir}: run has no recorded steps (no rows in the 'scalars' table); "
            "the recorder writes rows when it flushes, so a run stopped before its first "
            "flush has none"
        )


def create_table_views(
    connection: duckdb.DuckDBPyConnection,
    parts: dict[str, list[Path]],
    extra_columns: dict[str, Iterable[str]] | None = None,
) -> None:
    """Create one view per table of the format, whether or not the run has parts for it.

    Every view has every column that the format defines, NULL where the parts lack it, so
    a rule that reads an optional column (Adam's `state_step` in an SGD run) still binds.
    Whether a rule's signals are really present is decided by its `requires`, which
    counts non-NULL values. Tables without parts are empty views.

    `extra_columns` adds columns of DuckDB's NULL type, which binds in any expression, to
    the views of tables without parts. The rule loader checks queries against these empty
    views and adds the columns that a rule requires beyond the format, such as user
    scalars.
    """
    # NOTE: part files may differ in their columns, so every view reads an explicit file
    # list with union_by_name. A glob would fail on the first schema change.
    for table, files in parts.items():
        file_list = ", ".join(_quote_literal(str(file)) for file in files)
        raw = f"read_parquet([{file_list}], union_by_name = true)"
        present = {row[0] for row in connection.execute(f"DESCRIBE SELECT * FROM {raw}").fetchall()}
        absent = [
            f"CAST(NULL AS {_duckdb_type(kind)}) AS {_quote_name(column)}"
            for column, kind in fmt.TABLES.get(table, {}).items()
            if column not in present
        ]
        select = ", ".join(["*", *absent])
        connection.execute(f"CREATE VIEW {_quote_name(table)} AS SELECT {select} FROM {raw}")
    for table, columns in fmt.TABLES.items():
        if table in parts:
            continue
        typed = [
            f"CAST(NULL AS {_duckdb_type(kind)}) AS {_quote_name(column)}"
            for column, kind in columns.items()
        ]
        extra = (extra_columns or {}).get(table, ())
        untyped = [f"NULL AS {_quote_name(c)}" for c in dict.fromkeys(extra) if c not in columns]
        select = ", ".join(typed + untyped)
        connection.execute(f"CREATE VIEW {_quote_name(table)} AS SELECT {select} WHERE false")


_DUCKDB_TYPES = {"int64": "BIGINT", "int32": "INTEGER", "float64": "DOUBLE", "bool": "BOOLEAN",
                 "string": "VARCHAR"}


def _duckdb_type(arrow_type: str) -> str:
    return _DUCKDB_TYPES[arrow_type]


def _lock_sandbox(
    connection: duckdb.DuckDBPyConnection,
    parts: dict[str, list[Path]],
    memory_limit: str,
    threads: int,
) -> None:
    """Limit resources, allow reads of the run's part files only, and lock the configuration.

    Only the exact part files that the views read are allowed, so no path in the run
    directory, existing or new, is writable through DuckDB; the loader's single-SELECT
    check rejects COPY and other writing statements before that.
    """
    connection.execute("SET memory_limit = ?", [memory_limit])
    connection.execute(f"SET threads = {int(threads)}")
    connection.execute("SET temp_directory = ''")
    connection.execute("SET autoinstall_known_extensions = false")
    allowed = ", ".join(_quote_literal(str(file)) for files in parts.values() for file in files)
    connection.execute(f"SET allowed_paths = [{allowed}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")


def build_run_params(meta: dict[str, Any]) -> pa.Table:
    """Build one row per parameter from run.json's params and optimizer param groups.

    Columns: name, kind, module_type, dtype, shape, numel, requires_grad, group (the
    index of the param group that contains the parameter, NULL if none), optimizer_class
    (the optimizer's class name, the same on every row), lr, weight_decay,
    and one column for every other hyperparameter that a param group sets (betas, eps,
    momentum, ...). A parameter that only a param group names gets NULL param fields.
    """
    params = [p for p in meta.get("params") or [] if isinstance(p, dict) and "name" in p]
    by_name = {str(p["name"]): p for p in params}
    groups = _param_groups(meta)

    names = list(by_name)
    group_of: dict[str, int] = {}
    for index, (members, _) in groups.items():
        for ref in members:
            # A group lists its parameters by name, or by position in run.json's params.
            is_position = isinstance(ref, int) and not isinstance(ref, bool)
            name = names[ref] if is_position and 0 <= ref < len(names) else str(ref)
            group_of.setdefault(name, index)
    names += [name for name in group_of if name not in by_name]

    columns = _param_columns(names, by_name)
    columns["group"] = pa.array([group_of.get(n) for n in names], pa.int64())
    optimizer = meta.get("optimizer") or {}
    optimizer_class = optimizer.get("class") if isinstance(optimizer, dict) else None
    columns["optimizer_class"] = pa.array([optimizer_class] * len(names), pa.string())
    keys = ["lr", "weight_decay"]
    keys += sorted({key for _, hyper in groups.values() for key in hyper} - set(keys))
    for key in keys:
        values = [groups[group_of[n]][1].get(key) if n in group_of else None for n in names]
        arrow_type = pa.float64() if key in ("lr", "weight_decay") else None
        columns[key] = _arrow_column(values, arrow_type)
    return pa.table(columns)


def _param_groups(meta: dict[str, Any]) -> dict[int, tuple[list[Any], dict[str, Any]]]:
    """Return group index -> (parameter references, hyperparameters) from run.json.

    The recorder writes each group as {index, params, hyperparameters}. A group written
    flat, with hyperparameters beside `params` as in torch's state_dict, reads too.
    Hyperparameters that run.json stores as "inf", "-inf" or "nan" become floats.
    """
    optimizer = meta.get("optimizer") or {}
    groups = {}
    for position, group in enumerate(optimizer.get("param_groups") or []):
        if not isinstance(group, dict):
            continue
        hyper = group.get("hyperparameters")
        if not isinstance(hyper, dict):
            hyper = {k: v for k, v in group.items() if k not in ("params", "index")}
        hyper = {k: _nonfinite_to_float(v) for k, v in hyper.items()}
        index = group.get("index", position)
        groups[index if isinstance(index, int) else position] = (group.get("params") or [], hyper)
    return groups


def _nonfinite_to_float(value: Any) -> Any:
    return float(value) if value in ("inf", "-inf", "nan") else value


def _param_columns(names: list[str], by_name: dict[str, dict[str, Any]]) -> dict[str, pa.Array]:
    def field_values(key: str) -> list[Any]:
        return [by_name.get(name, {}).get(key) for name in names]

    columns = {"name": pa.array(names, pa.string())}
    for key in ("kind", "module_type", "dtype"):
        columns[key] = _arrow_column(field_values(key), pa.string())
    columns["shape"] = _arrow_column(field_values("shape"), pa.list_(pa.int64()))
    columns["numel"] = pa.array([_numel(by_name.get(n, {})) for n in names], pa.int64())
    columns["requires_grad"] = _arrow_column(field_values("requires_grad"), pa.bool_())
    return columns


def _numel(param: dict[str, Any]) -> int | None:
    numel = param.get("numel")
    if isinstance(numel, int) and not isinstance(numel, bool):
        return numel
    shape = param.get("shape")
    if isinstance(shape, list) and all(isinstance(size, int) for size in shape):
        return math.prod(shape)
    return None


def build_segments(meta: dict[str, Any]) -> pa.Table:
    """Build one row per segment record in run.json, with a `segment` index column.

    Fields become typed columns: nested objects (such as what a resume restored) become
    structs. A field whose values differ in type across segments becomes JSON text.
    """
    records = [r for r in meta.get("segments") or [] if isinstance(r, dict)]
    columns: dict[str, pa.Array] = {
        "segment": pa.array(
            [r.get("segment", index) for index, r in enumerate(records)], pa.int64()
        )
    }
    keys = sorted({k for r in records for k in r} - {"segment"})
    for key in keys:
        columns[key] = _arrow_column([r.get(key) for r in records], None)
    return pa.table(columns)


def _arrow_column(values: list[Any], arrow_type: pa.DataType | None) -> pa.Array:
    """Type a column of JSON values, falling back to JSON text when the types are mixed."""
    try:
        return pa.array(values, arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
