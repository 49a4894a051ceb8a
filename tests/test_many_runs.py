"""`runlens analyze` over several runs: discovery, the table, formats, exit codes, sandbox."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runlens import format as fmt
from runlens.analyze import load_rules
from runlens.cli import app
from runlens.many_runs import analyze_runs, find_runs, worst_first
from runlens.reports.runs_table import render_runs_markdown
from conftest import make_rule, tree_digest, write_rule

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RUNS = REPO_ROOT / "sample_runs"
JUNIT_SCHEMA = Path(__file__).with_name("junit-jenkins.xsd")

# Where each sample run is copied inside the runs folder, keyed by the label the
# reports give it. divergence has an error finding and warnings, loss-spike and
# clipping-every-step one warning each, and healthy-resume no finding.
LAYOUT = {
    "loss-spike": "loss-spike",
    "team-a/divergence": "divergence",
    "team-a/deeper/clipping-every-step": "clipping-every-step",
    "healthy-resume": "healthy-resume",
}
# The built-in rules that fire on these runs, so that the quicker tests load only them.
FAST_SELECT = "loss-spike,divergence,clipping-every-step"


def invoke(*args: object):
    # GITHUB_STEP_SUMMARY is unset here too, because module fixtures run before the
    # autouse fixture of conftest that unsets it.
    return CliRunner().invoke(app, [str(arg) for arg in args],
                              env={"GITHUB_STEP_SUMMARY": None})


def copy_runs(root: Path, layout: dict[str, str]) -> Path:
    for label, sample in layout.items():
        shutil.copytree(SAMPLE_RUNS / sample, root / label)
    return root


def table_rows(text: str) -> dict[str, list[str]]:
    """Return run label -> cells of the text table, read up to its first blank line."""
    lines = text.split("\n\n")[0].splitlines()
    assert lines[0].split()[:3] == ["RUN", "STEPS", "ERRORS"]
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four sample runs at different depths, and a run inside a run."""
    root = copy_runs(tmp_path_factory.mktemp("many") / "runs", LAYOUT)
    # A run directory inside another run's folder is not searched for.
    shutil.copytree(SAMPLE_RUNS / "healthy-resume", root / "loss-spike" / "inner-run")
    return root


