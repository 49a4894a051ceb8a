"""Report renderers, one module per format. Each takes a Report and returns text."""

from __future__ import annotations

from collections.abc import Callable

from runlens.analyze.findings import Report
from runlens.reports.json import render_json
from runlens.reports.markdown import render_markdown
from runlens.reports.text import render_text

Renderer = Callable[[Report, str], str]

RENDERERS: dict[str, Renderer] = {
    "text": render_text,
    "json": render_json,
    "markdown": render_markdown,
}


def render(report: Report, format_name: str, fail_on: str) -> str:
    """Render the report in `format_name` (a key of RENDERERS), gated at `fail_on`."""
    return RENDERERS[format_name](report, fail_on)


__all__ = ["RENDERERS", "render", "render_json", "render_markdown", "render_text"]
