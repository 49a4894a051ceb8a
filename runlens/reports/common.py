"""Wording that the text and Markdown reports share: step ranges, values, summary lines."""

from __future__ import annotations

from typing import Any

from runlens.analyze.findings import SEVERITIES, Finding, Report

MAX_VALUE_CHARS = 60


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def step_range(finding: Finding) -> str:
    start, end = finding.step_start, finding.step_end
    if start is None and end is None:
        return "whole run"
    if start == end:
        return f"step {start}"
    return f"steps {'?' if start is None else start}-{'?' if end is None else end}"


def format_value(value: Any) -> str:
    """Format an evidence value compactly: 4 significant digits, NULL as null."""
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        text = "[" + ", ".join(format_value(item) for item in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def evidence_text(evidence: dict[str, Any]) -> str:
    return " ".join(f"{name}={format_value(value)}" for name, value in evidence.items())


def run_line(report: Report) -> str:
    run = report.run
    if run.steps:
        steps = f"steps {run.first_step}-{run.last_step} ({plural(run.steps, 'step')})"
    else:
        steps = "no steps"
    return f"{steps}, {plural(run.segments, 'segment')}, {plural(run.ranks, 'rank')}"


def rules_line(report: Report) -> str:
    evaluated = report.rules_loaded - len(report.not_evaluated)
    return (
        f"{plural(report.rules_loaded, 'rule')} loaded: {evaluated} evaluated, "
        f"{len(report.not_evaluated)} not evaluated, {len(report.errored)} errored"
    )


def summary_line(report: Report) -> str:
    counts = report.counts()
    findings = ", ".join(
        f"{counts[s]} info" if s == "info" else plural(counts[s], s) for s in SEVERITIES
    )
    waived = f", {len(report.waived)} waived" if report.waived else ""
    return (
        f"Findings: {findings}{waived}. {len(report.not_evaluated)} not evaluated, "
        f"{len(report.passed)} passed, {len(report.errored)} errored."
    )


def gate_line(report: Report, fail_on: str) -> str:
    """Say which severities fail the run and the exit code that results."""
    exit_code = report.exit_code(fail_on)
    if report.errored:
        return f"Exit {exit_code}: {plural(len(report.errored), 'rule')} failed to run."
    if fail_on == "never":
        return f"Exit {exit_code}: --fail-on never, so findings do not fail the run."
    if report.expired_waivers:
        expired = len(report.expired_waivers)
        return (f"Exit {exit_code}: {plural(expired, 'waiver')} expired; renew or remove "
                f"{'it' if expired == 1 else 'them'} in the configuration.")
    gating = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
    count = sum(1 for finding in report.findings if finding.severity in gating)
    return (
        f"Exit {exit_code}: --fail-on {fail_on} fails on {' or '.join(gating)} findings, "
        f"and there {'is' if count == 1 else 'are'} {count}."
    )
