"""Compare two runs: metrics, findings that are new, gone or unchanged, and trajectories.

`compare_runs` evaluates the same rules on a base run and a new run and collects what
`runlens compare` reports. `render_comparison` writes it as text, JSON or HTML. Like the
rest of the analyzer, this module reads the runs through their sandboxed DuckDB
connections, never writes into a run directory, and does not import torch.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

import runlens
from runlens.analyze.engine import DEFAULT_MAX_FINDINGS, DEFAULT_RULE_TIMEOUT, evaluate
from runlens.analyze.errors import EXIT_INPUT_ERROR, RunlensError
from runlens.analyze.findings import (EXIT_FINDINGS, EXIT_OK, SEVERITIES, Finding, Report,
                                      to_json_value)
from runlens.analyze.rules import Rule
from runlens.analyze.run import Run, RunSummary
from runlens.reports import common

STATUSES = ("new", "gone", "unchanged")

# Evidence columns that name what a finding is about (a rank, a parameter, a task, a
# class, a kind of failure), and so make up its identity. Other columns are measurements
# or descriptions with numbers in them, which change between runs of the same fault.
IDENTITY_COLUMNS = frozenset({
    "rank", "segment", "class_id", "group", "param", "module", "module_type", "task",
    "other_task", "dominant_task", "weaker_task", "regressed_task", "improved_task",
    "split", "rare_split", "train_split_name", "metric", "metric_name", "signal", "kind",
    "what", "direction", "optimizer_class",
})

# Metric names whose words include one of these are maximized, and all others minimized,
# unless a word names an error or a loss ("top5_error" is minimized).
MAXIMIZED_WORDS = frozenset({"acc", "accuracy", "f1", "recall", "precision", "auc", "auroc"})
MINIMIZED_WORDS = frozenset({"loss", "error", "err", "errors"})
_TOP_K_WORD = re.compile(r"top(\d+|k)")

TRAIN_LOSS = "train loss"
# Curves longer than this are cut to the minimum and maximum of each of half as many
# buckets, so a 1M-step loss curve stays a small image with its spikes.
MAX_CURVE_POINTS = 2000
# Trajectories longer than this keep evenly spaced points, the first and the last.
MAX_TRAJECTORY_POINTS = 5000
# First points whose distance is above this share of the larger path length count as
# different starts: the runs did not begin from the same parameters.
START_TOLERANCE = 1e-6

WIDTH = 88


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Values of one metric by step, sorted by step."""

    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class MetricComparison:
    """The final and best values of one metric in both runs.

    `goal` is "min" or "max": the direction in which the metric improves, which decides
    its best value. Values are None when a run has no finite value.
    """

    name: str
    goal: str
    base_final: float | None
    new_final: float | None
    base_best: float | None
    new_best: float | None
    base_final_step: int | None
    new_final_step: int | None
    base_best_step: int | None
    new_best_step: int | None

    @property
    def final_change(self) -> float | None:
        return _difference(self.base_final, self.new_final)

    @property
    def best_change(self) -> float | None:
        return _difference(self.base_best, self.new_best)

    def to_dict(self) -> dict[str, Any]:
        return to_json_value({
            "name": self.name,
            "goal": self.goal,
            "base": {"final": self.base_final, "final_step": self.base_final_step,
                     "best": self.base_best, "best_step": self.base_best_step},
            "new": {"final": self.new_final, "final_step": self.new_final_step,
                    "best": self.new_best, "best_step": self.new_best_step},
            "final_change": self.final_change,
            "best_change": self.best_change,
        })


@dataclass(frozen=True)
class FindingChange:
    """A finding matched across the runs: new (new run only), gone (base run only) or
    unchanged (both). `identity` contains the evidence values that name what it is about.
    `note` explains a status that comes from a rule that the other run did not evaluate."""

    status: str
    rule_id: str
    severity: str
    identity: dict[str, Any]
    base: Finding | None
    new: Finding | None
    note: str | None = None

    @property
    def finding(self) -> Finding:
        """The new run's finding when there is one, else the base run's."""
        return self.new if self.new is not None else self.base  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "rule_id": self.rule_id,
            "severity": self.severity,
            "title": self.finding.title,
            "identity": self.identity,
            "base": None if self.base is None else self.base.to_dict(),
            "new": None if self.new is None else self.new.to_dict(),
            "note": self.note,
        }


