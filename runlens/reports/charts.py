"""Charts of a run's signals with its findings drawn on them, for `--format html` and `runlens plot`.

Each chart reads its data from the run's DuckDB views and is left out when the run has
no data for it. Long runs are downsampled in DuckDB: the steps are split into about
TARGET_BUCKETS buckets, and each bucket keeps its minimum and its maximum at the steps
where they occur. A spike of one step therefore stays in the drawn line, however long
the run.

A finding is drawn as a shaded step range, labelled with its rule id, on the chart that
shows the signals its rule reads (see `assign_findings`), and on the loss chart when no
chart does. matplotlib is imported inside the functions that draw, so importing this
module, and `runlens analyze` in text format, does not import it. Figures are drawn with
the Agg canvas and never pyplot, so no GUI backend is touched.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import duckdb
import numpy as np

from runlens.analyze.findings import Finding, Report

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from runlens.analyze.rules import Rule
    from runlens.analyze.run import Run

# Buckets across the run's step range for line charts: about 2 points per pixel column of
# a 1,200-pixel-wide figure, which keeps every spike and a small PNG.
TARGET_BUCKETS = 2000
# Columns of the update-ratio heatmap. More stats steps than this are bucketed.
HEATMAP_COLUMNS = 300
# More parameters than this are grouped into modules by their name prefix, aiming at
# HEATMAP_MIN_ROWS to HEATMAP_MAX_ROWS rows and never beyond HEATMAP_ROW_LIMIT, unless
# the first name part alone gives more.
HEATMAP_MAX_ROWS = 60
HEATMAP_MIN_ROWS = 10
HEATMAP_ROW_LIMIT = 240
# Row names of the heatmap longer than this are cut, with "..." at the end.
HEATMAP_LABEL_CHARS = 28
# An lr schedule with more jumps than this (a cyclic schedule) gets no boundary lines.
MAX_BOUNDARIES = 50
# Classes above this count are drawn in grey, and only the lowest ones get colours.
MAX_LABELLED_CLASSES = 8
# Evaluation metrics beyond this count are left out of the evals chart.
MAX_EVAL_METRICS = 6
# Series with more points than this are drawn as plain lines, without point markers.
MAX_MARKED_POINTS = 150
# Rows of finding labels at the top of a chart. Labels beyond them may overlap.
MAX_LABEL_LANES = 6

FIGURE_WIDTH = 12.0  # inches
AXES_HEIGHT = 2.6  # inches per stacked axes
DPI = 100
TOP_MARGIN = 0.75  # inches: title and the whole-run findings line
BOTTOM_MARGIN = 0.55  # inches: the step axis label
AXES_GAP = 0.35  # inches between stacked axes
LEFT = 0.075  # figure fractions
RIGHT = 0.79  # legends and colour bars sit to the right of this

SEVERITY_COLORS = {"error": "#c62828", "warning": "#e67e00", "info": "#1f6fb2"}
RESUME_COLOR = "#6a3d9a"
BOUNDARY_COLOR = "#555555"
MARKER_COLOR = "#c62828"

# The log10 update-to-weight ratio range of the heatmap's colour scale: 1e-3, the usual
# rule of thumb, in the middle. Cells outside it take the end colours.
RATIO_LOG_RANGE = (-6.0, 0.0)


@dataclass
class Chart:
    """One drawn chart: the file stem, title, figure and the findings drawn on it."""

    name: str
    title: str
    figure: "Figure"
    findings: list[Finding]

    def png(self) -> bytes:
        """Render the figure as PNG bytes. The PNG's text chunks name the chart and findings."""
        buffer = io.BytesIO()
        rule_ids = ", ".join(dict.fromkeys(f.rule_id for f in self.findings)) or "none"
        self.figure.savefig(
            buffer,
            format="png",
            dpi=DPI,
            metadata={"Title": self.title, "Description": f"findings: {rule_ids}",
                      "Software": None},
        )
        return buffer.getvalue()

    def labelled_rule_ids(self) -> list[str]:
        """Return the rule ids of the finding labels drawn on the figure, in drawing order."""
        ids = []
        for axes in self.figure.axes:
            for text in axes.texts:
                gid = text.get_gid() or ""
                if gid.startswith("finding:"):
                    ids.append(gid.removeprefix("finding:"))
        for text in self.figure.texts:
            gid = text.get_gid() or ""
            if gid.startswith("whole-run:"):
                ids += gid.removeprefix("whole-run:").split(",")
        return ids

    def series_values(self, gid: str) -> np.ndarray:
        """Return the y values drawn for the line with this gid, such as ``"loss"``."""
        return np.asarray(self._line(gid).get_ydata(), dtype=float)

    def series_steps(self, gid: str) -> np.ndarray:
        """Return the steps (x values) drawn for the line with this gid."""
        return np.asarray(self._line(gid).get_xdata(), dtype=float)

    def _line(self, gid: str) -> Any:
        for axes in self.figure.axes:
            for line in axes.get_lines():
                if line.get_gid() == gid:
                    return line
        raise KeyError(f"chart '{self.name}' has no line with gid {gid!r}")


