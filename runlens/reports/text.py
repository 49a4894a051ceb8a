"""Plain-text report for terminals and CI logs."""

from __future__ import annotations

import textwrap

from runlens.analyze.findings import SEVERITIES, Finding, Report
from runlens.reports import common

WIDTH = 88
DETAIL_INDENT = " " * 4


def render_text(report: Report, fail_on: str) -> str:
    lines = [
        f"runlens report: {report.run.path}",
        f"  {common.run_line(report)}",
        f"  {common.rules_line(report)}",
    ]
    for severity in SEVERITIES:
        findings = [f for f in report.findings if f.severity == severity]
        if findings:
            lines += ["", f"{severity.upper()} ({len(findings)})"]
            for finding in findings:
                lines += _finding_lines(finding)
    lines += _waiver_lines(report)
    lines += _rule_error_lines(report)
    lines += _not_evaluated_lines(report)
    if report.passed:
        lines += ["", f"Passed ({len(report.passed)})"]
        lines += _wrap(", ".join(report.passed), "  ")
    if report.warnings:
        lines += ["", f"Warnings ({len(report.warnings)})"]
        lines += [f"  {warning}" for warning in report.warnings]
    lines += ["", common.summary_line(report), common.gate_line(report, fail_on)]
    return "\n".join(lines) + "\n"


def _finding_lines(finding: Finding) -> list[str]:
    lines = [f"  {finding.rule_id}: {finding.title} [{common.step_range(finding)}]"]
    lines += _wrap(finding.message, DETAIL_INDENT)
    if finding.evidence:
        lines += _wrap("evidence: " + common.evidence_text(finding.evidence), DETAIL_INDENT)
    lines += _wrap("fix: " + " ".join(finding.remediation.split()), DETAIL_INDENT)
    lines.append(f"{DETAIL_INDENT}docs: {finding.docs}")
    return lines


def _waiver_lines(report: Report) -> list[str]:
    lines = []
    if report.expired_waivers:
        lines += ["", f"Expired waivers ({len(report.expired_waivers)})"]
        for message in report.expired_waivers:
            lines += _wrap(message, "  ")
    if report.waived:
        lines += ["", f"Waived ({len(report.waived)})"]
        for item in report.waived:
            finding = item.finding
            until = f" until {item.expires}" if item.expires else ""
            lines.append(f"  {finding.rule_id} [{common.step_range(finding)}] "
                         f"({finding.severity}){until}")
            lines += _wrap(f"reason: {item.reason}", DETAIL_INDENT)
    return lines


def _rule_error_lines(report: Report) -> list[str]:
    if not report.errored:
        return []
    lines = ["", f"Rule errors ({len(report.errored)})"]
    for failure in report.errored:
        lines.append(f"  {failure.rule_id}: {failure.title}")
        lines += [DETAIL_INDENT + line for line in failure.error.splitlines() if line.strip()]
    return lines


def _not_evaluated_lines(report: Report) -> list[str]:
    if not report.not_evaluated:
        return []
    lines = ["", f"Not evaluated ({len(report.not_evaluated)}): the run lacks these signals"]
    for item in report.not_evaluated:
        lines.append(f"  {item.rule_id}: missing {', '.join(item.missing)}")
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
        break_long_words=False, break_on_hyphens=False,
    ) or [indent]
