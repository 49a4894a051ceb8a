"""The runlens command line: exit codes, options, rule commands, and what it never touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import runlens
from runlens import format as fmt
from runlens.cli import app
from conftest import (
    RULES_FIXTURES,
    corrupt_data_pages,
    make_rule,
    steady_scalars,
    tree_digest,
    write_rule,
    write_run,
)

LOSS_RULE = str(RULES_FIXTURES / "loss-above-threshold.yaml")
REPO_ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def analyze(run_dir: Path, *args: str):
    return invoke("analyze", run_dir, "--no-builtin", "--rules", LOSS_RULE, *args)


def test_analyze_exit_0_without_findings(healthy_run: Path) -> None:
    result = analyze(healthy_run)
    assert result.exit_code == 0, result.output
    assert "Passed (1)" in result.stdout
    assert result.stderr == ""


def test_analyze_exit_1_with_error_finding(spiking_run: Path) -> None:
    result = analyze(spiking_run)
    assert result.exit_code == 1, result.output
    assert "ERROR (2)" in result.stdout


@pytest.mark.parametrize(("fail_on", "exit_code"), [("never", 0), ("warning", 1), ("info", 1)])
def test_analyze_fail_on(spiking_run: Path, fail_on: str, exit_code: int) -> None:
    result = analyze(spiking_run, "--fail-on", fail_on)
    assert result.exit_code == exit_code, result.output


def test_analyze_fail_on_error_ignores_warnings(spiking_run: Path, tmp_path: Path) -> None:
    rule = write_rule(tmp_path / "rules", make_rule(severity="warning"))
    args = ["analyze", spiking_run, "--no-builtin", "--rules", rule]
    assert invoke(*args).exit_code == 0
    assert invoke(*args, "--fail-on", "warning").exit_code == 1


def test_analyze_missing_run_dir(tmp_path: Path) -> None:
    result = analyze(tmp_path / "missing")
    assert result.exit_code == 2
    assert result.stderr == f"runlens: error: {tmp_path / 'missing'}: run directory not found\n"
    assert "Traceback" not in result.output


def test_analyze_not_a_run_dir(tmp_path: Path) -> None:
    result = analyze(tmp_path)
    assert result.exit_code == 2
    assert "not a runlens run directory (no run.json)" in result.stderr


def test_analyze_corrupt_part(spiking_run: Path) -> None:
    bad = spiking_run / "scalars" / "rank-0" / fmt.part_name(0, 7)
    bad.write_bytes(b"PAR1 not really")
    result = analyze(spiking_run)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: {bad}: corrupt Parquet part")
    assert "--skip-corrupt" in result.stderr


def test_analyze_corrupt_data_pages(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", {"scalars": steady_scalars()})
    part = corrupt_data_pages(run_dir / "scalars" / "rank-0" / fmt.part_name(0, 0))
    result = analyze(run_dir)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: {part}: cannot read Parquet data: ")
    assert result.stderr.endswith(
        "the part may be corrupt; move it aside or rerun with --skip-corrupt\n"
    )
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_analyze_skip_corrupt_data_pages(tmp_path: Path) -> None:
    scalars = steady_scalars(200)
    halves = [{name: values[:100] for name, values in scalars.items()},
              {name: values[100:] for name, values in scalars.items()}]
    run_dir = write_run(tmp_path / "run", {"scalars": halves})
    part = corrupt_data_pages(run_dir / "scalars" / "rank-0" / fmt.part_name(0, 1))
    result = analyze(run_dir, "--skip-corrupt", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["run"]["steps"] == 100
    assert len(report["warnings"]) == 1
    assert str(part) in report["warnings"][0]


def test_analyze_run_json_path(healthy_run: Path) -> None:
    result = analyze(healthy_run / "run.json")
    assert result.exit_code == 2
    assert result.stderr == (
        f"runlens: error: {healthy_run / 'run.json'}: is a file; pass the run directory "
        "that contains run.json\n"
    )


def test_analyze_run_json_wrong_type(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", {"scalars": steady_scalars()})
    meta = json.loads((run_dir / fmt.RUN_FILE).read_text())
    (run_dir / fmt.RUN_FILE).write_text(json.dumps(meta | {"optimizer": "adam"}))
    result = analyze(run_dir)
    assert result.exit_code == 2
    assert "run.json: field 'optimizer': expected object or null, got str 'adam'" in (
        result.stderr
    )


def test_analyze_skip_corrupt(spiking_run: Path) -> None:
    bad = spiking_run / "scalars" / "rank-0" / fmt.part_name(0, 7)
    bad.write_bytes(b"PAR1 not really")
    result = analyze(spiking_run, "--skip-corrupt", "--format", "json")
    assert result.exit_code == 1, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 1
    assert str(bad) in warnings[0]


def test_analyze_empty_run(tmp_path: Path) -> None:
    (tmp_path / fmt.RUN_FILE).write_text(json.dumps({"format_version": fmt.FORMAT_VERSION}))
    result = analyze(tmp_path)
    assert result.exit_code == 2
    assert "run has no recorded steps" in result.stderr


def test_analyze_bad_rule_file(healthy_run: Path, tmp_path: Path) -> None:
    rule = write_rule(tmp_path / "rules", make_rule(id="foo", severity="fatal"))
    result = invoke("analyze", healthy_run, "--no-builtin", "--rules", rule)
    assert result.exit_code == 2
    assert result.stderr == (
        f"runlens: error: {rule}: rule 'foo': field 'severity': 'fatal' is not one of "
        "error, warning, info\n"
    )


def test_analyze_rule_runtime_error(healthy_run: Path) -> None:
    result = invoke("analyze", healthy_run, "--no-builtin", "--rules",
                    RULES_FIXTURES / "read-passwd.yaml", "--fail-on", "never")
    assert result.exit_code == 2
    assert "runlens: error: rule 'read-outside-run': query failed: Permission Error" in (
        result.stderr
    )
    assert "Rule errors (1)" in result.stdout


def test_analyze_rules_folder_without_rule_files(healthy_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-rules"
    empty.mkdir()
    result = invoke("analyze", healthy_run, "--rules", empty)
    assert result.exit_code == 2
    assert result.stderr == f"runlens: error: no rule files (.yaml, .yml) found in {empty}\n"


def test_analyze_no_builtin_without_rules(healthy_run: Path) -> None:
    result = invoke("analyze", healthy_run, "--no-builtin")
    assert result.exit_code == 2
    assert result.stderr == (
        "runlens: error: no rules to evaluate: pass --rules PATH or drop --no-builtin\n"
    )


def test_analyze_rule_timeout(spiking_run: Path, tmp_path: Path) -> None:
    query = ("SELECT NULL AS step_start, NULL AS step_end, sum(hash(a.range * 7 + 1) % 13) "
             "AS n FROM range(100000000000) a WHERE $threshold > 0")
    slow = write_rule(tmp_path / "rules", make_rule(id="slow-rule", query=query, message="{n}"))
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", slow, "--rules",
                    LOSS_RULE, "--rule-timeout", "0.5", "--format", "json")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "runlens: error: rule 'slow-rule': timed out after 0.5 s; raise --rule-timeout or "
        "simplify the query\n"
    )
    report = json.loads(result.stdout)
    assert report["summary"]["findings"]["error"] == 2


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_analyze_rule_timeout_rejected(healthy_run: Path, value: str) -> None:
    result = analyze(healthy_run, "--rule-timeout", value)
    assert result.exit_code == 2
    assert "Invalid value for '--rule-timeout'" in result.stderr


def test_analyze_max_findings(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--set", "loss-above-threshold.threshold=0",
                     "--max-findings", "4", "--format", "json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert len(report["findings"]) == 4
    assert report["warnings"] == [
        "rule 'loss-above-threshold' produced more than 4 findings; the rest are not shown"
    ]


def test_analyze_max_findings_rejected(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--max-findings", "0")
    assert result.exit_code == 2
    assert "Invalid value for '--max-findings'" in result.stderr


def test_analyze_not_evaluated_sorted_by_id(healthy_run: Path, tmp_path: Path) -> None:
    for rule_id in ("zeta", "alpha"):
        write_rule(tmp_path / "rules", make_rule(id=rule_id, requires={"scalars": ["amp_scale"]}))
    args = ["analyze", healthy_run, "--no-builtin", "--rules", tmp_path / "rules"]
    text = invoke(*args).stdout
    assert text.index("alpha: missing") < text.index("zeta: missing")
    markdown = invoke(*args, "--format", "markdown").stdout
    assert markdown.index("| `alpha` |") < markdown.index("| `zeta` |")
    report = json.loads(invoke(*args, "--format", "json").stdout)
    assert [item["rule_id"] for item in report["not_evaluated"]] == ["alpha", "zeta"]


def test_analyze_unknown_option_is_usage_error(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--no-such-option")
    assert result.exit_code == 2
    assert "No such option: --no-such-option" in result.stderr


def test_analyze_bad_format_lists_choices(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--format", "xml")
    assert result.exit_code == 2
    assert "--format xml: unknown format 'xml'; use one of text, json" in result.stderr


def test_analyze_bad_fail_on(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--fail-on", "fatal")
    assert result.exit_code == 2
    assert "'fatal' is not one of 'error', 'warning', 'info', 'never'" in result.stderr


def test_analyze_set_override(healthy_run: Path) -> None:
    result = analyze(healthy_run, "--set", "loss-above-threshold.threshold=1.95",
                     "--format", "json")
    assert result.exit_code == 1, result.output
    steps = [f["step_start"] for f in json.loads(result.stdout)["findings"]]
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("loss-above-threshold.threshold=abc", "param 'threshold' expects a finite number"),
        ("loss-above-threshold.window=3", "has no param 'window'; params: threshold"),
        ("other-rule.threshold=3", "unknown rule 'other-rule'; rules: loss-above-threshold"),
    ],
)
def test_analyze_set_rejected(healthy_run: Path, override: str, problem: str) -> None:
    result = analyze(healthy_run, "--set", override)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: --set {override}: ")
    assert problem in result.stderr


@pytest.mark.parametrize("report_format", ["json", "markdown", "text"])
def test_analyze_output_file(spiking_run: Path, tmp_path: Path, report_format: str) -> None:
    output = tmp_path / f"report.{report_format}"
    result = analyze(spiking_run, "--format", report_format, "-o", output)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "loss-above-threshold" in output.read_text()


def test_analyze_several_formats_one_run(spiking_run: Path, tmp_path: Path) -> None:
    result = analyze(spiking_run, "--format", "text", "--format",
                     f"json={tmp_path / 'report.json'}", "--format",
                     f"markdown={tmp_path / 'report.md'}")
    assert result.exit_code == 1, result.output
    assert "ERROR (2)" in result.stdout
    findings = json.loads((tmp_path / "report.json").read_text())["findings"]
    assert len(findings) == 2
    assert "loss-above-threshold" in (tmp_path / "report.md").read_text()


def test_analyze_unplaced_format_goes_to_output(spiking_run: Path, tmp_path: Path) -> None:
    result = analyze(spiking_run, "--format", f"json={tmp_path / 'a.json'}",
                     "--format", "markdown", "-o", tmp_path / "b.md")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert (tmp_path / "a.json").read_text().startswith("{")
    assert (tmp_path / "b.md").read_text().startswith("#")


@pytest.mark.parametrize(("formats", "problem"), [
    (["--format", "text", "--format", "json"],
     "--format text and --format json: only one format can go to stdout; give the others "
     "a file, as in --format json=report.json"),
    (["--format", "pdf"], "--format pdf: unknown format 'pdf'; use one of text, json"),
    (["--format", "json="], "--format json=: the path after '=' is empty"),
    (["--format", "json=same.out", "--format", "markdown=same.out"],
     "--format: two formats would write same.out; give each its own file"),
    (["--format", "json=a.json", "-o", "b.txt"],
     "--output b.txt: every --format names its own file"),
])
def test_analyze_format_plan_errors(spiking_run: Path, formats: list[str],
                                    problem: str) -> None:
    result = analyze(spiking_run, *formats)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"runlens: error: {problem}")
    assert result.stdout == ""


def test_analyze_output_folder_missing(spiking_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "report.xml"
    result = analyze(spiking_run, "--format", "text", "--format", f"json={missing}")
    assert result.exit_code == 2
    assert result.stderr == (f"runlens: error: report file {missing}: folder "
                             f"{missing.parent} does not exist; create it or write the "
                             "report elsewhere\n")
    assert result.stdout == ""


def test_analyze_output_hard_link_into_run_rejected(spiking_run: Path,
                                                    tmp_path: Path) -> None:
    link = tmp_path / "report.json"
    os.link(spiking_run / "run.json", link)
    before = tree_digest(spiking_run)
    result = analyze(spiking_run, "--format", f"json={link}")
    assert result.exit_code == 2
    assert "is inside the run directory" in result.stderr
    assert tree_digest(spiking_run) == before


def test_analyze_output_inside_run_rejected(spiking_run: Path) -> None:
    result = analyze(spiking_run, "--output", spiking_run / "report.json")
    assert result.exit_code == 2
    assert "is inside the run directory" in result.stderr
    assert not (spiking_run / "report.json").exists()


@pytest.mark.parametrize("report_format", ["text", "json", "markdown"])
def test_analyze_leaves_run_dir_unchanged(
    spiking_run: Path, monkeypatch: pytest.MonkeyPatch, report_format: str
) -> None:
    before = tree_digest(spiking_run)
    monkeypatch.chdir(spiking_run)
    result = invoke("analyze", ".", "--rules", RULES_FIXTURES, "--format", report_format,
                    "--fail-on", "never")
    assert result.exit_code == 2, result.output  # read-outside-run fails in the sandbox
    assert tree_digest(spiking_run) == before
    assert sorted(p.name for p in spiking_run.iterdir()) == ["run.json", "scalars"]


def test_analyze_with_builtin_rules(healthy_run: Path) -> None:
    result = invoke("analyze", healthy_run, "--format", "json")
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["summary"]["errored"] == 0


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"runlens {runlens.__version__}\n"


def test_rules_list_sorted_by_id() -> None:
    result = invoke("rules", "list", "--no-builtin", "--rules", RULES_FIXTURES)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "SEVERITY", "CATEGORY", "TITLE"]
    assert lines[1].split()[:3] == ["amp-scale-collapsed", "warning", "test"]
    assert len(lines) == 5


def test_rules_check_ok() -> None:
    result = invoke("rules", "check", RULES_FIXTURES)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("OK ") == 4
    assert f"OK {RULES_FIXTURES / 'read-passwd.yaml'}: rule 'read-outside-run'" in result.stdout


def test_rules_check_reports_each_problem(tmp_path: Path) -> None:
    good = write_rule(tmp_path, make_rule(id="good"))
    bad = write_rule(tmp_path, make_rule(id="bad", query="CREATE TABLE t AS SELECT $threshold"))
    write_rule(tmp_path, make_rule(id="good"), name="copy.yaml")
    result = invoke("rules", "check", tmp_path)
    assert result.exit_code == 2
    assert f"OK {good}: rule 'good'" in result.stdout
    assert f"runlens: error: {bad}: rule 'bad': field 'query': is a CREATE statement" in (
        result.stderr
    )
    assert "field 'id': also defined in" in result.stderr


def test_rules_check_unknown_column_one_line(tmp_path: Path) -> None:
    query = "SELECT step AS step_start, step AS step_end, los\nFROM scalars WHERE loss > $threshold"
    rule = write_rule(tmp_path, make_rule(query=query))
    result = invoke("rules", "check", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"runlens: error: {rule}: rule 'loss-above-threshold': field 'query': Binder Error: "
    )
    assert result.stderr.count("\n") == 1


def test_rules_check_folder_without_rule_files(tmp_path: Path) -> None:
    result = invoke("rules", "check", tmp_path)
    assert result.exit_code == 2
    assert result.stderr == f"runlens: error: no rule files (.yaml, .yml) found in {tmp_path}\n"


def test_rules_list_no_builtin_without_rules() -> None:
    result = invoke("rules", "list", "--no-builtin")
    assert result.exit_code == 2
    assert result.stderr == (
        "runlens: error: no rules to list: pass --rules PATH or drop --no-builtin\n"
    )


def test_rules_check_missing_path(tmp_path: Path) -> None:
    result = invoke("rules", "check", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: rule file or folder not found" in result.stderr


def run_module(*args: str, code: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "runlens"]
    environment = {key: value for key, value in os.environ.items() if key != "RUNLENS_DEBUG"}
    environment |= {"PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=environment, timeout=120)


def test_module_exit_codes(healthy_run: Path, spiking_run: Path, tmp_path: Path) -> None:
    common = ["--no-builtin", "--rules", LOSS_RULE]
    assert run_module("analyze", str(healthy_run), *common).returncode == 0
    assert run_module("analyze", str(spiking_run), *common).returncode == 1
    missing = run_module("analyze", str(tmp_path / "missing"), *common)
    assert missing.returncode == 2
    assert missing.stderr.startswith("runlens: error: ")
    assert "Traceback" not in missing.stderr
    assert run_module("analyze", str(healthy_run), "--bogus").returncode == 2


BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from runlens.cli import main
sys.argv = ["runlens", *sys.argv[1:]]
try:
    main()
finally:
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "torch")
    print("torch modules:", loaded, file=sys.stderr)
"""