@pytest.fixture(scope="module")
def folder_analysis(runs_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """Analyze the folder with every built-in rule once: the result, JSON and digests."""
    before = tree_digest(runs_folder)
    json_path = tmp_path_factory.mktemp("reports") / "runs.json"
    result = invoke("analyze", runs_folder, "--no-config", "--format", "text",
                    "--format", f"json={json_path}")
    report = json.loads(json_path.read_text(encoding="utf-8"))
    return result, report, before, tree_digest(runs_folder)


@pytest.fixture(scope="module")
def single_reports(runs_folder: Path) -> dict[str, dict]:
    """Label -> the single-run JSON report of the same run, with every built-in rule."""
    reports = {}
    for label in LAYOUT:
        result = invoke("analyze", runs_folder / label, "--no-config", "--format", "json")
        assert result.exit_code in (0, 1), result.output
        reports[label] = json.loads(result.stdout)
    return reports


def test_folder_finds_nested_runs(folder_analysis) -> None:
    result, report, _, _ = folder_analysis
    assert sorted(table_rows(result.stdout)) == sorted(LAYOUT)
    assert sorted(entry["path"] for entry in report["runs"]) == sorted(LAYOUT)
    assert "inner-run" not in result.stdout


def test_folder_table_matches_single_runs(folder_analysis, single_reports) -> None:
    result, _, _, _ = folder_analysis
    rows = table_rows(result.stdout)
    for label, single in single_reports.items():
        summary = single["summary"]
        severities = ["error", "warning", "info"]
        expected = [str(single["run"]["steps"])]
        expected += [str(summary["findings"][severity]) for severity in severities]
        expected += [str(summary["waived"]), str(summary["not_evaluated"]),
                     str(summary["errored"])]
        assert rows[label][:7] == expected, label
        fired = sorted({(severities.index(f["severity"]), f["rule_id"])
                        for f in single["findings"]})
        fired_ids = list(dict.fromkeys(rule_id for _, rule_id in fired))
        assert rows[label][7:] == ([", ".join(fired_ids)] if fired_ids else []), label


def test_folder_json_matches_single_runs(folder_analysis, single_reports) -> None:
    _, report, _, _ = folder_analysis
    entries = {entry["path"]: entry for entry in report["runs"]}
    for label, single in single_reports.items():
        entry = dict(entries[label])
        assert entry.pop("path") == label
        assert entry == single, label


def test_folder_totals_sum_single_runs(folder_analysis, single_reports) -> None:
    _, report, _, _ = folder_analysis
    totals = report["totals"]
    assert totals["runs"] == 4
    assert totals["analyzed"] == 4
    assert totals["not_analyzed"] == 0
    for severity in ("error", "warning", "info"):
        assert totals["findings"][severity] == sum(
            single["summary"]["findings"][severity] for single in single_reports.values())
    assert totals["not_evaluated"] == sum(
        single["summary"]["not_evaluated"] for single in single_reports.values())
    assert totals["exit_code"] == 1
    assert totals["failed"] == 1


def test_folder_sorted_worst_first(folder_analysis) -> None:
    result, report, _, _ = folder_analysis
    order = ["team-a/divergence", "loss-spike", "team-a/deeper/clipping-every-step",
             "healthy-resume"]
    assert list(table_rows(result.stdout)) == order
    assert [entry["path"] for entry in report["runs"]] == order


def test_folder_exit_code_and_gate(folder_analysis) -> None:
    result, _, _, _ = folder_analysis
    assert result.exit_code == 1, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[-2].startswith("Runs: 4, 4 analyzed, 0 not analyzed. Findings: 1 error, ")
    assert lines[-1] == ("Exit 1: --fail-on error fails on error findings, and 1 run of 4 "
                         "has them.")


def test_folder_leaves_runs_unchanged(folder_analysis) -> None:
    _, _, before, after = folder_analysis
    assert after == before
    assert len(before) > 100


@pytest.mark.parametrize(("fail_on", "exit_code"),
                         [("never", 0), ("error", 0), ("warning", 1), ("info", 1)])
def test_fail_on_gates_all_runs(tmp_path: Path, fail_on: str, exit_code: int) -> None:
    runs = copy_runs(tmp_path / "runs", {"a/loss-spike": "loss-spike",
                                         "b/healthy-resume": "healthy-resume"})
    result = invoke("analyze", runs, "--no-config", "--select", FAST_SELECT,
                    "--fail-on", fail_on)
    assert result.exit_code == exit_code, result.output
    assert result.stdout.splitlines()[-1].startswith(f"Exit {exit_code}: ")


def test_bad_runs_among_good(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"good/loss-spike": "loss-spike",
                                         "good/healthy-resume": "healthy-resume",
                                         "bad/corrupt-part": "divergence",
                                         "bad/truncated-json": "divergence"})
    part = sorted((runs / "bad/corrupt-part/scalars/rank-0").glob("part-*.parquet"))[0]
    part.write_bytes(b"PAR1 not really")
    (runs / "bad/truncated-json" / fmt.RUN_FILE).write_text('{"format_version": 1',
                                                            encoding="utf-8")
    before = tree_digest(runs)
    json_path = tmp_path / "runs.json"

    result = invoke("analyze", runs, "--no-config", "--select", FAST_SELECT,
                    "--format", "text", "--format", f"json={json_path}")

    assert result.exit_code == 2, result.output
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert all(line.startswith("runlens: error: ") for line in errors)
    assert f"{part}: corrupt Parquet part" in result.stderr
    assert f"{runs / 'bad/truncated-json' / 'run.json'}: invalid JSON" in result.stderr
    rows = table_rows(result.stdout)
    assert list(rows)[:2] == ["bad/corrupt-part", "bad/truncated-json"]
    assert rows["bad/corrupt-part"][-1] == "not analyzed, see below"
    assert rows["good/loss-spike"][2] == "1"  # its loss-spike warning
    assert "Exit 2: 2 runs could not be analyzed." in result.stdout
    report = json.loads(json_path.read_text(encoding="utf-8"))
    entries = {entry["path"]: entry for entry in report["runs"]}
    assert set(entries["bad/corrupt-part"]) == {"path", "error"}
    assert "corrupt Parquet part" in entries["bad/corrupt-part"]["error"]
    assert entries["good/loss-spike"]["summary"]["findings"]["warning"] == 1
    assert entries["good/healthy-resume"]["summary"]["exit_code"] == 0
    assert report["totals"]["not_analyzed"] == 2
    assert report["totals"]["exit_code"] == 2
    assert tree_digest(runs) == before


