"""Report formats, one module per format, and the registry that `--format` reads.

A renderer takes the Report, the `--fail-on` level and the open Run, and returns the
report as text. Most formats use the Report alone; those that draw charts read the
run's tables too, so reports are rendered while the run is still open.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from runlens.analyze.findings import Report
from runlens.reports.github import render_github
from runlens.reports.html import render_html
from runlens.reports.json import render_json
from runlens.reports.junit import render_junit
from runlens.reports.markdown import render_markdown
from runlens.reports.text import render_text

if TYPE_CHECKING:
    from runlens.analyze.run import Run

Renderer = Callable[[Report, str, "Optional[Run]"], str]


@dataclass(frozen=True)
class ReportFormat:
    """A `--format` value: its renderer and the one-line description that help shows."""

    name: str
    render: Renderer
    description: str


def _report_only(render_report: Callable[[Report, str], str]) -> Renderer:
    def render(report: Report, fail_on: str, run: Optional["Run"]) -> str:
        return render_report(report, fail_on)
    return render


FORMATS: dict[str, ReportFormat] = {
    "text": ReportFormat("text", _report_only(render_text), "plain text for a terminal"),
    "json": ReportFormat("json", _report_only(render_json),
                         "every field, for scripts (docs/cli.md describes the shape)"),
    "markdown": ReportFormat("markdown", _report_only(render_markdown),
                             "a summary for a pull request comment or a job summary"),
    "junit": ReportFormat("junit", _report_only(render_junit),
                          "JUnit XML, one test case per rule, for CI test reports"),
    "github": ReportFormat("github", _report_only(render_github),
                           "GitHub Actions annotations, one workflow command per finding"),
    "html": ReportFormat("html", render_html,
                         "one self-contained page with charts of the run (docs/reports.md)"),
}


def render(report: Report, format_name: str, fail_on: str, run: Optional["Run"] = None) -> str:
    """Render the report in `format_name` (a key of FORMATS), gated at `fail_on`."""
    return FORMATS[format_name].render(report, fail_on, run)


__all__ = ["FORMATS", "ReportFormat", "render", "render_github", "render_json", "render_junit",
           "render_markdown", "render_text"]