@dataclass
class _Draft:
    """A chart that has data, before it is drawn.

    `draw` fills the `panels` stacked axes. `signals` (``table.column``)
    and `categories` decide which findings land on the chart.
    """

    name: str
    title: str
    signals: frozenset[str]
    categories: frozenset[str]
    draw: Callable[["Figure", list["Axes"], "_Context"], None]
    panels: int = 1
    panel_height: float = AXES_HEIGHT
    marks_resumes: bool = False
    left: float = LEFT


@dataclass
class _Context:
    """The run's step range, bucket width and resumes, which every chart shares."""

    connection: duckdb.DuckDBPyConnection
    run: "Run"
    first_step: int
    last_step: int
    bucket_width: int
    resumes: list[tuple[int, int]] = field(default_factory=list)
    # True when a resume restarted from an earlier step, so some steps were recorded by
    # two segments. Charts then draw each step from its last segment, the one that
    # continued training, as `runlens compare` does.
    overlapping_segments: bool = False

    def source(self, table: str) -> str:
        """Return SQL for `table`'s rows, each step from its last segment only."""
        if not self.overlapping_segments:
            return table
        return (f"(SELECT * FROM {table} "
                f"QUALIFY segment = max(segment) OVER (PARTITION BY rank, step))")

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.connection.execute(sql, list(params)).fetchall()
        except duckdb.Error as error:
            raise self.run.data_error(error) from None

    def envelope(self, table: str, value_sql: str, where: str = "TRUE",
                 series: Sequence[str] = ()) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """Return series key -> (steps, values) of a column, downsampled by min and max.

        Rows are grouped by the `series` expressions (such as the task name) and by step
        bucket. The key is None without `series`, the value with one expression, and a
        tuple with several. Each bucket gives two points, its minimum and its maximum, in
        step order, so the line passes through every extreme. Ranks share buckets, so
        the extremes of every rank are kept. Non-finite values are left out.
        """
        keys = [f"{expression} AS series_{index}" for index, expression in enumerate(series)]
        key_names = [f"series_{index}" for index in range(len(series))]
        sql = f"""
            WITH source AS (
                SELECT {", ".join(["step", *keys])}, CAST({value_sql} AS DOUBLE) AS v
                FROM {self.source(table)} WHERE {where}
            )
            SELECT {", ".join([*key_names, "(step - ?) // ? AS bucket"])},
                   arg_min(step, v), min(v), arg_max(step, v), max(v)
            FROM source
            WHERE isfinite(v)
            GROUP BY ALL
            ORDER BY ALL
        """
        grouped: dict[Any, list[tuple[Any, ...]]] = {}
        width = len(series)
        for row in self.fetch(sql, [self.first_step, self.bucket_width]):
            if width == 0:
                key = None
            elif width == 1:
                key = row[0]
            else:
                key = tuple(row[:width])
            grouped.setdefault(key, []).append(row[width + 1:])
        return {key: _interleave(rows) for key, rows in grouped.items()}

    def marked_steps(self, table: str, condition: str) -> tuple[np.ndarray, int]:
        """Return one step per bucket where `condition` holds, and the number of such steps."""
        sql = f"""
            SELECT min(step), count(DISTINCT step) FROM {self.source(table)}
            WHERE {condition}
            GROUP BY (step - ?) // ?
            ORDER BY 1
        """
        rows = self.fetch(sql, [self.first_step, self.bucket_width])
        steps = np.array([row[0] for row in rows], dtype=float)
        return steps, sum(row[1] for row in rows)

    def has_rows(self, table: str, condition: str) -> bool:
        return bool(self.fetch(f"SELECT 1 FROM {table} WHERE {condition} LIMIT 1"))


