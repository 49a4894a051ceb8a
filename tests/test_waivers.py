"""Waivers: matching by rule, run, steps and message, expiry, stale waivers, and errors."""

from __future__ import annotations

import datetime
import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runlens.cli import app
from conftest import RULES_FIXTURES, tree_digest

LOSS_RULE = RULES_FIXTURES / "loss-above-threshold.yaml"
SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"
FAR_FUTURE = "2999-12-31"
FAR_PAST = "2000-01-01"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a .git entry, so that the upward search stops there."""
    folder = tmp_path / "project"
    (folder / ".git").mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


def write_waivers(project: Path, *waivers: str) -> Path:
    """Write a runlens.toml with one [[waivers]] section per text."""
    sections = [f"[[waivers]]\n{textwrap.dedent(waiver).strip()}\n" for waiver in waivers]
    path = project / "runlens.toml"
    path.write_text("\n".join(sections), encoding="utf-8")
    return path


def analyze(run_dir: Path, *args: object):
    return invoke("analyze", run_dir, "--no-builtin", "--rules", LOSS_RULE, *args)


def analyze_json(run_dir: Path, *args: object) -> tuple[int, dict]:
    result = analyze(run_dir, "--format", "json", *args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def waived_steps(report: dict) -> list[int]:
    return [item["step_start"] for item in report["waived"]]


def finding_steps(report: dict) -> list[int]:
    return [item["step_start"] for item in report["findings"]]


# ---------------------------------------------------------------------------------------
# Matching


def test_waived_error_finding_exits_0(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "steps 40-41 read a corrupt shard, fixed in the next data release"
        expires = {FAR_FUTURE}
        """)

    code, report = analyze_json(spiking_run)

    assert code == 0
    assert report["findings"] == []
    assert waived_steps(report) == [40, 41]
    assert report["waived"][0]["severity"] == "error"
    assert report["waived"][0]["waiver"] == {
        "reason": "steps 40-41 read a corrupt shard, fixed in the next data release",
        "expires": FAR_FUTURE}
    assert report["summary"]["waived"] == 2
    assert report["summary"]["findings"]["error"] == 0
    assert report["expired_waivers"] == []
    assert report["warnings"] == []


def test_waived_findings_in_text_report(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_FUTURE}
        """)

    result = analyze(spiking_run)

    assert result.exit_code == 0, result.output
    assert "Waived (2)" in result.stdout
    assert f"loss-above-threshold [step 40] (error) until {FAR_FUTURE}" in result.stdout
    assert "reason: known bad shard" in result.stdout
    assert "ERROR (" not in result.stdout


def test_waiver_string_date(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = "{FAR_FUTURE}"
        """)
    code, report = analyze_json(spiking_run)
    assert code == 0
    assert waived_steps(report) == [40, 41]


@pytest.mark.parametrize(("steps", "waived", "kept"), [
    ("[30, 40]", [40], [41]),
    ("[41, 60]", [41], [40]),
    ("[40, 41]", [40, 41], []),
])
def test_waiver_by_steps(project: Path, spiking_run: Path, steps: str, waived: list[int],
                         kept: list[int]) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "a known outlier"
        expires = {FAR_FUTURE}
        steps = {steps}
        """)

    code, report = analyze_json(spiking_run)

    assert code == (1 if kept else 0)
    assert waived_steps(report) == waived
    assert finding_steps(report) == kept


@pytest.mark.parametrize(("steps", "overlaps"), [
    ("[590, 1000]", True), ("[0, 214]", True), ("[600, 1000]", False), ("[0, 213]", False),
])
def test_waiver_steps_overlap_range(project: Path, steps: str, overlaps: bool) -> None:
    # The divergence finding of this sample run covers steps 214-599.
    write_waivers(project, f"""
        rule = "divergence"
        reason = "this sample run diverges on purpose"
        expires = {FAR_FUTURE}
        steps = {steps}
        """)
    result = invoke("analyze", SAMPLE_RUNS / "divergence", "--format", "json",
                    "--select", "divergence")
    report = json.loads(result.stdout)
    assert [(f["step_start"], f["step_end"]) for f in report["waived"] + report["findings"]] == [
        (214, 599)]
    assert len(report["waived"]) == (1 if overlaps else 0)
    assert result.exit_code == (0 if overlaps else 1)


def test_waiver_by_message(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "step 41 is a known outlier"
        expires = {FAR_FUTURE}
        match = "at step 41"
        """)

    code, report = analyze_json(spiking_run)

    assert code == 1
    assert waived_steps(report) == [41]
    assert finding_steps(report) == [40]


@pytest.mark.parametrize("pattern", ["spiking", "spik*", "*/spiking"])
def test_waiver_by_run_glob(project: Path, spiking_run: Path, pattern: str) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "this run used the corrupt shard"
        expires = {FAR_FUTURE}
        run = "{pattern}"
        """)
    code, report = analyze_json(spiking_run)
    assert code == 0
    assert waived_steps(report) == [40, 41]


def test_waiver_by_run_path_end(project: Path, spiking_run: Path) -> None:
    pattern = f"{spiking_run.parent.name}/spiking"
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "this run used the corrupt shard"
        expires = {FAR_FUTURE}
        run = "{pattern}"
        """)
    code, report = analyze_json(spiking_run)
    assert code == 0
    assert waived_steps(report) == [40, 41]


