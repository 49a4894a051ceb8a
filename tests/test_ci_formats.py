"""CI report formats: JUnit XML, GitHub workflow commands, the Markdown summary and its
size limit, the GitHub job summary file, and the progress bar shown only in a terminal."""

from __future__ import annotations

import dataclasses
import os
import pty
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runlens.analyze import Report, Run, evaluate, load_rules
from runlens.analyze.findings import Waived
from runlens.cli import app
from runlens.reports import render_github, render_junit, render_markdown
from runlens.reports.github import escape_data, escape_property
from runlens.reports.markdown import MAX_CHARS
from conftest import RULES_FIXTURES, make_rule, tree_digest, write_rule

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).with_name("junit-jenkins.xsd")
LOSS_RULE = RULES_FIXTURES / "loss-above-threshold.yaml"
WAIVED_RULE = "loss-above-four"
WARNING_RULE = "loss-above-three"
CATEGORIES = {"loss-above-threshold": "test", "amp-scale-collapsed": "test",
              "decay-on-norm-or-bias": "test", "read-outside-run": "sandbox",
              WAIVED_RULE: "test", WARNING_RULE: "test"}


def invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


@pytest.fixture
def mixed_report(spiking_run: Path, tmp_path: Path) -> Report:
    """A report with one rule in every JUnit state, and one waived finding.

    loss-above-threshold fails with error findings at steps 40 and 41.
    amp-scale-collapsed is not evaluated, decay-on-norm-or-bias passes, and
    read-outside-run errors in the sandbox. loss-above-three has warning findings,
    below --fail-on error. The step-40 finding of loss-above-four is waived, and its
    step-41 finding still fails.
    """
    folder = tmp_path / "extra-rules"
    write_rule(folder, make_rule(id=WAIVED_RULE, params={
        "threshold": {"type": "number", "default": 4.0, "description": "Loss limit."}}))
    write_rule(folder, make_rule(id=WARNING_RULE, severity="warning", params={
        "threshold": {"type": "number", "default": 3.0, "description": "Loss limit."}}))
    rules = load_rules([RULES_FIXTURES, folder], builtin=False)
    with Run.open(spiking_run) as run:
        report = evaluate(run, rules)
    waived = next(f for f in report.findings if f.key == (WAIVED_RULE, 40, 40))
    report.findings.remove(waived)
    report.waived.append(Waived(waived, reason="known spike from a bad shard",
                                expires="2999-01-01"))
    return report


def parse_cases(xml_text: str) -> tuple[ET.Element, dict[str, ET.Element]]:
    suite = ET.fromstring(xml_text.encode("utf-8"))
    return suite, {case.get("name"): case for case in suite.iter("testcase")}


def case_state(case: ET.Element) -> str:
    states = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
    assert len(states) <= 1, f"{case.get('name')} has several outcomes: {states}"
    return states[0] if states else "passed"


# JUnit XML


def test_junit_counts_and_states(mixed_report: Report) -> None:
    suite, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    assert suite.tag == "testsuite"
    assert suite.get("name") == "runlens"
    assert suite.get("tests") == "6"
    assert suite.get("failures") == "2"
    assert suite.get("errors") == "1"
    assert suite.get("skipped") == "1"
    assert {name: case_state(case) for name, case in cases.items()} == {
        "loss-above-threshold": "failure",
        WAIVED_RULE: "failure",
        "amp-scale-collapsed": "skipped",
        "decay-on-norm-or-bias": "passed",
        "read-outside-run": "error",
        WARNING_RULE: "passed",
    }
    assert cases["read-outside-run"].get("classname") == "runlens.sandbox"
    assert cases["decay-on-norm-or-bias"].get("classname") == "runlens.test"


def test_junit_failure_text(mixed_report: Report) -> None:
    _, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    failure = cases["loss-above-threshold"].find("failure")
    assert failure is not None
    assert failure.get("message") == "loss 9.00 at step 40"
    assert failure.get("type") == "error"
    assert "error [step 40]: loss 9.00 at step 40" in failure.text
    assert "error [step 41]: loss 9.00 at step 41" in failure.text
    assert "evidence: loss=9" in failure.text
    assert "fix: Lower the learning rate." in failure.text
    assert "docs: docs/rules/loss-above-threshold.md" in failure.text


def test_junit_skipped_names_missing_signals(mixed_report: Report) -> None:
    _, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    skipped = cases["amp-scale-collapsed"].find("skipped")
    assert skipped is not None
    assert "scalars.amp_scale" in skipped.get("message")


def test_junit_error_has_query_message(mixed_report: Report) -> None:
    _, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    error = cases["read-outside-run"].find("error")
    assert error is not None
    assert "Permission Error" in error.get("message")


