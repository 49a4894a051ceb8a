"""JUnit XML report: one test case per rule, for CI systems that show test results.

The run is one ``<testsuite name="runlens">``, and each loaded rule is one
``<testcase classname="runlens.<category>" name="<rule id>">``:

- ``<failure>`` when the rule has findings at or above ``--fail-on``, or an expired
  waiver (unless ``--fail-on never``, which fails nothing);
- ``<skipped>`` when the rule was not evaluated, naming the missing signals;
- ``<error>`` when the rule's query failed;
- passing otherwise. Findings below ``--fail-on`` and waived findings go to the case's
  ``<system-out>``.

An expired waiver whose message names no rule of the report gets a case of its own,
``runlens.waivers`` / ``expired-waiver-<n>``, so that it still fails the suite.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from runlens.analyze.findings import SEVERITIES, Finding, Report, Waived
from runlens.reports import common

SUITE_NAME = "runlens"
# The category of a rule that neither the report nor the built-in rules name.
UNKNOWN_CATEGORY = "uncategorized"

# Characters that XML 1.0 does not allow anywhere in a document, even as character
# references: C0 controls other than tab, line feed and carriage return, surrogates,
# and U+FFFE and U+FFFF.
_INVALID_XML_CHARS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class _Case:
    """The report's results for one rule, gathered before the XML is built."""

    rule_id: str
    category: str | None = None
    gating: list[Finding] = field(default_factory=list)
    below_gate: list[Finding] = field(default_factory=list)
    waived: list[Waived] = field(default_factory=list)
    expired_waivers: list[str] = field(default_factory=list)
    missing: tuple[str, ...] | None = None
    error: str | None = None