def test_waiver_for_other_run_is_ignored(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "only the nightly runs"
        expires = {FAR_FUTURE}
        run = "nightly-*"
        """, f"""
        rule = "loss-above-threshold"
        reason = "expired, but for the nightly runs only"
        expires = {FAR_PAST}
        run = "nightly-*"
        """)

    code, report = analyze_json(spiking_run)

    assert code == 1
    assert report["waived"] == []
    assert finding_steps(report) == [40, 41]
    assert report["warnings"] == []
    assert report["expired_waivers"] == []


def test_waiver_for_other_rule(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "decay-on-norm-or-bias"
        reason = "norm layers are decayed on purpose"
        expires = {FAR_FUTURE}
        """)
    code, report = analyze_json(spiking_run, "--rules",
                                RULES_FIXTURES / "decay-on-norm.yaml")
    assert code == 1
    assert finding_steps(report) == [40, 41]
    assert report["waived"] == []
    assert report["passed"] == ["decay-on-norm-or-bias"]


def test_first_matching_waiver_wins(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "first"
        expires = {FAR_FUTURE}
        steps = [40, 40]
        """, f"""
        rule = "loss-above-threshold"
        reason = "second"
        expires = {FAR_FUTURE}
        """)
    code, report = analyze_json(spiking_run)
    assert code == 0
    reasons = {item["step_start"]: item["waiver"]["reason"] for item in report["waived"]}
    assert reasons == {40: "first", 41: "second"}
    assert report["warnings"] == []


def test_waiver_on_sample_run(project: Path) -> None:
    run_dir = SAMPLE_RUNS / "divergence"
    before = tree_digest(run_dir)
    write_waivers(project, f"""
        rule = "divergence"
        reason = "this sample run diverges on purpose"
        expires = {FAR_FUTURE}
        """)

    result = invoke("analyze", run_dir, "--format", "json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [item["rule_id"] for item in report["waived"]] == ["divergence"]
    assert report["summary"]["findings"]["error"] == 0
    assert tree_digest(run_dir) == before


# ---------------------------------------------------------------------------------------
# Expiry and stale waivers


def test_expired_waiver_exits_1(project: Path, healthy_run: Path) -> None:
    config = write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_PAST}
        """)

    code, report = analyze_json(healthy_run)
    text = analyze(healthy_run)

    assert code == 1
    assert report["expired_waivers"] == [
        f"waiver for rule 'loss-above-threshold' ({config}, waivers[0]) expired on "
        f"{FAR_PAST} (reason: known bad shard), so it waives nothing; renew the date or fix "
        "the cause and remove the waiver"]
    assert text.exit_code == 1
    assert "Expired waivers (1)" in text.stdout
    assert "1 waiver expired" in text.stdout


def test_expired_waiver_waives_nothing(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_PAST}
        """)
    code, report = analyze_json(spiking_run)
    assert code == 1
    assert report["waived"] == []
    assert finding_steps(report) == [40, 41]
    assert len(report["expired_waivers"]) == 1


def test_expired_waiver_with_fail_on_never(project: Path, healthy_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_PAST}
        """)
    code, report = analyze_json(healthy_run, "--fail-on", "never")
    assert code == 0
    assert len(report["expired_waivers"]) == 1


def test_waiver_valid_on_expiry_day(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "the fix lands today"
        expires = {datetime.date.today().isoformat()}
        """)
    code, report = analyze_json(spiking_run)
    assert code == 0
    assert report["expired_waivers"] == []
    assert waived_steps(report) == [40, 41]


def test_stale_waiver_warns(project: Path, healthy_run: Path) -> None:
    config = write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_FUTURE}
        """)

    code, report = analyze_json(healthy_run)

    assert code == 0
    assert report["warnings"] == [
        f"waiver for rule 'loss-above-threshold' ({config}, waivers[0]) matched no finding: "
        "the rule passed on this run; remove the waiver if the cause is fixed"]


def test_stale_waiver_narrowed_away(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "an old spike"
        expires = {FAR_FUTURE}
        steps = [0, 10]
        """)
    code, report = analyze_json(spiking_run)
    assert code == 1
    assert len(report["warnings"]) == 1
    assert "matched no finding: the rule has 2 finding(s) on this run" in report["warnings"][0]


def test_stale_waiver_for_ignored_rule(project: Path, spiking_run: Path) -> None:
    write_waivers(project, f"""
        rule = "decay-on-norm-or-bias"
        reason = "norm layers are decayed on purpose"
        expires = {FAR_FUTURE}
        """)
    code, report = analyze_json(spiking_run, "--rules", RULES_FIXTURES / "decay-on-norm.yaml",
                                "--ignore", "decay-on-norm-or-bias")
    assert code == 1
    assert len(report["warnings"]) == 1
    assert "the rule is not in the selected rules" in report["warnings"][0]


def test_waivers_leave_run_dir_unchanged(project: Path, spiking_run: Path,
                                         tmp_path: Path) -> None:
    write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_FUTURE}
        steps = [40, 40]
        """, f"""
        rule = "loss-above-threshold"
        reason = "old"
        expires = {FAR_PAST}
        """)
    before = tree_digest(spiking_run)
    result = analyze(spiking_run, "--format", "text",
                     "--format", f"json={tmp_path / 'report.json'}")
    assert result.exit_code == 1, result.output
    assert tree_digest(spiking_run) == before


