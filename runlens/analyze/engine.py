"""Evaluate rules on a run: check required signals, run each query, collect findings.

Each rule is one SELECT that DuckDB runs inside the run's sandbox. Python touches only
the rows that a query returns, which are findings, never the per-step data.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import duckdb

from runlens.analyze.findings import SEVERITIES, Finding, NotEvaluated, Report, RuleFailure
from runlens.analyze.errors import single_line
from runlens.analyze.findings import to_json_value
from runlens.analyze.messages import TemplateError, render_message
from runlens.analyze.query_check import STEP_COLUMNS, check_result_columns
from runlens.analyze.rules import Rule
from runlens.analyze.run import Run

logger = logging.getLogger("runlens.analyze")

# NOTE: 60 s is an estimate with wide headroom. docs/benchmarks.md measured at most 1.5 s
# for one built-in rule on a 1M-step run. A CI job with longer runs can raise it.
DEFAULT_RULE_TIMEOUT = 60.0
DEFAULT_MAX_FINDINGS = 1000


class RuleRuntimeError(Exception):
    """A rule that failed on this run. The engine reports it as a `RuleFailure`."""


def evaluate(
    run: Run,
    rules: Sequence[Rule],
    *,
    rule_timeout: float = DEFAULT_RULE_TIMEOUT,
    max_findings: int = DEFAULT_MAX_FINDINGS,
    on_rule_done: Callable[[Rule], None] | None = None,
) -> Report:
    """Evaluate every rule on the run and return the report.

    A rule whose required tables or columns the run lacks, or has only NULL in, is
    not evaluated. A rule whose query fails or runs longer than `rule_timeout` seconds
    is reported as errored, and the remaining rules still run. A rule keeps at most
    `max_findings` findings, with a report warning when it had more. Findings are sorted
    by severity, then by first step, with run-level findings (no step) first.
    `on_rule_done`, when given, is called with each rule once its outcome is recorded,
    such as to advance a progress bar.

    Raises:
        RunError: DuckDB failed to read the run's Parquet parts, such as a part with
            corrupt data pages.
    """
    report = Report(run=run.summary(), rules_loaded=len(rules), warnings=list(run.warnings))
    for rule in rules:
        report.rule_categories[rule.id] = rule.category
        report.rule_signals[rule.id] = tuple(
            f"{table}.{column}" for table, columns in rule.requires.items()
            for column in columns)
    for rule in _notify_after_each(rules, on_rule_done):
        # signals: a rule without its data is reported, never passed
        missing = missing_signals(run, rule)
        if missing:
            report.not_evaluated.append(NotEvaluated(rule.id, rule.title, rule.severity, missing))
            continue

        # query: one SELECT, its rows are findings
        started = time.perf_counter()
        try:
            findings = run_rule(run, rule, timeout=rule_timeout, max_findings=max_findings)
        except RuleRuntimeError as error:
            logger.warning("rule %s failed: %s", rule.id, error)
            report.errored.append(RuleFailure(rule.id, rule.title, str(error)))
            continue
        logger.debug("rule %s: %d findings in %.3f s", rule.id, len(findings),
                     time.perf_counter() - started)

        if len(findings) > max_findings:
            findings = findings[:max_findings]
            report.warnings.append(
                f"rule '{rule.id}' produced more than {max_findings} findings; "
                "the rest are not shown"
            )
        if findings:
            report.findings += findings
        else:
            report.passed.append(rule.id)

    report.findings.sort(key=_finding_order)
    report.not_evaluated.sort(key=lambda item: item.rule_id)
    return report


def _notify_after_each(
    rules: Sequence[Rule], on_rule_done: Callable[[Rule], None] | None
) -> Iterator[Rule]:
    """Yield each rule, and call `on_rule_done` with it when the loop requests the next.

    The loop body ends in several `continue` statements, so the call sits here, where
    every path through the body passes.
    """
    for rule in rules:
        yield rule
        if on_rule_done is not None:
            on_rule_done(rule)


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


def run_rule(
    run: Run,
    rule: Rule,
    *,
    timeout: float = DEFAULT_RULE_TIMEOUT,
    max_findings: int = DEFAULT_MAX_FINDINGS,
) -> list[Finding]:
    """Run the rule's query and turn each row into a finding.

    Returns at most `max_findings` + 1 findings, so that the caller can tell that there
    were more. A timer interrupts the query after `timeout` seconds.

    Raises:
        RuleRuntimeError: the query failed or timed out, lacks the step columns, or a
            row does not fit the message template.
        RunError: DuckDB failed to read the run's Parquet parts.
    """
    timer = threading.Timer(timeout, run.connection.interrupt)
    timer.start()
    try:
        result = run.connection.execute(rule.query, rule.bound_params())
        columns = [description[0] for description in result.description]
        rows = result.fetchmany(max_findings + 1)
    except duckdb.InterruptException:
        raise RuleRuntimeError(
            f"timed out after {timeout:g} s; raise --rule-timeout or simplify the query"
        ) from None
    except duckdb.Error as error:
        if run.is_data_error(error):
            raise run.data_error(error) from None
        raise RuleRuntimeError(f"query failed: {single_line(error)}") from None
    finally:
        timer.cancel()
        # An interrupt that fires after the query finished leaves the next query alone
        # (checked with DuckDB 2.0.1), and the join keeps it from firing any later.
        timer.join()
    check_result_columns(columns, RuleRuntimeError)
    return [_make_finding(rule, dict(zip(columns, row))) for row in rows]


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
