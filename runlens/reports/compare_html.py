"""The HTML form of `runlens compare`: one self-contained page with its charts inlined.

The charts are PNG images drawn with matplotlib's Agg renderer, without pyplot, so no
global backend is set, and embedded as base64 data URIs: the page loads nothing from
the network or the disk.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib import colormaps

from runlens.compare import (STATUSES, TRAIN_LOSS, Comparison, Curve, FindingChange,
                             Series, TrajectoryComparison, findings_summary, format_change,
                             format_number, gate_line, run_text)
from runlens.reports import common

RUN_COLORS = {"base": "#1f77b4", "new": "#d62728"}
RUN_LINESTYLES = {"base": "solid", "new": "dashed"}
# Eval metrics beyond this many get no chart, and the page states how many.
MAX_METRIC_CHARTS = 24
METRIC_CHART_COLUMNS = 3
# A positive curve whose largest value exceeds its smallest by more than this factor
# gets a log y axis, so an early loss of 10 does not flatten a later loss of 0.1.
LOG_SCALE_RATIO = 50.0

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.new { color: #b00020; } .gone { color: #1b7f3b; }
.note { color: #555; }
img { max-width: 100%; }
code { font-size: 0.95em; }
"""


def render_compare_html(comparison: Comparison, fail_on_new: str) -> str:
    """Return the comparison as one HTML page with its charts as base64 PNG images."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>runlens compare: {_escape(_run_name(comparison.base.path))} vs "
        f"{_escape(_run_name(comparison.new.path))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>runlens compare</h1>",
        "<p>",
        f"base: <code>{_escape(comparison.base.path)}</code>: "
        f"{_escape(run_text(comparison.base))}<br>",
        f"new: <code>{_escape(comparison.new.path)}</code>: "
        f"{_escape(run_text(comparison.new))}<br>",
        f"{_escape(common.plural(comparison.base_report.rules_loaded, 'rule'))} evaluated "
        "on each run",
        "</p>",
        f"<p><strong>{_escape(gate_line(comparison, fail_on_new))}</strong></p>",
    ]
    parts += _metrics_section(comparison)
    parts += _curves_section(comparison.curves)
    parts += _findings_section(comparison)
    parts += _trajectory_section(comparison.trajectory)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _run_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _escape(text: Any) -> str:
    return html.escape(str(text))


# -- tables -----------------------------------------------------------------------------------


def _metrics_section(comparison: Comparison) -> list[str]:
    parts = ["<h2>Metrics</h2>"]
    if not comparison.metrics:
        return parts + ["<p>The runs share no training loss or evaluation metric.</p>"]
    parts += [
        "<p>Final: the last recorded value. Best: the minimum, or the maximum where goal "
        "is max. Change: new minus base.</p>",
        "<table><tr><th>metric</th><th>goal</th><th>base final</th><th>new final</th>"
        "<th>change</th><th>base best</th><th>new best</th><th>change</th></tr>",
    ]
    for metric in comparison.metrics:
        cells = [format_number(metric.base_final), format_number(metric.new_final),
                 format_change(metric.base_final, metric.new_final),
                 format_number(metric.base_best), format_number(metric.new_best),
                 format_change(metric.base_best, metric.new_best)]
        parts.append(f"<tr><td>{_escape(metric.name)}</td><td>{metric.goal}</td>"
                     + "".join(f'<td class="number">{_escape(cell)}</td>' for cell in cells)
                     + "</tr>")
    parts.append("</table>")
    return parts


def _findings_section(comparison: Comparison) -> list[str]:
    parts = ["<h2>Findings</h2>", f"<p>{_escape(findings_summary(comparison))}</p>"]
    for status in STATUSES:
        changes = comparison.changes(status)
        if not changes:
            continue
        parts += [f'<h3 class="{status}">{status.capitalize()} ({len(changes)})</h3>',
                  "<table><tr><th>severity</th><th>rule</th><th>steps</th><th>identity</th>"
                  "<th>message</th></tr>"]
        parts += [_finding_row(change) for change in changes]
        parts.append("</table>")
    if comparison.errored:
        parts += ["<h3>Rule errors</h3>", "<ul>"]
        parts += [f"<li>{_escape(line)}</li>" for line in comparison.errored]
        parts.append("</ul>")
    return parts


def _finding_row(change: FindingChange) -> str:
    finding = change.finding
    if change.base is not None and change.new is not None:
        steps = (f"base {common.step_range(change.base)}, "
                 f"new {common.step_range(change.new)}")
    else:
        steps = common.step_range(finding)
    message = _escape(finding.message)
    if change.note:
        message += f'<br><span class="note">note: {_escape(change.note)}</span>'
    identity = common.evidence_text(change.identity) if change.identity else "-"
    return (f"<tr><td>{change.severity}</td><td><code>{_escape(change.rule_id)}</code>: "
            f"{_escape(finding.title)}</td><td>{_escape(steps)}</td>"
            f"<td>{_escape(identity)}</td><td>{message}</td></tr>")


# -- charts -------------------------------------------------------------------------------------


def _image(figure: Figure, description: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img src="data:image/png;base64,{encoded}" alt="{_escape(description)}">')


def _curves_section(curves: list[Curve]) -> list[str]:
    if not curves:
        return []
    parts = ["<h2>Curves</h2>",
             "<p>Long curves keep the minimum and maximum of each bucket of steps, so "
             "spikes stay visible.</p>"]
    loss = [curve for curve in curves if curve.name == TRAIN_LOSS]
    metrics = [curve for curve in curves if curve.name != TRAIN_LOSS]
    if loss:
        figure = Figure(figsize=(9, 3.6), layout="constrained")
        _draw_curve(figure.add_subplot(), loss[0])
        parts.append(_image(figure, "Training loss of both runs by step"))
    if metrics:
        shown = metrics[:MAX_METRIC_CHARTS]
        rows = math.ceil(len(shown) / METRIC_CHART_COLUMNS)
        columns = min(len(shown), METRIC_CHART_COLUMNS)
        figure = Figure(figsize=(3.4 * columns, 2.8 * rows), layout="constrained")
        for index, curve in enumerate(shown):
            _draw_curve(figure.add_subplot(rows, columns, index + 1), curve)
        parts.append(_image(figure, "Evaluation metrics of both runs by step"))
        if len(metrics) > len(shown):
            parts.append(f"<p>{len(metrics) - len(shown)} more shared metrics have no chart; "
                         "the table above lists them all.</p>")
    return parts


def _draw_curve(axes, curve: Curve) -> None:
    for label, series in (("base", curve.base), ("new", curve.new)):
        axes.plot(series.steps, series.values, color=RUN_COLORS[label],
                  linestyle=RUN_LINESTYLES[label], linewidth=1.2,
                  marker="o" if len(series.steps) <= 30 else None, markersize=3,
                  label=label)
    if _wants_log_scale([curve.base, curve.new]):
        axes.set_yscale("log")
    axes.set_title(f"{curve.name} ({'higher' if curve.goal == 'max' else 'lower'} is better)",
                   fontsize=10)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def _wants_log_scale(series: list[Series]) -> bool:
    values = np.array([value for item in series for value in item.values], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() <= 0:
        return False
    return values.max() / values.min() > LOG_SCALE_RATIO


def _trajectory_section(trajectory: TrajectoryComparison) -> list[str]:
    parts = ["<h2>Trajectory</h2>"]
    if not trajectory.drawn:
        notes = "; ".join(trajectory.notes)
        return parts + [f'<p class="note">Trajectory chart omitted: {_escape(notes)}.</p>']
    parts.append(
        "<p>Each run's parameters projected onto two fixed random directions in parameter "
        "space, relative to the run's first point. A unit is on the scale of the RMS "
        "change of one parameter element. The colour is the training loss. Two random "
        "directions keep only a small part of a high-dimensional path, so read distances "
        "and turns as rough. docs/compare.md explains the chart and its limits.</p>")
    figure = Figure(figsize=(7.5, 6), layout="constrained")
    _draw_trajectories(figure, trajectory)
    parts.append(_image(figure, "Trajectories of both runs in the projection plane"))
    parts += ["<table><tr><th>run</th><th>points</th><th>steps</th><th>distance</th>"
              "<th>path length</th><th>straightness</th></tr>"]
    for label, path in (("base", trajectory.base), ("new", trajectory.new)):
        assert path is not None
        cells = [str(len(path.steps)), f"{path.steps[0]}-{path.steps[-1]}",
                 format_number(path.distance), format_number(path.path_length),
                 "-" if path.straightness is None else f"{path.straightness:.2f}"]
        parts.append(f"<tr><td>{label}</td>"
                     + "".join(f'<td class="number">{cell}</td>' for cell in cells) + "</tr>")
    parts.append("</table>")
    parts.append(f"<p>The last points are {format_number(trajectory.final_separation)} "
                 "apart. Straightness is distance over path length: 1 for a straight "
                 "path.</p>")
    parts += [f'<p class="note">Note: {_escape(note)}.</p>' for note in trajectory.notes]
    return parts


def _draw_trajectories(figure: Figure, trajectory: TrajectoryComparison) -> None:
    axes = figure.add_subplot()
    paths = {"base": trajectory.base, "new": trajectory.new}
    losses = np.array([np.nan if value is None else value
                       for path in paths.values() if path is not None
                       for value in path.loss], dtype=np.float64)
    norm = _loss_norm(losses)
    colormap = colormaps["viridis"].with_extremes(bad="#bbbbbb")
    collection = None

    for label, path in paths.items():
        assert path is not None
        points = np.column_stack([path.x, path.y])
        loss = np.array([np.nan if value is None else value for value in path.loss],
                        dtype=np.float64)
        if len(points) > 1:
            segments = np.stack([points[:-1], points[1:]], axis=1)
            # Each segment takes the mean loss of its two ends.
            collection = LineCollection(segments, cmap=colormap, norm=norm,
                                        linestyles=RUN_LINESTYLES[label], linewidths=2.0)
            collection.set_array((loss[:-1] + loss[1:]) / 2)
            axes.add_collection(collection)
        marker = "o" if label == "base" else "s"
        axes.plot(points[-1, 0], points[-1, 1], marker=marker, markersize=8,
                  markerfacecolor="white", markeredgecolor=RUN_COLORS[label],
                  linestyle="none", label=f"{label}: last point (step {path.steps[-1]})")
        axes.annotate(label, points[-1], textcoords="offset points", xytext=(6, 6),
                      color=RUN_COLORS[label])

    axes.plot(0, 0, marker="*", markersize=12, color="black", linestyle="none",
              label="first point")
    axes.autoscale_view()
    axes.set_aspect("equal", adjustable="datalim")
    axes.set_xlabel("direction u")
    axes.set_ylabel("direction v")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    if collection is not None:
        colorbar = figure.colorbar(collection, ax=axes)
        colorbar.set_label("training loss (base solid, new dashed)")


def _loss_norm(losses: np.ndarray) -> Normalize:
    finite = losses[np.isfinite(losses)]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    if low > 0 and high / low > LOG_SCALE_RATIO:
        return LogNorm(low, high)
    if high == low:
        return Normalize(low - 0.5, high + 0.5)
    return Normalize(low, high)
