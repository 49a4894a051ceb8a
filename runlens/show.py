"""`runlens show`: what a run directory contains, as text for people or JSON for scripts.

The description comes from ``run.json`` and from queries on the run's views in the
same sandbox that rules run in, so showing a run never writes to it.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import duckdb

from runlens import format as fmt
from runlens.analyze.run import Run
from runlens.reports.common import plural

# Columns that every table has. A table's signals are its other columns.
KEY_COLUMNS = frozenset(fmt.KEY_COLUMNS)


def describe_run(run: Run) -> dict[str, Any]:
    """Return the run's metadata, steps, segments, ranks, tables and events as JSON values.

    Raises:
        RunError: DuckDB failed to read the run's Parquet parts.
    """
    meta = run.meta
    summary = run.summary()
    return {
        "path": str(run.path),
        "format_version": meta.get("format_version"),
        "created": meta.get("created"),
        "runlens_version": meta.get("runlens_version"),
        "torch_version": meta.get("torch_version"),
        "world_size": meta.get("world_size"),
        "steps": {"count": summary.steps, "first": summary.first_step,
                  "last": summary.last_step},
        "segments": _segments(meta),
        "ranks": [row[0] for row in _fetch(run, "SELECT DISTINCT rank FROM scalars "
                                                "WHERE rank IS NOT NULL ORDER BY rank")],
        "tables": [_table(run, table) for table in run.parts],
        "events": _events(run),
        "params": _params(meta),
        "optimizer": _class_name(meta.get("optimizer")),
        "scheduler": _class_name(meta.get("scheduler")),
    }


def _fetch(run: Run, sql: str) -> list[tuple[Any, ...]]:
    try:
        return run.connection.execute(sql).fetchall()
    except duckdb.Error as error:
        raise run.data_error(error) from None


def _segments(meta: dict[str, Any]) -> list[dict[str, Any]]:
    segments = []
    for index, record in enumerate(meta.get("segments") or []):
        if not isinstance(record, dict):
            continue
        argv = record.get("argv")
        segments.append({
            "segment": record.get("segment", index),
            "start_step": record.get("start_step"),
            "started": record.get("started"),
            "argv": [str(arg) for arg in argv] if isinstance(argv, list) else None,
        })
    return segments


def _table(run: Run, table: str) -> dict[str, Any]:
    quoted = '"' + table.replace('"', '""') + '"'
    (rows,) = _fetch(run, f"SELECT count(*) FROM {quoted}")[0]
    columns = run.columns(table)
    counts = run.non_null_counts(table, columns)
    return {
        "name": table,
        "parts": len(run.parts[table]),
        "rows": rows,
        "signals": [c for c in columns if c not in KEY_COLUMNS and counts[c] > 0],
    }


def _events(run: Run) -> list[dict[str, Any]]:
    if "events" not in run.parts:
        return []
    rows = _fetch(run, "SELECT kind, count(*), min(step) FROM events "
                       "GROUP BY kind ORDER BY min(step), kind")
    return [{"kind": kind, "count": count, "first_step": first} for kind, count, first in rows]


def _params(meta: dict[str, Any]) -> dict[str, Any]:
    params = [p for p in meta.get("params") or [] if isinstance(p, dict)]
    sizes = [p.get("numel") for p in params]
    known = [size for size in sizes if isinstance(size, int) and not isinstance(size, bool)]
    return {
        "count": len(params),
        # None when a parameter lacks its size, so a partial sum is never shown as total.
        "numel": sum(known) if len(known) == len(sizes) else None,
        "trainable": sum(1 for p in params if p.get("requires_grad") is True),
    }


def _class_name(description: Any) -> str | None:
    if isinstance(description, dict) and isinstance(description.get("class"), str):
        return description["class"]
    return None


def render_show_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2) + "\n"


def render_show_text(info: dict[str, Any]) -> str:
    """Render `describe_run`'s result as aligned text."""
    steps = info["steps"]
    step_range = (f"{steps['first']}-{steps['last']} ({plural(steps['count'], 'step')})"
                  if steps["count"] else "none")
    params = info["params"]
    numel = "" if params["numel"] is None else f", {params['numel']:,} elements"
    header = [
        ("path", info["path"]),
        ("format version", info["format_version"]),
        ("created", info["created"]),
        ("recorded with", f"runlens {info['runlens_version']}, torch {info['torch_version']}"),
        ("world size", info["world_size"]),
        ("ranks", ", ".join(str(rank) for rank in info["ranks"]) or "none"),
        ("steps", step_range),
        ("parameters", f"{params['count']} tensors ({params['trainable']} trainable){numel}"),
        ("optimizer", info["optimizer"] or "none"),
        ("scheduler", info["scheduler"] or "none"),
    ]
    width = max(len(name) for name, _ in header)
    lines = [f"{name.ljust(width)}  {'unknown' if value is None else value}"
             for name, value in header]

    lines += ["", f"Segments ({len(info['segments'])})"]
    lines += _aligned(
        ["SEGMENT", "START STEP", "STARTED", "ARGV"],
        [[s["segment"], s["start_step"], s["started"],
          "" if s["argv"] is None else shlex.join(s["argv"])] for s in info["segments"]],
    )
    lines += ["", f"Tables ({len(info['tables'])})"]
    lines += _aligned(
        ["TABLE", "PARTS", "ROWS", "SIGNALS"],
        [[table["name"], table["parts"], table["rows"], ", ".join(table["signals"]) or "none"]
         for table in info["tables"]],
    )
    if info["events"]:
        lines += ["", f"Events ({sum(e['count'] for e in info['events'])})"]
        lines += _aligned(
            ["KIND", "COUNT", "FIRST STEP"],
            [[e["kind"], e["count"], e["first_step"]] for e in info["events"]],
        )
    return "\n".join(lines) + "\n"


def _aligned(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Return the rows as lines of left-aligned columns, two spaces apart, indented."""
    cells = [header] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1]
        for row in cells
    ]


def show_run(run_dir: Path, *, as_json: bool = False) -> str:
    """Describe the run at `run_dir` as text, or as JSON with `as_json`.

    Raises:
        RunlensError: the run directory is missing, invalid or unreadable.
    """
    with Run.open(run_dir) as run:
        info = describe_run(run)
    return render_show_json(info) if as_json else render_show_text(info)