@dataclass(frozen=True)
class Trajectory:
    """A run's trajectory points relative to its first point, with the loss at each step.

    `start` is the absolute first point, kept to check that both runs start together.
    """

    steps: list[int]
    x: list[float]
    y: list[float]
    loss: list[float | None]
    start: tuple[float, float]

    @property
    def distance(self) -> float:
        """Distance from the first point to the last."""
        return math.hypot(self.x[-1], self.y[-1])

    @property
    def path_length(self) -> float:
        return float(np.sum(np.hypot(np.diff(self.x), np.diff(self.y))))

    @property
    def straightness(self) -> float | None:
        """Distance over path length: 1 for a straight path, near 0 for a winding one."""
        length = self.path_length
        return self.distance / length if length > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return to_json_value({
            "points": len(self.steps),
            "first_step": self.steps[0],
            "last_step": self.steps[-1],
            "distance": self.distance,
            "path_length": self.path_length,
            "straightness": self.straightness,
        })


@dataclass
class TrajectoryComparison:
    """Both runs' trajectories when they can be overlaid, else None and a note why not."""

    base: Trajectory | None = None
    new: Trajectory | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def drawn(self) -> bool:
        return self.base is not None and self.new is not None

    @property
    def final_separation(self) -> float | None:
        """Distance between the runs' last points, each relative to its own start."""
        if self.base is None or self.new is None:
            return None
        return math.hypot(self.base.x[-1] - self.new.x[-1], self.base.y[-1] - self.new.y[-1])

    @property
    def start_offset(self) -> float | None:
        """Distance between the runs' absolute first points: 0 for a shared start."""
        if self.base is None or self.new is None:
            return None
        return math.hypot(self.base.start[0] - self.new.start[0],
                          self.base.start[1] - self.new.start[1])

    def to_dict(self) -> dict[str, Any]:
        return to_json_value({
            "drawn": self.drawn,
            "notes": self.notes,
            "base": None if self.base is None else self.base.to_dict(),
            "new": None if self.new is None else self.new.to_dict(),
            "final_separation": self.final_separation,
            "start_offset": self.start_offset,
        })


@dataclass
class Curve:
    """One metric's curve in both runs, downsampled for charts."""

    name: str
    goal: str
    base: Series
    new: Series


