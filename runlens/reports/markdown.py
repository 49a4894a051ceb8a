"""Markdown report for pull requests: a summary table, the findings, then details.

Each finding's evidence, remediation and docs link sit in a <details> section, so that
a long report stays short on the page until a reader opens a finding.
"""

from __future__ import annotations

import html

from runlens.analyze.findings import SEVERITIES, Finding, Report
from runlens.reports import common


def render_markdown(report: Report, fail_on: str) -> str:
    lines = [
        "# runlens report",
        "",
        f"Run `{report.run.path}`: {common.run_line(report)}. {common.rules_line(report)}.",
        "",
    ]
    lines += _summary_table(report)
    lines += ["", f"**{common.gate_line(report, fail_on)}**"]
    if report.findings:
        lines += ["", "## Findings", ""]
        lines += ["| severity | rule | steps | message |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {f.severity} | `{f.rule_id}` | {common.step_range(f)} | {_cell(f.message)} |"
            for f in report.findings
        ]
        for finding in report.findings:
            lines += [""] + _details(finding)
    lines += _rule_errors(report)
    lines += _not_evaluated(report)
    if report.passed:
        lines += ["", "## Passed", "", ", ".join(f"`{rule_id}`" for rule_id in report.passed)]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {_cell(w)}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def _summary_table(report: Report) -> list[str]:
    counts = report.counts()
    rows = [(severity, counts[severity]) for severity in SEVERITIES]
    rows += [
        ("not evaluated", len(report.not_evaluated)),
        ("passed", len(report.passed)),
        ("errored", len(report.errored)),
    ]
    return ["| result | rules or findings |", "| --- | ---: |"] + [
        f"| {name} | {count} |" for name, count in rows
    ]


def _details(finding: Finding) -> list[str]:
    summary = (
        f"<b>{finding.severity}</b> <code>{html.escape(finding.rule_id)}</code>: "
        f"{html.escape(finding.title)}, {common.step_range(finding)}"
    )
    lines = ["<details>", f"<summary>{summary}</summary>", "", finding.message, ""]
    if finding.evidence:
        lines += ["| evidence | value |", "| --- | --- |"]
        lines += [
            f"| {_cell(name)} | {_cell(common.format_value(value))} |"
            for name, value in finding.evidence.items()
        ]
        lines.append("")
    lines += [
        f"**Fix:** {' '.join(finding.remediation.split())}",
        "",
        f"**Docs:** [{finding.docs}]({finding.docs})",
        "",
        "</details>",
    ]
    return lines


def _rule_errors(report: Report) -> list[str]:
    if not report.errored:
        return []
    lines = ["", "## Rule errors", "", "| rule | error |", "| --- | --- |"]
    return lines + [f"| `{f.rule_id}` | {_cell(f.error)} |" for f in report.errored]


def _not_evaluated(report: Report) -> list[str]:
    if not report.not_evaluated:
        return []
    lines = ["", "## Not evaluated", "", "The run lacks the signals these rules need.", ""]
    lines += ["| rule | missing |", "| --- | --- |"]
    return lines + [
        f"| `{item.rule_id}` | {', '.join(f'`{name}`' for name in item.missing)} |"
        for item in report.not_evaluated
    ]


def _cell(text: str) -> str:
    """Escape text for one Markdown table cell: no pipes, no line breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")
