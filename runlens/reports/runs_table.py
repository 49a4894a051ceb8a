"""Reports over several runs: one row per run, then totals and the gate line.

`render_runs` takes the outcomes in the order to show them (runlens.many_runs sorts
the worst runs first) and returns one of these formats:

- text: an aligned table of runs by findings;
- json: one object with a `runs` list, each entry the single-run JSON report plus the
  run's `path`, and the `totals`;
- markdown: the table as Markdown, cut to GitHub's comment size limit;
- junit: one ``<testsuite>`` per run inside ``<testsuites>``;
- github: the single-run annotations, each message starting with the run's path.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import runlens
from runlens.analyze.findings import EXIT_OK, SEVERITIES
from runlens.reports import common
from runlens.reports.github import COMMANDS, escape_data, escape_property
from runlens.reports.junit import render_junit
from runlens.reports.markdown import GATE_RESULTS, MAX_CHARS
from runlens.reports.markdown import _cell as markdown_cell

if TYPE_CHECKING:
    from runlens.many_runs import RunOutcome

RUNS_FORMATS = ("text", "json", "markdown", "junit", "github")

HEADERS = ("RUN", "STEPS", "ERRORS", "WARNINGS", "INFO", "WAIVED", "NOT EVALUATED",
           "RULE ERRORS", "RULES FIRED")
NOT_ANALYZED = "not analyzed, see below"
# At most this many run paths follow a warning that several runs share.
MAX_RUNS_PER_WARNING = 3


def render_runs(outcomes: Sequence[RunOutcome], format_name: str, fail_on: str) -> str:
    """Render the outcomes of several runs in `format_name`, one of RUNS_FORMATS."""
    renderers = {"text": render_runs_text, "json": render_runs_json,
                 "markdown": render_runs_markdown, "junit": render_runs_junit,
                 "github": render_runs_github}
    return renderers[format_name](outcomes, fail_on)


def exit_code(outcomes: Sequence[RunOutcome], fail_on: str) -> int:
    """Return the worst exit code over the runs: 2 for a run not analyzed or a rule error."""
    return max((outcome.exit_code(fail_on) for outcome in outcomes), default=EXIT_OK)


def totals(outcomes: Sequence[RunOutcome], fail_on: str) -> dict[str, Any]:
    """Return the counts over all runs, as the JSON report's `totals` shows them."""
    reports = [outcome.report for outcome in outcomes if outcome.report is not None]
    findings = dict.fromkeys(SEVERITIES, 0)
    for report in reports:
        for severity, count in report.counts().items():
            findings[severity] += count
    return {
        "runs": len(outcomes),
        "analyzed": len(reports),
        "not_analyzed": len(outcomes) - len(reports),
        "failed": sum(1 for outcome in outcomes if outcome.exit_code(fail_on) != EXIT_OK),
        "findings": findings,
        "waived": sum(len(report.waived) for report in reports),
        "expired_waivers": sum(len(report.expired_waivers) for report in reports),
        "not_evaluated": sum(len(report.not_evaluated) for report in reports),
        "errored": sum(len(report.errored) for report in reports),
        "fail_on": fail_on,
        "exit_code": exit_code(outcomes, fail_on),
    }


def rules_fired(outcome: RunOutcome) -> list[str]:
    """Return the ids of the rules with findings, error rules first, then by id."""
    if outcome.report is None:
        return []
    ranked = {(SEVERITIES.index(f.severity), f.rule_id) for f in outcome.report.findings}
    return list(dict.fromkeys(rule_id for _, rule_id in sorted(ranked)))