def test_junit_below_gate_and_waived_in_system_out(mixed_report: Report) -> None:
    _, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    warning_out = cases[WARNING_RULE].find("system-out")
    assert warning_out is not None
    assert "warning [step 40]: loss 9.00 at step 40" in warning_out.text
    waived_out = cases[WAIVED_RULE].find("system-out")
    assert waived_out is not None
    assert "waived until 2999-01-01 (known spike from a bad shard)" in waived_out.text
    assert "[step 40]" in waived_out.text
    assert "[step 40]" not in cases[WAIVED_RULE].find("failure").text


def test_junit_fail_on_warning_fails_warning_rule(mixed_report: Report) -> None:
    suite, cases = parse_cases(render_junit(mixed_report, "warning", CATEGORIES))
    assert case_state(cases[WARNING_RULE]) == "failure"
    assert suite.get("failures") == "3"


def test_junit_fail_on_never_fails_nothing(mixed_report: Report) -> None:
    mixed_report.expired_waivers.append("waiver for rule 'decay-on-norm-or-bias' expired")
    suite, cases = parse_cases(render_junit(mixed_report, "never", CATEGORIES))
    assert suite.get("failures") == "0"
    assert case_state(cases["loss-above-threshold"]) == "passed"
    assert "expired waiver" in cases["decay-on-norm-or-bias"].find("system-out").text


def test_junit_expired_waiver_fails_its_rule(mixed_report: Report) -> None:
    message = ("waiver for rule 'decay-on-norm-or-bias' (reason: norm decay is intended) "
               "expired on 2001-01-01; renew the date or fix the cause and remove the waiver")
    mixed_report.expired_waivers.append(message)
    suite, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    failure = cases["decay-on-norm-or-bias"].find("failure")
    assert failure is not None
    assert failure.get("message") == message
    assert suite.get("tests") == "6"
    assert suite.get("failures") == "3"


def test_junit_expired_waiver_of_unknown_rule(mixed_report: Report) -> None:
    mixed_report.expired_waivers.append("waiver for rule 'gone-rule' expired on 2001-01-01")
    suite, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    assert suite.get("tests") == "7"
    assert case_state(cases["expired-waiver-1"]) == "failure"
    assert cases["expired-waiver-1"].get("classname") == "runlens.waivers"


def test_junit_expired_waiver_of_skipped_and_errored(mixed_report: Report) -> None:
    mixed_report.expired_waivers += ["waiver for rule 'amp-scale-collapsed' expired",
                                     "waiver for rule 'read-outside-run' expired"]
    suite, cases = parse_cases(render_junit(mixed_report, "error", CATEGORIES))
    assert case_state(cases["amp-scale-collapsed"]) == "failure"
    assert case_state(cases["read-outside-run"]) == "error"
    assert "expired waiver" in cases["read-outside-run"].find("system-out").text
    assert suite.get("skipped") == "0"


def test_junit_escapes_and_strips_control_chars(mixed_report: Report) -> None:
    finding = mixed_report.findings[0]
    hostile = 'a <tag> & "quote" ]]> \x00\x08\x1b[31m\ufffe end\nsecond line'
    mixed_report.findings[0] = dataclasses.replace(finding, message=hostile)
    text = render_junit(mixed_report, "error", CATEGORIES)
    _, cases = parse_cases(text)
    failure = cases[finding.rule_id].find("failure")
    assert failure.get("message") == 'a <tag> & "quote" ]]> [31m end\nsecond line'
    assert "\x1b" not in text
    assert "\x00" not in text


def test_junit_builtin_categories_on_sample_run() -> None:
    with Run.open(REPO_ROOT / "sample_runs" / "clipping-every-step") as run:
        rules = load_rules()
        report = evaluate(run, rules)
    suite, cases = parse_cases(render_junit(report, "warning"))
    assert suite.get("tests") == str(len(rules))
    expected = {rule.id: f"runlens.{rule.category}" for rule in rules}
    assert {name: case.get("classname") for name, case in cases.items()} == expected
    assert case_state(cases["clipping-every-step"]) == "failure"
    assert int(suite.get("skipped")) == len(report.not_evaluated)


def test_junit_matches_jenkins_schema(mixed_report: Report) -> None:
    xmlschema = pytest.importorskip("xmlschema")
    mixed_report.expired_waivers.append("waiver for rule 'gone-rule' expired")
    schema = xmlschema.XMLSchema(str(SCHEMA))
    schema.validate(render_junit(mixed_report, "error", CATEGORIES))