@dataclass
class Comparison:
    """Everything `runlens compare` reports about a base run and a new run."""

    base: RunSummary
    new: RunSummary
    base_report: Report
    new_report: Report
    metrics: list[MetricComparison]
    findings: list[FindingChange]
    curves: list[Curve]
    trajectory: TrajectoryComparison

    def changes(self, status: str) -> list[FindingChange]:
        return [change for change in self.findings if change.status == status]

    def counts(self, status: str) -> dict[str, int]:
        """Return the number of findings with `status` per severity, for every severity."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for change in self.changes(status):
            counts[change.severity] += 1
        return counts

    @property
    def errored(self) -> list[str]:
        """One line per rule whose query failed on either run."""
        return [f"{label} run: rule '{failure.rule_id}': {failure.error}"
                for label, report in (("base", self.base_report), ("new", self.new_report))
                for failure in report.errored]

    def gating(self, fail_on_new: str) -> list[FindingChange]:
        """Return the new findings at or above `fail_on_new`, which fail the comparison."""
        if fail_on_new == "never":
            return []
        severities = SEVERITIES[: SEVERITIES.index(fail_on_new) + 1]
        return [change for change in self.changes("new") if change.severity in severities]

    def exit_code(self, fail_on_new: str) -> int:
        """Return 2 if a rule failed on either run, 1 if a new finding gates, else 0."""
        if self.errored:
            return EXIT_INPUT_ERROR
        return EXIT_FINDINGS if self.gating(fail_on_new) else EXIT_OK

    def to_dict(self, fail_on_new: str) -> dict[str, Any]:
        return {
            "runlens_version": runlens.__version__,
            "base": _summary_dict(self.base),
            "new": _summary_dict(self.new),
            "summary": {
                "rules": self.base_report.rules_loaded,
                **{status: self.counts(status) for status in STATUSES},
                "errored": len(self.errored),
                "fail_on_new": fail_on_new,
                "exit_code": self.exit_code(fail_on_new),
            },
            "metrics": [metric.to_dict() for metric in self.metrics],
            "findings": {status: [change.to_dict() for change in self.changes(status)]
                         for status in STATUSES},
            "errored": self.errored,
            "not_evaluated": {
                "base": [item.rule_id for item in self.base_report.not_evaluated],
                "new": [item.rule_id for item in self.new_report.not_evaluated],
            },
            "trajectory": self.trajectory.to_dict(),
        }


def _summary_dict(summary: RunSummary) -> dict[str, Any]:
    return {"path": summary.path, "steps": summary.steps, "first_step": summary.first_step,
            "last_step": summary.last_step, "segments": summary.segments,
            "ranks": summary.ranks}


# -- comparing ------------------------------------------------------------------------------


def compare_runs(base: Run, new: Run, rules: Sequence[Rule], *,
                 rule_timeout: float = DEFAULT_RULE_TIMEOUT,
                 max_findings: int = DEFAULT_MAX_FINDINGS) -> Comparison:
    """Evaluate `rules` on both runs and compare their metrics, findings and trajectories.

    Raises:
        RunError: DuckDB failed to read a run's Parquet parts.
    """
    base_report = evaluate(base, rules, rule_timeout=rule_timeout, max_findings=max_findings)
    new_report = evaluate(new, rules, rule_timeout=rule_timeout, max_findings=max_findings)
    base_series = metric_series(base)
    new_series = metric_series(new)
    shared = [name for name in base_series if name in new_series]
    metrics = [_compare_metric(name, base_series[name], new_series[name]) for name in shared]
    curves = [Curve(name, metric_goal(name), downsample(base_series[name]),
                    downsample(new_series[name])) for name in shared]
    return Comparison(
        base=base_report.run,
        new=new_report.run,
        base_report=base_report,
        new_report=new_report,
        metrics=metrics,
        findings=match_findings(base_report, new_report),
        curves=curves,
        trajectory=compare_trajectories(base, new),
    )


def metric_goal(name: str) -> str:
    """Return "max" for accuracy-like metric names (accuracy, acc, f1, recall, precision,
    auc, auroc, top-5, top_k, ...), else "min". A name with the word loss or error is
    "min" either way."""
    words = [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word]
    if MINIMIZED_WORDS.intersection(words):
        return "min"
    for index, word in enumerate(words):
        if word in MAXIMIZED_WORDS or _TOP_K_WORD.fullmatch(word):
            return "max"
        following = words[index + 1] if index + 1 < len(words) else ""
        if word == "top" and (following.isdigit() or following == "k"):
            return "max"
    return "min"


def metric_series(run: Run) -> dict[str, Series]:
    """Return the training loss and every evaluation metric of the run, by name.

    The training loss is `scalars.loss`, named "train loss"; an evaluation metric is
    named "<split>/<metric>". A step recorded by several segments (a resume that went
    back) keeps the last segment's value, and a step recorded by several ranks the mean.
    """
    series: dict[str, Series] = {}
    loss = _fetch(run, f"{_LOSS_BY_STEP_SQL} ORDER BY step")
    if loss:
        series[TRAIN_LOSS] = Series([row[0] for row in loss], [row[1] for row in loss])
    rows = _fetch(run, _EVALS_SQL)
    for split, metric, step, value in rows:
        name = f"{split}/{metric}"
        if name not in series:
            series[name] = Series([], [])
        series[name].steps.append(step)
        series[name].values.append(value)
    return series


_LOSS_BY_STEP_SQL = """
SELECT step, avg(loss) AS loss FROM (
    SELECT step, segment, loss, max(segment) OVER (PARTITION BY step) AS last_segment
    FROM scalars WHERE loss IS NOT NULL)
WHERE segment = last_segment
GROUP BY step
"""

_EVALS_SQL = """
SELECT split, metric, step, avg(value) FROM (
    SELECT split, metric, step, segment, value,
           max(segment) OVER (PARTITION BY split, metric, step) AS last_segment
    FROM evals WHERE value IS NOT NULL AND split IS NOT NULL AND metric IS NOT NULL)