def test_sandbox_keeps_runs_apart(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "healthy-resume"})
    other_part = sorted((runs / "b" / "scalars" / "rank-0").glob("part-*.parquet"))[0]
    rule = make_rule(
        id="read-other-run", params={}, message="{rows} rows",
        query=f"SELECT 0 AS step_start, 0 AS step_end, count(*) AS rows "
              f"FROM read_parquet('{other_part.resolve()}')")
    rule_file = write_rule(tmp_path / "rules", rule)
    before = tree_digest(runs)

    # Two jobs analyze both runs at the same time, each on its own connection.
    result = invoke("analyze", runs, "--no-config", "--no-builtin", "--rules", rule_file,
                    "--format", "json", "--jobs", "2")

    assert result.exit_code == 2, result.output
    entries = {entry["path"]: entry for entry in json.loads(result.stdout)["runs"]}
    # The rule on run a may not read run b's part, which its own run reads freely.
    assert [item["rule_id"] for item in entries["a"]["errored"]] == ["read-other-run"]
    assert "Permission Error" in entries["a"]["errored"][0]["error"]
    assert entries["a"]["findings"] == []
    assert entries["b"]["errored"] == []
    assert [finding["rule_id"] for finding in entries["b"]["findings"]] == ["read-other-run"]
    assert result.stderr.startswith("runlens: error: a: rule 'read-other-run': query failed: ")
    assert "Permission Error" in result.stderr
    assert tree_digest(runs) == before


def test_jobs_do_not_change_reports(runs_folder: Path) -> None:
    reports = []
    for jobs in ("1", "3"):
        result = invoke("analyze", runs_folder, "--no-config", "--select", FAST_SELECT,
                        "--format", "json", "--jobs", jobs)
        assert result.exit_code == 1, result.output
        reports.append(json.loads(result.stdout))
    assert reports[0] == reports[1]
    assert len(reports[0]["runs"]) == 4


def test_jobs_must_be_positive(runs_folder: Path) -> None:
    result = invoke("analyze", runs_folder, "--no-config", "--jobs", "0")
    assert result.exit_code == 2
    assert "--jobs" in result.stderr


def test_several_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_runs(tmp_path / "runs", {"x/loss-spike": "loss-spike",
                                  "x/healthy-resume": "healthy-resume"})
    copy_runs(tmp_path / "more", {"clipping-every-step": "clipping-every-step"})
    monkeypatch.chdir(tmp_path)
    # runs/x/loss-spike is named directly and found in runs/ too: it is analyzed once.
    result = invoke("analyze", "runs/x/loss-spike", "runs", "more/clipping-every-step",
                    "--no-config", "--select", FAST_SELECT)
    assert result.exit_code == 0, result.output
    assert sorted(table_rows(result.stdout)) == [
        "more/clipping-every-step", "runs/x/healthy-resume", "runs/x/loss-spike"]


def test_argument_without_runs(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"loss-spike": "loss-spike"})
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    result = invoke("analyze", runs, empty, "--no-config", "--select", FAST_SELECT)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"runlens: error: {empty}: no run directory found: neither the folder nor any "
        "folder below it contains run.json; pass a run directory or a folder of runs\n")
    assert table_rows(result.stdout)[f"{runs}/loss-spike"][2] == "1"


