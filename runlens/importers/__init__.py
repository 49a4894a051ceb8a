"""Import runs that other loggers wrote (TensorBoard event files, CSV metrics) as run directories.

An importer reads its source into a `SeriesSet`: one series of (step, value) points per
source name, a TensorBoard tag or a CSV column. `import_series` then decides where each
series goes (`resolve_mapping`: the default mapping of common names, `--map` overrides,
and user scalar columns for everything else), builds the tables with the format's column
types and writes a new run directory. ``docs/import.md`` lists the default mapping.

This package must not import torch: the analyzer's install has no torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from runlens import format as fmt
from runlens.analyze.errors import RunlensError


class ImportInputError(RunlensError):
    """Bad input to an import: an unreadable or corrupt source, a bad --map, an existing RUN_DIR."""


# -- series ------------------------------------------------------------------------------


class SeriesSet:
    """Scalar series by source name, with at most one value per step.

    A step that a name has twice keeps the value with the later wall time, or the one
    added later when the wall times are equal or unknown (a CSV without a time column).
    """

    def __init__(self) -> None:
        # name -> step -> (value, wall time in seconds since the epoch, or None)
        self.points: dict[str, dict[int, tuple[float, float | None]]] = {}
        # name -> values that another value of the same step replaced or lost to
        self.replaced: dict[str, int] = {}
        # name -> why it was not imported (a histogram, an image, text, non-numeric cells)
        self.not_imported: dict[str, str] = {}

    def add(self, name: str, step: int, value: float, wall_time: float | None) -> None:
        series = self.points.get(name)
        if series is None:
            series = self.points[name] = {}
            self.not_imported.pop(name, None)
        existing = series.get(step)
        if existing is not None:
            self.replaced[name] = self.replaced.get(name, 0) + 1
            if wall_time is not None and existing[1] is not None and wall_time < existing[1]:
                return
        series[step] = (value, wall_time)

    def mark_not_imported(self, name: str, reason: str) -> None:
        if name not in self.points:
            self.not_imported.setdefault(name, reason)

    def drop(self, name: str, reason: str) -> None:
        """Remove a series that turned out unusable, such as a CSV column with text cells."""
        self.points.pop(name, None)
        self.replaced.pop(name, None)
        self.not_imported[name] = reason

    def counts(self) -> dict[str, int]:
        return {name: len(series) for name, series in self.points.items()}


# -- signals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signal:
    """A place in a run directory that one source series fills: a table and its value column.

    `group` is the param group of a `param_groups` signal, `split` and `metric` name an
    `evals` signal, and `split` and `class_id` name a `classes` signal.
    """

    table: str
    column: str
    group: int | None = None
    split: str | None = None
    metric: str | None = None
    class_id: int | None = None

    def __str__(self) -> str:
        """Return the signal in the syntax that --map accepts."""
        if self.table == "param_groups":
            suffix = "" if self.group == 0 else f".{self.group}"
            return f"param_groups.{self.column}{suffix}"
        if self.table == "evals":
            return f"evals.{self.split}.{self.metric}"
        if self.table == "classes":
            return f"classes.{self.split}.{self.class_id}.{self.column}"
        return f"{self.table}.{self.column}"


def scalar_signal(column: str) -> Signal:
    return Signal("scalars", column)


# Built-in float columns of `scalars` that --map may fill. `time` comes from the source's
# wall times, and the integer and bool columns have no counterpart in other loggers.
MAPPABLE_SCALARS = tuple(
    column for column, kind in fmt.TABLES["scalars"].items()
    if kind == "float64" and column != "time"
)
PARAM_GROUP_COLUMNS = ("lr", "weight_decay")
CLASS_COLUMNS = ("recall", "precision")
SKIP = "skip"
_COLUMN_NAME = re.compile(r"[a-z_][a-z0-9_]*")
SIGNAL_FORMS = ("scalars.COLUMN, param_groups.lr[.GROUP], param_groups.weight_decay[.GROUP], "
                "evals.SPLIT.METRIC, classes.SPLIT.CLASS_ID.recall, "
                "classes.SPLIT.CLASS_ID.precision or skip")


def parse_signal(text: str) -> Signal | None:
    """Parse the SIGNAL of ``--map NAME=SIGNAL``; return None for ``skip``.

    Raises:
        ValueError: the text is no signal. The message states why, without the option.
    """
    if text == SKIP:
        return None
    table, _, rest = text.partition(".")
    if table == "scalars":
        return _parse_scalar_column(rest)
    if table == "param_groups":
        column, _, group_text = rest.partition(".")
        if column not in PARAM_GROUP_COLUMNS:
            raise ValueError(f"param_groups takes {' or '.join(PARAM_GROUP_COLUMNS)}, "
                             f"got {column!r}")
        return Signal("param_groups", column, group=_non_negative(group_text or "0", "GROUP"))
    if table == "evals":
        split, _, metric = rest.partition(".")
        if not split or not metric:
            raise ValueError("evals takes a split and a metric, as in evals.val.accuracy")
        return Signal("evals", "value", split=split, metric=metric)
    if table == "classes":
        split, class_text, column = (rest.split(".") + ["", "", ""])[:3]
        if not split or column not in CLASS_COLUMNS or rest.count(".") != 2:
            raise ValueError("classes takes a split, a class id and recall or precision, "
                             "as in classes.val.3.recall")
        return Signal("classes", column, split=split,
                      class_id=_non_negative(class_text, "CLASS_ID"))
    raise ValueError(f"expected one of {SIGNAL_FORMS}")


def _parse_scalar_column(column: str) -> Signal:
    if column in MAPPABLE_SCALARS:
        return scalar_signal(column)
    if column in fmt.RESERVED_SCALARS:
        raise ValueError(f"scalars.{column} is a column that the import fills itself or "
                         f"that takes no float; use one of {', '.join(MAPPABLE_SCALARS)} "
                         "or a new column name")
    if not _COLUMN_NAME.fullmatch(column):
        raise ValueError(f"scalars takes a column name of lowercase letters, digits and "
                         f"'_', such as scalars.{sanitize_column(column)}")
    return scalar_signal(column)


def _non_negative(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} must be a non-negative integer, got {text!r}")
    return int(text)


def parse_map_options(options: Iterable[str], option: str = "--map") -> dict[str, Signal | None]:
    """Parse ``NAME=SIGNAL`` values into NAME -> signal (None for skip).

    The last ``=`` separates NAME from SIGNAL, because a TensorBoard tag may contain
    ``=`` and a signal never does.

    Raises:
        ImportInputError: a value has no ``=``, an empty NAME, a bad SIGNAL, or repeats
            a NAME.
    """
    overrides: dict[str, Signal | None] = {}
    for value in options:
        name, separator, signal_text = value.rpartition("=")
        if not separator or not name:
            raise ImportInputError(f"{option} {value}: expected NAME=SIGNAL, as in "
                                   f"{option} 'train/loss=scalars.loss'")
        try:
            signal = parse_signal(signal_text)
        except ValueError as error:
            raise ImportInputError(f"{option} {value}: invalid signal {signal_text!r}: "
                                   f"{error}") from None
        if name in overrides:
            raise ImportInputError(f"{option} {value}: {name!r} is mapped twice; keep one "
                                   f"{option} per name")
        overrides[name] = signal
    return overrides


# -- the default mapping -----------------------------------------------------------------

# Split words, as a tag's first or last `/` part or a name's `<split>_` prefix, and the
# split that `evals` and `classes` store. Hugging Face's Trainer logs `eval_*`, which is
# the validation split.
SPLIT_WORDS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "eval": "val", "evaluation": "val",
    "test": "test",
}
LOSS_NAMES = frozenset({"loss", "train_loss", "training_loss"})
GRAD_NORM_NAMES = frozenset({"grad_norm", "gradient_norm", "grad_norm_total",
                             # lightning.pytorch.utilities.grad_norm(..., norm_type=2)
                             "grad_2.0_norm_total", "grad_2_norm_total"})
# Names under an evaluation split that are timings or counters, not metrics (the
# `eval_runtime` and `eval_samples_per_second` of Hugging Face's Trainer).
NOT_METRICS = frozenset({"runtime", "samples_per_second", "steps_per_second", "epoch",
                         "step", "global_step"})
METRIC_ALIASES = {"acc": "accuracy"}
_SPLIT_PREFIX = re.compile(r"(val|valid|validation|eval|evaluation|test)_(.+)")
# `lr`, `learning_rate`, and Lightning's LearningRateMonitor names: `lr-<Optimizer>`, with
# `/pg<N>` (counted from 1) for several param groups, and `-momentum` or
# `-weight_decay` for its log_momentum and log_weight_decay options.
_LR = re.compile(r"(?:lr|learning_rate)(?:/pg(?P<pg>[1-9][0-9]*))?")
_LIGHTNING_LR = re.compile(
    r"lr-[^/]+?(?:/pg(?P<pg>[1-9][0-9]*))?(?P<suffix>-momentum|-weight_decay)?")
_PER_CLASS = re.compile(r"(?P<column>recall|precision)[/_](?:class[_-]?)?(?P<class_id>[0-9]+)")


def default_signal(name: str) -> Signal | None:
    """Return the signal that a source name maps to by default, or None for a user scalar.

    Matching ignores case. A first or last ``/`` part that is a split word (``train/``,
    ``val/``, ``/test``) or a ``val_``-style prefix sets the split, the rest is matched
    against the known names, and ``docs/import.md`` has the table.
    """
    parts = [part for part in name.strip().lower().split("/") if part]
    if not parts:
        return None
    split = None
    if len(parts) > 1 and parts[0] in SPLIT_WORDS:
        split = SPLIT_WORDS[parts.pop(0)]
    elif len(parts) > 1 and parts[-1] in SPLIT_WORDS:
        split = SPLIT_WORDS[parts.pop()]
    rest = "/".join(parts)
    if split is None:
        prefixed = _SPLIT_PREFIX.fullmatch(rest)
        if prefixed:
            split, rest = SPLIT_WORDS[prefixed[1]], prefixed[2]
    if split in (None, "train"):
        return _training_signal(rest, split)
    return _evaluation_signal(rest, split)


def _training_signal(rest: str, split: str | None) -> Signal | None:
    # Lightning logs `self.log(name, on_step=True, on_epoch=True)` as `<name>_step`.
    if rest.endswith("_step") and rest[:-len("_step")] in LOSS_NAMES:
        rest = rest[:-len("_step")]
    if rest in LOSS_NAMES:
        return scalar_signal("loss")
    if rest in GRAD_NORM_NAMES:
        return scalar_signal("grad_norm")
    per_class = _PER_CLASS.fullmatch(rest)
    if per_class:
        return _class_signal(per_class, split or "val")
    rate = _LR.fullmatch(rest) or _LIGHTNING_LR.fullmatch(rest)
    if rate is None:
        return None
    suffix = rate.groupdict().get("suffix")
    if suffix == "-momentum":
        return None
    group = int(rate["pg"]) - 1 if rate["pg"] else 0
    column = "weight_decay" if suffix == "-weight_decay" else "lr"
    return Signal("param_groups", column, group=group)


def _evaluation_signal(rest: str, split: str) -> Signal | None:
    # Lightning logs `self.log(name, on_step=True, on_epoch=True)` as `<name>_epoch`.
    if rest.endswith("_epoch"):
        rest = rest[:-len("_epoch")]
    per_class = _PER_CLASS.fullmatch(rest)
    if per_class:
        return _class_signal(per_class, split)
    if not rest or rest in NOT_METRICS:
        return None
    metric = METRIC_ALIASES.get(rest, rest)
    return Signal("evals", "value", split=split, metric=metric)


def _class_signal(match: re.Match[str], split: str) -> Signal:
    return Signal("classes", match["column"], split=split, class_id=int(match["class_id"]))


def sanitize_column(name: str) -> str:
    """Turn a source name into a column name: lowercase, `_` for every other character."""
    column = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")
    column = re.sub(r"__+", "_", column)
    return column or "value"


# -- resolving the mapping ---------------------------------------------------------------


@dataclass
class MappedSeries:
    """The destination of one source series, and its origin.

    `origin` is ``default`` (the default mapping), ``--map``, ``user scalar`` or ``skip``.
    A user scalar matched no default, or matched a signal that another series took, which
    `note` names.
    """

    name: str
    signal: Signal | None
    origin: str
    values: int
    note: str = ""


def resolve_mapping(counts: Mapping[str, int], overrides: Mapping[str, Signal | None],
                    source: str, noun: str, option: str = "--map") -> list[MappedSeries]:
    """Decide the signal of every series: overrides first, then defaults, then user scalars.

    When several series map to one signal by default, the one with the most values keeps
    it (the first name in sorted order on a tie) and the others become user scalars.

    Args:
        counts: source name -> number of values.
        overrides: the parsed --map options, by the name that the user wrote. A name
            matches exactly, or else without regard to case when only one name does.
        source: the source, for error messages, such as the log directory.
        noun: what a source name is, ``tag`` or ``column``.

    Raises:
        ImportInputError: an override names no series of the source, or two overrides
            map to one signal.
    """
    explicit = _match_overrides(counts, overrides, source, noun, option)
    claimed: dict[Signal, str] = {}
    for name, signal in explicit.items():
        if signal is None:
            continue
        if signal in claimed:
            raise ImportInputError(
                f"{option}: {claimed[signal]!r} and {name!r} both map to {signal}; map one "
                "of them elsewhere or to skip")
        claimed[signal] = name

    result = [MappedSeries(name, signal, "--map" if signal else SKIP, counts[name])
              for name, signal in explicit.items()]
    candidates: dict[Signal, list[str]] = {}
    unmatched: list[tuple[str, str]] = []
    for name in sorted(counts):
        if name in explicit:
            continue
        signal = default_signal(name)
        if signal is None:
            unmatched.append((name, ""))
        elif signal in claimed:
            unmatched.append((name, f"matched {signal}, which {option} gives to "
                                    f"{claimed[signal]!r}"))
        else:
            candidates.setdefault(signal, []).append(name)
    for signal, names in candidates.items():
        # max() returns the first of equal counts, and `names` is in sorted order.
        winner = max(names, key=lambda name: counts[name])
        result.append(MappedSeries(winner, signal, "default", counts[winner]))
        for name in names:
            if name != winner:
                unmatched.append((name, f"matched {signal}, which {winner!r} fills with more "
                                        f"values; use {option} to choose"))

    used_columns = set(fmt.RESERVED_SCALARS)
    used_columns |= {s.column for s in claimed if s.table == "scalars"}
    for name, note in sorted(unmatched):
        column = _unique_column(sanitize_column(name), used_columns)
        used_columns.add(column)
        result.append(MappedSeries(name, scalar_signal(column), "user scalar", counts[name],
                                   note))
    return result


def _match_overrides(counts: Mapping[str, int], overrides: Mapping[str, Signal | None],
                     source: str, noun: str, option: str) -> dict[str, Signal | None]:
    by_lower: dict[str, list[str]] = {}
    for name in counts:
        by_lower.setdefault(name.lower(), []).append(name)
    matched: dict[str, Signal | None] = {}
    for written, signal in overrides.items():
        if written in counts:
            name = written
        elif len(by_lower.get(written.lower(), [])) == 1:
            name = by_lower[written.lower()][0]
        else:
            available = ", ".join(repr(n) for n in sorted(counts)[:20])
            more = f" and {len(counts) - 20} more" if len(counts) > 20 else ""
            raise ImportInputError(
                f"{option} {written}=...: no {noun} {written!r} in {source}; its scalar "
                f"{noun}s are {available}{more}")
        if name in matched:
            raise ImportInputError(f"{option}: {name!r} is mapped twice (as {written!r} "
                                   "and in another case); keep one")
        matched[name] = signal
    return matched


def _unique_column(column: str, used: set[str]) -> str:
    if column in fmt.RESERVED_SCALARS:
        column = f"user_{column}"
    candidate, number = column, 2
    while candidate in used:
        candidate = f"{column}_{number}"
        number += 1
    return candidate


# -- building the tables -----------------------------------------------------------------


def build_tables(series: SeriesSet, mapping: list[MappedSeries]) -> dict[str, pa.Table]:
    """Build the rows of every table that the mapped series fill, sorted by their keys.

    `scalars` has one row per step that any imported value has, so that the run's step
    range covers its evaluations too, with `time` the latest wall time of those values.
    The recorder's `nonfinite_loss` is derived from an imported loss.
    """
    times: dict[int, float | None] = {}
    scalars: dict[int, dict[str, float]] = {}
    groups: dict[tuple[int, int], dict[str, float]] = {}
    evals: dict[tuple[int, str, str], dict[str, float]] = {}
    classes: dict[tuple[int, str, int], dict[str, float]] = {}
    for entry in mapping:
        signal = entry.signal
        if signal is None:
            continue
        for step, (value, wall_time) in series.points[entry.name].items():
            if step not in times or (wall_time is not None
                                     and (times[step] is None or wall_time > times[step])):
                times[step] = wall_time
            if signal.table == "scalars":
                row = scalars.setdefault(step, {})
            elif signal.table == "param_groups":
                row = groups.setdefault((step, signal.group), {})
            elif signal.table == "evals":
                row = evals.setdefault((step, signal.split, signal.metric), {})
            else:
                row = classes.setdefault((step, signal.split, signal.class_id), {})
            row[signal.column] = value

    tables: dict[str, pa.Table] = {}
    if not times:
        return tables
    steps = sorted(times)
    scalar_columns: dict[str, list[Any]] = {
        "step": steps, "time": [times[step] for step in steps]}
    names = sorted({column for row in scalars.values() for column in row})
    for column in names:
        scalar_columns[column] = [scalars.get(step, {}).get(column) for step in steps]
    if "loss" in scalar_columns:
        scalar_columns["nonfinite_loss"] = [
            None if loss is None else int(not math.isfinite(loss))
            for loss in scalar_columns["loss"]]
    tables["scalars"] = _arrow_table("scalars", scalar_columns)
    key_names = {"param_groups": ("step", "group"), "evals": ("step", "split", "metric"),
                 "classes": ("step", "split", "class_id")}
    for table, rows in (("param_groups", groups), ("evals", evals), ("classes", classes)):
        if rows:
            tables[table] = _arrow_table(table, _columns_of(rows, key_names[table]))
    return tables


def _columns_of(rows: dict[tuple, dict[str, float]], keys: tuple[str, ...]) -> dict[str, list]:
    ordered = sorted(rows)
    columns: dict[str, list[Any]] = {key: [row_key[i] for row_key in ordered]
                                     for i, key in enumerate(keys)}
    for column in sorted({name for row in rows.values() for name in row}):
        columns[column] = [rows[row_key].get(column) for row_key in ordered]
    return columns


def _arrow_table(table: str, columns: dict[str, list[Any]]) -> pa.Table:
    """Build a table with the format's column order and types; user columns are float64.

    A column without any value is left out, as the recorder leaves it out of a part.
    """
    known = fmt.TABLES[table]
    row_count = len(columns["step"])
    columns = {**columns, "segment": [0] * row_count, "rank": [0] * row_count}
    present = {name: values for name, values in columns.items()
               if any(value is not None for value in values)}
    ordered = [name for name in known if name in present]
    ordered += sorted(name for name in present if name not in known)
    arrays = {name: pa.array(present[name], type=pa.type_for_alias(known.get(name, "float64")))
              for name in ordered}
    return pa.table(arrays)


# -- the import --------------------------------------------------------------------------


@dataclass
class ImportReport:
    """The outcome of an import, for the summary that the command prints."""

    source: str
    run_dir: Path
    noun: str
    mapping: list[MappedSeries]
    row_counts: dict[str, int]
    first_step: int
    last_step: int
    steps: int
    # name -> values that a later value of the same step replaced, or that lost to an
    # earlier value with a later wall time
    replaced: dict[str, int]
    not_imported: dict[str, str]

    def render(self) -> str:
        lines = [f"imported {self.source} into {self.run_dir}: {self.steps} steps "
                 f"({self.first_step}-{self.last_step})"]
        sections = (
            ("mapped", [m for m in self.mapping if m.origin in ("default", "--map")]),
            ("user scalars (columns of scalars)",
             [m for m in self.mapping if m.origin == "user scalar"]),
            ("skipped with --map", [m for m in self.mapping if m.origin == SKIP]),
        )
        for title, entries in sections:
            if not entries:
                continue
            lines.append(f"{title}:")
            width = min(max(len(entry.name) for entry in entries), 40)
            for entry in sorted(entries, key=_report_order):
                target = str(entry.signal) if entry.signal else SKIP
                origin = " (--map)" if entry.origin == "--map" else ""
                note = f"; {entry.note}" if entry.note else ""
                values = f"{entry.values} value{'s' if entry.values != 1 else ''}"
                lines.append(f"  {entry.name.ljust(width)} -> {target}{origin}, {values}{note}")
        if self.not_imported:
            count = len(self.not_imported)
            lines.append(f"not imported ({count} {self.noun}{'s' if count != 1 else ''}):")
            for name in sorted(self.not_imported):
                lines.append(f"  {name}: {self.not_imported[name]}")
        if self.replaced:
            counts = ", ".join(f"{name} {count}" for name, count in sorted(self.replaced.items()))
            lines.append(f"steps logged twice, where the value with the later wall time (or "
                         f"on the later row) was kept: {counts}")
        tables = ", ".join(f"{table} {count} rows" for table, count in self.row_counts.items())
        lines.append(f"tables: {tables}")
        return "\n".join(lines) + "\n"


def _report_order(entry: MappedSeries) -> tuple:
    table_order = list(fmt.TABLES).index(entry.signal.table) if entry.signal else 0
    return (table_order, str(entry.signal), entry.name)


def import_series(series: SeriesSet, overrides: Mapping[str, Signal | None], run_dir: Path,
                  imported_from: dict[str, Any], *, source: str,
                  noun: str) -> ImportReport:
    """Map the series, build the tables and write them as a new run directory.

    Raises:
        ImportInputError: an override does not match, the source has no scalar values,
            or RUN_DIR exists and is not empty.
    """
    # Imported here because the writer module imports ImportInputError from this one.
    from runlens.importers.writer import run_metadata, write_run_dir

    counts = series.counts()
    if not counts:
        found = f"; found only {', '.join(sorted(series.not_imported))}" \
            if series.not_imported else ""
        raise ImportInputError(f"{source}: no scalar values to import{found}")
    mapping = resolve_mapping(counts, overrides, source, noun)
    tables = build_tables(series, mapping)
    if not tables:
        raise ImportInputError(f"{source}: every {noun} is skipped, so there is nothing to "
                               "import; drop a --map NAME=skip")
    steps = tables["scalars"].column("step").to_pylist()
    imported_from = {**imported_from,
                     "signals": {m.name: str(m.signal) if m.signal else SKIP for m in mapping}}
    write_run_dir(run_dir, run_metadata(imported_from, first_step=steps[0]), tables)
    return ImportReport(
        source=source, run_dir=run_dir, noun=noun, mapping=mapping,
        row_counts={table: data.num_rows for table, data in tables.items()},
        first_step=steps[0], last_step=steps[-1], steps=len(steps),
        replaced={entry.name: series.replaced[entry.name] for entry in mapping
                  if entry.signal is not None and entry.name in series.replaced},
        not_imported=dict(series.not_imported))
