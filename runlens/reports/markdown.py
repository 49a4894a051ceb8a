"""Markdown report for a pull request comment or a GitHub job summary.

The report opens with the gate result and a table of counts, then lists the findings,
each with its evidence, remediation and docs link in a collapsed <details> section.
Waived findings and expired waivers follow, and the rules that were not evaluated,
errored or passed sit in collapsed sections at the end.

GitHub rejects a comment over 65,536 characters, so a long report is cut to fit: first
finding details, then findings, then the other lists, each from its end. The report
then states how many items it left out and that the other formats have them all.
"""

from __future__ import annotations

import html
from collections.abc import Callable

from runlens.analyze.findings import SEVERITIES, Finding, Report, Waived
from runlens.reports import common

# GitHub's maximum length of an issue or pull request comment body. The report measures
# UTF-8 bytes, which are never fewer than characters, so the cut text fits the limit
# however GitHub counts characters.
MAX_CHARS = 65_536
# The maximum length of a message, reason or error in one table cell, in characters.
MAX_CELL_CHARS = 1_000

GATE_RESULTS = {0: "passed", 1: "failed", 2: "rule errors"}


# Sections in the order that a long report cuts them, each from its end.
CUT_ORDER = ("details", "findings", "waived", "expired", "warnings", "passed",
             "not_evaluated", "errored")


def render_markdown(report: Report, fail_on: str, max_chars: int = MAX_CHARS) -> str:
    """Render the report as Markdown of at most `max_chars` UTF-8 bytes."""
    items = _section_items(report)
    kept = {name: len(items[name]) for name in CUT_ORDER}

    def build() -> str:
        return _document(report, fail_on, items, kept)

    for name in CUT_ORDER:
        if _size(build()) <= max_chars:
            break
        kept[name] = _most_items_that_fit(name, kept, build, max_chars)
    text = build()
    if _size(text) > max_chars:
        # Only the header is left. A run path or gate line that long is not expected,
        # but the limit still holds: the text itself is cut.
        text = text.encode("utf-8")[: max_chars - 200].decode("utf-8", "ignore")
        text += "\n\n_The report is cut here to fit GitHub's comment size limit._\n"
    return text


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _most_items_that_fit(name: str, kept: dict[str, int], build: Callable[[], str],
                         max_chars: int) -> int:
    """Return the largest number of items of section `name` at which the report fits.

    The report grows with that number, so a binary search finds it. The result is 0
    when even no items are too many, and the next section in CUT_ORDER is cut too.
    """
    low, high = 0, kept[name]
    while low < high:
        middle = (low + high + 1) // 2
        kept[name] = middle
        if _size(build()) <= max_chars:
            low = middle
        else:
            high = middle - 1
    kept[name] = low
    return low


def _section_items(report: Report) -> dict[str, list[str]]:
    """Return each shortenable section's items as Markdown, keyed by CUT_ORDER names."""
    return {
        "details": [_details(finding) for finding in report.findings],
        "findings": [_finding_row(finding) for finding in report.findings],
        "waived": [_waived_row(item) for item in report.waived],
        "expired": [f"- {_cell(message)}" for message in report.expired_waivers],
        "warnings": [f"- {_cell(warning)}" for warning in report.warnings],
        "passed": [f"- `{rule_id}`" for rule_id in report.passed],
        "not_evaluated": [
            f"| `{item.rule_id}` | {', '.join(f'`{name}`' for name in item.missing)} |"
            for item in report.not_evaluated
        ],
        "errored": [f"| `{item.rule_id}` | {_cell(item.error)} |" for item in report.errored],
    }


def _document(report: Report, fail_on: str, items: dict[str, list[str]],
              kept: dict[str, int]) -> str:
    shown = {name: items[name][: kept[name]] for name in CUT_ORDER}
    left_out = {name: len(items[name]) - kept[name] for name in CUT_ORDER}
    lines = [
        f"# runlens report: {GATE_RESULTS.get(report.exit_code(fail_on), 'failed')}",
        "",
        f"Run `{report.run.path}`: {common.run_line(report)}. {common.rules_line(report)}.",
        "",
        f"**{common.gate_line(report, fail_on)}**",
        "",
    ]
    lines += _counts_table(report)
    lines += _left_out_note(left_out)
    lines += _findings_section(shown["findings"], left_out["findings"])
    for block in shown["details"]:
        lines += ["", block]
    lines += _more_line(left_out["details"], "finding detail")
    lines += _waived_section(shown["waived"], left_out["waived"])
    lines += _expired_section(shown["expired"], left_out["expired"])
    lines += _collapsed("Not evaluated", shown["not_evaluated"], left_out["not_evaluated"],
                        ["The run lacks the signals these rules need.", "",
                         "| rule | missing |", "| --- | --- |"])
    lines += _collapsed("Rule errors", shown["errored"], left_out["errored"],
                        ["| rule | error |", "| --- | --- |"])
    lines += _collapsed("Passed", shown["passed"], left_out["passed"], [])
    lines += _collapsed("Warnings", shown["warnings"], left_out["warnings"], [])
    return "\n".join(lines) + "\n"


