"""Configuration files: discovery, every key, precedence with the command line, errors,
and `runlens config`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runlens.cli import app
from conftest import RULES_FIXTURES, make_rule, tree_digest, write_rule

LOSS_RULE = RULES_FIXTURES / "loss-above-threshold.yaml"
DECAY_RULE = RULES_FIXTURES / "decay-on-norm.yaml"
SAMPLE_RUNS = Path(__file__).resolve().parents[1] / "sample_runs"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a .git entry, so that the upward search stops there."""
    folder = tmp_path / "project"
    (folder / ".git").mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


def config_json(*args: object) -> dict:
    result = invoke("config", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def analyze_json(run_dir: Path, *args: object) -> tuple[int, dict]:
    result = invoke("analyze", run_dir, "--format", "json", *args)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def one_error_line(result) -> str:
    """Return the single `runlens: error:` line of a failed command."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("runlens: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------
# Discovery


def test_discovery_searches_upward(project: Path, spiking_run: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(project / "runlens.toml", 'fail-on = "never"\n')
    nested = project / "src" / "train"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)

    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE)

    assert result.exit_code == 0, result.output
    assert config_json()["config_file"] == str(config)


def test_discovery_without_file_uses_defaults(project: Path, spiking_run: Path) -> None:
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE)
    assert result.exit_code == 1, result.output
    described = config_json()
    assert described["config_file"] is None
    assert described["settings"]["fail-on"] == {"value": "error", "source": "default"}


def test_runlens_toml_wins_over_pyproject(project: Path) -> None:
    write_toml(project / "pyproject.toml", """\
        [project]
        name = "demo"

        [tool.runlens]
        fail-on = "warning"
        """)
    config = write_toml(project / "runlens.toml", 'fail-on = "info"\n')

    described = config_json()

    assert described["config_file"] == str(config)
    assert described["settings"]["fail-on"] == {"value": "info", "source": str(config)}


def test_pyproject_without_table_is_skipped(project: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(project / "runlens.toml", 'fail-on = "info"\n')
    package = project / "package"
    write_toml(package / "pyproject.toml", '[project]\nname = "package"\n')
    monkeypatch.chdir(package)

    assert config_json()["config_file"] == str(config)


def test_pyproject_table_is_read(project: Path) -> None:
    config = write_toml(project / "pyproject.toml", """\
        [tool.runlens]
        fail-on = "warning"
        """)
    described = config_json()
    assert described["config_file"] == str(config)
    assert described["settings"]["fail-on"] == {"value": "warning", "source": str(config)}


def test_search_stops_at_git_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "runlens.toml", 'fail-on = "info"\n')
    repository = tmp_path / "repository"
    (repository / ".git").mkdir(parents=True)
    (repository / "sub").mkdir()
    monkeypatch.chdir(repository / "sub")

    described = config_json()

    assert described["config_file"] is None
    assert described["settings"]["fail-on"]["source"] == "default"


def test_config_option_names_file(project: Path, tmp_path: Path) -> None:
    write_toml(project / "runlens.toml", 'fail-on = "info"\n')
    elsewhere = write_toml(tmp_path / "ci" / "strict.toml", 'fail-on = "warning"\n')

    described = config_json("--config", elsewhere)

    assert described["config_file"] == str(elsewhere)
    assert described["settings"]["fail-on"]["value"] == "warning"


def test_config_option_reads_pyproject_table(project: Path, tmp_path: Path) -> None:
    pyproject = write_toml(tmp_path / "other" / "pyproject.toml", """\
        [tool.runlens]
        fail-on = "never"
        """)
    assert config_json("--config", pyproject)["settings"]["fail-on"]["value"] == "never"


def test_no_config_ignores_file(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", 'fail-on = "never"\n')
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                    "--no-config")
    assert result.exit_code == 1, result.output
    assert config_json("--no-config")["config_file"] is None


# ---------------------------------------------------------------------------------------
# Keys


def test_key_select_by_id_and_category(project: Path) -> None:
    rules = project / "rules"
    write_rule(rules, make_rule(id="first-rule", category="alpha"))
    write_rule(rules, make_rule(id="second-rule", category="beta"))
    write_rule(rules, make_rule(id="third-rule", category="gamma"))
    write_toml(project / "runlens.toml", """\
        no-builtin = true
        rules = ["rules"]
        select = ["first-rule", "beta"]
        """)

    rule_set = config_json()["rule_set"]

    assert rule_set["selected_rules"] == ["first-rule", "second-rule"]
    assert rule_set["not_selected"] == ["third-rule"]
    assert rule_set["loaded"] == 3


def test_key_ignore_wins_over_select(project: Path) -> None:
    rules = project / "rules"
    write_rule(rules, make_rule(id="first-rule", category="alpha"))
    write_rule(rules, make_rule(id="second-rule", category="alpha"))
    write_toml(project / "runlens.toml", """\
        no-builtin = true
        rules = ["rules"]
        select = ["alpha"]
        ignore = ["second-rule"]
        """)

    rule_set = config_json()["rule_set"]

    assert rule_set["selected_rules"] == ["first-rule"]
    assert rule_set["ignored"] == ["second-rule"]


def test_key_ignore_keeps_rule_from_running(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", """\
        no-builtin = true
        rules = ["rules"]
        ignore = ["loss-above-threshold"]
        """)
    write_rule(project / "rules", make_rule())
    write_rule(project / "rules", make_rule(id="other-rule", query=(
        "SELECT step AS step_start, step AS step_end, loss FROM scalars "
        "WHERE loss > $threshold * 100 ORDER BY step")))

    code, report = analyze_json(spiking_run)

    assert code == 0
    assert report["summary"]["rules"] == 1
    assert report["passed"] == ["other-rule"]


def test_key_severity_changes_findings(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", """\
        [severity]
        loss-above-threshold = "warning"
        """)

    code, report = analyze_json(spiking_run, "--no-builtin", "--rules", LOSS_RULE)

    assert code == 0
    assert [finding["severity"] for finding in report["findings"]] == ["warning", "warning"]
    assert report["summary"]["findings"] == {"error": 0, "warning": 2, "info": 0}
    listed = invoke("rules", "list", "--no-builtin", "--rules", LOSS_RULE)
    assert "loss-above-threshold  warning" in listed.stdout


def test_key_severity_on_sample_run(project: Path) -> None:
    run_dir = SAMPLE_RUNS / "loss-spike"
    before = tree_digest(run_dir)
    write_toml(project / "runlens.toml", """\
        [severity]
        loss-spike = "error"
        """)

    code, report = analyze_json(run_dir)

    assert code == 1
    assert [f["severity"] for f in report["findings"] if f["rule_id"] == "loss-spike"] == [
        "error"]
    assert tree_digest(run_dir) == before


def test_key_params_sets_value(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", """\
        [params.loss-above-threshold]
        threshold = 10
        """)

    code, report = analyze_json(spiking_run, "--no-builtin", "--rules", LOSS_RULE)

    assert code == 0
    assert report["findings"] == []
    params = config_json("--no-builtin", "--rules", LOSS_RULE)["settings"]["params"]
    # An integer for a number param is bound as a float, as --set parses it.
    assert params == {"loss-above-threshold": {
        "threshold": {"value": 10.0, "source": str(project / "runlens.toml")}}}


def test_key_params_pyproject_dotted(project: Path, spiking_run: Path) -> None:
    write_toml(project / "pyproject.toml", """\
        [tool.runlens.params]
        loss-above-threshold.threshold = 8.5
        """)
    code, report = analyze_json(spiking_run, "--no-builtin", "--rules", LOSS_RULE)
    assert code == 1
    assert len(report["findings"]) == 2
    code, report = analyze_json(spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                                "--set", "loss-above-threshold.threshold=9.5")
    assert code == 0


def test_key_fail_on(project: Path, spiking_run: Path, tmp_path: Path) -> None:
    rule = write_rule(tmp_path / "warning-rules", make_rule(severity="warning"))
    args = ["analyze", spiking_run, "--no-builtin", "--rules", rule]
    assert invoke(*args).exit_code == 0
    write_toml(project / "runlens.toml", 'fail-on = "warning"\n')
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "--fail-on warning fails on" in result.stdout


def test_key_rules_relative_to_file(project: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_rule(project / "ci" / "rules", make_rule(id="project-rule"))
    config = write_toml(project / "runlens.toml", 'rules = ["ci/rules"]\n')
    (project / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(project / "deep" / "er")

    listed = invoke("rules", "list")
    described = config_json()

    assert listed.exit_code == 0, listed.output
    assert "project-rule" in listed.stdout
    assert "loss-spike" in listed.stdout
    assert described["settings"]["rules"] == [
        {"value": str(project / "ci" / "rules"), "source": str(config)}]


def test_key_no_builtin(project: Path) -> None:
    write_rule(project / "rules", make_rule(id="only-rule"))
    write_toml(project / "runlens.toml", 'no-builtin = true\nrules = ["rules"]\n')

    listed = invoke("rules", "list")

    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[1:] == [
        "only-rule  error     test      Loss above a threshold"]


def test_key_no_builtin_without_rules(project: Path) -> None:
    config = write_toml(project / "runlens.toml", "no-builtin = true\n")
    line = one_error_line(invoke("rules", "list"))
    assert line.startswith(f"runlens: error: {config}: key 'no-builtin': ")
    assert "add a 'rules' key, pass --rules PATH, or pass --builtin" in line


# ---------------------------------------------------------------------------------------
# Precedence


def test_command_line_fail_on_replaces_file(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", 'fail-on = "never"\n')
    result = invoke("analyze", spiking_run, "--no-builtin", "--rules", LOSS_RULE,
                    "--fail-on", "error")
    assert result.exit_code == 1, result.output
    described = config_json("--fail-on", "error")
    assert described["settings"]["fail-on"] == {"value": "error", "source": "command line"}


def test_command_line_set_wins_over_params(project: Path, spiking_run: Path) -> None:
    write_toml(project / "runlens.toml", """\
        [params.loss-above-threshold]
        threshold = 10.0
        """)
    args = ["--no-builtin", "--rules", LOSS_RULE, "--set", "loss-above-threshold.threshold=5"]

    code, report = analyze_json(spiking_run, *args)
    params = config_json(*args)["settings"]["params"]

    assert code == 1
    assert len(report["findings"]) == 2
    assert params["loss-above-threshold"]["threshold"] == {"value": 5.0,
                                                           "source": "command line"}


def test_command_line_rules_add_to_file(project: Path, tmp_path: Path) -> None:
    write_rule(project / "rules", make_rule(id="file-rule"))
    cli_rule = write_rule(tmp_path / "extra", make_rule(id="cli-rule"))
    config = write_toml(project / "runlens.toml", 'no-builtin = true\nrules = ["rules"]\n')

    described = config_json("--rules", cli_rule)

    assert described["settings"]["rules"] == [
        {"value": str(project / "rules"), "source": str(config)},
        {"value": str(cli_rule), "source": "command line"},
    ]
    assert described["rule_set"]["selected_rules"] == ["file-rule", "cli-rule"]


def test_command_line_select_ignore_replace_file(project: Path) -> None:
    write_rule(project / "rules", make_rule(id="first-rule", category="alpha"))
    write_rule(project / "rules", make_rule(id="second-rule", category="beta"))
    write_toml(project / "runlens.toml", """\
        no-builtin = true
        rules = ["rules"]
        select = ["alpha"]
        ignore = ["first-rule"]
        """)
    with_file = invoke("config")
    assert with_file.exit_code == 2
    assert "no rules left to evaluate" in with_file.stderr

    described = config_json("--select", "beta,first-rule", "--ignore", "second-rule")

    assert described["settings"]["select"] == {"value": ["beta", "first-rule"],
                                               "source": "command line"}
    assert described["settings"]["ignore"] == {"value": ["second-rule"],
                                               "source": "command line"}
    assert described["rule_set"]["selected_rules"] == ["first-rule"]


def test_command_line_builtin_overrides_file(project: Path) -> None:
    write_rule(project / "rules", make_rule(id="only-rule"))
    write_toml(project / "runlens.toml", 'no-builtin = true\nrules = ["rules"]\n')

    described = config_json("--builtin")

    assert described["settings"]["no-builtin"] == {"value": False, "source": "command line"}
    assert "loss-spike" in described["rule_set"]["selected_rules"]
    assert "only-rule" in described["rule_set"]["selected_rules"]


# ---------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the key, exit 2

ERROR_CASES = [
    ('fail_on = "never"\n', "fail_on", "did you mean 'fail-on'?"),
    ('select = "loss-above-threshold"\n', "select", 'write it as select = ['),
    ('ignore = ["no-such-rule"]\n', "ignore[0]", "unknown rule id or category"),
    ('fail-on = "fatal"\n', "fail-on", "use one of error, warning, info, never"),
    ("no-builtin = 1\n", "no-builtin", "expected true or false, got integer 1"),
    ('rules = ["missing-folder"]\n', "rules[0]", "rule file or folder not found"),
    ('rules = "rules"\n', "rules", 'write it as rules = ["ci/rules"]'),
    ('[severity]\nloss-above-threshold = "fatal"\n', "severity.loss-above-threshold",
     "use one of error, warning, info"),
    ('[severity]\nloss-above-treshold = "info"\n', "severity.loss-above-treshold",
     "did you mean 'loss-above-threshold'?"),
    ("[params.loss-above-threshold]\nlimit = 3.0\n", "params.loss-above-threshold.limit",
     "has no param 'limit'; params: threshold"),
    ('[params.loss-above-threshold]\nthreshold = "3.0"\n',
     "params.loss-above-threshold.threshold", "write the value without quotes"),
    ("[params.loss-above-threshold]\nthreshold = -1.0\n",
     "params.loss-above-threshold.threshold", "-1.0 is below the minimum 0.0"),
    ("[params.loss-above-threshold]\nthreshold = nan\n",
     "params.loss-above-threshold.threshold", "expects a finite number"),
    ("[params.no-such-rule]\nthreshold = 3.0\n", "params.no-such-rule",
     "unknown rule id 'no-such-rule'"),
    ("params = 3\n", "params", "write it as [params.clipping-every-step]"),
    ("waivers = 3\n", "waivers", "write each waiver as a [[waivers]] section"),
]


@pytest.mark.parametrize(("text", "key", "fix"), ERROR_CASES)
def test_config_error(project: Path, text: str, key: str, fix: str) -> None:
    config = write_toml(project / "runlens.toml", text)
    for command in (["config"], ["rules", "list"]):
        line = one_error_line(invoke(*command, "--no-builtin", "--rules", LOSS_RULE))
        assert line.startswith(f"runlens: error: {config}: key '{key}': "), line
        assert fix in line


def test_config_error_in_analyze(project: Path, spiking_run: Path) -> None:
    config = write_toml(project / "runlens.toml", 'fail-on = "fatal"\n')
    before = tree_digest(spiking_run)
    line = one_error_line(invoke("analyze", spiking_run))
    assert line.startswith(f"runlens: error: {config}: key 'fail-on': ")
    assert tree_digest(spiking_run) == before


def test_pyproject_error_names_table_key(project: Path) -> None:
    config = write_toml(project / "pyproject.toml", """\
        [tool.runlens]
        fail-on = "fatal"
        """)
    line = one_error_line(invoke("config"))
    assert line.startswith(f"runlens: error: {config}: key 'tool.runlens.fail-on': ")


def test_invalid_toml(project: Path) -> None:
    config = write_toml(project / "runlens.toml", "fail-on = \n")
    line = one_error_line(invoke("config"))
    assert line.startswith(f"runlens: error: {config}: invalid TOML: ")
    assert "line 1" in line
    assert line.endswith("fix the syntax, or pass --no-config to ignore the file")


def test_several_problems_one_line_each(project: Path) -> None:
    write_toml(project / "runlens.toml", 'fail-on = "fatal"\nno-builtin = "yes"\n')
    result = invoke("config")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert "key 'fail-on'" in lines[0]
    assert "key 'no-builtin'" in lines[1]


def test_config_file_not_found(project: Path) -> None:
    line = one_error_line(invoke("config", "--config", "missing.toml"))
    assert line == ("runlens: error: missing.toml: configuration file not found; fix the "
                    "path given to --config")


def test_config_pyproject_without_table(project: Path) -> None:
    pyproject = write_toml(project / "pyproject.toml", '[project]\nname = "demo"\n')
    line = one_error_line(invoke("config", "--config", pyproject))
    assert line == (f"runlens: error: {pyproject}: has no [tool.runlens] table; add one, "
                    "or pass a runlens.toml with --config")


def test_config_and_no_config_conflict(project: Path) -> None:
    line = one_error_line(invoke("config", "--config", "a.toml", "--no-config"))
    assert "contradict each other; pass only one of them" in line


def test_unknown_select_option(project: Path) -> None:
    line = one_error_line(invoke("config", "--select", "no-such-rule"))
    assert line.startswith("runlens: error: --select no-such-rule: unknown rule id or "
                           "category 'no-such-rule'; ")


def test_set_error_with_config(project: Path) -> None:
    write_toml(project / "runlens.toml", "[params.loss-above-threshold]\nthreshold = 3.0\n")
    line = one_error_line(invoke("config", "--no-builtin", "--rules", LOSS_RULE,
                                 "--set", "loss-above-threshold.threshold=abc"))
    assert "--set loss-above-threshold.threshold=abc: param 'threshold' expects" in line


# ---------------------------------------------------------------------------------------
# runlens config


def test_config_text_shows_sources(project: Path) -> None:
    config = write_toml(project / "runlens.toml", """\
        fail-on = "warning"
        ignore = ["decay-on-norm-or-bias"]

        [severity]
        loss-above-threshold = "info"

        [params.loss-above-threshold]
        threshold = 7.5
        """)
    result = invoke("config", "--no-builtin", "--rules", LOSS_RULE, "--rules", DECAY_RULE,
                    "--set", "loss-above-threshold.threshold=6")

    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[0] == f"Configuration file: {config} (found from {project} upward)"
    assert f"fail-on warning {config}" in lines
    assert "no-builtin true command line" in lines
    assert f"rules {LOSS_RULE} command line" in lines
    assert "select all rules default" in lines
    assert f"ignore decay-on-norm-or-bias {config}" in lines
    assert f"severity loss-above-threshold = info {config}" in lines
    assert "params loss-above-threshold.threshold = 6.0 command line" in lines
    assert "waivers (none) default" in lines
    assert "Rule set: 1 of 2 loaded rules selected" in lines
    assert "ignored: decay-on-norm-or-bias" in lines
    assert "severity overrides: 1" in lines
    assert "params set: 1" in lines


def test_config_json_rule_set(project: Path) -> None:
    write_toml(project / "runlens.toml", """\
        select = ["optimization"]
        ignore = ["clipping-every-step"]

        [severity]
        loss-spike = "error"
        """)
    described = config_json()

    rule_set = described["rule_set"]
    assert rule_set["selected"] == len(rule_set["selected_rules"])
    assert "clipping-every-step" in rule_set["ignored"]
    assert "clipping-every-step" not in rule_set["selected_rules"]
    assert "non-finite-values" in rule_set["not_selected"]
    assert rule_set["severity_overrides"] == 1
    assert rule_set["loaded"] == (rule_set["selected"] + len(rule_set["ignored"])
                                  + len(rule_set["not_selected"]))
    assert described["settings"]["select"]["value"] == ["optimization"]


def test_config_defaults_without_file(project: Path) -> None:
    result = invoke("config")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == (
        f"Configuration file: none found from {project} upward")
    described = config_json()
    settings = described["settings"]
    assert settings["no-builtin"] == {"value": False, "source": "default"}
    assert settings["select"] == {"value": None, "source": "default"}
    assert settings["ignore"] == {"value": [], "source": "default"}
    assert settings["rules"] == []
    assert settings["severity"] == {}
    assert settings["params"] == {}
    assert settings["waivers"] == []
    assert described["rule_set"]["ignored"] == []
