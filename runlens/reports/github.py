"""GitHub Actions workflow commands: one annotation line per finding, then a summary line.

A line ``::error title=runlens <rule id>::<message> (steps a-b)`` in a job's log becomes
an annotation on the workflow run. Findings map to ``::error``, ``::warning`` and
``::notice`` by severity. Rule errors and expired waivers, which fail the gate, are
``::error`` lines too. Waived findings get no line.
"""

from __future__ import annotations

from runlens.analyze.findings import Finding, Report
from runlens.reports import common

COMMANDS = {"error": "error", "warning": "warning", "info": "notice"}


def render_github(report: Report, fail_on: str) -> str:
    lines = [_finding_command(finding) for finding in report.findings]
    lines += [_command("error", f"runlens {failure.rule_id}", f"rule failed: {failure.error}")
              for failure in report.errored]
    lines += [_command("error", "runlens expired waiver", message)
              for message in report.expired_waivers]
    lines.append(f"runlens: {common.summary_line(report)} {common.gate_line(report, fail_on)}")
    return "\n".join(lines) + "\n"


def _finding_command(finding: Finding) -> str:
    return _command(COMMANDS[finding.severity], f"runlens {finding.rule_id}",
                    f"{finding.message} ({common.step_range(finding)})")


def _command(name: str, title: str, message: str) -> str:
    return f"::{name} title={escape_property(title)}::{escape_data(message)}"


def escape_data(text: str) -> str:
    """Escape a command's message: %, carriage return and line feed, as GitHub reads them.

    The runner splits a command at the first ``::`` after its properties, so a ``::``
    inside the message needs no escape.
    """
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a property value: the message escapes, plus ``:`` and ``,``, which end it."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")