def summary_line(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    counts = totals(outcomes, fail_on)
    findings = counts["findings"]
    severities = ", ".join(
        f"{findings[s]} info" if s == "info" else common.plural(findings[s], s)
        for s in SEVERITIES
    )
    expired = counts["expired_waivers"]
    expired_text = f", {common.plural(expired, 'expired waiver')}" if expired else ""
    return (
        f"Runs: {counts['runs']}, {counts['analyzed']} analyzed, {counts['not_analyzed']} "
        f"not analyzed. Findings: {severities}, {counts['waived']} waived{expired_text}. "
        f"{counts['not_evaluated']} not evaluated, "
        f"{common.plural(counts['errored'], 'rule error')}."
    )


def gate_line(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    """Say why the exit code over all runs is what it is."""
    code = exit_code(outcomes, fail_on)
    reports = [outcome.report for outcome in outcomes if outcome.report is not None]
    not_analyzed = len(outcomes) - len(reports)
    errored = sum(1 for report in reports if report.errored)
    if not_analyzed or errored:
        reasons = []
        if not_analyzed:
            reasons.append(f"{common.plural(not_analyzed, 'run')} could not be analyzed")
        if errored:
            reasons.append(f"rules failed to run on {common.plural(errored, 'run')}")
        return f"Exit {code}: {' and '.join(reasons)}."
    if fail_on == "never":
        return f"Exit {code}: --fail-on never, so findings do not fail the runs."
    gating = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
    with_findings = sum(1 for report in reports
                        if any(f.severity in gating for f in report.findings))
    line = (f"Exit {code}: --fail-on {fail_on} fails on {' or '.join(gating)} findings, "
            f"and {common.plural(with_findings, 'run')} of {len(reports)} "
            f"{'has' if with_findings == 1 else 'have'} them")
    expired = sum(1 for report in reports if report.expired_waivers)
    if expired:
        line += (f"; {common.plural(expired, 'run')} {'has' if expired == 1 else 'have'} "
                 "an expired waiver")
    return line + "."


def _row(outcome: RunOutcome, quote: str = "") -> tuple[str, ...]:
    """Return the table row of a run; `quote` goes around each rule id, as Markdown's `."""
    report = outcome.report
    if report is None:
        return (outcome.label, *(["-"] * 7), NOT_ANALYZED)
    counts = report.counts()
    fired = ", ".join(f"{quote}{rule_id}{quote}" for rule_id in rules_fired(outcome))
    if report.expired_waivers:
        expired = common.plural(len(report.expired_waivers), "expired waiver")
        fired = f"{fired} ({expired})" if fired else expired
    return (outcome.label, str(report.run.steps),
            *(str(counts[severity]) for severity in SEVERITIES),
            str(len(report.waived)), str(len(report.not_evaluated)),
            str(len(report.errored)), fired)


def render_runs_text(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    rows = [HEADERS, *(_row(outcome) for outcome in outcomes)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADERS) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    not_analyzed = [outcome for outcome in outcomes if outcome.report is None]
    if not_analyzed:
        lines += ["", f"Not analyzed ({len(not_analyzed)})"]
        lines += [f"  {outcome.label}: {outcome.error}" for outcome in not_analyzed]
    warnings = _grouped_warnings(outcomes)
    if warnings:
        lines += ["", f"Warnings ({len(warnings)})"]
        lines += [f"  {warning}" for warning in warnings]
    lines += ["", summary_line(outcomes, fail_on), gate_line(outcomes, fail_on)]
    return "\n".join(lines) + "\n"


def _grouped_warnings(outcomes: Sequence[RunOutcome]) -> list[str]:
    """Return each report warning once, with the runs that have it.

    A waiver that matches nothing warns on every run it applies to, so listing each
    warning per run would repeat it hundreds of times.
    """
    runs_by_warning: dict[str, list[str]] = {}
    for outcome in outcomes:
        if outcome.report is None:
            continue
        for warning in outcome.report.warnings:
            runs_by_warning.setdefault(warning, []).append(outcome.label)
    lines = []
    for warning, labels in runs_by_warning.items():
        if len(labels) == 1:
            lines.append(f"{labels[0]}: {warning}")
            continue
        shown = ", ".join(labels[:MAX_RUNS_PER_WARNING])
        more = len(labels) - MAX_RUNS_PER_WARNING
        listed = f"{shown} and {more} more" if more > 0 else shown
        lines.append(f"{warning} ({len(labels)} runs: {listed})")
    return lines


def render_runs_json(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    runs = []
    for outcome in outcomes:
        if outcome.report is None:
            runs.append({"path": outcome.label, "error": outcome.error})
        else:
            runs.append({"path": outcome.label, **outcome.report.to_dict(fail_on)})
    document = {
        "runlens_version": runlens.__version__,
        "totals": totals(outcomes, fail_on),
        "runs": runs,
    }
    # allow_nan=False, as in the single-run report: evidence has NaN and inf as null.
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def render_runs_markdown(outcomes: Sequence[RunOutcome], fail_on: str,
                         max_chars: int = MAX_CHARS) -> str:
    """Render the table as Markdown of at most `max_chars` UTF-8 bytes.

    A longer table loses rows from its end, where the runs with the fewest findings
    are, and states how many it left out.
    """
    rows = [_markdown_row(outcome) for outcome in outcomes]

    def size(kept: int) -> int:
        return len(_markdown_document(outcomes, fail_on, rows, kept).encode("utf-8"))

    kept = len(rows)
    if size(kept) > max_chars:
        # Below the full table the size grows with the rows kept, so a binary search
        # finds the most rows that fit. The note about left-out rows is in every size.
        low, high = 0, len(rows) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if size(middle) <= max_chars:
                low = middle
            else:
                high = middle - 1
        kept = low
    text = _markdown_document(outcomes, fail_on, rows, kept)
    if len(text.encode("utf-8")) > max_chars:
        # Only the header and the runs not analyzed are left, and they are too long.
        text = text.encode("utf-8")[: max_chars - 200].decode("utf-8", "ignore")
        text += "\n\n_The report is cut here to fit GitHub's comment size limit._\n"
    return text


def _markdown_row(outcome: RunOutcome) -> str:
    label, *counts, fired = _row(outcome, quote="`")
    return "| " + " | ".join([markdown_cell(label), *counts, fired]) + " |"


def _markdown_document(outcomes: Sequence[RunOutcome], fail_on: str, rows: list[str],
                       kept: int) -> str:
    code = exit_code(outcomes, fail_on)
    lines = [
        f"# runlens report: {common.plural(len(outcomes), 'run')}, "
        f"{GATE_RESULTS.get(code, 'failed')}",
        "",
        f"**{gate_line(outcomes, fail_on)}**",
        "",
        summary_line(outcomes, fail_on),
        "",
        "| " + " | ".join(header.lower() for header in HEADERS) + " |",
        "| --- | " + " | ".join("---:" for _ in HEADERS[1:-1]) + " | --- |",
        *rows[:kept],
    ]
    if kept < len(rows):
        lines += ["", f"_{common.plural(len(rows) - kept, 'run')} with the fewest findings "
                      f"left out here to stay within GitHub's {MAX_CHARS:,}-character "
                      "comment limit; `--format text` and `--format json` list them all._"]
    not_analyzed = [outcome for outcome in outcomes if outcome.report is None]
    if not_analyzed:
        lines += ["", "## Not analyzed", ""]
        lines += [f"- `{markdown_cell(outcome.label)}`: {markdown_cell(outcome.error or '')}"
                  for outcome in not_analyzed]
    return "\n".join(lines) + "\n"


def render_runs_junit(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    """Render one <testsuite> per run, named by the run's path, inside <testsuites>.

    Each analyzed run's suite is the single-run JUnit report. A run that was not
    analyzed gets a suite with one errored case, ``runlens.run`` / ``open``.
    """
    root = ET.Element("testsuites", {"name": "runlens"})
    counts = {"tests": 0, "failures": 0, "errors": 0}
    for outcome in outcomes:
        if outcome.report is None:
            suite = ET.Element("testsuite", {"tests": "1", "failures": "0", "errors": "1",
                                             "skipped": "0"})
            case = ET.SubElement(suite, "testcase", {"classname": "runlens.run",
                                                     "name": "open"})
            ET.SubElement(case, "error", {"message": outcome.error or "", "type": "run"})
        else:
            suite = ET.fromstring(render_junit(outcome.report, fail_on))
        suite.set("name", outcome.label)
        for name in counts:
            counts[name] += int(suite.get(name, "0"))
        root.append(suite)
    for name, count in counts.items():
        root.set(name, str(count))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def render_runs_github(outcomes: Sequence[RunOutcome], fail_on: str) -> str:
    """Render the annotations of every run, each message prefixed with the run's path."""
    lines = []
    for outcome in outcomes:
        report = outcome.report
        if report is None:
            lines.append(_command("error", "runlens", f"{outcome.label}: not analyzed: "
                                                      f"{outcome.error}"))
            continue
        lines += [
            _command(COMMANDS[f.severity], f"runlens {f.rule_id}",
                     f"{outcome.label}: {f.message} ({common.step_range(f)})")
            for f in report.findings
        ]
        lines += [_command("error", f"runlens {failure.rule_id}",
                           f"{outcome.label}: rule failed: {failure.error}")
                  for failure in report.errored]
        lines += [_command("error", "runlens expired waiver", f"{outcome.label}: {message}")
                  for message in report.expired_waivers]
    lines.append(f"runlens: {summary_line(outcomes, fail_on)} {gate_line(outcomes, fail_on)}")
    return "\n".join(lines) + "\n"


def _command(name: str, title: str, message: str) -> str:
    return f"::{name} title={escape_property(title)}::{escape_data(message)}"

