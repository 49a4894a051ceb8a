"""Results of evaluating rules on a run: findings, rules not evaluated, rule failures.

`Report.to_dict` is the JSON report. Its keys are stable, and docs/cli.md documents them.
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import runlens
from runlens.analyze.errors import EXIT_INPUT_ERROR
from runlens.analyze.run import RunSummary

SEVERITIES = ("error", "warning", "info")
EXIT_OK = 0
EXIT_FINDINGS = 1


@dataclass(frozen=True)
class Finding:
    """One row of a rule's query: a failure over a step range, with its evidence.

    `step_start` and `step_end` are None for a finding about the whole run. `evidence`
    contains the row's other columns in query order, as JSON values (NaN and inf as None).
    """

    rule_id: str
    title: str
    severity: str
    category: str
    step_start: int | None
    step_end: int | None
    message: str
    evidence: dict[str, Any]
    remediation: str
    docs: str

    @property
    def key(self) -> tuple[str, int | None, int | None]:
        """The (rule id, first step, last step) tuple that identifies a finding in tests."""
        return (self.rule_id, self.step_start, self.step_end)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "title": self.title,
            "severity": self.severity,
            "category": self.category,
            "step_start": self.step_start,
            "step_end": self.step_end,
            "message": self.message,
            "evidence": self.evidence,
            "remediation": self.remediation,
            "docs": self.docs,
        }


@dataclass(frozen=True)
class NotEvaluated:
    """A rule whose required signals the run lacks: `missing` names ``table.column``."""

    rule_id: str
    title: str
    severity: str
    missing: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "title": self.title, "missing": list(self.missing)}


@dataclass(frozen=True)
class RuleFailure:
    """A rule whose query failed on this run, with DuckDB's error message."""

    rule_id: str
    title: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "title": self.title, "error": self.error}


@dataclass(frozen=True)
class Waived:
    """A finding that a waiver accepted: it is reported but does not fail the gate."""

    finding: Finding
    reason: str
    expires: str | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.finding.to_dict(),
                "waiver": {"reason": self.reason, "expires": self.expires}}


@dataclass
class Report:
    """Everything the analysis of one run found, ready for a renderer."""

    run: RunSummary
    rules_loaded: int
    findings: list[Finding] = field(default_factory=list)
    not_evaluated: list[NotEvaluated] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    errored: list[RuleFailure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waived: list[Waived] = field(default_factory=list)
    # One message per waiver whose expiry date has passed; each fails the gate.
    expired_waivers: list[str] = field(default_factory=list)
    # Rule id -> category, and rule id -> the `table.column` signals the rule requires,
    # for every rule evaluated, so that formats can place and group rules without
    # findings.
    rule_categories: dict[str, str] = field(default_factory=dict)
    rule_signals: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Return the number of findings per severity, for every severity."""
        counts = dict.fromkeys(SEVERITIES, 0)
        for finding in self.findings:
            counts[finding.severity] += 1
        return counts

    def exit_code(self, fail_on: str) -> int:
        """Return 2 if a rule failed, 1 if a finding is at or above `fail_on`, else 0."""
        if self.errored:
            return EXIT_INPUT_ERROR
        if fail_on == "never":
            return EXIT_OK
        if self.expired_waivers:
            return EXIT_FINDINGS
        gating = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
        failed = any(finding.severity in gating for finding in self.findings)
        return EXIT_FINDINGS if failed else EXIT_OK

    def to_dict(self, fail_on: str) -> dict[str, Any]:
        """Return the JSON report. NaN and inf values are already None."""
        run = self.run
        return {
            "runlens_version": runlens.__version__,
            "run": {
                "path": run.path,
                "format_version": run.format_version,
                "steps": run.steps,
                "first_step": run.first_step,
                "last_step": run.last_step,
                "segments": run.segments,
                "ranks": run.ranks,
                "tables": list(run.tables),
            },
            "summary": {
                "rules": self.rules_loaded,
                "findings": self.counts(),
                "not_evaluated": len(self.not_evaluated),
                "passed": len(self.passed),
                "errored": len(self.errored),
                "waived": len(self.waived),
                "fail_on": fail_on,
                "exit_code": self.exit_code(fail_on),
            },
            "findings": [finding.to_dict() for finding in self.findings],
            "not_evaluated": [item.to_dict() for item in self.not_evaluated],
            "errored": [item.to_dict() for item in self.errored],
            "passed": list(self.passed),
            "warnings": list(self.warnings),
            "waived": [item.to_dict() for item in self.waived],
            "expired_waivers": list(self.expired_waivers),
        }


def to_json_value(value: Any) -> Any:
    """Convert a DuckDB result value to plain JSON types. NaN and inf become None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return to_json_value(float(value))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)
