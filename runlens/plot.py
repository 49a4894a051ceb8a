"""`runlens plot`: write the charts of the HTML report as PNG files, one per chart.

The run is analyzed as `runlens analyze` does it (rules, configuration, waivers), so the
findings are drawn on the charts. Only the output folder is written: it is created if
missing and must lie outside the run directory. Existing files in it other than the
chart PNGs are left alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runlens.analyze import Report, Run, RunlensError, evaluate
from runlens.analyze.engine import DEFAULT_MAX_FINDINGS, DEFAULT_RULE_TIMEOUT
from runlens.analyze.errors import os_error_reason
from runlens.config import Settings, build_rule_set
from runlens.waivers import apply_waivers


@dataclass(frozen=True)
class PlotResult:
    """The PNG files written, in chart order, and the report whose findings they show."""

    paths: list[Path]
    report: Report


def plot_run(run_dir: Path, output_dir: Path, settings: Settings, *,
             skip_corrupt: bool = False, rule_timeout: float = DEFAULT_RULE_TIMEOUT,
             max_findings: int = DEFAULT_MAX_FINDINGS) -> PlotResult:
    """Analyze the run with `settings` and write ``<chart>.png`` files into `output_dir`.

    Raises:
        RunlensError: `output_dir` lies inside the run directory, is a file or cannot be
            created or written, or the run directory, a rule or the configuration is
            invalid.
    """
    check_output_dir(output_dir, run_dir)
    rules = build_rule_set(settings).rules
    with Run.open(run_dir, skip_corrupt=skip_corrupt) as run:
        report = evaluate(run, rules, rule_timeout=rule_timeout, max_findings=max_findings)
        apply_waivers(report, settings.waivers)
        # Imported here so that the other commands never load matplotlib.
        from runlens.reports.charts import build_charts

        charts = build_charts(run, report, rules)
    _make_folder(output_dir)
    paths = []
    for chart in charts:
        path = output_dir / f"{chart.name}.png"
        try:
            path.write_bytes(chart.png())
        except OSError as error:
            raise RunlensError(f"-o {output_dir}: cannot write {path.name}: "
                               f"{os_error_reason(error)}") from None
        paths.append(path)
    return PlotResult(paths, report)


def check_output_dir(output_dir: Path, run_dir: Path) -> None:
    """Reject an output folder inside the run directory, or a path that is not a folder."""
    if output_dir.resolve().is_relative_to(Path(run_dir).resolve()):
        raise RunlensError(
            f"-o {output_dir}: is inside the run directory {run_dir}, which runlens never "
            "modifies; write the charts to another folder"
        )
    if output_dir.exists() and not output_dir.is_dir():
        raise RunlensError(f"-o {output_dir}: is a file, not a folder; pass a folder for "
                           "the chart PNGs")


def _make_folder(output_dir: Path) -> None:
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as error:
        raise RunlensError(f"-o {output_dir}: cannot create the folder: "
                           f"{os_error_reason(error)}") from None