WHERE segment = last_segment
GROUP BY split, metric, step ORDER BY split, metric, step
"""


def _fetch(run: Run, sql: str) -> list[tuple[Any, ...]]:
    try:
        return run.connection.execute(sql).fetchall()
    except duckdb.Error as error:
        raise run.data_error(error) from None


def _compare_metric(name: str, base: Series, new: Series) -> MetricComparison:
    goal = metric_goal(name)
    base_best_step, base_best = _best(base, goal)
    new_best_step, new_best = _best(new, goal)
    return MetricComparison(
        name=name, goal=goal,
        base_final=base.values[-1], new_final=new.values[-1],
        base_best=base_best, new_best=new_best,
        base_final_step=base.steps[-1], new_final_step=new.steps[-1],
        base_best_step=base_best_step, new_best_step=new_best_step,
    )


def _best(series: Series, goal: str) -> tuple[int | None, float | None]:
    """Return the step and value of the series' minimum or maximum finite value."""
    finite = [(value, step) for step, value in zip(series.steps, series.values)
              if math.isfinite(value)]
    if not finite:
        return None, None
    choose = min if goal == "min" else max
    # The earliest step wins a tie: min and max return the first of equal keys.
    value, step = choose(finite, key=lambda pair: pair[0])
    return step, value


def _difference(base: float | None, new: float | None) -> float | None:
    if base is None or new is None:
        return None
    return new - base


