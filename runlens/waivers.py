"""Waivers: accept known findings until a date, so that they stop failing the gate.

A waiver names a rule, a reason and an expiry date, and can narrow itself to some runs
(a glob), a step range, or a substring of the message. `apply_waivers` runs after
`evaluate` and before any report is rendered, so every format shows the same result.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

from runlens.analyze.findings import Finding, Report, Waived

EXPIRED_FIX = "renew the date or fix the cause and remove the waiver"


@dataclass(frozen=True)
class Waiver:
    """One ``[[waivers]]`` entry of a configuration file.

    Attributes:
        run: glob for the run directory, matched as `PurePath.match` does, so ``exp*``
            matches the directory's name and ``runs/exp*`` the end of its absolute path.
        steps: inclusive [start, end]; a finding matches when its step range overlaps it.
        match: substring that the finding's message must contain (case-sensitive).
        origin: where the waiver is written, such as ``runlens.toml, waivers[0]``.
    """

    rule: str
    reason: str
    expires: datetime.date
    origin: str
    run: str | None = None
    steps: tuple[int, int] | None = None
    match: str | None = None

    def is_expired(self, today: datetime.date) -> bool:
        """Return whether the expiry date is before `today`; the expiry day itself counts."""
        return self.expires < today

    def applies_to_run(self, run_path: str) -> bool:
        return self.run is None or PurePath(run_path).match(self.run)

    def matches(self, finding: Finding) -> bool:
        """Return whether the finding has this waiver's rule, steps and message text."""
        if finding.rule_id != self.rule:
            return False
        if self.match is not None and self.match not in finding.message:
            return False
        return self.steps is None or _overlaps(finding, self.steps)

    def to_dict(self, today: datetime.date) -> dict[str, object]:
        return {
            "rule": self.rule,
            "reason": self.reason,
            "expires": self.expires.isoformat(),
            "run": self.run,
            "steps": list(self.steps) if self.steps else None,
            "match": self.match,
            "expired": self.is_expired(today),
            "source": self.origin,
        }


def _overlaps(finding: Finding, steps: tuple[int, int]) -> bool:
    """Return whether the finding's step range overlaps `steps`.

    A finding about the whole run has no steps and never matches a step range. A finding
    with only one end of its range set is treated as that single step.
    """
    start = finding.step_start if finding.step_start is not None else finding.step_end
    end = finding.step_end if finding.step_end is not None else finding.step_start
    if start is None or end is None:
        return False
    return start <= steps[1] and end >= steps[0]


def apply_waivers(
    report: Report, waivers: Sequence[Waiver], today: datetime.date | None = None
) -> None:
    """Move the findings that a waiver matches from `report.findings` to `report.waived`.

    Only waivers whose `run` glob matches the report's run apply. An applicable waiver
    that has expired waives nothing and adds a message to `report.expired_waivers`,
    which fails the gate. An applicable waiver that matches no finding adds a report
    warning, so that a stale waiver is noticed. A finding that several waivers match is
    waived by the first of them. `today` defaults to ``datetime.date.today()``.
    """
    today = today or datetime.date.today()
    waived_by: dict[int, Waiver] = {}
    for waiver in waivers:
        if not waiver.applies_to_run(report.run.path):
            continue
        if waiver.is_expired(today):
            report.expired_waivers.append(_expired_message(waiver))
            continue
        matched = [index for index, finding in enumerate(report.findings)
                   if waiver.matches(finding)]
        if not matched:
            report.warnings.append(_stale_message(waiver, report))
        for index in matched:
            waived_by.setdefault(index, waiver)

    remaining: list[Finding] = []
    for index, finding in enumerate(report.findings):
        waiver = waived_by.get(index)
        if waiver is None:
            remaining.append(finding)
        else:
            report.waived.append(Waived(finding, waiver.reason, waiver.expires.isoformat()))
    report.findings = remaining


def _expired_message(waiver: Waiver) -> str:
    return (
        f"waiver for rule '{waiver.rule}' ({waiver.origin}) expired on "
        f"{waiver.expires.isoformat()} (reason: {waiver.reason}), so it waives nothing; "
        f"{EXPIRED_FIX}"
    )


def _stale_message(waiver: Waiver, report: Report) -> str:
    prefix = f"waiver for rule '{waiver.rule}' ({waiver.origin}) matched no finding"
    findings = sum(1 for finding in report.findings if finding.rule_id == waiver.rule)
    if findings:
        return (f"{prefix}: the rule has {findings} finding(s) on this run, but none within "
                "the waiver's steps and match keys; correct those keys or remove the waiver")
    if waiver.rule in report.passed:
        return f"{prefix}: the rule passed on this run; remove the waiver if the cause is fixed"
    if any(item.rule_id == waiver.rule for item in report.not_evaluated):
        return f"{prefix}: the rule was not evaluated, because the run lacks its signals"
    if any(item.rule_id == waiver.rule for item in report.errored):
        return f"{prefix}: the rule failed to run, see Rule errors"
    return (f"{prefix}: the rule is not in the selected rules; remove the waiver or select "
            "the rule")