def test_one_folder_without_runs_keeps_single_run_error(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    result = invoke("analyze", tmp_path, "--no-config", "--select", FAST_SELECT)
    assert result.exit_code == 2
    assert "not a runlens run directory (no run.json)" in result.stderr


def test_one_run_keeps_single_run_report(tmp_path: Path) -> None:
    run_dir = copy_runs(tmp_path, {"loss-spike": "loss-spike"}) / "loss-spike"
    result = invoke("analyze", run_dir, "--no-config", "--select", FAST_SELECT)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"runlens report: {run_dir}\n")


def test_markdown_table(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"loss-spike": "loss-spike",
                                         "healthy-resume": "healthy-resume"})
    result = invoke("analyze", runs, "--no-config", "--select", FAST_SELECT,
                    "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "# runlens report: 2 runs, passed"
    assert "| run | steps | errors | warnings | info | waived | not evaluated | rule errors " \
           "| rules fired |" in lines
    # clipping-every-step is not evaluated: neither run records clipping.
    assert "| loss-spike | 600 | 0 | 1 | 0 | 0 | 1 | 0 | `loss-spike` |" in lines
    assert "| healthy-resume | 500 | 0 | 0 | 0 | 0 | 1 | 0 |  |" in lines


def test_markdown_cut_to_size(tmp_path: Path) -> None:
    layout = {f"{sample}-{copy}": sample for copy in range(4)
              for sample in ("loss-spike", "divergence", "healthy-resume")}
    runs = copy_runs(tmp_path / "runs", layout)
    rules = [rule for rule in load_rules() if rule.id in FAST_SELECT.split(",")]
    outcomes = worst_first(analyze_runs(find_runs([runs]), rules, [], skip_corrupt=False,
                                        rule_timeout=60, max_findings=1000), "error")
    full = render_runs_markdown(outcomes, "error")
    full_rows = [line for line in full.splitlines() if line.startswith("| ") and
                 not line.startswith(("| run ", "| --- "))]
    assert len(full_rows) == 12
    assert "left out" not in full

    limit = len(full.encode("utf-8")) - 300
    cut = render_runs_markdown(outcomes, "error", max_chars=limit)
    cut_rows = [line for line in cut.splitlines() if line in full_rows]
    assert len(cut.encode("utf-8")) <= limit
    assert 0 < len(cut_rows) < 12
    assert cut_rows == full_rows[: len(cut_rows)]  # the worst runs stay
    left_out = 12 - len(cut_rows)
    assert f"_{left_out} runs with the fewest findings left out here" in cut


def test_junit_one_suite_per_run(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"loss-spike": "loss-spike",
                                         "healthy-resume": "healthy-resume",
                                         "broken": "healthy-resume"})
    (runs / "broken" / fmt.RUN_FILE).unlink()
    (runs / "broken" / fmt.RUN_FILE).mkdir()  # still a run folder, but unreadable
    result = invoke("analyze", runs, "--no-config", "--select", FAST_SELECT,
                    "--fail-on", "warning", "--format", "junit")
    assert result.exit_code == 2, result.output
    root = ET.fromstring(result.stdout.split("\n", 1)[1])
    assert root.tag == "testsuites"
    suites = {suite.get("name"): suite for suite in root.findall("testsuite")}
    assert list(suites) == ["broken", "loss-spike", "healthy-resume"]
    assert suites["loss-spike"].get("tests") == "3"
    assert suites["loss-spike"].get("failures") == "1"
    assert suites["broken"].find("testcase/error") is not None
    assert root.get("tests") == "7"
    assert root.get("failures") == "1"
    assert root.get("errors") == "1"
    xmlschema = pytest.importorskip("xmlschema")
    xmlschema.XMLSchema(str(JUNIT_SCHEMA)).validate(result.stdout)


