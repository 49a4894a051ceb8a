"""Evaluate rules on a run: check required signals, run each query, collect findings.

Each rule is one SELECT that DuckDB runs inside the run's sandbox. Python touches only
the rows that a query returns, which are findings, never the per-step data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import duckdb

from runlens.analyze.findings import SEVERITIES, Finding, NotEvaluated, Report, RuleFailure
from runlens.analyze.findings import to_json_value
from runlens.analyze.messages import TemplateError, render_message
from runlens.analyze.rules import Rule
from runlens.analyze.run import Run

logger = logging.getLogger("runlens.analyze")

STEP_COLUMNS = ("step_start", "step_end")


class RuleRuntimeError(Exception):
    """A rule that failed on this run. The engine reports it as a `RuleFailure`."""


def evaluate(run: Run, rules: Sequence[Rule]) -> Report:
    """Evaluate every rule on the run and return the report.

    A rule whose required tables or columns the run lacks, or has only NULL in, is
    not evaluated. A rule whose query fails is reported as errored. Findings are sorted
    by severity, then by first step, with run-level findings (no step) first.
    """
    report = Report(run=run.summary(), rules_loaded=len(rules), warnings=list(run.warnings))
    for rule in rules:
        # signals: a rule without its data is reported, never passed
        missing = missing_signals(run, rule)
        if missing:
            report.not_evaluated.append(NotEvaluated(rule.id, rule.title, rule.severity, missing))
            continue

        # query: one SELECT, its rows are findings
        started = time.perf_counter()
        try:
            findings = run_rule(run, rule)
        except RuleRuntimeError as error:
            logger.warning("rule %s failed: %s", rule.id, error)
            report.errored.append(RuleFailure(rule.id, rule.title, str(error)))
            continue
        logger.debug("rule %s: %d findings in %.3f s", rule.id, len(findings),
                     time.perf_counter() - started)

        if findings:
            report.findings += findings
        else:
            report.passed.append(rule.id)

    report.findings.sort(key=_finding_order)
    return report


def missing_signals(run: Run, rule: Rule) -> tuple[str, ...]:
    """Return the required tables and ``table.column`` names that are absent or all NULL."""
    missing: list[str] = []
    for table, columns in rule.requires.items():
        if table not in run.tables:
            missing.append(table)
            continue
        present = set(run.columns(table))
        counts = run.non_null_counts(table, [c for c in columns if c in present])
        missing += [f"{table}.{c}" for c in columns if counts.get(c, 0) == 0]
    return tuple(missing)


def run_rule(run: Run, rule: Rule) -> list[Finding]:
    """Run the rule's query and turn each row into a finding.

    Raises:
        RuleRuntimeError: the query failed, lacks the step columns, or a row does not
            fit the message template.
    """
    try:
        result = run.connection.execute(rule.query, rule.bound_params())
        columns = [description[0] for description in result.description]
        rows = result.fetchall()
    except duckdb.Error as error:
        raise RuleRuntimeError(f"query failed: {error}") from None
    _check_columns(columns)
    return [_make_finding(rule, dict(zip(columns, row))) for row in rows]


def _check_columns(columns: list[str]) -> None:
    absent = [name for name in STEP_COLUMNS if name not in columns]
    if absent:
        raise RuleRuntimeError(
            f"query result lacks column {', '.join(absent)}; every row needs step_start "
            f"and step_end (NULL for a run-level finding); columns: {', '.join(columns)}"
        )
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise RuleRuntimeError(
            f"query result has column {', '.join(repeated)} more than once; "
            "give each column its own alias"
        )


def _make_finding(rule: Rule, row: dict[str, Any]) -> Finding:
    try:
        message = render_message(rule.message, row).strip()
    except TemplateError as error:
        raise RuleRuntimeError(f"field 'message': {error}") from None
    evidence = {
        name: to_json_value(value) for name, value in row.items() if name not in STEP_COLUMNS
    }
    return Finding(
        rule_id=rule.id,
        title=rule.title,
        severity=rule.severity,
        category=rule.category,
        step_start=_step_value("step_start", row["step_start"]),
        step_end=_step_value("step_end", row["step_end"]),
        message=message,
        evidence=evidence,
        remediation=rule.remediation,
        docs=rule.docs,
    )


def _step_value(column: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise RuleRuntimeError(
        f"column {column} must hold an integer step or NULL, got {value!r}; "
        f"cast it with {column}::BIGINT"
    )


def _finding_order(finding: Finding) -> tuple[int, float, str, float]:
    start = -math.inf if finding.step_start is None else finding.step_start
    end = -math.inf if finding.step_end is None else finding.step_end
    return (SEVERITIES.index(finding.severity), start, finding.rule_id, end)