def render_junit(report: Report, fail_on: str,
                 categories: Mapping[str, str] | None = None) -> str:
    """Render the report as a JUnit XML document with one test case per rule.

    `categories` maps rule ids to categories, for the rules that have no finding in
    the report. Without it, the built-in rules' categories are used.
    """
    cases = _collect_cases(report, fail_on)
    if categories is not None:
        lookup = dict(categories)
    elif report.rule_categories:
        lookup = dict(report.rule_categories)
    else:
        lookup = _builtin_categories()
    for case in cases.values():
        case.category = case.category or lookup.get(case.rule_id, UNKNOWN_CATEGORY)

    suite = ET.Element("testsuite", {"name": SUITE_NAME})
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    suite.append(_properties(report, fail_on))
    for case in sorted(cases.values(), key=lambda c: c.rule_id):
        outcome = _append_case(suite, case, fail_on)
        counts["tests"] += 1
        if outcome:
            counts[outcome] += 1
    for name, count in counts.items():
        suite.set(name, str(count))
    ET.indent(suite)
    body = ET.tostring(suite, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def _collect_cases(report: Report, fail_on: str) -> dict[str, _Case]:
    """Group the report's parts by rule id, one `_Case` per rule."""
    gating = () if fail_on == "never" else SEVERITIES[: SEVERITIES.index(fail_on) + 1]
    cases: dict[str, _Case] = {}

    def case_for(rule_id: str) -> _Case:
        return cases.setdefault(rule_id, _Case(rule_id))

    for finding in report.findings:
        case = case_for(finding.rule_id)
        case.category = finding.category
        (case.gating if finding.severity in gating else case.below_gate).append(finding)
    for item in report.waived:
        case = case_for(item.finding.rule_id)
        case.category = case.category or item.finding.category
        case.waived.append(item)
    for rule_id in report.passed:
        case_for(rule_id)
    for item in report.not_evaluated:
        case_for(item.rule_id).missing = item.missing
    for failure in report.errored:
        case_for(failure.rule_id).error = failure.error

    for position, message in enumerate(report.expired_waivers, start=1):
        rule_id = _rule_named_in(message, list(cases))
        if rule_id is None:
            rule_id = f"expired-waiver-{position}"
            cases[rule_id] = _Case(rule_id, category="waivers")
        cases[rule_id].expired_waivers.append(message)
    return cases


def _rule_named_in(message: str, rule_ids: list[str]) -> str | None:
    """Return the longest rule id that occurs in `message` as a whole word, or None.

    Rule ids contain hyphens, so a word boundary is any character that is not a letter,
    digit, underscore or hyphen.
    """
    for rule_id in sorted(rule_ids, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(rule_id)}(?![\w-])", message):
            return rule_id
    return None


@lru_cache(maxsize=1)
def _builtin_categories() -> dict[str, str]:
    """Return rule id -> category for the built-in rules.

    Used only for a Report without `rule_categories` (one built by hand, not by
    `evaluate`): a rule of it that is not built in and has no finding is classed as
    UNKNOWN_CATEGORY.
    """
    from runlens.analyze.errors import RunlensError
    from runlens.analyze.rules import load_rules

    try:
        return {rule.id: rule.category for rule in load_rules()}
    except RunlensError:
        return {}


def _properties(report: Report, fail_on: str) -> ET.Element:
    properties = ET.Element("properties")
    values = {
        "run": report.run.path,
        "steps": common.run_line(report),
        "fail_on": fail_on,
        "exit_code": str(report.exit_code(fail_on)),
    }
    values.update({f"warning.{n}": w for n, w in enumerate(report.warnings, start=1)})
    for name, value in values.items():
        ET.SubElement(properties, "property", {"name": name, "value": _xml_text(value)})
    return properties


def _append_case(suite: ET.Element, case: _Case, fail_on: str) -> str | None:
    """Append the case's <testcase> and return its count name, or None when it passed."""
    element = ET.SubElement(suite, "testcase", {
        "classname": f"{SUITE_NAME}.{case.category}",
        "name": case.rule_id,
    })
    # An error outranks a failure, which outranks a skip: a rule that is not evaluated
    # still fails when its waiver expired, as the exit code does.
    outcome = None
    expired_fail = bool(case.expired_waivers) and fail_on != "never"
    if case.error is not None:
        _child(element, "error", case.error, "query", case.error)
        outcome = "errors"
    elif case.gating or expired_fail:
        _child(element, "failure", _failure_message(case),
               _failure_type(case), _failure_text(case, expired_fail))
        outcome = "failures"
    elif case.missing is not None:
        missing = ", ".join(case.missing)
        _child(element, "skipped", f"not evaluated: the run lacks {missing}", None, None)
        outcome = "skipped"

    out = [_finding_text(f) for f in case.below_gate]
    out += [_waived_text(item) for item in case.waived]
    if outcome != "failures":
        out += [f"expired waiver: {message}" for message in case.expired_waivers]
    if out:
        system_out = ET.SubElement(element, "system-out")
        system_out.text = _xml_text("\n\n".join(out))
    return outcome


def _child(parent: ET.Element, tag: str, message: str, kind: str | None,
           text: str | None) -> None:
    child = ET.SubElement(parent, tag, {"message": _xml_text(message)})
    if kind is not None:
        child.set("type", kind)
    if text is not None:
        child.text = _xml_text(text)


def _failure_message(case: _Case) -> str:
    if case.gating:
        return case.gating[0].message
    return case.expired_waivers[0]


def _failure_type(case: _Case) -> str:
    if case.gating:
        return min((f.severity for f in case.gating), key=SEVERITIES.index)
    return "expired-waiver"


def _failure_text(case: _Case, expired_fail: bool) -> str:
    blocks = [_finding_text(finding) for finding in case.gating]
    if expired_fail:
        blocks += [f"expired waiver: {message}" for message in case.expired_waivers]
    return "\n\n".join(blocks)


def _finding_text(finding: Finding) -> str:
    lines = [
        f"{finding.severity} [{common.step_range(finding)}]: {finding.message}",
    ]
    if finding.evidence:
        lines.append(f"evidence: {common.evidence_text(finding.evidence)}")
    lines.append(f"fix: {' '.join(finding.remediation.split())}")
    lines.append(f"docs: {finding.docs}")
    return "\n".join(lines)


def _waived_text(item: Waived) -> str:
    until = f" until {item.expires}" if item.expires else ""
    return f"waived{until} ({item.reason}):\n{_finding_text(item.finding)}"


def _xml_text(text: str) -> str:
    """Remove the characters that XML 1.0 forbids. ElementTree escapes the rest."""
    return _INVALID_XML_CHARS.sub("", str(text))