def test_config_command_lists_waivers(project: Path) -> None:
    config = write_waivers(project, f"""
        rule = "loss-above-threshold"
        reason = "known bad shard"
        expires = {FAR_PAST}
        steps = [40, 41]
        match = "loss"
        run = "spik*"
        """)

    result = invoke("config", "--no-builtin", "--rules", LOSS_RULE, "--format", "json")
    text = invoke("config", "--no-builtin", "--rules", LOSS_RULE)

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["waivers"] == [{
        "rule": "loss-above-threshold", "reason": "known bad shard", "expires": FAR_PAST,
        "run": "spik*", "steps": [40, 41], "match": "loss", "expired": True,
        "source": f"{config}, waivers[0]"}]
    assert (f"loss-above-threshold until {FAR_PAST} (expired) run=spik* steps=40-41 "
            "match='loss'") in text.stdout


# ---------------------------------------------------------------------------------------
# Errors

WAIVER_ERRORS = [
    (f'reason = "x"\nexpires = {FAR_FUTURE}', "waivers[0].rule", "missing; name the rule"),
    (f'rule = "loss-above-threshold"\nexpires = {FAR_FUTURE}', "waivers[0].reason",
     "missing; say why"),
    (f'rule = "loss-above-threshold"\nreason = "  "\nexpires = {FAR_FUTURE}',
     "waivers[0].reason", "expected a non-empty string"),
    ('rule = "loss-above-threshold"\nreason = "x"', "waivers[0].expires",
     "missing; give the last day"),
    ('rule = "loss-above-threshold"\nreason = "x"\nexpires = "31.12.2999"',
     "waivers[0].expires", "is not a valid date YYYY-MM-DD"),
    ('rule = "loss-above-threshold"\nreason = "x"\nexpires = "2999-02-30"',
     "waivers[0].expires", "is not a valid date YYYY-MM-DD"),
    ('rule = "loss-above-threshold"\nreason = "x"\nexpires = 2999-12-31T10:00:00',
     "waivers[0].expires", "expected a date YYYY-MM-DD, got date-time"),
    (f'rule = "loss-above-threshold"\nreason = "x"\nexpires = {FAR_FUTURE}\nsteps = [5]',
     "waivers[0].steps", "expected [start, end] with two integer steps"),
    (f'rule = "loss-above-threshold"\nreason = "x"\nexpires = {FAR_FUTURE}\nsteps = [9, 5]',
     "waivers[0].steps", "start 9 is after end 5"),
    (f'rule = "loss-above-threshold"\nreason = "x"\nexpires = {FAR_FUTURE}\nrun = 3',
     "waivers[0].run", "expected a glob"),
    (f'rule = "loss-above-threshold"\nreason = "x"\nexpires = {FAR_FUTURE}\nmatch = ""',
     "waivers[0].match", "expected a substring"),
    (f'rule = "loss-above-threshold"\nreason = "x"\nexpires = {FAR_FUTURE}\nuntil = 3',
     "waivers[0].until", "unknown key; valid keys: rule, reason, expires"),
    (f'rule = "loss-above-treshold"\nreason = "x"\nexpires = {FAR_FUTURE}',
     "waivers[0].rule", "unknown rule id 'loss-above-treshold'; did you mean"),
]


@pytest.mark.parametrize(("waiver", "key", "fix"), WAIVER_ERRORS)
def test_waiver_error(project: Path, healthy_run: Path, waiver: str, key: str,
                      fix: str) -> None:
    config = write_waivers(project, waiver)
    before = tree_digest(healthy_run)

    result = analyze(healthy_run)

    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"runlens: error: {config}: key '{key}': ")
    assert fix in lines[0]
    assert result.stdout == ""
    assert tree_digest(healthy_run) == before


def test_waiver_error_in_pyproject(project: Path, healthy_run: Path) -> None:
    config = project / "pyproject.toml"
    config.write_text('[[tool.runlens.waivers]]\nrule = "loss-above-threshold"\n'
                      'expires = 2999-12-31\n', encoding="utf-8")
    result = analyze(healthy_run)
    assert result.exit_code == 2
    assert result.stderr == (
        f"runlens: error: {config}: key 'tool.runlens.waivers[0].reason': missing; say why "
        "the finding is acceptable, such as reason = \"the data shard at step 4000 is "
        "known to be noisy\"\n")