def test_analyze_without_torch(spiking_run: Path) -> None:
    result = run_module("analyze", str(spiking_run), "--rules", str(RULES_FIXTURES),
                        "--format", "json", "--fail-on", "never", code=BLOCK_TORCH)
    assert result.returncode == 2, result.stderr  # read-outside-run fails in the sandbox
    assert "torch modules: ['torch']" in result.stderr
    assert "ImportError" not in result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert {f["rule_id"] for f in findings} == {"loss-above-threshold"}


RAISE_INSIDE_ANALYZE = """
import sys
import runlens.cli

def failing_render(*args):
    raise ValueError("renderer broke\\nsecond line")

runlens.cli.render = failing_render  # an unexpected bug inside the analyze command
sys.argv = ["runlens", *sys.argv[1:]]
runlens.cli.main()
"""


def test_main_internal_error_exit_2(healthy_run: Path) -> None:
    result = run_module("analyze", str(healthy_run), "--no-builtin", "--rules", LOSS_RULE,
                        code=RAISE_INSIDE_ANALYZE)
    assert result.returncode == 2
    assert result.stderr == (
        "runlens: internal error: ValueError: renderer broke second line "
        "(set RUNLENS_DEBUG=1 to see the traceback; please report it)\n"
    )


def test_main_internal_error_debug_traceback(healthy_run: Path) -> None:
    result = run_module("analyze", str(healthy_run), "--no-builtin", "--rules", LOSS_RULE,
                        code=RAISE_INSIDE_ANALYZE, env={"RUNLENS_DEBUG": "1"})
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "in failing_render" in result.stderr
    assert result.stderr.endswith(
        "runlens: internal error: ValueError: renderer broke second line "
        "(set RUNLENS_DEBUG=1 to see the traceback; please report it)\n"
    )