def test_junit_schema_rejects_bad_counts() -> None:
    xmlschema = pytest.importorskip("xmlschema")
    schema = xmlschema.XMLSchema(str(SCHEMA))
    assert not schema.is_valid('<testsuite tests="many"><testcase name="a"/></testsuite>')
    assert not schema.is_valid('<testsuite tests="1"><testcase/></testsuite>')


def test_analyze_junit_cli(spiking_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "report.xml"
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                    "--format", f"junit={output}")
    assert result.exit_code == 1, result.output
    suite, cases = parse_cases(output.read_text(encoding="utf-8"))
    assert suite.get("tests") == "1"
    assert case_state(cases["loss-above-threshold"]) == "failure"


# GitHub workflow commands


def test_github_one_command_per_finding(mixed_report: Report) -> None:
    lines = render_github(mixed_report, "error").splitlines()
    commands = [line for line in lines if line.startswith("::")]
    expected = len(mixed_report.findings) + len(mixed_report.errored)
    assert len(commands) == expected
    assert lines[0] == ("::error title=runlens loss-above-threshold::loss 9.00 at step 40 "
                        "(step 40)")
    assert ("::warning title=runlens loss-above-three::loss 9.00 at step 40 (step 40)"
            in lines)
    assert not lines[-1].startswith("::")
    assert lines[-1].startswith("runlens: Findings: 3 errors, 2 warnings, 0 info, 1 waived.")


def test_github_info_is_notice(mixed_report: Report) -> None:
    mixed_report.findings = [dataclasses.replace(mixed_report.findings[0], severity="info")]
    mixed_report.errored = []
    first = render_github(mixed_report, "error").splitlines()[0]
    assert first.startswith("::notice title=runlens loss-above-threshold::")


def test_github_escapes_message(mixed_report: Report) -> None:
    finding = dataclasses.replace(mixed_report.findings[0],
                                  message="loss up 50% at\nstep 40::see\r\nabove")
    mixed_report.findings = [finding]
    mixed_report.errored = []
    text = render_github(mixed_report, "error")
    assert text.splitlines()[0] == ("::error title=runlens loss-above-threshold::loss up "
                                    "50%25 at%0Astep 40::see%0D%0Aabove (step 40)")
    assert len(text.splitlines()) == 2


def test_github_property_escapes() -> None:
    assert escape_property("a:b,c%d\ne") == "a%3Ab%2Cc%25d%0Ae"
    assert escape_data("a:b,c") == "a:b,c"


def test_github_expired_waiver_is_error(mixed_report: Report) -> None:
    mixed_report.expired_waivers.append("waiver for rule 'x' expired on 2001-01-01")
    text = render_github(mixed_report, "error")
    assert ("::error title=runlens expired waiver::waiver for rule 'x' expired on 2001-01-01"
            in text.splitlines())


def test_analyze_github_cli(spiking_run: Path) -> None:
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                    "--format", "github")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        "::error title=runlens loss-above-threshold::loss 9.00 at step 40 (step 40)",
        "::error title=runlens loss-above-threshold::loss 9.00 at step 41 (step 41)",
    ]
    assert len(lines) == 3


# Markdown summary