def _counts_table(report: Report) -> list[str]:
    counts = report.counts()
    rows = [(severity, counts[severity]) for severity in SEVERITIES]
    rows += [
        ("waived", len(report.waived)),
        ("expired waivers", len(report.expired_waivers)),
        ("not evaluated", len(report.not_evaluated)),
        ("passed", len(report.passed)),
        ("errored", len(report.errored)),
    ]
    return ["| result | rules or findings |", "| --- | ---: |"] + [
        f"| {name} | {count} |" for name, count in rows
    ]


def _left_out_note(left_out: dict[str, int]) -> list[str]:
    nouns = {"details": "finding detail", "findings": "finding", "waived": "waived finding",
             "expired": "expired waiver", "warnings": "warning", "passed": "passed rule",
             "not_evaluated": "not-evaluated rule", "errored": "rule error"}
    parts = [common.plural(left_out[name], nouns[name]) for name in CUT_ORDER
             if left_out[name]]
    if not parts:
        return []
    return [
        "",
        f"> **This summary leaves out {', '.join(parts)}** to stay within GitHub's "
        f"{MAX_CHARS:,}-character comment limit. The other formats have the full report: "
        "`--format text`, `--format json` or `--format junit`.",
    ]


def _more_line(left_out: int, noun: str) -> list[str]:
    if not left_out:
        return []
    return ["", f"_{common.plural(left_out, noun)} left out here; the other formats have "
                "them all._"]


def _finding_row(finding: Finding) -> str:
    return (f"| {finding.severity} | `{finding.rule_id}` | {common.step_range(finding)} | "
            f"{_cell(finding.message)} |")


def _findings_section(rows: list[str], left_out: int) -> list[str]:
    if not rows and not left_out:
        return []
    lines = ["", "## Findings", ""]
    if rows:
        lines += ["| severity | rule | steps | message |", "| --- | --- | --- | --- |", *rows]
    return lines + _more_line(left_out, "finding")


def _details(finding: Finding) -> str:
    summary = (
        f"<b>{finding.severity}</b> <code>{html.escape(finding.rule_id)}</code>: "
        f"{html.escape(finding.title)}, {common.step_range(finding)}"
    )
    lines = ["<details>", f"<summary>{summary}</summary>", "", _cell(finding.message), ""]
    if finding.evidence:
        lines += ["| evidence | value |", "| --- | --- |"]
        lines += [
            f"| {_cell(name)} | {_cell(common.format_value(value))} |"
            for name, value in finding.evidence.items()
        ]
        lines.append("")
    lines += [
        f"**Fix:** {_cell(finding.remediation)}",
        "",
        f"**Docs:** [{finding.docs}]({finding.docs})",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _waived_row(item: Waived) -> str:
    finding = item.finding
    return (f"| `{finding.rule_id}` | {common.step_range(finding)} | {finding.severity} | "
            f"{_cell(item.reason)} | {item.expires or 'never'} |")


def _waived_section(rows: list[str], left_out: int) -> list[str]:
    if not rows and not left_out:
        return []
    lines = ["", "## Waived findings", "", "A waiver accepted these findings, so they do not "
             "fail the run.", ""]
    if rows:
        lines += ["| rule | steps | severity | reason | expires |",
                  "| --- | --- | --- | --- | --- |", *rows]
    return lines + _more_line(left_out, "waived finding")


def _expired_section(items: list[str], left_out: int) -> list[str]:
    if not items and not left_out:
        return []
    lines = ["", "## Expired waivers", "", "Each expired waiver fails the run.", "", *items]
    return lines + _more_line(left_out, "expired waiver")


def _collapsed(title: str, items: list[str], left_out: int, head: list[str]) -> list[str]:
    """Return a closed <details> block of the items, titled with their total count."""
    total = len(items) + left_out
    if not total:
        return []
    lines = ["", "<details>", f"<summary>{title} ({total})</summary>", ""]
    if items:
        lines += head + items
    return lines + _more_line(left_out, "item") + ["", "</details>"]


def _cell(text: str) -> str:
    """Escape text for one line of Markdown, such as a table cell.

    Line breaks become spaces, pipes are escaped, and <, > and & become entities, so
    that a message cannot open an HTML tag. Text over MAX_CELL_CHARS is cut.
    """
    flat = " ".join(str(text).split())
    if len(flat) > MAX_CELL_CHARS:
        flat = flat[: MAX_CELL_CHARS - 3] + "..."
    return html.escape(flat, quote=False).replace("|", "\\|")
