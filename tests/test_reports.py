"""Report renderers: JSON shape, text and Markdown sections, exit codes per --fail-on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from runlens.analyze import Report, Run, evaluate, load_rules
from runlens.reports import render_json, render_markdown, render_text
from conftest import RULES_FIXTURES, steady_scalars, write_run

SANDBOX_RULE = "read-outside-run"


@pytest.fixture
def report(spiking_run: Path) -> Report:
    """Findings from loss-above-threshold, one not evaluated, one passed, no rule errors."""
    rules = [r for r in load_rules([RULES_FIXTURES], builtin=False) if r.id != SANDBOX_RULE]
    with Run.open(spiking_run) as run:
        return evaluate(run, rules)


def test_json_report_shape(report: Report) -> None:
    data = json.loads(render_json(report, "error"))
    assert list(data) == ["runlens_version", "run", "summary", "findings", "not_evaluated",
                          "errored", "passed", "warnings", "waived", "expired_waivers"]
    assert list(data["run"]) == ["path", "format_version", "steps", "first_step", "last_step",
                                 "segments", "ranks", "tables"]
    assert data["run"]["steps"] == 100
    assert data["summary"] == {
        "rules": 3,
        "findings": {"error": 2, "warning": 0, "info": 0},
        "not_evaluated": 1,
        "passed": 1,
        "errored": 0,
        "waived": 0,
        "fail_on": "error",
        "exit_code": 1,
    }
    assert data["findings"][0] == {
        "rule_id": "loss-above-threshold",
        "title": "Loss above a threshold",
        "severity": "error",
        "category": "test",
        "step_start": 40,
        "step_end": 40,
        "message": "loss 9.00 at step 40",
        "evidence": {"loss": 9.0},
        "remediation": "Lower the learning rate.",
        "docs": "docs/rules/loss-above-threshold.md",
    }
    assert data["not_evaluated"] == [{
        "rule_id": "amp-scale-collapsed",
        "title": "AMP loss scale collapsed",
        "missing": ["scalars.amp_scale"],
    }]
    assert data["passed"] == ["decay-on-norm-or-bias"]
    assert data["warnings"] == []


def test_json_report_is_strict_json(tmp_path: Path) -> None:
    scalars = steady_scalars(10)
    scalars["loss"][3] = float("nan")
    scalars["loss"][4] = 50.0
    write_run(tmp_path, {"scalars": scalars})
    rules = [r for r in load_rules([RULES_FIXTURES], builtin=False) if r.id != SANDBOX_RULE]
    with Run.open(tmp_path) as run:
        text = render_json(evaluate(run, rules), "never")
    assert "NaN" not in text
    data = json.loads(text)
    assert data["summary"]["exit_code"] == 0
    # DuckDB orders NaN above every number, so the NaN loss is a finding with loss null.
    assert [f["evidence"]["loss"] for f in data["findings"]] == [None, 50.0]


def test_text_report_sections_in_order(report: Report) -> None:
    text = render_text(report, "error")
    headings = ["runlens report: ", "ERROR (2)", "Not evaluated (1)", "Passed (1)",
                "Findings: 2 errors, 0 warnings, 0 info."]
    positions = [text.index(heading) for heading in headings]
    assert positions == sorted(positions)
    assert "loss-above-threshold: Loss above a threshold [step 40]" in text
    assert "evidence: loss=9" in text
    assert "fix: Lower the learning rate." in text
    assert "docs: docs/rules/loss-above-threshold.md" in text
    assert "amp-scale-collapsed: missing scalars.amp_scale" in text
    assert text.rstrip().endswith(
        "Exit 1: --fail-on error fails on error findings, and there are 2."
    )


def test_text_report_header(report: Report) -> None:
    lines = render_text(report, "error").splitlines()
    assert lines[1] == "  steps 0-99 (100 steps), 1 segment, 1 rank"
    assert lines[2] == "  3 rules loaded: 2 evaluated, 1 not evaluated, 0 errored"


def test_markdown_report_summary_then_details(report: Report) -> None:
    text = render_markdown(report, "warning")
    assert text.startswith("# runlens report: failed\n")
    assert "| error | 2 |" in text
    assert "| not evaluated | 1 |" in text
    assert "| error | `loss-above-threshold` | step 40 | loss 9.00 at step 40 |" in text
    # two finding details, then the collapsed not-evaluated and passed sections
    assert text.count("<details>") == 4
    not_evaluated = text.index("<summary>Not evaluated (1)</summary>")
    assert text.index("## Findings") < text.index("<details>") < not_evaluated
    assert "| loss | 9 |" in text
    assert "**Docs:** [docs/rules/loss-above-threshold.md]" in text


@pytest.mark.parametrize(
    ("fail_on", "exit_code"),
    [("error", 1), ("warning", 1), ("info", 1), ("never", 0)],
)
def test_exit_code_with_error_findings(report: Report, fail_on: str, exit_code: int) -> None:
    assert report.exit_code(fail_on) == exit_code


def test_exit_code_with_info_findings(report: Report) -> None:
    report.findings = [dataclasses.replace(f, severity="info") for f in report.findings]
    assert report.exit_code("error") == 0
    assert report.exit_code("warning") == 0
    assert report.exit_code("info") == 1