def test_markdown_title_counts_and_sections(mixed_report: Report) -> None:
    mixed_report.expired_waivers.append("waiver for rule 'x' expired on 2001-01-01")
    text = render_markdown(mixed_report, "error")
    assert text.startswith("# runlens report: rule errors\n")
    assert "| error | 3 |" in text
    assert "| waived | 1 |" in text
    assert "| expired waivers | 1 |" in text
    order = ["## Findings", "<details>", "## Waived findings", "## Expired waivers",
             "<summary>Not evaluated (1)</summary>", "<summary>Rule errors (1)</summary>",
             "<summary>Passed (1)</summary>"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert ("| `loss-above-four` | step 40 | error | known spike from a bad shard | "
            "2999-01-01 |") in text
    assert "leaves out" not in text


@pytest.mark.parametrize(("fail_on", "title"), [("never", "passed"), ("error", "failed")])
def test_markdown_title_follows_gate(mixed_report: Report, fail_on: str, title: str) -> None:
    mixed_report.errored = []
    assert render_markdown(mixed_report, fail_on).startswith(f"# runlens report: {title}\n")


def test_markdown_escapes_html_and_pipes(mixed_report: Report) -> None:
    finding = dataclasses.replace(mixed_report.findings[0],
                                  message="a | b <details> & c\nnext")
    mixed_report.findings = [finding]
    text = render_markdown(mixed_report, "error")
    assert "| a \\| b &lt;details&gt; &amp; c next |" in text
    assert text.count("<details>") == text.count("</details>")


def many_findings(report: Report, count: int) -> Report:
    template = report.findings[0]
    report.findings = [
        dataclasses.replace(template, step_start=step, step_end=step,
                            message=f"loss 9.00 at step {step}; " + "detail " * 20)
        for step in range(count)
    ]
    return report


def test_markdown_thousands_of_findings_fit(mixed_report: Report) -> None:
    report = many_findings(mixed_report, 5000)
    text = render_markdown(report, "error")
    assert len(text) <= MAX_CHARS
    assert len(text.encode("utf-8")) <= MAX_CHARS
    assert "<summary><b>error</b>" not in text  # every detail was cut first
    rows = [line for line in text.splitlines() if line.startswith("| error | `")]
    assert 0 < len(rows) < 5000
    left_out = 5000 - len(rows)
    assert f"This summary leaves out 5000 finding details, {left_out} findings**" in text
    assert "`--format json`" in text
    assert f"_{left_out} findings left out here" in text
    assert text.count("<details>") == text.count("</details>")


def test_markdown_cuts_details_before_findings(mixed_report: Report) -> None:
    report = many_findings(mixed_report, 200)
    text = render_markdown(report, "error")
    assert len(text.encode("utf-8")) <= MAX_CHARS
    rows = [line for line in text.splitlines() if line.startswith("| error | `")]
    assert len(rows) == 200
    details = text.count("<summary><b>error</b>")
    assert 0 < details < 200
    assert f"This summary leaves out {200 - details} finding details**" in text


def test_markdown_small_limit_still_holds(mixed_report: Report) -> None:
    text = render_markdown(many_findings(mixed_report, 50), "error", max_chars=3000)
    assert len(text.encode("utf-8")) <= 3000
    assert text.startswith("# runlens report:")


# GITHUB_STEP_SUMMARY


def test_step_summary_appended_twice(spiking_run: Path, tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("previous step\n", encoding="utf-8")
    env = {"GITHUB_STEP_SUMMARY": str(summary)}
    for _ in range(2):
        result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                        "--format", "json", env=env)
        assert result.exit_code == 1, result.output
        assert result.stdout.startswith("{")
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("previous step\n")
    assert text.count("# runlens report: failed\n") == 2
    assert text.count("| error | `loss-above-threshold` | step 40 |") == 2


def test_step_summary_write_failure_warns(spiking_run: Path, tmp_path: Path) -> None:
    env = {"GITHUB_STEP_SUMMARY": str(tmp_path)}  # a folder cannot be opened for append
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE, env=env)
    assert result.exit_code == 1, result.output
    assert "ERROR (2)" in result.stdout
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"runlens: warning: GITHUB_STEP_SUMMARY={tmp_path}: "
                                  "the job summary was not written: ")


def test_step_summary_inside_run_not_written(spiking_run: Path) -> None:
    before = tree_digest(spiking_run)
    env = {"GITHUB_STEP_SUMMARY": str(spiking_run / "summary.md")}
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE, env=env)
    assert result.exit_code == 1, result.output
    assert "is inside the run directory" in result.stderr
    assert tree_digest(spiking_run) == before


def test_step_summary_unset_writes_nothing(spiking_run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE)
    assert result.exit_code == 1, result.output
    assert list(tmp_path.iterdir()) == [spiking_run]


# Progress bar


def test_progress_absent_from_captured_output(spiking_run: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                    "--format", "json")
    assert result.exit_code == 1, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("{")


def run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Run runlens with stderr on a pseudo-terminal; return exit code, stdout, terminal."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "runlens", *args], stdin=terminal,
                               stdout=subprocess.PIPE, stderr=terminal, env=env,
                               cwd=REPO_ROOT)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # Linux raises EIO once the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    stdout = process.stdout.read()
    process.wait()
    os.close(controller)
    return process.returncode, stdout, seen


@pytest.mark.parametrize(("ci", "shown"), [(None, True), ("true", False)])
def test_progress_in_terminal_unless_ci(spiking_run: Path, ci: str | None,
                                        shown: bool) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("CI", "GITHUB_STEP_SUMMARY")}
    if ci is not None:
        env["CI"] = ci
    code, stdout, terminal = run_in_terminal(
        ["analyze", str(spiking_run), "--no-builtin", "--rules", str(RULES_FIXTURES),
         "--format", "json"], env)
    assert code == 2, terminal  # read-outside-run errors in the sandbox
    assert stdout.startswith(b"{")
    assert b"evaluating rules" not in stdout
    assert (b"evaluating rules" in terminal) is shown
    assert (b"4/4" in terminal) is shown