def test_job_summary_gets_markdown_table(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"loss-spike": "loss-spike",
                                         "healthy-resume": "healthy-resume"})
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["analyze", str(runs), "--no-config", "--select", FAST_SELECT],
        env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.exit_code == 0, result.output
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step\n\n# runlens report: 2 runs, passed\n")
    assert "| loss-spike | 600 | 0 | 1 |" in text
    assert result.stdout.startswith("RUN ")


def test_github_annotations_name_runs(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"loss-spike": "loss-spike",
                                         "healthy-resume": "healthy-resume"})
    result = invoke("analyze", runs, "--no-config", "--select", FAST_SELECT,
                    "--format", "github")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("::warning title=runlens loss-spike::loss-spike: The loss ")
    assert lines[1].startswith("runlens: Runs: 2, 2 analyzed, 0 not analyzed.")


def test_html_rejected_for_several_runs(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "healthy-resume"})
    result = invoke("analyze", runs, "--no-config", "--format", "html",
                    "-o", tmp_path / "report.html")
    assert result.exit_code == 2
    assert result.stderr.startswith("runlens: error: --format html: the HTML report shows "
                                    "one run; for several runs use text, json, ")
    assert not (tmp_path / "report.html").exists()


def test_output_inside_a_run_rejected(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "healthy-resume"})
    before = tree_digest(runs)
    result = invoke("analyze", runs, "--no-config", "--format", f"json={runs / 'b' / 'r.json'}")
    assert result.exit_code == 2
    assert "is inside the run directory" in result.stderr
    assert tree_digest(runs) == before


def test_waivers_apply_to_every_run(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "loss-spike",
                                         "c": "healthy-resume"})
    config = tmp_path / "runlens.toml"
    config.write_text(
        'select = ["loss-spike", "divergence"]\n'
        '[[waivers]]\nrule = "loss-spike"\nreason = "known data glitch"\n'
        'expires = 2999-01-01\nrun = "a"\n', encoding="utf-8")
    result = invoke("analyze", runs, "--config", config, "--fail-on", "warning",
                    "--format", "json")
    single = invoke("analyze", runs / "a", "--config", config, "--format", "json")
    assert result.exit_code == 1, result.output
    entries = {entry["path"]: entry for entry in json.loads(result.stdout)["runs"]}
    assert entries["a"]["summary"]["waived"] == 1
    assert entries["b"]["summary"]["waived"] == 0
    assert entries["b"]["summary"]["findings"]["warning"] == 1
    assert entries["a"]["waived"] == json.loads(single.stdout)["waived"]


def test_shared_warning_listed_once(tmp_path: Path) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "loss-spike",
                                         "c": "loss-spike", "d": "loss-spike"})
    config = tmp_path / "runlens.toml"
    config.write_text(
        'select = ["loss-spike", "divergence"]\n'
        '[[waivers]]\nrule = "divergence"\nreason = "old incident"\n'
        'expires = 2999-01-01\n', encoding="utf-8")
    result = invoke("analyze", runs, "--config", config)
    assert result.exit_code == 0, result.output
    warnings = result.stdout.split("\nWarnings (1)\n")[1].split("\n\n")[0].splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("  waiver for rule 'divergence' (")
    assert warnings[0].endswith(" (4 runs: a, b, c and 1 more)")


def run_with_terminal_stderr(args: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
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
def test_progress_over_runs_in_terminal(tmp_path: Path, ci: str | None, shown: bool) -> None:
    runs = copy_runs(tmp_path / "runs", {"a": "loss-spike", "b": "healthy-resume"})
    env = {key: value for key, value in os.environ.items()
           if key not in ("CI", "GITHUB_STEP_SUMMARY")}
    if ci is not None:
        env["CI"] = ci
    code, stdout, terminal = run_with_terminal_stderr(
        ["analyze", str(runs), "--no-config", "--select", FAST_SELECT, "--format", "json"],
        env)
    assert code == 0, terminal
    assert stdout.startswith(b"{")
    assert b"analyzing runs" not in stdout
    assert (b"analyzing runs" in terminal) is shown
    assert (b"2/2" in terminal) is shown