def downsample(series: Series, max_points: int = MAX_CURVE_POINTS) -> Series:
    """Cut a series to at most `max_points` points, keeping each bucket's min and max.

    The steps are split into `max_points // 2` buckets of equal count. Each bucket keeps
    its smallest and largest finite value in step order, so spikes survive. A bucket
    without a finite value keeps its first point.
    """
    count = len(series.steps)
    if count <= max_points:
        return series
    values = np.asarray(series.values, dtype=np.float64)
    edges = np.linspace(0, count, max_points // 2 + 1).astype(int)
    kept: list[int] = []
    for start, end in zip(edges[:-1], edges[1:]):
        chunk = values[start:end]
        finite = np.flatnonzero(np.isfinite(chunk))
        if finite.size == 0:
            kept.append(int(start))
            continue
        low = int(finite[np.argmin(chunk[finite])])
        high = int(finite[np.argmax(chunk[finite])])
        kept += sorted({start + low, start + high})
    return Series([series.steps[i] for i in kept], [series.values[i] for i in kept])


# -- findings -------------------------------------------------------------------------------


def finding_identity(finding: Finding) -> dict[str, Any]:
    """Return the evidence values that name what a finding is about.

    These are the values of the columns in IDENTITY_COLUMNS. Step ranges, measurements
    and descriptive text are left out, so a finding whose steps or numbers moved is
    still the same finding.
    """
    return {name: value for name, value in finding.evidence.items()
            if name in IDENTITY_COLUMNS}


def match_findings(base: Report, new: Report) -> list[FindingChange]:
    """Match the findings of both reports by rule id and identity.

    Findings with the same key pair up in report order as unchanged. The rest of the
    base run's are gone and the rest of the new run's are new. A finding of a rule that
    the other run did not evaluate keeps its status, with a note.
    """
    base_groups = _group_by_key(base.findings)
    new_groups = _group_by_key(new.findings)
    not_evaluated = {"base": {item.rule_id for item in base.not_evaluated},
                     "new": {item.rule_id for item in new.not_evaluated}}
    changes: list[FindingChange] = []
    for key in dict.fromkeys([*base_groups, *new_groups]):
        base_findings = base_groups.get(key, [])
        new_findings = new_groups.get(key, [])
        paired = min(len(base_findings), len(new_findings))
        for before, after in zip(base_findings, new_findings):
            changes.append(_change("unchanged", before, after))
        for before in base_findings[paired:]:
            note = None
            if before.rule_id in not_evaluated["new"]:
                note = "the new run lacks this rule's signals, so it was not evaluated there"
            changes.append(_change("gone", before, None, note))
        for after in new_findings[paired:]:
            note = None
            if after.rule_id in not_evaluated["base"]:
                note = "the base run lacks this rule's signals, so it was not evaluated there"
            changes.append(_change("new", None, after, note))
    order = {severity: index for index, severity in enumerate(SEVERITIES)}
    return sorted(changes, key=lambda change: (order.get(change.severity, len(order)),
                                               change.rule_id))


def _group_by_key(findings: list[Finding]) -> dict[tuple[Any, ...], list[Finding]]:
    groups: dict[tuple[Any, ...], list[Finding]] = {}
    for finding in findings:
        identity = finding_identity(finding)
        key = (finding.rule_id, tuple(sorted((name, repr(value))
                                             for name, value in identity.items())))
        groups.setdefault(key, []).append(finding)
    return groups


def _change(status: str, base: Finding | None, new: Finding | None,
            note: str | None = None) -> FindingChange:
    finding = new if new is not None else base
    assert finding is not None
    return FindingChange(status, finding.rule_id, finding.severity,
                         finding_identity(finding), base, new, note)


# -- trajectories -----------------------------------------------------------------------------


_TRAJECTORY_SQL = f"""
WITH points AS (
    SELECT step, segment, x, y, max(segment) OVER (PARTITION BY step) AS last_segment
    FROM trajectory
    WHERE rank = (SELECT min(rank) FROM trajectory) AND x IS NOT NULL AND y IS NOT NULL),
losses AS ({_LOSS_BY_STEP_SQL})
SELECT points.step, points.segment, points.x, points.y, losses.loss
FROM points LEFT JOIN losses ON points.step = losses.step
WHERE points.segment = points.last_segment
ORDER BY points.step
"""


def projection_of(meta: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[int, Any]]:
    """Return the run's trajectory projection and the projection of each segment.

    The run's projection is that of its first segment that records one. A segment
    record without the field has run.json's `settings` value when it is segment 0.
    """
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    by_segment: dict[int, Any] = {}
    for position, record in enumerate(meta.get("segments") or []):
        if not isinstance(record, dict):
            continue
        segment = record.get("segment", position)
        if "trajectory_projection" in record:
            by_segment[segment] = record["trajectory_projection"]
        elif segment == 0:
            by_segment[segment] = settings.get("trajectory_projection")
    # A value that is not an object (a hand-edited run.json) counts as no projection.
    run_projection = next((value for _, value in sorted(by_segment.items())
                           if isinstance(value, dict)), None)
    if run_projection is None and isinstance(settings.get("trajectory_projection"), dict):
        run_projection = settings["trajectory_projection"]
    return run_projection, by_segment


def projection_mismatch(base: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Return why two projections differ, in words, or None when they are the same."""
    if base.get("method") != new.get("method"):
        return (f"they use different projection methods ({base.get('method')!r} and "
                f"{new.get('method')!r})")
    if base.get("seed") != new.get("seed"):
        return (f"their trajectory_seed differs ({base.get('seed')!r} in the base run, "
                f"{new.get('seed')!r} in the new run)")
    if base.get("device_types") != new.get("device_types"):
        return ("their random directions were drawn on different devices "
                f"({_device_list(base)} and {_device_list(new)}), which draw different "
                "numbers from one seed")
    base_params = base.get("params") or []
    new_params = new.get("params") or []
    for index, (before, after) in enumerate(zip(base_params, new_params)):
        if before != after:
            return (f"their parameter layouts differ at parameter {index}: "
                    f"{_param_text(before)} in the base run, {_param_text(after)} in the "
                    "new run")
    if len(base_params) != len(new_params):
        return (f"they project {len(base_params)} and {len(new_params)} parameters")
    if base != new:
        return "their projection definitions in run.json differ"
    return None


def _device_list(projection: dict[str, Any]) -> str:
    return ", ".join(str(device) for device in projection.get("device_types") or []) or "none"


def _param_text(param: Any) -> str:
    if isinstance(param, dict):
        return (f"{param.get('name')!r} of shape {param.get('shape')} on "
                f"{param.get('device_type')}")
    return repr(param)


def compare_trajectories(base: Run, new: Run) -> TrajectoryComparison:
    """Load both runs' trajectories when their projections match, else explain why not."""
    comparison = TrajectoryComparison()
    base_projection, _ = projection_of(base.meta)
    new_projection, _ = projection_of(new.meta)
    missing = [label for label, run, projection in (("base", base, base_projection),
                                                    ("new", new, new_projection))
               if projection is None or "trajectory" not in run.parts]
    if missing:
        runs = "the base run" if missing == ["base"] else \
            "the new run" if missing == ["new"] else "neither run"
        verb = "recorded no trajectory" if len(missing) == 1 else "recorded a trajectory"
        comparison.notes.append(f"{runs} {verb}; record both runs with "
                                "runlens.record(..., trajectory_every=N)")
        return comparison

    mismatch = projection_mismatch(base_projection, new_projection)
    if mismatch is not None:
        comparison.notes.append(
            f"the runs' projections differ, because {mismatch}; only runs with the same "
            "trajectory_seed, model and device type share a plane")
        return comparison

    comparison.base = _load_trajectory(base, "base", comparison.notes)
    comparison.new = _load_trajectory(new, "new", comparison.notes)
    if comparison.base is None or comparison.new is None:
        comparison.base = comparison.new = None
        return comparison

    length = max(comparison.base.path_length, comparison.new.path_length)
    offset = comparison.start_offset or 0.0
    if offset > START_TOLERANCE * max(length, 1e-12):
        comparison.notes.append(
            f"the runs' first points are {offset:.4g} apart, so they did not start from "
            "the same parameters; each path is drawn relative to its own start")
    return comparison


def _load_trajectory(run: Run, label: str, notes: list[str]) -> Trajectory | None:
    projection, by_segment = projection_of(run.meta)
    rows = _fetch(run, _TRAJECTORY_SQL)
    kept = [row for row in rows if by_segment.get(row[1], projection) == projection]
    if len(kept) < len(rows):
        notes.append(f"the {label} run has {len(rows) - len(kept)} trajectory points from "
                     "segments with another projection; they are left out")
    if not kept:
        notes.append(f"the {label} run has no trajectory points in its projection")
        return None
    if len(kept) > MAX_TRAJECTORY_POINTS:
        positions = np.unique(np.linspace(0, len(kept) - 1, MAX_TRAJECTORY_POINTS).astype(int))
        kept = [kept[i] for i in positions]
    start = (kept[0][2], kept[0][3])
    return Trajectory(
        steps=[row[0] for row in kept],
        x=[row[2] - start[0] for row in kept],
        y=[row[3] - start[1] for row in kept],
        loss=[row[4] for row in kept],
        start=start,
    )


# -- rendering --------------------------------------------------------------------------------


def render_comparison(comparison: Comparison, format_name: str, fail_on_new: str) -> str:
    """Render the comparison as `format_name`: text, json or html.

    Raises:
        RunlensError: html was requested and matplotlib is not installed.
    """
    if format_name == "json":
        return json.dumps(comparison.to_dict(fail_on_new), indent=2, allow_nan=False) + "\n"
    if format_name == "html":
        try:
            from runlens.reports.compare_html import render_compare_html
        except ModuleNotFoundError as error:
            if error.name != "matplotlib" and not (error.name or "").startswith("matplotlib."):
                raise
            raise RunlensError("--format html needs matplotlib, which is not installed; "
                               "install it with pip install matplotlib, or use --format "
                               "text or json") from None
        return render_compare_html(comparison, fail_on_new)
    return render_text(comparison, fail_on_new)


def render_text(comparison: Comparison, fail_on_new: str) -> str:
    lines = [
        "runlens compare",
        f"  base: {comparison.base.path}: {run_text(comparison.base)}",
        f"  new:  {comparison.new.path}: {run_text(comparison.new)}",
        f"  {common.plural(comparison.base_report.rules_loaded, 'rule')} evaluated on each run",
        "",
    ]
    lines += metric_table_lines(comparison.metrics)
    lines += ["", findings_summary(comparison)]
    for status in STATUSES:
        changes = comparison.changes(status)
        if changes:
            lines += ["", f"{status.upper()} ({len(changes)})"]
            for change in changes:
                lines += _change_lines(change)
    if comparison.errored:
        lines += ["", f"Rule errors ({len(comparison.errored)})"]
        lines += [f"  {line}" for line in comparison.errored]
    lines += [""] + trajectory_lines(comparison.trajectory)
    lines += ["", gate_line(comparison, fail_on_new)]
    return "\n".join(lines) + "\n"


def run_text(summary: RunSummary) -> str:
    if not summary.steps:
        return "no steps"
    return (f"steps {summary.first_step}-{summary.last_step} "
            f"({common.plural(summary.steps, 'step')}), "
            f"{common.plural(summary.segments, 'segment')}, "
            f"{common.plural(summary.ranks, 'rank')}")


def metric_table_lines(metrics: list[MetricComparison]) -> list[str]:
    """Return the metrics table: final and best values of both runs and their changes."""
    if not metrics:
        return ["Metrics: the runs share no training loss or evaluation metric."]
    header = ("metric", "goal", "base final", "new final", "change", "base best",
              "new best", "change")
    rows = [header]
    for metric in metrics:
        rows.append((
            metric.name, metric.goal,
            format_number(metric.base_final), format_number(metric.new_final),
            format_change(metric.base_final, metric.new_final),
            format_number(metric.base_best), format_number(metric.new_best),
            format_change(metric.base_best, metric.new_best),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["Metrics (final: the last recorded value; best: the minimum, or the maximum "
             "where goal is max)"]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(width)
                                      for cell, width in zip(row, widths)).rstrip())
    return lines


def format_number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def format_change(base: float | None, new: float | None) -> str:
    """Format new - base, with the relative change when base is finite and not 0."""
    change = _difference(base, new)
    if change is None:
        return "-"
    text = f"{change:+.4g}"
    if base and math.isfinite(base) and math.isfinite(change):
        text += f" ({change / abs(base):+.1%})"
    return text


def findings_summary(comparison: Comparison) -> str:
    parts = []
    for status in STATUSES:
        counts = comparison.counts(status)
        detail = ", ".join(f"{counts[s]} {s}" for s in SEVERITIES if counts[s])
        parts.append(f"{sum(counts.values())} {status}" + (f" ({detail})" if detail else ""))
    return "Findings: " + ", ".join(parts) + "."


def _change_lines(change: FindingChange) -> list[str]:
    finding = change.finding
    steps = _steps_text(change)
    lines = [f"  {change.severity} {change.rule_id}: {finding.title} [{steps}]"]
    if change.identity:
        lines += _wrap("identity: " + common.evidence_text(change.identity))
    lines += _wrap(finding.message)
    if change.note:
        lines += _wrap(f"note: {change.note}")
    return lines


def _steps_text(change: FindingChange) -> str:
    if change.base is not None and change.new is not None:
        before, after = common.step_range(change.base), common.step_range(change.new)
        return after if before == after else f"base {before}, new {after}"
    return common.step_range(change.finding)


def trajectory_lines(trajectory: TrajectoryComparison) -> list[str]:
    """Describe both paths: distance, path length and straightness, and their separation."""
    if not trajectory.drawn:
        return ["Trajectory: not compared: " + "; ".join(trajectory.notes) + "."]
    lines = ["Trajectory (relative to each run's first point; a unit is on the scale of the "
             "RMS change of one parameter element)"]
    for label, path in (("base", trajectory.base), ("new", trajectory.new)):
        assert path is not None
        straightness = "-" if path.straightness is None else f"{path.straightness:.2f}"
        lines.append(f"  {label + ':':5} {common.plural(len(path.steps), 'point')}, steps "
                     f"{path.steps[0]}-{path.steps[-1]}, distance "
                     f"{format_number(path.distance)}, path length "
                     f"{format_number(path.path_length)}, straightness {straightness}")
    lines.append(f"  last points {format_number(trajectory.final_separation)} apart")
    lines += [f"  note: {note}" for note in trajectory.notes]
    return lines


def gate_line(comparison: Comparison, fail_on_new: str) -> str:
    """Say which new findings fail the comparison and the exit code that results."""
    exit_code = comparison.exit_code(fail_on_new)
    if comparison.errored:
        return (f"Exit {exit_code}: {common.plural(len(comparison.errored), 'rule')} "
                "failed to run.")
    if fail_on_new == "never":
        return f"Exit {exit_code}: --fail-on-new never, so new findings do not fail."
    severities = SEVERITIES[: SEVERITIES.index(fail_on_new) + 1]
    count = len(comparison.gating(fail_on_new))
    return (f"Exit {exit_code}: --fail-on-new {fail_on_new} fails on new "
            f"{' or '.join(severities)} findings, and there "
            f"{'is' if count == 1 else 'are'} {count}.")


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(" ".join(text.split()), WIDTH, initial_indent="    ",
                         subsequent_indent="      ", break_long_words=False,
                         break_on_hyphens=False) or ["    "]