DROP_READ_OVERRIDE = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def run_without_read_override(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as this user, without the capabilities that let root read any file."""
    return subprocess.run(
        [*DROP_READ_OVERRIDE, sys.executable, "-m", "runlens", *args], capture_output=True,
        text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120,
    )


def can_drop_read_override() -> bool:
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run([*DROP_READ_OVERRIDE, "true"], capture_output=True)
    return probe.returncode == 0


needs_unreadable_files = pytest.mark.skipif(
    not can_drop_read_override(),
    reason="needs setpriv with CAP_SETPCAP to drop root's file-read capabilities",
)


@needs_unreadable_files
@pytest.mark.parametrize(
    ("relative", "what"),
    [
        ("run.json", "cannot read"),
        ("scalars", "cannot list table folder"),
        ("scalars/rank-0", "cannot list table folder"),
        ("scalars/rank-0/part-0000-000000.parquet", "cannot read"),
    ],
)
def test_analyze_unreadable_path(tmp_path: Path, relative: str, what: str) -> None:
    run_dir = write_run(tmp_path / "run", {"scalars": steady_scalars()})
    blocked = run_dir / relative
    os.chmod(blocked, 0)
    try:
        result = run_without_read_override("analyze", str(run_dir), "--no-builtin", "--rules",
                                           LOSS_RULE)
    finally:
        os.chmod(blocked, 0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"runlens: error: {blocked}: {what}: permission denied; ")
    assert "this user may read it" in result.stderr
    assert "corrupt" not in result.stderr
    assert "Traceback" not in result.stderr
