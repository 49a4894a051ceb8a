"""Read metrics from a CSV file: a Lightning CSVLogger metrics.csv or a W&B history export.

Lightning's CSVLogger writes one row per `log_metrics` call, with a `step` column, an
`epoch` column on the rows that the Trainer logged, and an empty cell for each metric
that the call did not log, so a training row and a validation row of one step are
separate rows. A W&B history export (``run.history()`` written with pandas) has `_step`,
`_runtime` and `_timestamp` columns and metric columns named as logged, such as
``train/loss``. Every other column is a metric, and each non-empty cell is one value.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runlens.importers import ImportInputError, SeriesSet

LIGHTNING = "lightning-csv"
WANDB = "wandb-csv"
GENERIC = "csv"
KIND_LABELS = {LIGHTNING: "Lightning CSVLogger metrics", WANDB: "W&B history export",
               GENERIC: "CSV metrics"}
LIGHTNING_STEP = "step"
WANDB_STEP = "_step"
WANDB_TIME = "_timestamp"
ProgressCallback = Callable[[int], None]
# Progress is reported in steps of this many bytes, not once per line.
_PROGRESS_STEP = 1 << 20


@dataclass
class CsvSource:
    """A CSV file whose header was read: its kind and the columns with the step and time."""

    path: Path
    kind: str
    header: list[str]
    step_column: str
    time_column: str | None

    @property
    def label(self) -> str:
        return f"{self.path} ({KIND_LABELS[self.kind]})"

    @property
    def total_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


def open_csv(path: Path, step_column: str | None = None) -> CsvSource:
    """Read the header of `path` and tell its kind by its step column.

    `_step` makes it a W&B export (with `_timestamp` as the wall time), `step` a Lightning
    metrics.csv. `step_column` names another column that contains the optimizer step.

    Raises:
        ImportInputError: the file cannot be read, has no header, repeats a column name,
            or has no step column.
    """
    with _open(path) as handle:
        try:
            header = next(csv.reader(handle), None)
        except (csv.Error, UnicodeDecodeError) as error:
            raise _unreadable(path, error) from None
    if not header:
        raise ImportInputError(f"{path}: the file is empty; expected a header row such as "
                               "epoch,step,train_loss")
    duplicates = sorted({name for name in header if header.count(name) > 1 and name})
    if duplicates:
        raise ImportInputError(f"{path}: the header repeats the column {duplicates[0]!r}; "
                               "each column must have its own name")
    kind = WANDB if WANDB_STEP in header else LIGHTNING if LIGHTNING_STEP in header else GENERIC
    if step_column is None:
        if kind == GENERIC:
            raise ImportInputError(
                f"{path}: no '{LIGHTNING_STEP}' column (Lightning CSVLogger) or "
                f"'{WANDB_STEP}' column (W&B history export); pass --step-column NAME with "
                "the column that contains the optimizer step")
        step_column = WANDB_STEP if kind == WANDB else LIGHTNING_STEP
    elif step_column not in header:
        raise ImportInputError(f"--step-column {step_column}: no such column in {path}; its "
                               f"columns are {', '.join(repr(name) for name in header)}")
    time_column = WANDB_TIME if kind == WANDB and WANDB_TIME in header else None
    return CsvSource(path, kind, header, step_column, time_column)


def read_csv(source: CsvSource, on_progress: ProgressCallback | None = None
             ) -> tuple[SeriesSet, list[str]]:
    """Read every metric column of `source` into series by column name.

    Returns the series and the warnings: skipped rows and dropped columns.

    Raises:
        ImportInputError: the file cannot be read, a row other than the last has another
            number of cells than the header, or a step cell is not an integer.
    """
    series = SeriesSet()
    header = source.header
    step_index = header.index(source.step_column)
    time_index = header.index(source.time_column) if source.time_column else None
    metrics = []
    for index, name in enumerate(header):
        if index in (step_index, time_index) or not name:
            continue  # an unnamed column is the index that pandas' to_csv writes
        if source.kind == WANDB and name.startswith("_"):
            series.mark_not_imported(name, "a W&B field, not a metric")
            continue
        metrics.append((index, name))

    warnings: list[str] = []
    non_numeric: dict[str, tuple[int, str]] = {}
    skipped = {"no step": 0, "negative step": 0}
    with _open(source.path) as handle:
        lines = _counted_lines(handle, source.total_bytes, on_progress)
        try:
            for line, row, is_last in _rows(csv.reader(lines)):
                if not row:
                    continue
                if len(row) != len(header):
                    if is_last:
                        warnings.append(
                            f"{source.path} line {line}: the last row has {len(row)} cells "
                            f"and the header {len(header)}, as a writer that is still "
                            "running or was killed leaves it; it was skipped")
                        continue
                    raise ImportInputError(
                        f"{source.path} line {line}: {len(row)} cells, but the header has "
                        f"{len(header)} columns; the file is damaged or is not one CSV table")
                step = _step(row[step_index], source, line)
                if step is None or step < 0:
                    skipped["no step" if step is None else "negative step"] += 1
                    continue
                wall_time = _number(row[time_index]) if time_index is not None else None
                for index, name in metrics:
                    cell = row[index]
                    if not cell.strip() or name in non_numeric:
                        continue
                    value = _number(cell)
                    if value is None:
                        non_numeric[name] = (line, cell)
                    else:
                        series.add(name, step, value, wall_time)
        except (csv.Error, UnicodeDecodeError) as error:
            raise _unreadable(source.path, error) from None

    for name, (line, cell) in sorted(non_numeric.items()):
        reason = f"non-numeric cells, such as {cell[:40]!r} on line {line}"
        series.drop(name, reason)
        warnings.append(f"{source.path}: column {name!r} has {reason}; it was not imported")
    for what, count in skipped.items():
        if count:
            cell = "an empty" if what == "no step" else "a negative"
            warnings.append(f"{source.path}: {count} rows with {cell} "
                            f"{source.step_column!r} cell were skipped")
    return series, warnings


def _open(path: Path) -> IO[str]:
    # newline="" as the csv module requires; utf-8-sig drops a byte order mark.
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        what = "not found" if isinstance(error, FileNotFoundError) else \
            f"cannot read: {error.strerror or error}"
        raise ImportInputError(f"FILE {path}: {what}; pass a metrics.csv or a W&B history "
                               "CSV") from None


def _unreadable(path: Path, error: Exception) -> ImportInputError:
    if isinstance(error, UnicodeDecodeError):
        return ImportInputError(f"{path}: not UTF-8 text at byte {error.start}; pass a CSV file")
    return ImportInputError(f"{path}: not a readable CSV file: {error}")


def _counted_lines(handle: IO[str], total: int, on_progress: ProgressCallback | None
                   ) -> Iterator[str]:
    reported = pending = 0
    for line in handle:
        if on_progress is not None:
            pending += len(line.encode("utf-8"))
            if pending >= _PROGRESS_STEP:
                on_progress(pending)
                reported += pending
                pending = 0
        yield line
    if on_progress is not None:
        on_progress(max(total - reported, 0))


def _rows(reader: Iterator[list[str]]) -> Iterator[tuple[int, list[str], bool]]:
    """Yield (line number, row, whether it is the last row) of the rows after the header."""
    next(reader, None)
    previous = None
    for row in reader:
        if previous is not None:
            yield previous[0], previous[1], False
        previous = (reader.line_num, row)
    if previous is not None:
        yield previous[0], previous[1], True


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _step(cell: str, source: CsvSource, line: int) -> int | None:
    """Return the step of a cell, None for an empty cell; raise on a non-integer."""
    if not cell.strip():
        return None
    value = _number(cell)
    if value is None or not math.isfinite(value) or value != int(value) \
            or abs(value) >= 2**63:
        raise ImportInputError(
            f"{source.path} line {line}: the step column {source.step_column!r} contains "
            f"{cell!r}, not an integer; pass --step-column NAME with the column of the "
            "optimizer step")
    return int(value)