def _interleave(rows: list[tuple[Any, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Turn (min step, min, max step, max) rows into one polyline in step order."""
    data = np.array(rows, dtype=float).reshape(-1, 4)
    min_first = data[:, 0] <= data[:, 2]
    steps = np.where(min_first[:, None], data[:, [0, 2]], data[:, [2, 0]]).ravel()
    values = np.where(min_first[:, None], data[:, [1, 3]], data[:, [3, 1]]).ravel()
    return steps, values


def build_charts(run: "Run", report: Report,
                 rules: Optional[Iterable["Rule"]] = None) -> list[Chart]:
    """Draw every chart that the run has data for, with the report's findings on them.

    `rules` are the rules that produced the report. Their `requires` decide which chart
    a finding goes on. Without them the built-in rule files are read for it.
    """
    context = _make_context(run, report)
    drafts = [draft for loader in _LOADERS if (draft := loader(context)) is not None]
    if rules is None and report.rule_signals:
        signals = {rule_id: frozenset(names) for rule_id, names in report.rule_signals.items()}
    elif rules is None:
        signals = builtin_rule_signals()
    else:
        signals = {rule.id: _required_signals(rule.requires) for rule in rules}
    placement = assign_findings(report.findings, drafts, signals)
    return [_draw(draft, placement.get(draft.name, []), context) for draft in drafts]


def _make_context(run: "Run", report: Report) -> _Context:
    first = report.run.first_step or 0
    last = report.run.last_step if report.run.last_step is not None else first
    width = max(1, math.ceil((last - first + 1) / TARGET_BUCKETS))
    context = _Context(run.connection, run, first, last, width)
    context.overlapping_segments = bool(context.fetch(
        "SELECT 1 FROM scalars GROUP BY rank, step HAVING count(DISTINCT segment) > 1 "
        "LIMIT 1"))
    context.resumes = [
        (int(segment), int(step))
        for segment, step in context.fetch(
            "SELECT segment, min(step) FROM scalars WHERE segment > 0 "
            "GROUP BY segment ORDER BY segment"
        )
    ]
    return context


# ---------------------------------------------------------------------------------------
# Which chart a finding goes on


@functools.lru_cache(maxsize=1)
def builtin_rule_signals() -> dict[str, frozenset[str]]:
    """Return rule id -> the ``table.column`` signals that the built-in rule requires.

    Used only for a Report without `rule_signals` (one built by hand, not by
    `evaluate`). Rules from `--rules` or a configuration file are not among them, so
    such a report's findings from those rules are placed by category alone.
    """
    import yaml

    from runlens.analyze.errors import RunlensError
    from runlens.analyze.rules import builtin_rules_dir, find_rule_files

    signals: dict[str, frozenset[str]] = {}
    try:
        files = find_rule_files(builtin_rules_dir())
    except RunlensError:
        return signals
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for file in files:
        try:
            document = yaml.load(file.read_text(encoding="utf-8"), Loader=loader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if not isinstance(document, dict) or not isinstance(document.get("requires"), dict):
            continue
        signals[str(document.get("id"))] = _required_signals(document["requires"])
    return signals


def _required_signals(requires: dict[str, Any]) -> frozenset[str]:
    return frozenset(f"{table}.{column}" for table, columns in requires.items()
                     for column in (columns or []))


# A matching category counts a little more than one matching signal, so that a rule
# with one signal on each of two charts goes to the chart of its category.
CATEGORY_WEIGHT = 1.5
FALLBACK_CHART = "loss"


def assign_findings(findings: Iterable[Finding], drafts: Sequence[_Draft],
                    signals: dict[str, frozenset[str]]) -> dict[str, list[Finding]]:
    """Return chart name -> the findings drawn on it.

    Each chart scores a finding by the signals that both the chart draws and the rule
    requires, plus CATEGORY_WEIGHT when the rule's category is one of the chart's. The
    chart with the highest score wins, the earlier chart on a tie. A finding that no
    chart scores goes on the loss chart. Without a loss chart it is not drawn, and the
    report still lists it. `signals` maps rule ids to their required ``table.column``.
    """
    names = {draft.name for draft in drafts}
    placement: dict[str, list[Finding]] = {}
    for finding in findings:
        rule_signals = signals.get(finding.rule_id, frozenset())
        best, best_score = None, 0.0
        for draft in drafts:
            score = len(draft.signals & rule_signals)
            if finding.category in draft.categories:
                score += CATEGORY_WEIGHT
            if score > best_score:
                best, best_score = draft.name, score
        if best is None and FALLBACK_CHART in names:
            best = FALLBACK_CHART
        if best is not None:
            placement.setdefault(best, []).append(finding)
    return placement


# ---------------------------------------------------------------------------------------
# Loading: one function per chart, returning a draft when the run has its data


def _loss_chart(context: _Context) -> Optional[_Draft]:
    lines = context.envelope("scalars", "loss")
    nonfinite, nonfinite_count = context.marked_steps(
        "scalars", "loss IS NOT NULL AND NOT isfinite(loss)")
    if not lines and not nonfinite_count:
        return None

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        if None in lines:
            steps, values = lines[None]
            ax.plot(steps, values, color="#1f4e79", linewidth=0.9, label="loss", gid="loss")
            _log_scale_if_wide(ax, values)
        ax.set_ylabel("loss")
        _rug(ax, nonfinite, f"non-finite loss ({nonfinite_count} steps)", marker="x")

    return _Draft("loss", "Training loss", frozenset({
        "scalars.loss", "scalars.nonfinite_loss", "scalars.optimizer_state_tensors"}),
        frozenset({"numerics", "checkpointing"}), draw, marks_resumes=True)


def _task_loss_chart(context: _Context) -> Optional[_Draft]:
    raw = context.envelope("losses", "loss", series=["task"])
    weighted = context.envelope("losses", "weighted_loss", series=["task"])
    if not raw and not weighted:
        return None

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        colors = _colors(len(set(raw) | set(weighted)))
        for color, task in zip(colors, sorted(set(raw) | set(weighted), key=str)):
            if task in raw:
                ax.plot(*raw[task], color=color, linewidth=0.9, label=f"{task} (raw)",
                        gid=f"loss:{task}")
            if task in weighted:
                ax.plot(*weighted[task], color=color, linewidth=0.9, linestyle="--",
                        label=f"{task} (weighted)", gid=f"weighted_loss:{task}")
        _log_scale_if_wide(ax, np.concatenate([v for _, v in [*raw.values(),
                                                               *weighted.values()]]))
        ax.set_ylabel("task loss")

    return _Draft("task_losses", "Per-task losses: raw (solid) and weighted (dashed)",
                  frozenset({"losses.task", "losses.loss", "losses.weight",
                             "losses.weighted_loss"}),
                  frozenset({"multitask"}), draw)


def _eval_chart(context: _Context) -> Optional[_Draft]:
    lines = context.envelope("evals", "value", series=["metric", "split"])
    if not lines:
        return None
    metrics = sorted({key[0] for key in lines}, key=str)
    shown_metrics = metrics[:MAX_EVAL_METRICS]
    title = "Evaluation metrics"
    if len(metrics) > len(shown_metrics):
        title += f" (first {len(shown_metrics)} of {len(metrics)} metrics by name)"

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        splits = sorted({key[1] for key in lines}, key=str)
        colors = dict(zip(splits, _colors(len(splits))))
        for ax, metric in zip(axes, shown_metrics):
            for split in splits:
                if (metric, split) in lines:
                    steps, values = lines[(metric, split)]
                    ax.plot(steps, values, color=colors[split], linewidth=1.0,
                            label=str(split), gid=f"eval:{metric}:{split}",
                            **_point_markers(steps))
            ax.set_ylabel(_short(str(metric), 18))
            _legend(ax)

    return _Draft("evals", title, frozenset({"evals.value", "evals.metric", "evals.split"}),
                  frozenset({"generalization"}), draw, panels=len(shown_metrics),
                  panel_height=1.9 if len(shown_metrics) > 1 else AXES_HEIGHT)


def _lr_chart(context: _Context) -> Optional[_Draft]:
    lines = context.envelope("param_groups", "lr", series=['"group"'])
    if not lines:
        return None
    # A schedule boundary is a step where a group's lr jumps by at least a tenth of its
    # peak and by at least three times the previous change, as the schedule-boundary-spike
    # rule defines it with its default parameters. Smooth schedules have none.
    boundaries = [row[0] for row in context.fetch(f"""
        WITH deltas AS (
            SELECT rank, "group", step, lr - lag(lr) OVER g AS delta,
                   max(lr) OVER (PARTITION BY rank, "group") AS peak
            FROM {context.source("param_groups")} WHERE isfinite(lr)
            WINDOW g AS (PARTITION BY rank, "group" ORDER BY step)
        ),
        jumps AS (
            SELECT step, delta, peak,
                   lag(delta) OVER (PARTITION BY rank, "group" ORDER BY step) AS previous
            FROM deltas
        )
        SELECT DISTINCT step FROM jumps
        WHERE abs(delta) >= 0.1 * peak AND abs(delta) >= 3 * abs(coalesce(previous, 0))
        ORDER BY step LIMIT {MAX_BOUNDARIES + 1}
    """)]

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        groups = sorted(lines, key=lambda g: (g is None, g))
        for color, group in zip(_colors(len(groups)), groups):
            ax.plot(*lines[group], color=color, linewidth=1.0, label=f"group {group}",
                    gid=f"lr:{group}")
        if 0 < len(boundaries) <= MAX_BOUNDARIES:
            for index, step in enumerate(boundaries):
                ax.axvline(step, color=BOUNDARY_COLOR, linestyle=":", linewidth=1.0,
                           label="schedule boundary" if index == 0 else None,
                           gid="boundary")
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    return _Draft("lr", "Learning rate per param group", frozenset({
        "param_groups.lr", "param_groups.group", "param_groups.weight_decay"}),
        frozenset({"schedule"}), draw, marks_resumes=True)


def _grad_norm_chart(context: _Context) -> Optional[_Draft]:
    grad = context.envelope("scalars", "grad_norm")
    total = context.envelope("scalars", "clip_total_norm")
    threshold = context.envelope("scalars", "clip_max_norm")
    if not grad and not total:
        return None
    clipped, clipped_count = context.marked_steps(
        "scalars", "clip_total_norm > clip_max_norm")
    nonfinite, nonfinite_count = context.marked_steps(
        "scalars", "nonfinite_grad_tensors > 0 OR NOT isfinite(grad_norm)")

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        values = []
        if None in total:
            ax.plot(*total[None], color="#1f4e79", linewidth=0.9,
                    label="norm before clipping", gid="clip_total_norm")
            values.append(total[None][1])
        if None in grad:
            ax.plot(*grad[None], color="#2e8b57", linewidth=0.9, alpha=0.8,
                    label="norm at optimizer step", gid="grad_norm")
            values.append(grad[None][1])
        if None in threshold:
            ax.plot(*threshold[None], color=SEVERITY_COLORS["error"], linewidth=1.2,
                    linestyle="--", label="clip threshold (max_norm)", gid="clip_max_norm")
            values.append(threshold[None][1])
        _log_scale_if_wide(ax, np.concatenate(values), always=True)
        _rug(ax, clipped, f"clipped ({clipped_count} steps)")
        _rug(ax, nonfinite, f"non-finite gradient ({nonfinite_count} steps)", marker="x",
             row=1 if len(clipped) else 0, color="#6a1b9a")
        ax.set_ylabel("global gradient norm")

    return _Draft("grad_norm", "Global gradient norm and clipping", frozenset({
        "scalars.grad_norm", "scalars.clip_total_norm", "scalars.clip_max_norm",
        "scalars.nonfinite_grad_tensors"}),
        frozenset({"optimization", "numerics"}), draw)


def _amp_chart(context: _Context) -> Optional[_Draft]:
    scale = context.envelope("scalars", "amp_scale")
    if not context.has_rows("scalars", "amp_scale IS NOT NULL"):
        return None
    skipped, skipped_count = context.marked_steps("scalars", "step_skipped")

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        if None in scale:
            steps, values = scale[None]
            ax.plot(steps, values, color="#1f4e79", linewidth=1.0, label="loss scale",
                    gid="amp_scale")
            if (values > 0).all():
                ax.set_yscale("log", base=2)
        _rug(ax, skipped, f"skipped step ({skipped_count} steps)")
        ax.set_ylabel("AMP loss scale")

    return _Draft("amp_scale", "AMP loss scale and skipped steps",
                  frozenset({"scalars.amp_scale", "scalars.step_skipped"}),
                  frozenset({"amp"}), draw)


def _update_ratio_chart(context: _Context) -> Optional[_Draft]:
    valid = "param_norm > 0 AND isfinite(update_norm / param_norm)"
    steps_count, first, last = context.fetch(
        f"SELECT count(DISTINCT step), min(step), max(step) FROM params WHERE {valid}")[0]
    if not steps_count:
        return None
    # Up to HEATMAP_COLUMNS stats steps get a column each. More are bucketed by step.
    width = 1 if steps_count <= HEATMAP_COLUMNS else math.ceil(
        (last - first + 1) / HEATMAP_COLUMNS)
    params = [row[0] for row in context.fetch(
        f"SELECT DISTINCT param FROM params WHERE {valid}")]
    depth = _grouping_depth(params)
    row_sql = "param" if depth is None else (
        f"array_to_string(string_split(param, '.')[1:{depth}], '.')")
    # A module's ratio is the norm of its parameters' updates over the norm of its
    # parameters. A bucketed cell shows the largest ratio in its bucket, so a short
    # burst of large updates stays visible.
    rows = context.fetch(f"""
        WITH per_step AS (
            SELECT {row_sql} AS row_name, step,
                   sqrt(sum(update_norm * update_norm)) / sqrt(sum(param_norm * param_norm))
                       AS ratio
            FROM params WHERE {valid}
            GROUP BY row_name, step
        )
        SELECT row_name, (step - ?) // ? AS bucket, max(ratio)
        FROM per_step GROUP BY row_name, bucket
    """, [first, width])
    order = _param_order(context.run, depth)
    names = sorted({row[0] for row in rows},
                   key=lambda name: (order.get(name, len(order)), _natural_key(name)))
    row_index = {name: index for index, name in enumerate(names)}
    if width == 1:
        buckets = sorted({row[1] for row in rows})
        edges = _midpoint_edges(np.array(buckets, dtype=float) + first)
    else:
        buckets = list(range(max(row[1] for row in rows) + 1))
        edges = first + width * np.arange(len(buckets) + 1, dtype=float)
    column = {bucket: index for index, bucket in enumerate(buckets)}
    grid = np.full((len(names), len(buckets)), np.nan)
    for name, bucket, ratio in rows:
        grid[row_index[name], column[bucket]] = ratio
    unit = "parameter" if depth is None else "module"
    height = min(max(AXES_HEIGHT, 0.16 * len(names) + 0.4), 24.0)

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        _draw_heatmap(figure, axes[0], grid, names, edges, unit)

    return _Draft("update_ratio", f"Update-to-weight ratio per {unit} (stats steps)",
                  frozenset({"params.update_norm", "params.param_norm", "params.param",
                             "params.state_step", "params.requires_grad",
                             "run_params.kind", "run_params.weight_decay",
                             "run_params.requires_grad", "run_params.name"}),
                  frozenset({"optimization"}), draw, panel_height=height,
                  left=_label_margin(names))


def _grouping_depth(params: list[str]) -> Optional[int]:
    """Return how many leading name parts (split at dots) to group parameters by.

    None keeps one row per parameter, when there are at most HEATMAP_MAX_ROWS of them.
    Otherwise the deepest prefix that gives at most HEATMAP_MAX_ROWS rows is used. When
    that prefix gives fewer than HEATMAP_MIN_ROWS rows, as `blocks` does for 80 blocks
    named `blocks.<i>`, the next deeper one is used if it gives at most
    HEATMAP_ROW_LIMIT rows.
    """
    if len(params) <= HEATMAP_MAX_ROWS:
        return None
    full = max(name.count(".") for name in params) + 1  # a prefix this deep is the name
    counts = {depth: len({_name_prefix(name, depth) for name in params})
              for depth in range(1, full + 1)}
    fitting = [depth for depth in counts if counts[depth] <= HEATMAP_MAX_ROWS]
    depth = max(fitting, default=1)
    deeper = depth + 1
    if (counts[depth] < HEATMAP_MIN_ROWS and deeper in counts
            and counts[deeper] <= HEATMAP_ROW_LIMIT):
        depth = deeper
    return None if depth == full else depth


def _natural_key(name: str) -> list[Any]:
    """Return a sort key that orders `blocks.2` before `blocks.10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


def _name_prefix(name: str, depth: Optional[int]) -> str:
    return name if depth is None else ".".join(name.split(".")[:depth])


def _param_order(run: "Run", depth: Optional[int]) -> dict[str, int]:
    """Return row name -> position of its first parameter in run.json's params."""
    order: dict[str, int] = {}
    for param in run.meta.get("params") or []:
        if isinstance(param, dict) and isinstance(param.get("name"), str):
            order.setdefault(_name_prefix(param["name"], depth), len(order))
    return order


def _class_recall_chart(context: _Context) -> Optional[_Draft]:
    lines = context.envelope("classes", "recall", series=["split", "class_id"])
    if not lines:
        return None
    splits = sorted({key[0] for key in lines}, key=str)

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        for ax, split in zip(axes, splits):
            keys = sorted((key for key in lines if key[0] == split),
                          key=lambda key: int(key[1]))
            lowest = sorted(keys, key=lambda key: float(np.min(lines[key][1])))
            highlighted = set(lowest[:MAX_LABELLED_CLASSES])
            colors = dict(zip(sorted(highlighted, key=lambda key: int(key[1])),
                              _colors(len(highlighted))))
            for key in keys:
                steps, values = lines[key]
                gid = f"recall:{split}:{key[1]}"
                if key in highlighted:
                    ax.plot(steps, values, color=colors[key], linewidth=1.1,
                            label=f"class {key[1]}", gid=gid, zorder=3,
                            **_point_markers(steps))
                else:
                    ax.plot(steps, values, color="#b0b0b0", linewidth=0.7, gid=gid,
                            zorder=2)
            if len(keys) > len(highlighted):
                ax.plot([], [], color="#b0b0b0", linewidth=0.7,
                        label=f"{len(keys) - len(highlighted)} other classes")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(f"recall ({_short(str(split), 10)})")
            _legend(ax)

    title = "Per-class recall over evaluations"
    if any(len([k for k in lines if k[0] == s]) > MAX_LABELLED_CLASSES for s in splits):
        title += f" ({MAX_LABELLED_CLASSES} lowest classes in colour)"
    return _Draft("class_recall", title,
                  frozenset({"classes.recall", "classes.support", "classes.class_id",
                             "classes.precision", "classes.predicted"}),
                  frozenset(), draw, panels=len(splits),
                  panel_height=2.2 if len(splits) > 1 else AXES_HEIGHT)


def _task_grad_norm_chart(context: _Context) -> Optional[_Draft]:
    lines = context.envelope("tasks", "grad_norm", series=["task"])
    if not lines:
        return None

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        tasks = sorted(lines, key=str)
        for color, task in zip(_colors(len(tasks)), tasks):
            ax.plot(*lines[task], color=color, linewidth=1.0, label=str(task),
                    gid=f"task_grad_norm:{task}", **_point_markers(lines[task][0]))
        _log_scale_if_wide(ax, np.concatenate([v for _, v in lines.values()]), always=True)
        ax.set_ylabel("task gradient norm")

    return _Draft("task_grad_norm", "Gradient norm per task on the shared parameters",
                  frozenset({"tasks.grad_norm", "tasks.task"}), frozenset({"multitask"}),
                  draw)


def _task_cosine_chart(context: _Context) -> Optional[_Draft]:
    # task_pairs contains both (a, b) and (b, a) with the same cosine, so one order is drawn.
    lines = context.envelope("task_pairs", "cosine", where="task < other_task",
                             series=["task || ' / ' || other_task"])
    if not lines:
        return None

    def draw(figure: "Figure", axes: list["Axes"], ctx: _Context) -> None:
        ax = axes[0]
        pairs = sorted(lines, key=str)
        for color, pair in zip(_colors(len(pairs)), pairs):
            ax.plot(*lines[pair], color=color, linewidth=1.0, label=str(pair),
                    gid=f"task_cosine:{pair}", **_point_markers(lines[pair][0]))
        ax.axhline(0.0, color="#777777", linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("gradient cosine")

    return _Draft("task_cosine", "Cosine between task gradients",
                  frozenset({"task_pairs.cosine", "task_pairs.task", "task_pairs.other_task"}),
                  frozenset({"multitask"}), draw)


# Charts in the order that the report shows them.
_LOADERS: tuple[Callable[[_Context], Optional[_Draft]], ...] = (
    _loss_chart,
    _task_loss_chart,
    _eval_chart,
    _lr_chart,
    _grad_norm_chart,
    _amp_chart,
    _update_ratio_chart,
    _class_recall_chart,
    _task_grad_norm_chart,
    _task_cosine_chart,
)


# ---------------------------------------------------------------------------------------
# Drawing


def _draw(draft: _Draft, findings: list[Finding], context: _Context) -> Chart:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    whole_run = any(f.step_start is None and f.step_end is None for f in findings)
    top_margin = TOP_MARGIN if whole_run else TOP_MARGIN - 0.25
    height = top_margin + BOTTOM_MARGIN + draft.panels * draft.panel_height
    height += (draft.panels - 1) * AXES_GAP
    figure = Figure(figsize=(FIGURE_WIDTH, height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = list(figure.subplots(draft.panels, 1, sharex=True, squeeze=False)[:, 0])
    figure.subplots_adjust(left=draft.left, right=RIGHT, top=1 - top_margin / height,
                           bottom=BOTTOM_MARGIN / height,
                           hspace=AXES_GAP / draft.panel_height)
    figure.text(0.01, 1 - 0.12 / height, draft.title, ha="left", va="top", fontsize=12,
                fontweight="bold")
    for ax in axes:
        ax.grid(True, color="#e4e4e4", linewidth=0.6)
        ax.tick_params(labelsize=8)

    draft.draw(figure, axes, context)
    for ax in axes:
        ax.set_xlim(context.first_step - 0.5, context.last_step + 0.5)
        ax.yaxis.label.set_size(9)
        if draft.marks_resumes:
            _mark_resumes(ax, context.resumes)
    axes[-1].set_xlabel("step", fontsize=9)
    if draft.name not in ("evals", "class_recall"):
        _legend(axes[0])

    _draw_findings(figure, axes, findings, context)
    return Chart(draft.name, draft.title, figure, findings)


def _draw_heatmap(figure: "Figure", ax: "Axes", grid: np.ndarray, names: list[str],
                  edges: np.ndarray, unit: str) -> None:
    import matplotlib

    low, high = RATIO_LOG_RANGE
    with np.errstate(divide="ignore"):
        logs = np.log10(grid)
    # Zero updates (a frozen parameter) get the colour below the scale, missing cells
    # (a parameter without a row on that step) the "bad" colour.
    shown = np.where(np.isneginf(logs), low - 1.0, np.clip(logs, low, high))
    masked = np.ma.masked_invalid(shown)
    colormap = matplotlib.colormaps["RdBu_r"].with_extremes(under="black", bad="#eeeeee")
    norm = matplotlib.colors.TwoSlopeNorm(vcenter=(low + high) / 2, vmin=low, vmax=high)
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), masked, cmap=colormap,
                         norm=norm, shading="flat")
    mesh.set_gid("update_ratio")
    ax.grid(False)
    ax.set_ylim(len(names), 0)
    # Beyond HEATMAP_MAX_ROWS rows, only every k-th row is named, so the names stay legible.
    every = max(1, math.ceil(len(names) / HEATMAP_MAX_ROWS))
    ax.set_yticks(np.arange(0, len(names), every) + 0.5)
    font = 8 if len(names) <= 30 else 6
    ax.set_yticklabels([_short(name, HEATMAP_LABEL_CHARS) for name in names[::every]],
                       fontsize=font)
    ax.set_ylabel(unit, fontsize=9)

    box = ax.get_position()
    colorbar_axes = figure.add_axes((RIGHT + 0.02, box.y0, 0.012, box.height))
    colorbar = figure.colorbar(mesh, cax=colorbar_axes, extend="min")
    colorbar.set_label("log10(update norm / weight norm)\nblack: no update", fontsize=8)
    colorbar.ax.tick_params(labelsize=8)


def _label_margin(names: list[str]) -> float:
    """Return the left margin, as a figure fraction, that fits the heatmap's row names."""
    longest = max(len(_short(name, HEATMAP_LABEL_CHARS)) for name in names)
    # About 0.07 inch per character at the 8-point tick font, plus the axis label.
    return max(LEFT, (0.5 + 0.07 * longest) / FIGURE_WIDTH)


def _midpoint_edges(steps: np.ndarray) -> np.ndarray:
    """Return cell edges halfway between consecutive steps, and as far out at both ends."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    first = steps[0] - (middles[0] - steps[0])
    last = steps[-1] + (steps[-1] - middles[-1])
    return np.concatenate([[first], middles, [last]])


def _draw_findings(figure: "Figure", axes: list["Axes"], findings: list[Finding],
                   context: _Context) -> None:
    """Shade each finding's step range on every axes and label it on the top one.

    Findings of one rule share one label, at the first of their ranges, with their
    count. Labels stack in lanes below the top edge so they do not overlap. Findings
    about the whole run are named in a line under the title.
    """
    span = max(context.last_step - context.first_step + 1, 1)
    min_width = span * 0.004
    by_rule: dict[str, list[tuple[float, float, Finding]]] = {}
    whole_run: list[Finding] = []
    for finding in findings:
        if finding.step_start is None and finding.step_end is None:
            whole_run.append(finding)
            continue
        start = context.first_step if finding.step_start is None else finding.step_start
        end = context.last_step if finding.step_end is None else finding.step_end
        x0, x1 = float(start), float(end) + 1.0
        if x1 - x0 < min_width:
            middle = (x0 + x1) / 2
            x0, x1 = middle - min_width / 2, middle + min_width / 2
        by_rule.setdefault(finding.rule_id, []).append((x0, x1, finding))

    for ranges in by_rule.values():
        for x0, x1, finding in ranges:
            color = SEVERITY_COLORS.get(finding.severity, "#777777")
            for ax in axes:
                if _is_heatmap(ax):
                    # Shading under a heatmap would be hidden, so outline the range.
                    ax.axvspan(x0, x1, fill=False, edgecolor=color, linewidth=1.8,
                               zorder=3, gid=f"span:{finding.rule_id}")
                    continue
                ax.axvspan(x0, x1, color=color, alpha=0.14, linewidth=0, zorder=0.5,
                           gid=f"span:{finding.rule_id}")
                ax.axvline(x0, color=color, linewidth=0.6, alpha=0.6, zorder=0.6)

    lanes = _place_labels(figure, axes[0], by_rule)
    if lanes:
        _reserve(axes[0], top=0.03 + 0.12 * lanes)
    if whole_run:
        ids = list(dict.fromkeys(f.rule_id for f in whole_run))
        figure.text(0.01, 1 - 0.42 / figure.get_figheight(),
                    "Whole-run findings: " + ", ".join(ids), ha="left", va="top",
                    fontsize=9, color=SEVERITY_COLORS.get(whole_run[0].severity, "#333333"),
                    gid="whole-run:" + ",".join(ids))


def _is_heatmap(ax: "Axes") -> bool:
    return any(collection.get_gid() == "update_ratio" for collection in ax.collections)


def _place_labels(figure: "Figure", ax: "Axes",
                  by_rule: dict[str, list[tuple[float, float, Finding]]]) -> int:
    """Label each rule's first range at the top of `ax`; return the label lanes used."""
    renderer = figure.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    placed = []
    lanes_used = 0
    order = sorted(by_rule.items(), key=lambda item: min(x0 for x0, _, _ in item[1]))
    for rule_id, ranges in order:
        x0, x1, finding = min(ranges, key=lambda item: item[0])
        text = rule_id if len(ranges) == 1 else f"{rule_id} ({len(ranges)} ranges)"
        color = SEVERITY_COLORS.get(finding.severity, "#333333")
        label = ax.text(max(x0, ax.get_xlim()[0]), 0.97, text,
                        transform=ax.get_xaxis_transform(), ha="left", va="top",
                        fontsize=8, color=color, zorder=6, gid=f"finding:{rule_id}",
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white",
                              "edgecolor": color, "linewidth": 0.6, "alpha": 0.9})
        for lane in range(MAX_LABEL_LANES):
            label.set_y(0.97 - lane * 0.12)
            label.set_horizontalalignment("left")
            label.set_x(max(x0, ax.get_xlim()[0]))
            box = label.get_window_extent(renderer).padded(4)
            if box.x1 > axes_box.x1:
                label.set_horizontalalignment("right")
                label.set_x(min(x1, ax.get_xlim()[1]))
                box = label.get_window_extent(renderer).padded(4)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
        lanes_used = max(lanes_used, lane + 1)
    return lanes_used


def _mark_resumes(ax: "Axes", resumes: list[tuple[int, int]]) -> None:
    for index, (segment, step) in enumerate(resumes):
        ax.axvline(step, color=RESUME_COLOR, linestyle="--", linewidth=1.1, zorder=2,
                   label="resume (segment start)" if index == 0 else None,
                   gid=f"resume:{segment}")


def _rug(ax: "Axes", steps: np.ndarray, label: str, marker: str = "|", row: int = 0,
         color: str = MARKER_COLOR) -> None:
    """Mark steps with ticks in a band along the bottom of the axes, kept free of data.

    Each `row` of marks gets its own band. Call it after the y scale is set, because it
    widens the y limits to make room for the band.
    """
    if len(steps) == 0:
        return
    _reserve(ax, bottom=0.1)
    ax.plot(steps, np.full(len(steps), 0.045 + 0.07 * row), linestyle="none",
            marker=marker, markersize=8, color=color, transform=ax.get_xaxis_transform(),
            label=label, gid=f"marks:{label.split(' (')[0]}", zorder=4)


def _reserve(ax: "Axes", bottom: float = 0.0, top: float = 0.0) -> None:
    """Widen the y limits so that the data leaves these fractions of the axes free."""
    low, high = ax.get_ylim()
    if high <= low or bottom + top >= 0.9:
        return  # an inverted axis, such as the heatmap's rows
    log = ax.get_yscale() == "log"
    if log:
        low, high = math.log10(low), math.log10(high)
    extent = (high - low) / (1.0 - bottom - top)
    low, high = low - bottom * extent, high + top * extent
    if log:
        low, high = 10.0**low, 10.0**high
    ax.set_ylim(low, high)


def _log_scale_if_wide(ax: "Axes", values: np.ndarray, always: bool = False) -> None:
    """Use a log y axis for positive values that span more than two decades (or always)."""
    if len(values) == 0 or not (values > 0).all():
        return
    if always or values.max() / values.min() > 100:
        ax.set_yscale("log")


def _point_markers(steps: np.ndarray) -> dict[str, Any]:
    """Return marker settings that show each point of a sparse series, such as evaluations."""
    if len(steps) > 2 * MAX_MARKED_POINTS:  # two drawn points per bucket
        return {}
    return {"marker": "o", "markersize": 2.5}


def _legend(ax: "Axes") -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  borderaxespad=0.0)


def _colors(count: int) -> list[str]:
    palette = ["#1f77b4", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e",
               "#a6761d", "#e6ab02", "#17becf", "#666666"]
    return [palette[index % len(palette)] for index in range(count)]


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
